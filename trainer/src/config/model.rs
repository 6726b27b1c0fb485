//! `model:`: the architecture, where its weights come from, and which of its
//! outputs is the embedding.

use std::path::PathBuf;

use handid_model::{Backbone, ClipTextConfig, ClipVisionConfig, Feature, Preprocess};
use serde::{Deserialize, Serialize};

/// Architecture presets by name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// CLIP ViT-B/16.
    #[default]
    VitB16,
    /// CLIP RN50.
    Rn50,
    /// CLIP RN101.
    Rn101,
    /// A tiny ViT (tests, CPU demos).
    TinyVit,
    /// A tiny ModifiedResNet (tests).
    TinyResnet,
}

impl Arch {
    /// The image and text towers of the preset.
    pub fn towers(self) -> (ClipVisionConfig, ClipTextConfig) {
        match self {
            Arch::VitB16 => (ClipVisionConfig::vit_b16(), ClipTextConfig::vit_b16()),
            Arch::Rn50 => (ClipVisionConfig::rn50(), ClipTextConfig::rn50()),
            Arch::Rn101 => (ClipVisionConfig::rn101(), ClipTextConfig::vit_b16()),
            Arch::TinyVit => (
                ClipVisionConfig::tiny_vit(),
                tiny_text(ClipVisionConfig::tiny_vit().output_dim),
            ),
            Arch::TinyResnet => (
                ClipVisionConfig::tiny_resnet(),
                tiny_text(ClipVisionConfig::tiny_resnet().output_dim),
            ),
        }
    }
}

/// The tiny text tower with its output width matched to the image tower's.
fn tiny_text(output_dim: i64) -> ClipTextConfig {
    ClipTextConfig {
        output_dim,
        ..ClipTextConfig::tiny()
    }
}

/// What the BatchNorm layers inside a ResNet image tower do while it trains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackboneNorm {
    /// Batch statistics, running statistics updated (PyTorch's
    /// `model.train()`), as CLIP-ReID fine-tunes RN50. With
    /// `unfreeze_last_blocks` the statistics stay frozen whatever this says:
    /// frozen layers must not drift.
    #[default]
    Train,
    /// Running statistics only, never updated (small-batch fine-tuning).
    Frozen,
}

/// The network and where its weights come from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Architecture preset.
    pub arch: Arch,
    /// Replaces the preset's image tower (any size CLIP's code allows).
    pub vision: Option<ClipVisionConfig>,
    /// Replaces the preset's text tower.
    pub text: Option<ClipTextConfig>,
    /// Stride of a ResNet's last stage: 1 as CLIP-ReID trains RN50 (its
    /// `model/clip/model.py` builds `layer4` with stride 1), absent: the
    /// preset's (OpenAI's 2). The attention pool's positional embedding is
    /// resized to the finer grid when CLIP weights load.
    pub last_stride: Option<i64>,
    /// CLIP weights to start from (OpenAI TorchScript `.pt`, open_clip or
    /// Hugging Face safetensors); random CLIP initialisation when absent.
    pub clip_weights: Option<PathBuf>,
    /// Input size `[height, width]`; absent: the preset's square size with
    /// CLIP's resize + centre crop. Present: a plain resize (re-id style).
    pub input_size: Option<[u32; 2]>,
    /// Which output of the image tower is the embedding that is trained
    /// with the metric losses and served: `projected` (default),
    /// `class_token`, or `clip_reid` (the backbone and projected features
    /// concatenated, each with its own BNNeck and classifier, CLIP-ReID's
    /// two branches).
    pub feature: Feature,
    /// Train only the last N blocks of the image tower (transformer blocks,
    /// or bottlenecks of a ResNet) and what follows them; absent: all.
    pub unfreeze_last_blocks: Option<usize>,
    /// A ResNet's BatchNorm layers while training.
    pub backbone_norm: BackboneNorm,
}

impl ModelConfig {
    /// The image tower's configuration.
    pub fn vision(&self) -> ClipVisionConfig {
        let mut vision = self.vision.clone().unwrap_or_else(|| self.arch.towers().0);
        if let (Some(stride), Backbone::ModifiedResnet { last_stride, .. }) =
            (self.last_stride, &mut vision.backbone)
        {
            *last_stride = stride;
        }
        vision
    }

    /// The text tower's configuration.
    pub fn text(&self) -> ClipTextConfig {
        self.text.clone().unwrap_or_else(|| self.arch.towers().1)
    }

    /// How images become input tensors (recorded in the exported manifest).
    pub fn preprocess(&self) -> Preprocess {
        match self.input_size {
            Some([height, width]) => Preprocess::Resize { height, width },
            None => Preprocess::Clip {
                size: self.vision().image_size as u32,
            },
        }
    }

    /// Whether a ResNet's BatchNorm layers use batch statistics in training.
    pub fn trains_backbone_norm(&self) -> bool {
        self.backbone_norm == BackboneNorm::Train && self.unfreeze_last_blocks.is_none()
    }
}
