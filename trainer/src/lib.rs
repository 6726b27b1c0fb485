//! handid-trainer: fine-tunes CLIP for hand identity.
//!
//! # Layout
//! - [`data`]: the training data pipeline (P x K identity sampler).
//! - [`losses`]: one loss per file, each citing its paper.

pub mod data;
pub mod losses;
