//! TEMPORARY stand-in with the interface of branch `parts` (replaced at merge).

use handid_model::Preprocess;
use image::RgbImage;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// Augmentation settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Horizontal flip probability.
    pub hflip_prob: f64,
}

/// Training and evaluation views.
#[derive(Debug)]
pub struct Augment {
    preprocess: Preprocess,
}

impl Augment {
    /// Stand-in.
    pub fn new(_config: AugmentConfig, preprocess: Preprocess) -> anyhow::Result<Self> {
        Ok(Self { preprocess })
    }
    /// Stand-in.
    pub fn train(&self, img: &RgbImage, _rng: &mut ChaCha8Rng) -> anyhow::Result<Tensor> {
        self.eval(img)
    }
    /// Stand-in.
    pub fn eval(&self, img: &RgbImage) -> anyhow::Result<Tensor> {
        Ok(self.preprocess.apply(img)?)
    }
}
