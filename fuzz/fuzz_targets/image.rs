//! Arbitrary bytes as an image sent to a server with default settings:
//! header checks, decode, preprocessing for every kind of checkpoint
//! (`handid_server::fuzzing::image` says what must hold).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        // One intra-op thread: libFuzzer runs one input at a time, and
        // libtorch's pool would only add contention on a small machine.
        tch::set_num_threads(1);
    },
    |data: &[u8]| {
        handid_server::fuzzing::image(data);
    }
);
