//! Compiles the handid.v1 API (client and server), writes the descriptor
//! set that gRPC reflection serves, and generates the proto3 JSON mapping
//! (serde) of every message for the HTTP gateway.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let descriptors = out.join("handid_v1_descriptor.bin");
    // The well-known types with their JSON forms (a Timestamp is an
    // RFC 3339 string), so the messages that hold them serialise too.
    let mut config = tonic_prost_build::Config::new();
    config.prost_types_path("::pbjson_types");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptors)
        .compile_with_config(config, &["handid/v1/handid.proto"], &["."])?;
    let set = std::fs::read(&descriptors)?;
    pbjson_build::Builder::new()
        .register_descriptors(&set)?
        // Every field in a response, defaults included: `"isMatch": false`
        // rather than an absent key.
        .emit_fields()
        .build(&[".handid.v1"])?;
    println!("cargo:rerun-if-changed=handid/v1/handid.proto");
    Ok(())
}
