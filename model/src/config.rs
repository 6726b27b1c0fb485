//! Model configurations with presets, deserialisable from YAML.
//!
//! Field names follow OpenAI CLIP `model.py` `CLIP.__init__` (`vision_width`,
//! `vision_layers`, `vision_patch_size`, `image_resolution`, `embed_dim`).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The image tower's backbone and its depth.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Backbone {
    /// `VisionTransformer` (OpenAI CLIP `model.py`).
    Vit {
        /// Side of the square patches (the stride of `conv1`).
        patch_size: i64,
        /// Number of residual attention blocks.
        layers: i64,
    },
    /// `ModifiedResNet` (OpenAI CLIP `model.py`); `width` is the stem width
    /// and the attention pool works on `32 * width` channels.
    ModifiedResnet {
        /// Bottleneck counts of `layer1` .. `layer4`.
        layers: [i64; 4],
        /// Stride of `layer4`: OpenAI's 2, or 1 as CLIP-ReID trains RN50
        /// (`model/clip/model.py`, `_make_layer(width * 8, layers[3],
        /// stride=1)`; Luo et al.'s "last stride" trick), which doubles the
        /// final map and the attention pool's grid.
        #[serde(default = "openai_last_stride", skip_serializing_if = "is_openai_last_stride")]
        last_stride: i64,
    },
}

fn openai_last_stride() -> i64 {
    2
}

fn is_openai_last_stride(stride: &i64) -> bool {
    *stride == openai_last_stride()
}

/// Configuration of CLIP's image encoder (`visual.*`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipVisionConfig {
    /// Backbone kind and depth.
    pub backbone: Backbone,
    /// Transformer width (ViT) or stem width (ResNet: 64 for RN50).
    pub width: i64,
    /// Attention heads.
    pub heads: i64,
    /// Square resolution the positional embedding is laid out for; other
    /// input sizes interpolate it (bicubic).
    pub image_size: i64,
    /// Dimension of the joint image-text space (`visual.proj` columns).
    pub output_dim: i64,
}

impl ClipVisionConfig {
    /// OpenAI CLIP ViT-B/16.
    pub fn vit_b16() -> Self {
        Self {
            backbone: Backbone::Vit {
                patch_size: 16,
                layers: 12,
            },
            width: 768,
            heads: 12,
            image_size: 224,
            output_dim: 512,
        }
    }

    /// OpenAI CLIP RN50.
    pub fn rn50() -> Self {
        Self::resnet([3, 4, 6, 3], 64, 224, 1024)
    }

    /// OpenAI CLIP RN101.
    pub fn rn101() -> Self {
        Self::resnet([3, 4, 23, 3], 64, 224, 512)
    }

    /// OpenAI CLIP RN50x4.
    pub fn rn50x4() -> Self {
        Self::resnet([4, 6, 10, 6], 80, 288, 640)
    }

    /// A one-block-per-stage ResNet of width 4 on 64x64 inputs, for fast tests.
    pub fn tiny_resnet() -> Self {
        Self::resnet([1, 1, 1, 1], 4, 64, 16)
    }

    /// A modified ResNet with OpenAI's head count (`width * 32 / 64`).
    fn resnet(layers: [i64; 4], width: i64, image_size: i64, output_dim: i64) -> Self {
        Self {
            backbone: Backbone::ModifiedResnet {
                layers,
                last_stride: openai_last_stride(),
            },
            width,
            heads: width * 32 / 64,
            image_size,
            output_dim,
        }
    }

    /// A two-block ViT on 32x32 inputs, for fast tests.
    pub fn tiny_vit() -> Self {
        Self {
            backbone: Backbone::Vit {
                patch_size: 8,
                layers: 2,
            },
            width: 32,
            heads: 2,
            image_size: 32,
            output_dim: 16,
        }
    }

