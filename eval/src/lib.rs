//! Datasets, reproducible splits and re-identification metrics (pure Rust).
