//! handid-trainer: fine-tunes CLIP for hand identity.
//!
//! # Layout
//! - [`commands`]: the subcommands of the `handid-trainer` binary, one file
//!   each, public so that end-to-end tests drive them in-process.
//! - [`data`]: the training data pipeline (P x K identity sampler).
//! - [`engine`]: training building blocks (learning-rate schedules).
//! - [`losses`]: one loss per file, each citing its paper.

pub mod commands;
pub mod data;
pub mod engine;
pub mod losses;
