//! `method:`: what is trained, in which phases, and how. Each method kind has
//! its paper's recipe as defaults ([`Method::defaults`]); a config overrides
//! any part of it.

use std::path::PathBuf;

use handid_model::heads::ArcFaceConfig;
use serde::{Deserialize, Serialize};

use super::losses::{I2tLoss, IdLoss, ImageTextLoss, LossConfig, TrainFeature, TripletLoss};
use super::optim::OptimConfig;
use crate::engine::{OptimizerKind, Schedule};

/// The training method (YAML: `kind: finetune`, ...).
// One value per run, read once: the size difference of the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Method {
    /// No training: the imported CLIP evaluated and exported as it is.
    ZeroShot,
    /// Image-encoder fine-tuning with a re-id head and metric losses (the
    /// dissertation's stage-2 recipes; CLIP-ReID's stage 2 without text).
    Finetune(Stage2),
    /// CLIP-ReID (Li et al., AAAI 2023): stage 1 learns per-person prompt
    /// context with both encoders frozen, stage 2 fine-tunes the image
    /// encoder with the image-to-text cross-entropy against the frozen
    /// stage-1 text features added to its losses.
    ClipReid {
        /// Prompt learning.
        stage1: Stage1,
        /// Image-encoder fine-tuning.
        stage2: Stage2,
    },
    /// PromptSG (Yang et al., "A Pedestrian is Worth One Prompt", CVPR
    /// 2024): an inversion network turns each image feature into a
    /// pseudo-word of a composed prompt that goes through the frozen text
    /// encoder; an interaction module lets that text feature attend over
    /// the image's patch tokens. ID and triplet losses train the interaction
    /// output; `image_text` is the supervised contrastive loss between the
    /// image feature and its composed-prompt text feature, both directions.
    PromptSg {
        /// The prompt and the interaction module.
        prompt: PromptSgConfig,
        /// Epochs, head, losses and optimisation.
        train: Stage2,
    },
}

/// A phase of training, in the order a method runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Validate and save the initial weights (no training).
    ZeroShot,
    /// CLIP-ReID stage 1: prompt learning on cached image features.
    Stage1,
    /// Training the image encoder and heads (CLIP-ReID stage 2, fine-tuning, PromptSG).
    Stage2,
}

impl Phase {
    /// The name in checkpoints, logs and `metrics.csv`.
    pub fn name(self) -> &'static str {
        match self {
            Phase::ZeroShot => "zero_shot",
            Phase::Stage1 => "stage1",
            Phase::Stage2 => "stage2",
        }
    }
}

impl Method {
    /// The phases of the method, in order, with their epoch counts (zero-shot: 1 pass).
    pub fn phases(&self) -> Vec<(Phase, u64)> {
        match self {
            Method::ZeroShot => vec![(Phase::ZeroShot, 1)],
            Method::Finetune(s) | Method::PromptSg { train: s, .. } => vec![(Phase::Stage2, s.epochs)],
            Method::ClipReid { stage1, stage2 } => {
                vec![(Phase::Stage1, stage1.epochs), (Phase::Stage2, stage2.epochs)]
            }
        }
    }

    /// The image-training stage, when the method has one.
    pub fn stage2(&self) -> Option<&Stage2> {
        match self {
            Method::ZeroShot => None,
            Method::Finetune(s) | Method::ClipReid { stage2: s, .. } | Method::PromptSg { train: s, .. } => {
                Some(s)
            }
        }
    }

    /// Mutable [`Method::stage2`].
    pub fn stage2_mut(&mut self) -> Option<&mut Stage2> {
        match self {
            Method::ZeroShot => None,
            Method::Finetune(s) | Method::ClipReid { stage2: s, .. } | Method::PromptSg { train: s, .. } => {
                Some(s)
            }
        }
    }

