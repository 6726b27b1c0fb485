// Shared by the build scripts of every crate whose binaries or tests link
// libtorch (`include!`d, so each stays a one-liner).
//
// Embeds libtorch's real `lib` folder as the binaries' RUNPATH, so they run
// without LD_LIBRARY_PATH. The real path matters: libtorch finds the CUDA
// runtime wheels through `$ORIGIN/../../nvidia/...` (DESIGN.md). An
// LD_LIBRARY_PATH set at run time still wins, which is how a GPU host points
// a binary at its own CUDA-enabled torch.
fn embed_libtorch_rpath() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Some(dir) = std::env::var_os("LIBTORCH") {
        let lib = std::path::Path::new(&dir).join("lib");
        let lib = lib.canonicalize().unwrap_or(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
