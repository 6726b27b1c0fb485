//! Compiles the handid.v1 API (client and server) and writes the descriptor
//! set that gRPC reflection serves.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("handid_v1_descriptor.bin"))
        .compile_protos(&["handid/v1/handid.proto"], &["."])?;
    println!("cargo:rerun-if-changed=handid/v1/handid.proto");
    Ok(())
}