    /// The recipe a method kind starts from (`kind` as in YAML), which a
    /// config's `method:` overrides key by key:
    /// - `finetune`: CLIP-ReID's stage 2 without text (ID + triplet on the
    ///   embedding, `vit_clipreid.yml`'s optimisation);
    /// - `clip_reid`: the official `configs/person/vit_clipreid.yml`
    ///   (Syliz517/CLIP-ReID at eb1898b): stage 1 of 120 epochs, stage 2 of
    ///   60 with ID (weight 0.25, both branches) + triplet (layer-11 CLS,
    ///   CLS, projected) + i2t;
    /// - `prompt_sg`: PromptSG's recipe (Yang et al. 2024, implementation
    ///   details): batch 64, Adam, lr 5e-6 for the image encoder and 5e-5 for
    ///   the new modules, 60 epochs, x0.1 every 20, ID + triplet + image-text
    ///   SupCon (λ 0.5).
    pub fn defaults(kind: &str) -> Option<Method> {
        Some(match kind {
            "zero_shot" => Method::ZeroShot,
            "finetune" => Method::Finetune(Stage2::default()),
            "clip_reid" => Method::ClipReid {
                stage1: Stage1::default(),
                stage2: Stage2 {
                    losses: LossConfig {
                        id: Some(IdLoss {
                            weight: 0.25,
                            ..IdLoss::default()
                        }),
                        triplet: Some(TripletLoss {
                            features: vec![
                                TrainFeature::Penultimate,
                                TrainFeature::Backbone,
                                TrainFeature::Projected,
                            ],
                            ..TripletLoss::default()
                        }),
                        i2t: Some(I2tLoss::default()),
                        ..LossConfig::default()
                    },
                    ..Stage2::default()
                },
            },
            "prompt_sg" => Method::PromptSg {
                prompt: PromptSgConfig::default(),
                train: Stage2 {
                    epochs: 60,
                    head: HeadConfig::default(),
                    // Eq. 10: L_Triplet + L_ID + λ L_SupCon; the triplet on the
                    // fused feature and, "similar to CLIP-ReID" (sec. 4.3), on the
                    // image tower's last states.
                    losses: LossConfig {
                        id: Some(IdLoss::default()),
                        triplet: Some(TripletLoss {
                            features: vec![
                                TrainFeature::Fused,
                                TrainFeature::Projected,
                                TrainFeature::Backbone,
                                TrainFeature::Penultimate,
                            ],
                            ..TripletLoss::default()
                        }),
                        image_text: Some(ImageTextLoss::default()),
                        ..LossConfig::default()
                    },
                    optim: OptimConfig {
                        lr: 5e-6,
                        head_lr: Some(5e-5),
                        bias_lr_factor: 1.0,
                        // "x0.1 every 20 epochs": the 21st and 41st epochs
                        // (1-based, as `Schedule::Step` counts) start the drops.
                        schedule: Schedule::Step {
                            warmup_steps: 0,
                            warmup_factor: 1.0,
                            milestones: vec![21, 41],
                            gamma: 0.1,
                        },
                        ..OptimConfig::default()
                    },
                    compatibility: None,
                },
            },
            _ => return None,
        })
    }
}

/// PromptSG's prompt, interaction module and served feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PromptSgConfig {
    /// Composed prompt: `{}` is the pseudo-word, `{aspect}` the aspect.
    pub template: String,
    /// The hand aspect named in the prompt.
    pub aspect: String,
    /// Hidden width of the inversion network's MLP (PromptSG: 512).
    pub inversion_hidden: i64,
    /// Attention heads of the interaction module (the paper: 8).
    pub heads: i64,
    /// Self-attention blocks after the cross-attention (the paper: 2).
    pub blocks: i64,
    /// What is served: the interaction output with the cached simplified
    /// prompt (`fused`, the paper's inference) or the plain image feature
    /// (`image`).
    pub inference: PromptSgInference,
}

impl Default for PromptSgConfig {
    fn default() -> Self {
        Self {
            template: handid_model::promptsg::DEFAULT_TEMPLATE.to_owned(),
            aspect: "dorsal right".to_owned(),
            inversion_hidden: 512,
            heads: 8,
            blocks: 2,
            inference: PromptSgInference::Fused,
        }
    }
}

/// The embedding a PromptSG model serves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptSgInference {
    /// The interaction module over the patch tokens, queried by the
    /// simplified prompt's feature (computed once at export).
    #[default]
    Fused,
    /// CLIP's projected image feature.
    Image,
}

/// CLIP-ReID stage 1: prompt learning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Stage1 {
    /// Epochs (CLIP-ReID: 120 for ViT-B/16, 60 for RN50).
    pub epochs: u64,
    /// Learnable context tokens per person (CLIP-ReID: 4).
    pub n_ctx: i64,
    /// The prompt; `{}` marks where the `n_ctx` learnable context words go
    /// (CLIP-ReID: "A photo of a X X X X person.").
    pub template: String,
    /// Batch size over the cached image features (CLIP-ReID: 64); the
    /// last, partial batch of an epoch is trained on too.
    pub batch_size: usize,
    /// Temperature of the i2t / t2i losses over L2-normalised features;
    /// absent: CLIP-ReID's official form, the raw features at temperature 1
    /// (`loss/supcontrast.py`), whose norms act as a learnt temperature.
    pub temperature: Option<f64>,
    /// Optimisation.
    pub optim: OptimConfig,
}

impl Default for Stage1 {
    /// `configs/person/vit_clipreid.yml`'s `SOLVER.STAGE1`: Adam, lr 3.5e-4,
    /// weight decay 1e-4, 120 epochs of cosine decay to 1e-6 after 5
    /// warm-up epochs from 1e-5.
    fn default() -> Self {
        Self {
            epochs: 120,
            n_ctx: 4,
            template: "A photo of a {} hand.".to_owned(),
            batch_size: 64,
            temperature: None,
            optim: OptimConfig {
                optimizer: OptimizerKind::default(),
                lr: 3.5e-4,
                weight_decay: 1e-4,
                bias_lr_factor: 1.0,
                schedule: Schedule::Cosine {
                    warmup_steps: 5,
                    warmup_factor: 1e-5 / 3.5e-4,
                    total_steps: 120,
                    min_factor: 1e-6 / 3.5e-4,
                },
                ..OptimConfig::default()
            },
        }
    }
}

