//! handid-trainer: fine-tunes CLIP for hand identity.
//!
//! # Layout
//! - [`commands`]: the subcommands of the `handid-trainer` binary, one file
//!   each, public so that end-to-end tests drive them in-process.
//! - [`config`]: the YAML training configuration.
//! - [`data`]: the training data pipeline (P x K identity sampler,
//!   augmentation, parallel decoding).
//! - [`net`]: the network trained (CLIP + re-id head).
//! - [`engine`]: optimizers, schedules, the training loop, checkpoints.
//! - [`losses`]: one loss per file, each citing its paper.
//! - [`compat`]: backward-compatible training (the influence loss through
//!   an old model's frozen classifier).
//! - [`export`]: training checkpoint -> serving checkpoint with calibrated thresholds.

// Unit tests may unwrap: a panic there is a test failure with a location.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod commands;
pub mod compat;
pub mod config;
pub mod data;
pub mod engine;
pub mod export;
pub mod losses;
pub mod net;
