include!("../build-support/libtorch_rpath.rs");

fn main() {
    // The binary does not link libtorch; its tests do, through the server
    // they start.
    embed_libtorch_rpath();
}
