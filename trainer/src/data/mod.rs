//! Training data pipeline: identity sampling, augmentation, parallel loading.

mod augment;
mod loader;
mod sampler;

pub use augment::{Augment, AugmentConfig, ColorJitter, RandomAffine};
pub use loader::{Batch, Item, Loader, PREFETCH_BATCHES};
pub use sampler::{PkSampler, Sampler, SamplerError};
