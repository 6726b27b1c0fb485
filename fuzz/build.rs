include!("../build-support/libtorch_rpath.rs");

fn main() {
    embed_libtorch_rpath();
}
