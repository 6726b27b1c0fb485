//! CLIP's image tower, whichever backbone the config names.

use std::borrow::Borrow;

use serde::{Deserialize, Serialize};
use tch::{Tensor, nn};

use crate::config::{Backbone, ClipVisionConfig};
use crate::error::{Error, Result};
use crate::resnet::ModifiedResNet;
use crate::vit::VisionTransformer;

/// Which output of the image tower is the embedding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Feature {
    /// CLIP's image feature in the joint space (`... @ visual.proj`): `output_dim` wide.
    #[default]
    Projected,
    /// The ViT's `ln_post(class token)` before the projection (CLIP-ReID's
    /// `img_feature`): `width` wide. ViT only.
    ClassToken,
    /// CLIP-ReID's evaluation feature (`make_model_clipreid.py`,
    /// `torch.cat([img_feature, img_feature_proj], dim=1)`): the backbone
    /// feature (ViT: `ln_post(class token)`; ResNet: the average-pooled
    /// final map) followed by the projected one, `width + output_dim` (ViT)
    /// or `32 * width + output_dim` (ResNet) wide.
    ClipReid,
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

/// Every image feature fine-tuning uses, from one forward pass.
#[derive(Debug)]
pub struct ImageFeatures {
    /// Before the last block: the ViT's class token entering its last block
    /// (no `ln_post`), a ResNet's average-pooled `layer3` (CLIP-ReID's
    /// `img_feature_last`).
    pub penultimate: Tensor,
    /// The backbone feature: the ViT's `ln_post(class token)`, a ResNet's
    /// average-pooled final map (CLIP-ReID's `img_feature`).
    pub backbone: Tensor,
    /// CLIP's image feature in the joint space (`img_feature_proj`).
    pub projected: Tensor,
    /// The patch tokens projected into the joint space `[batch, n,
    /// output_dim]` (see [`ImageEncoder::forward_feature_and_tokens`]), when asked for.
    pub tokens: Option<Tensor>,
}

impl ImageFeatures {
    /// The served feature `feature` (not normalised); PromptSG's needs its
    /// interaction module and is refused here.
    pub fn select(&self, feature: Feature) -> Result<Tensor> {
        match feature {
            Feature::Projected => Ok(self.projected.shallow_clone()),
            Feature::ClassToken => Ok(self.backbone.shallow_clone()),
            Feature::ClipReid => Ok(Tensor::cat(&[&self.backbone, &self.projected], 1)),
            Feature::PromptSg { .. } => Err(Error::InvalidInput(
                "the PromptSG feature needs the interaction module (PromptSgHead), not the image tower alone"
                    .to_owned(),
            )),
        }
    }
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
            Backbone::ModifiedResnet { layers, last_stride } => {
                ImageEncoder::ModifiedResnet(ModifiedResNet::new(p, cfg, layers, last_stride))
            }
        })
    }

    /// The width of `feature` for this config, or an error when the backbone lacks it.
    pub fn feature_dim(cfg: &ClipVisionConfig, feature: Feature) -> Result<i64> {
        match (feature, &cfg.backbone) {
            (Feature::Projected | Feature::PromptSg { .. }, _) => Ok(cfg.output_dim),
            (Feature::ClassToken, Backbone::Vit { .. }) => Ok(cfg.width),
            (Feature::ClipReid, _) => Ok(Self::backbone_dim(cfg) + cfg.output_dim),
            (Feature::ClassToken, Backbone::ModifiedResnet { .. }) => Err(Error::InvalidInput(format!(
                "a modified ResNet ({}) has no class token feature",
                cfg.architecture()
            ))),
        }
    }

    /// Width of [`ImageFeatures::backbone`]: the ViT's width, `32 * width` for a ResNet.
    pub fn backbone_dim(cfg: &ClipVisionConfig) -> i64 {
        match cfg.backbone {
            Backbone::Vit { .. } => cfg.width,
            Backbone::ModifiedResnet { .. } => 32 * cfg.width,
        }
    }

    /// Width of [`ImageFeatures::penultimate`]: the ViT's width, `16 * width` for a ResNet.
    pub fn penultimate_dim(cfg: &ClipVisionConfig) -> i64 {
        match cfg.backbone {
            Backbone::Vit { .. } => cfg.width,
            Backbone::ModifiedResnet { .. } => 16 * cfg.width,
        }
    }

    /// Every feature fine-tuning uses ([`ImageFeatures`]) from one pass;
    /// `train` selects batch statistics for a ResNet's BatchNorms (and
    /// updates their running statistics; a ViT has none), `tokens` asks for
    /// the projected patch tokens too.
    pub fn forward_t(&self, pixels: &Tensor, train: bool, tokens: bool) -> Result<ImageFeatures> {
        Ok(match self {
            ImageEncoder::Vit(vit) => {
                let out = vit.forward(pixels)?;
                ImageFeatures {
                    tokens: tokens.then(|| vit.project_tokens(&out.tokens)),
                    penultimate: out.penultimate,
                    backbone: out.cls,
                    projected: out.pooled,
                }
            }
            ImageEncoder::ModifiedResnet(resnet) => {
                let out = resnet.forward_t(pixels, train)?;
                ImageFeatures {
                    tokens: tokens.then(|| resnet.project_tokens(&out.tokens)),
                    penultimate: out.penultimate,
                    backbone: out.avg,
                    projected: out.pooled,
                }
            }
        })
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
                    Feature::ClipReid => (Tensor::cat(&[out.cls, out.pooled], 1), tokens),
                })
            }
            ImageEncoder::ModifiedResnet(resnet) => match feature {
                Feature::Projected | Feature::PromptSg { .. } => {
                    let (pooled, tokens) = resnet.forward_pooled_and_tokens(pixels)?;
                    Ok((pooled, resnet.project_tokens(&tokens)))
                }
                Feature::ClipReid => {
                    let out = resnet.forward_t(pixels, false)?;
                    let feature = Tensor::cat(&[out.avg, out.pooled], 1);
                    Ok((feature, resnet.project_tokens(&out.tokens)))
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
        match (self, feature) {
            (ImageEncoder::ModifiedResnet(resnet), Feature::Projected) => resnet.forward(pixels),
            (ImageEncoder::ModifiedResnet(_), Feature::ClassToken) => Err(Error::InvalidInput(
                "a modified ResNet has no class token feature".to_owned(),
            )),
            _ => self.forward_t(pixels, false, false)?.select(feature),
        }
    }
}
