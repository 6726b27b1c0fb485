//! `losses:` of a training stage: which terms, on which features, with
//! which weights. An absent term is off.

use serde::{Deserialize, Serialize};

/// Loss terms; an absent term is off.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    /// Identity cross-entropy on every classifier's logits (summed over the
    /// branches, as CLIP-ReID's `make_loss.py` sums `ID_LOSS` over its two).
    pub id: Option<IdLoss>,
    /// Batch-hard triplet on each of `triplet.features` (summed).
    pub triplet: Option<TripletLoss>,
    /// Center loss on the first branch's feature.
    pub center: Option<CenterLossConfig>,
    /// Supervised contrastive loss between images (the dissertation's), on
    /// the normalised first branch feature.
    pub sup_con: Option<SupConLoss>,
    /// Image-to-text cross-entropy against the stage-1 text features
    /// (CLIP-ReID only).
    pub i2t: Option<I2tLoss>,
    /// Image-text supervised contrastive loss, both directions, between the
    /// projected image feature and a text feature (PromptSG's composed
    /// prompt, or CLIP-ReID's stage-1 prompt of the person).
    pub image_text: Option<ImageTextLoss>,
}

/// An image feature a loss can be applied to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainFeature {
    /// Before the image tower's last block: the class token entering the
    /// ViT's last block, a ResNet's average-pooled `layer3` (CLIP-ReID's
    /// `img_feature_last`).
    Penultimate,
    /// The ViT's `ln_post(class token)`, a ResNet's average-pooled final
    /// map (CLIP-ReID's `img_feature`).
    Backbone,
    /// CLIP's projected image feature (`img_feature_proj`).
    Projected,
    /// PromptSG's language-guided feature (the interaction module's output).
    Fused,
}

/// Identity loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdLoss {
    /// Weight (CLIP-ReID's `ID_LOSS_WEIGHT`: 0.25 for ViT-B/16, 1 for RN50).
    pub weight: f64,
    /// Label smoothing ε (Szegedy et al. 2016; CLIP-ReID: 0.1).
    pub label_smoothing: f64,
}

impl Default for IdLoss {
    fn default() -> Self {
        Self {
            weight: 1.0,
            label_smoothing: 0.1,
        }
    }
}

/// Batch-hard triplet loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TripletLoss {
    /// Weight of each feature's term.
    pub weight: f64,
    /// Margin; `null`: soft margin.
    pub margin: Option<f64>,
    /// L2-normalise the features first.
    pub normalize: bool,
    /// The features, one term each; empty: the feature of each branch
    /// (what its BNNeck and classifier see). CLIP-ReID: `[penultimate,
    /// backbone, projected]`.
    pub features: Vec<TrainFeature>,
}

impl Default for TripletLoss {
    fn default() -> Self {
        Self {
            weight: 1.0,
            margin: Some(0.3),
            normalize: false,
            features: Vec::new(),
        }
    }
}

/// Center loss (Wen et al., ECCV 2016, as Bag of Tricks uses it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CenterLossConfig {
    /// Weight (BoT: 0.0005).
    pub weight: f64,
    /// Learning rate of the centres' own SGD (BoT: 0.5).
    pub lr: f64,
}

impl Default for CenterLossConfig {
    fn default() -> Self {
        Self {
            weight: 0.0005,
            lr: 0.5,
        }
    }
}

/// Supervised contrastive loss between images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SupConLoss {
    /// Final weight.
    pub weight: f64,
    /// Temperature (SupCon paper: 0.07; CLIP-FH: 0.1).
    pub temperature: f64,
    /// Epochs over which the weight ramps linearly from 0 to `weight`.
    pub ramp_epochs: u64,
}

impl Default for SupConLoss {
    fn default() -> Self {
        Self {
            weight: 1.0,
            temperature: 0.07,
            ramp_epochs: 0,
        }
    }
}

impl SupConLoss {
    /// The weight in (0-based) `epoch`.
    pub fn weight_at(&self, epoch: u64) -> f64 {
        if self.ramp_epochs == 0 {
            self.weight
        } else {
            self.weight * ((epoch + 1) as f64 / self.ramp_epochs as f64).min(1.0)
        }
    }
}

/// Image-to-text cross-entropy (CLIP-ReID stage 2, eq. 5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct I2tLoss {
    /// Weight (CLIP-ReID's `I2T_LOSS_WEIGHT`: 1).
    pub weight: f64,
    /// Label smoothing ε (CLIP-ReID applies its `CrossEntropyLabelSmooth`,
    /// ε = 0.1, when `IF_LABELSMOOTH` is on).
    pub label_smoothing: f64,
}

impl Default for I2tLoss {
    fn default() -> Self {
        Self {
            weight: 1.0,
            label_smoothing: 0.1,
        }
    }
}

/// Image-text supervised contrastive loss, both directions (PromptSG eqs.
/// 4-6; for CLIP-ReID, the dissertation's v5 image stage): the cosine of
/// each L2-normalised image feature with each text feature over a
/// temperature, every same-person pair a positive. The text side is
/// PromptSG's composed prompt of each image, or CLIP-ReID's frozen stage-1
/// prompt of each image's person.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageTextLoss {
    /// Weight λ of each direction (PromptSG eq. 10: 0.5).
    pub weight: f64,
    /// Temperature τ; absent: CLIP's own (`1 / exp(logit_scale)`, frozen),
    /// as PromptSG eq. 1 introduces it (the paper gives no value).
    pub temperature: Option<f64>,
}

impl Default for ImageTextLoss {
    fn default() -> Self {
        Self {
            weight: 0.5,
            temperature: None,
        }
    }
}
