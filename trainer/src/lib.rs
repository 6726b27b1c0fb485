//! handid-trainer: fine-tunes CLIP for hand identity.
//!
//! # Layout
//! - [`data`]: the training data pipeline (P x K identity sampler, augmentation,
//!   parallel deterministic loader).
//! - [`engine`]: training building blocks (learning-rate schedules).
//! - [`losses`]: one loss per file, each citing its paper.

pub mod data;
pub mod engine;
pub mod losses;
