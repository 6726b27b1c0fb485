include!("../build-support/libtorch_rpath.rs");

fn main() {
    embed_libtorch_rpath();
    // `sqlx::migrate!` and `#[sqlx::test(migrations)]` embed the migrations
    // at compile time: a new or edited one must rebuild this crate.
    println!("cargo:rerun-if-changed=../migrations");
}
