//! handid-trainer: fine-tunes CLIP for hand identity.
//!
//! # Layout
//! - [`losses`]: one loss per file, each citing its paper.

pub mod losses;
