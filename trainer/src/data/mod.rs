//! Training data pipeline.

mod augment;
mod loader;
mod sampler;

pub use augment::{Augment, AugmentConfig};
pub use loader::{Batch, Item, Loader};
pub use sampler::{PkSampler, SamplerError};
