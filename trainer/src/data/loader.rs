//! TEMPORARY stand-in with the interface of branch `parts` (replaced at merge).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;
use tch::Tensor;

use super::Augment;

/// One image and its label.
#[derive(Debug, Clone)]
pub struct Item {
    /// Image file.
    pub path: PathBuf,
    /// Person index.
    pub label: i64,
}

/// A decoded batch.
#[derive(Debug)]
pub struct Batch {
    /// `[B, 3, H, W]`.
    pub images: Tensor,
    /// `[B]` int64.
    pub labels: Tensor,
    /// Dataset indices.
    pub indices: Vec<usize>,
}

/// Stand-in serial loader.
#[derive(Debug)]
pub struct Loader {
    items: Arc<Vec<Item>>,
    augment: Arc<Augment>,
    seed: u64,
}

impl Loader {
    /// Stand-in.
    pub fn new(
        items: Arc<Vec<Item>>,
        augment: Arc<Augment>,
        _workers: usize,
        _cache: bool,
        seed: u64,
    ) -> Self {
        Self { items, augment, seed }
    }

    /// Stand-in.
    pub fn batches(
        &self,
        batches: Vec<Vec<usize>>,
        epoch: u64,
        train: bool,
    ) -> impl Iterator<Item = anyhow::Result<Batch>> + '_ {
        batches.into_iter().enumerate().map(move |(b, indices)| {
            let mut images = Vec::new();
            let mut labels = Vec::new();
            for (pos, &i) in indices.iter().enumerate() {
                let item = &self.items[i];
                let bytes =
                    std::fs::read(&item.path).with_context(|| format!("reading {}", item.path.display()))?;
                let img = handid_model::decode(&bytes, &handid_model::DecodeLimits::default())
                    .with_context(|| format!("decoding {}", item.path.display()))?;
                let mut rng =
                    ChaCha8Rng::seed_from_u64(self.seed ^ (epoch << 40) ^ ((b as u64) << 16) ^ pos as u64);
                images.push(if train {
                    self.augment.train(&img, &mut rng)?
                } else {
                    self.augment.eval(&img)?
                });
                labels.push(item.label);
            }
            Ok(Batch {
                images: Tensor::stack(&images, 0),
                labels: Tensor::from_slice(&labels),
                indices,
            })
        })
    }
}