    /// A short name of the architecture, recorded in manifests
    /// (`vit-b/16`, `vit-w32-l2-p8`, ...).
    pub fn architecture(&self) -> String {
        match self.backbone {
            Backbone::Vit { patch_size, layers } => {
                if *self == Self::vit_b16() {
                    "vit-b/16".to_owned()
                } else {
                    format!("vit-w{}-l{layers}-p{patch_size}-r{}", self.width, self.image_size)
                }
            }
            Backbone::ModifiedResnet { layers, last_stride } => {
                let named = [
                    (Self::rn50(), "rn50"),
                    (Self::rn101(), "rn101"),
                    (Self::rn50x4(), "rn50x4"),
                ];
                let openai = Self {
                    backbone: Backbone::ModifiedResnet {
                        layers,
                        last_stride: openai_last_stride(),
                    },
                    ..self.clone()
                };
                let name = match named.iter().find(|(preset, _)| *preset == openai) {
                    Some((_, name)) => (*name).to_owned(),
                    None => format!(
                        "resnet-w{}-l{}-{}-{}-{}-r{}",
                        self.width, layers[0], layers[1], layers[2], layers[3], self.image_size
                    ),
                };
                if last_stride == openai_last_stride() {
                    name
                } else {
                    format!("{name}-s{last_stride}")
                }
            }
        }
    }

    /// How many input pixels one position of the final feature map spans:
    /// the patch size of a ViT; 32 for a ResNet (16 with last stride 1).
    pub fn total_stride(&self) -> i64 {
        match self.backbone {
            Backbone::Vit { patch_size, .. } => patch_size,
            Backbone::ModifiedResnet { last_stride, .. } => 16 * last_stride,
        }
    }

    /// Side of the square grid the positional embedding (ViT) or the
    /// attention pool's positional embedding (ResNet) is laid out for.
    pub fn grid(&self) -> i64 {
        self.image_size / self.total_stride()
    }

    /// A lower bound on the image tower's parameters, counted from its
    /// largest weights without allocating anything; `None` when the count
    /// overflows. A ViT has its patch embedding, its positional embedding
    /// and 12 width^2 per block (attention 4, MLP 8); a ResNet the 3x3
    /// convolution of every bottleneck (9 planes^2, planes doubling by stage
    /// from the width) and its attention pool on 32 x width channels (query,
    /// key and value projections, positional embedding); both their output
    /// projection. A weights file must hold at least this many values, so a
    /// manifest naming layers or widths its weights cannot hold is refused
    /// before the tower is built ([`crate::Embedder::load`]): building it
    /// first would allocate what the manifest asks, terabytes from one
    /// edited number.
    pub fn parameter_floor(&self) -> Option<u128> {
        let count = |n: i64| u128::try_from(n).ok();
        let (width, out) = (count(self.width)?, count(self.output_dim)?);
        let grid = count(self.grid())?;
        let positions = grid.checked_mul(grid)?.checked_add(1)?;
        match self.backbone {
            Backbone::Vit { patch_size, layers } => {
                let patch = count(patch_size)?;
                let stem = width.checked_mul(3)?.checked_mul(patch.checked_mul(patch)?)?;
                let blocks = count(layers)?.checked_mul(width.checked_mul(width)?.checked_mul(12)?)?;
                stem.checked_add(positions.checked_mul(width)?)?
                    .checked_add(blocks)?
                    .checked_add(width.checked_mul(out)?)
            }
            Backbone::ModifiedResnet { layers, .. } => {
                let mut total: u128 = 0;
                for (stage, &blocks) in layers.iter().enumerate() {
                    let planes = width.checked_mul(1 << stage)?;
                    let convs = count(blocks)?.checked_mul(planes.checked_mul(planes)?.checked_mul(9)?)?;
                    total = total.checked_add(convs)?;
                }
                let embed = width.checked_mul(32)?;
                let pool = embed
                    .checked_mul(embed)?
                    .checked_mul(3)?
                    .checked_add(positions.checked_mul(embed)?)?
                    .checked_add(embed.checked_mul(out)?)?;
                total.checked_add(pool)
            }
        }
    }

