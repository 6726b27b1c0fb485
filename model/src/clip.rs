//! The whole CLIP model: both towers and the logit scale.

use std::borrow::Borrow;

use serde::{Deserialize, Serialize};
use tch::{Tensor, nn};

use crate::config::ClipVisionConfig;
use crate::error::Result;
use crate::text::{ClipTextConfig, TextTransformer};
use crate::visual::{Feature, ImageEncoder};

/// Configuration of a whole CLIP model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipConfig {
    /// The image tower.
    pub vision: ClipVisionConfig,
    /// The text tower.
    pub text: ClipTextConfig,
}

impl ClipConfig {
    /// OpenAI CLIP ViT-B/16.
    pub fn vit_b16() -> Self {
        Self {
            vision: ClipVisionConfig::vit_b16(),
            text: ClipTextConfig::vit_b16(),
        }
    }

    /// OpenAI CLIP RN50.
    pub fn rn50() -> Self {
        Self {
            vision: ClipVisionConfig::rn50(),
            text: ClipTextConfig::rn50(),
        }
    }
}

/// `CLIP` of OpenAI CLIP `model.py`: `visual.*`, the root-level text tower
/// and `logit_scale`.
#[derive(Debug)]
pub struct Clip {
    /// The image tower.
    pub visual: ImageEncoder,
    /// The text tower.
    pub text: TextTransformer,
    /// Log of the temperature of the image-text logits (init ln(1 / 0.07)).
    pub logit_scale: Tensor,
}

impl Clip {
    /// Creates the model under `p`, normally the root path.
    pub fn new<'a>(p: impl Borrow<nn::Path<'a>>, cfg: &ClipConfig) -> Result<Self> {
        let p = p.borrow();
        Ok(Self {
            visual: ImageEncoder::new(p / "visual", &cfg.vision)?,
            text: TextTransformer::new(p, &cfg.text),
            logit_scale: p.var("logit_scale", &[], nn::Init::Const((1.0f64 / 0.07).ln())),
        })
    }

    /// `[batch, 3, H, W]` -> image features `[batch, output_dim]` (not normalised).
    pub fn encode_image(&self, pixels: &Tensor) -> Result<Tensor> {
        self.visual.forward_feature(pixels, Feature::Projected)
    }

    /// Token ids `[batch, tokens]` -> text features `[batch, output_dim]` (not normalised).
    pub fn encode_text(&self, ids: &Tensor) -> Result<Tensor> {
        self.text.forward(ids)
    }
}
