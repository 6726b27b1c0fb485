//! The handid.v1 gRPC API: messages, clients and server traits generated from
//! `proto/handid/v1/handid.proto` (the contract; read its comments).
//!
//! # Layout
//! - [`v1`]: generated code (`hand_id_client`, `hand_id_server`,
//!   `admin_client`, `admin_server` and the messages).
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for gRPC reflection.

/// Generated from `handid/v1/handid.proto`.
#[allow(
    missing_docs,
    unused_qualifications,
    clippy::all,
    missing_debug_implementations
)]
pub mod v1 {
    tonic::include_proto!("handid.v1");
}

/// The encoded `FileDescriptorSet` of the API, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("handid_v1_descriptor");
