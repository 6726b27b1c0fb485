//! handid-model: CLIP in tch for hand-based identity matching.
//!
//! # Layout
//! - [`device`]: choosing `cpu` / `cuda[:N]`, loading libtorch's CUDA library
//!   at run time so one binary serves CPU-only and GPU hosts.
//! - [`error`]: the crate's error type.
//! - [`heads`]: BNNeck, linear and ArcFace classifiers (re-id heads).

pub mod device;
pub mod error;
pub mod heads;

pub use device::{Device, parse_device};
pub use error::{Error, Result};
