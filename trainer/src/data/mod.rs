//! Training data pipeline.

mod sampler;

pub use sampler::{PkSampler, SamplerError};
