//! CLIP's image tower, whichever backbone the config names.

use std::borrow::Borrow;

use serde::{Deserialize, Serialize};
use tch::{Tensor, nn};

use crate::config::{Backbone, ClipVisionConfig};
use crate::error::{Error, Result};
use crate::resnet::ModifiedResNet;
use crate::vit::VisionTransformer;

/// Which output of the image tower is the embedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Feature {
    /// CLIP's image feature in the joint space (`... @ visual.proj`): `output_dim` wide.
    Projected,
    /// The ViT's `ln_post(class token)` before the projection (CLIP-ReID's
    /// `img_feature`): `width` wide. ViT only.
    ClassToken,
    /// PromptSG's language-guided feature (`output_dim` wide): the
    /// interaction module over the projected patch tokens with the cached
    /// simplified prompt as its query ([`crate::promptsg::PromptSgHead`]).
    /// The checkpoint holds `promptsg.interaction.*` and
    /// `promptsg.simplified_text` besides the image tower.
    PromptSg {
        /// Attention heads of the interaction module.
        heads: i64,
        /// Self-attention blocks of the interaction module.
        blocks: i64,
    },
}

/// `model.visual` of OpenAI CLIP `model.py`.
#[derive(Debug)]
pub enum ImageEncoder {
    /// A vision transformer.
    Vit(VisionTransformer),
    /// A modified ResNet.
    ModifiedResnet(ModifiedResNet),
}

impl ImageEncoder {
    /// Creates the encoder under `p` (normally `root / "visual"`) after validating `cfg`.
    pub fn new<'a>(p: impl Borrow<nn::Path<'a>>, cfg: &ClipVisionConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(match cfg.backbone {
            Backbone::Vit { patch_size, layers } => {
                ImageEncoder::Vit(VisionTransformer::new(p, cfg, patch_size, layers))
            }
            Backbone::ModifiedResnet { layers } => {
                ImageEncoder::ModifiedResnet(ModifiedResNet::new(p, cfg, layers))
            }
        })
    }

    /// The width of `feature` for this config, or an error when the backbone lacks it.
    pub fn feature_dim(cfg: &ClipVisionConfig, feature: Feature) -> Result<i64> {
        match (feature, &cfg.backbone) {
            (Feature::Projected | Feature::PromptSg { .. }, _) => Ok(cfg.output_dim),
            (Feature::ClassToken, Backbone::Vit { .. }) => Ok(cfg.width),
            (Feature::ClassToken, Backbone::ModifiedResnet { .. }) => Err(Error::InvalidInput(format!(
                "a modified ResNet ({}) has no class token feature",
                cfg.architecture()
            ))),
        }
    }

    /// The chosen feature `[batch, dim]` and the patch tokens projected into
    /// the joint space `[batch, n, output_dim]` (ViT: `ln_post(patch) @ proj`,
    /// see [`VisionTransformer::project_tokens`]; ResNet: the final feature
    /// map through the attention pool's value path, see
    /// [`ModifiedResNet::project_tokens`]), from one pass. PromptSG's
    /// interaction module attends over these tokens.
    pub fn forward_feature_and_tokens(&self, pixels: &Tensor, feature: Feature) -> Result<(Tensor, Tensor)> {
        match self {
            ImageEncoder::Vit(vit) => {
                let out = vit.forward(pixels)?;
                let tokens = vit.project_tokens(&out.tokens);
                Ok(match feature {
                    Feature::Projected | Feature::PromptSg { .. } => (out.pooled, tokens),
                    Feature::ClassToken => (out.cls, tokens),
                })
            }
            ImageEncoder::ModifiedResnet(resnet) => match feature {
                Feature::Projected | Feature::PromptSg { .. } => {
                    let (pooled, tokens) = resnet.forward_pooled_and_tokens(pixels)?;
                    Ok((pooled, resnet.project_tokens(&tokens)))
                }
                Feature::ClassToken => Err(Error::InvalidInput(
                    "a modified ResNet has no class token feature".to_owned(),
                )),
            },
        }
    }

    /// `[batch, 3, H, W]` -> `[batch, dim]`, the chosen feature (not
    /// normalised). [`Feature::PromptSg`] needs the interaction module too:
    /// [`crate::promptsg::PromptSgHead::forward`] over
    /// [`ImageEncoder::forward_feature_and_tokens`].
    pub fn forward_feature(&self, pixels: &Tensor, feature: Feature) -> Result<Tensor> {
        if let Feature::PromptSg { .. } = feature {
            return Err(Error::InvalidInput(
                "the PromptSG feature needs the interaction module (PromptSgHead), not the image tower alone"
                    .to_owned(),
            ));
        }
        match self {
            ImageEncoder::Vit(vit) => {
                let out = vit.forward(pixels)?;
                Ok(match feature {
                    Feature::ClassToken => out.cls,
                    Feature::Projected | Feature::PromptSg { .. } => out.pooled,
                })
            }
            ImageEncoder::ModifiedResnet(resnet) => match feature {
                Feature::Projected | Feature::PromptSg { .. } => resnet.forward(pixels),
                Feature::ClassToken => Err(Error::InvalidInput(
                    "a modified ResNet has no class token feature".to_owned(),
                )),
            },
        }
    }
}