    /// Checks that the sizes are consistent (a config read from YAML may not be).
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(Error::InvalidInput(format!("vision config: {why}")));
        if self.width <= 0 || self.heads <= 0 || self.image_size <= 0 || self.output_dim <= 0 {
            return bad("width, heads, image_size and output_dim must be positive".to_owned());
        }
        match self.backbone {
            Backbone::Vit { patch_size, layers } => {
                if patch_size <= 0 || layers <= 0 {
                    return bad("patch_size and layers must be positive".to_owned());
                }
                if self.width % self.heads != 0 {
                    return bad(format!(
                        "width {} is not a multiple of heads {}",
                        self.width, self.heads
                    ));
                }
                if self.image_size % patch_size != 0 {
                    return bad(format!(
                        "image_size {} is not a multiple of patch_size {patch_size}",
                        self.image_size
                    ));
                }
            }
            Backbone::ModifiedResnet { layers, last_stride } => {
                if layers.iter().any(|&n| n <= 0) || self.width % 2 != 0 {
                    return bad("every stage needs a block, and the width must be even".to_owned());
                }
                // The attention pool works on 32 * width channels: that is
                // what the heads split (a ResNet imported with a 16-wide head
                // has more heads than stem channels).
                if (self.width * 32) % self.heads != 0 {
                    return bad(format!(
                        "32 * width {} is not a multiple of heads {}",
                        self.width, self.heads
                    ));
                }
                if !matches!(last_stride, 1 | 2) {
                    return bad(format!("last_stride must be 1 or 2, got {last_stride}"));
                }
                let total = self.total_stride();
                if self.image_size % total != 0 {
                    return bad(format!(
                        "image_size {} is not a multiple of {total}",
                        self.image_size
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_round_trip_through_yaml_and_validate() {
        for config in [
            ClipVisionConfig::vit_b16(),
            ClipVisionConfig::tiny_vit(),
            ClipVisionConfig::rn50(),
            ClipVisionConfig::rn101(),
            ClipVisionConfig::rn50x4(),
            ClipVisionConfig::tiny_resnet(),
        ] {
            config.validate().expect("preset is valid");
            let yaml = serde_yaml::to_string(&config).expect("yaml");
            let back: ClipVisionConfig = serde_yaml::from_str(&yaml).expect("parse");
            assert_eq!(back, config);
        }
        assert_eq!(ClipVisionConfig::vit_b16().architecture(), "vit-b/16");
        assert_eq!(ClipVisionConfig::rn50().architecture(), "rn50");
        assert_eq!(ClipVisionConfig::rn50().heads, 32);
    }

    #[test]
    fn unknown_keys_and_bad_sizes_are_rejected() {
        let yaml = "backbone: {kind: vit, patch_size: 16, layers: 2}\nwidth: 64\nheads: 2\nimage_size: 224\noutput_dim: 8\nwidht: 3\n";
        let err = serde_yaml::from_str::<ClipVisionConfig>(yaml).expect_err("typo accepted");
        assert!(err.to_string().contains("widht"), "{err}");
        let mut config = ClipVisionConfig::tiny_vit();
        config.heads = 3;
        assert!(config.validate().is_err());
        config = ClipVisionConfig::tiny_vit();
        config.image_size = 30;
        assert!(config.validate().is_err());
    }

    #[test]
    fn a_resnet_may_have_more_heads_than_stem_channels() {
        // RN50 imported with 16-wide heads: 2048 / 16 = 128 heads over a 64-wide stem.
        let mut config = ClipVisionConfig::rn50();
        config.heads = 128;
        config.validate().expect("heads split the pool's 2048 channels");
        config.heads = 3;
        assert!(config.validate().is_err());
    }

    #[test]
    fn last_stride_one_doubles_the_grid_and_is_named() {
        let mut config = ClipVisionConfig::rn50();
        assert_eq!(config.grid(), 7);
        config.backbone = Backbone::ModifiedResnet {
            layers: [3, 4, 6, 3],
            last_stride: 1,
        };
        config.validate().expect("valid");
        assert_eq!(config.grid(), 14);
        assert_eq!(config.architecture(), "rn50-s1");
        // OpenAI's stride is not written, so older manifests read the same.
        let yaml = serde_yaml::to_string(&ClipVisionConfig::rn50()).expect("yaml");
        assert!(!yaml.contains("last_stride"), "{yaml}");
        let back: ClipVisionConfig =
            serde_yaml::from_str(&serde_yaml::to_string(&config).expect("yaml")).expect("parse");
        assert_eq!(back, config);
    }
}
