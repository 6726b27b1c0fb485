//! Datasets, reproducible splits and re-identification metrics (pure Rust,
//! no libtorch, so its tests run alone and fast).
//!
//! # Layout
//! - [`data`]: dataset readers (11k Hands, `<root>/<person>/<image>`), seeded
//!   splits, manifest files, synthetic identity data;
//! - [`metrics`]: ranking (CMC, Rank-k, mAP, mINP), verification (ROC, TPR at
//!   FMR, EER), open-set (FNIR at FPIR), summaries over splits;
//! - [`embeddings`]: the precomputed-embeddings file (safetensors) and cosine
//!   similarity;
//! - [`report`]: Markdown / JSON / CSV reports and PNG plots over splits;
//! - `error`: the crate's [`Error`] and [`Result`].

// Unit tests may unwrap: a panic there is a test failure with a location.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod data;
pub mod embeddings;
mod error;
pub mod metrics;
pub mod report;

pub use error::{Error, Result};