/// Training of the image encoder with a re-id head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Stage2 {
    /// Epochs (CLIP-ReID ViT-B/16: 60).
    pub epochs: u64,
    /// The head on top of the embedding.
    pub head: HeadConfig,
    /// Loss terms and weights. Given in a config, it replaces the method's
    /// default terms as a whole (an absent term is off).
    pub losses: LossConfig,
    /// Optimisation.
    pub optim: OptimConfig,
    /// Backward-compatible training against an old model (absent: off).
    /// Written `method.compatibility` for every method kind that trains
    /// (`TrainConfig::from_yaml` puts it here, in the image-training stage).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compatibility: Option<Compatibility>,
}

impl Default for Stage2 {
    fn default() -> Self {
        Self {
            epochs: 60,
            head: HeadConfig::default(),
            losses: LossConfig {
                id: Some(IdLoss::default()),
                triplet: Some(TripletLoss::default()),
                ..LossConfig::default()
            },
            optim: OptimConfig::default(),
            compatibility: None,
        }
    }
}

/// Backward-compatible training (BCT; Shen, Xiong, Xia, Soatto, "Towards
/// Backward-Compatible Representation Learning", CVPR 2020): the new model
/// is trained with its own losses plus the *influence loss*, the
/// classification loss of its embedding through the old model's frozen
/// classifier, `L = L(w_new, φ_new) + λ L(w_old, φ_new)`, so that
/// its queries can be searched against the old model's templates. How the
/// old classifier is applied is in `crate::compat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Compatibility {
    /// The old model: its trainer run folder (its `best` checkpoint, what
    /// `export` exports by default), one of its training checkpoint folders,
    /// or an exported serving checkpoint (then every person's classifier
    /// weights are synthesised from the old model's features).
    pub old: PathBuf,
    /// λ, the influence loss's weight.
    pub influence_weight: f64,
    /// Which classifier of the old model the influence loss goes through.
    pub classifier: OldClassifier,
    /// Scale `s` of the cosine logits when the classifier weights are
    /// synthesised from class means (normalised-softmax practice, CLIP-FH's
    /// ArcFace scale).
    pub scale: f64,
}

impl Default for Compatibility {
    fn default() -> Self {
        Self {
            old: PathBuf::new(),
            influence_weight: 1.0,
            classifier: OldClassifier::Auto,
            scale: 30.0,
        }
    }
}

/// The old classifier of backward-compatible training (`crate::compat`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OldClassifier {
    /// The old run's trained head when it can score every training person
    /// of the new run, else weights synthesised from class means.
    #[default]
    Auto,
    /// The old run's trained head; refused when it cannot be used.
    Trained,
    /// Every person's weights synthesised from the old model's class means
    /// (cosine logits times `scale`), also for an old run that has a head.
    Synthesised,
}

/// Classifier of the identity loss.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Classifier {
    /// A bias-free linear layer (BoT / CLIP-ReID).
    #[default]
    Linear,
    /// ArcFace (Deng et al., CVPR 2019).
    Arcface,
}

/// The re-id head: BNNeck (Luo et al., "Bag of Tricks and a Strong Baseline
/// for Deep Person Re-identification", CVPRW 2019) and a classifier, one per
/// branch of the embedding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeadConfig {
    /// Put a BNNeck between the embedding and the classifier.
    pub bnneck: bool,
    /// The classifier.
    pub classifier: Classifier,
    /// ArcFace scale `s` (CLIP-FH: 30).
    pub arcface_scale: f64,
    /// ArcFace margin `m` in radians (ArcFace paper: 0.5).
    pub arcface_margin: f64,
    /// ArcFace easy margin.
    pub arcface_easy_margin: bool,
    /// A bias-free linear layer to this width between each branch's feature
    /// and its BNNeck (the dissertation's stage-3 `bnneck_reduction`); the
    /// reduced feature only feeds the classifier. Absent: none.
    pub reduction_dim: Option<i64>,
    /// Which side of the BNNeck is the embedding at inference (CLIP-ReID's
    /// `TEST.NECK_FEAT`): `before` (CLIP-ReID's choice) or `after` (Bag of
    /// Tricks' choice: the normalised feature, centred per dimension, which
    /// suits cosine similarity). `after` needs `bnneck: true`; the serving
    /// checkpoint then carries the BNNeck(s) as its `neck`.
    pub neck_feat: NeckFeat,
}

impl Default for HeadConfig {
    fn default() -> Self {
        Self {
            bnneck: true,
            classifier: Classifier::Linear,
            arcface_scale: 30.0,
            arcface_margin: 0.5,
            arcface_easy_margin: false,
            reduction_dim: None,
            neck_feat: NeckFeat::Before,
        }
    }
}

impl HeadConfig {
    /// The ArcFace settings.
    pub fn arcface(&self) -> ArcFaceConfig {
        ArcFaceConfig {
            scale: self.arcface_scale,
            margin: self.arcface_margin,
            easy_margin: self.arcface_easy_margin,
        }
    }
}

/// Where the inference embedding is taken relative to the BNNeck.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NeckFeat {
    /// The feature the triplet loss sees.
    #[default]
    Before,
    /// The BatchNorm-normalised feature the classifier sees.
    After,
}
