//! Arbitrary bytes as every request message of the HandId and Admin
//! services, validated as the handlers do
//! (`handid_server::fuzzing::requests` says what must hold).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    handid_server::fuzzing::requests(data);
});
