//! The training configuration: one YAML file per experiment (`configs/`).
//!
//! Every struct refuses unknown keys, and errors name the offending key
//! (`method.losses.triplet.margn: unknown field`). Defaults live here, in
//! Rust, and follow the CLIP-ReID paper (Li et al., AAAI 2023, sec. 4.2)
//! unless a field says otherwise.

use std::path::{Path, PathBuf};

use anyhow::Context;
use handid_model::heads::ArcFaceConfig;
use handid_model::{ClipTextConfig, ClipVisionConfig, Feature, Preprocess};
use serde::{Deserialize, Serialize};

use crate::data::AugmentConfig;
use crate::engine::{OptimizerKind, Schedule};

/// A whole experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Experiment name (reports, provenance).
    pub name: String,
    /// Free text: what the experiment is and where its recipe comes from.
    #[serde(default)]
    pub description: String,
    /// Seeds the weights, the sampler and the augmentations.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// The network.
    pub model: ModelConfig,
    /// The data.
    pub data: DataConfig,
    /// Training-time augmentation.
    #[serde(default)]
    pub augment: AugmentConfig,
    /// What is trained, and how.
    pub method: Method,
    /// Validation during training (training persons only).
    #[serde(default)]
    pub validation: ValidationConfig,
    /// What `export` writes.
    #[serde(default)]
    pub export: ExportConfig,
}

fn default_seed() -> u64 {
    1
}
fn default_device() -> String {
    "cpu".to_owned()
}

/// Architecture presets by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// CLIP ViT-B/16.
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

/// The network and where its weights come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Architecture preset.
    pub arch: Arch,
    /// Replaces the preset's image tower (any size CLIP's code allows).
    #[serde(default)]
    pub vision: Option<ClipVisionConfig>,
    /// Replaces the preset's text tower.
    #[serde(default)]
    pub text: Option<ClipTextConfig>,
    /// CLIP weights to start from (OpenAI TorchScript `.pt`, open_clip or
    /// Hugging Face safetensors); random CLIP initialisation when absent.
    #[serde(default)]
    pub clip_weights: Option<PathBuf>,
    /// Input size `[height, width]`; absent: the preset's square size with
    /// CLIP's resize + centre crop. Present: a plain resize (re-id style).
    #[serde(default)]
    pub input_size: Option<[u32; 2]>,
    /// Which output of the image tower is the embedding that is trained
    /// with the metric losses and served.
    #[serde(default = "default_feature")]
    pub feature: Feature,
    /// Train only the last N blocks of the image tower (transformer blocks,
    /// or bottlenecks of a ResNet) and what follows them; absent: all.
    #[serde(default)]
    pub unfreeze_last_blocks: Option<usize>,
}

fn default_feature() -> Feature {
    Feature::Projected
}

impl ModelConfig {
    /// The image tower's configuration.
    pub fn vision(&self) -> ClipVisionConfig {
        self.vision.clone().unwrap_or_else(|| self.arch.towers().0)
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
}

/// Where the images are and how batches are drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// A split manifest written by `handid-trainer splits`.
    pub manifest: PathBuf,
    /// Dataset root (default: the manifest's `root`).
    #[serde(default)]
    pub root: Option<PathBuf>,
    /// The split trained on (training persons only).
    #[serde(default = "default_train_split")]
    pub train_split: String,
    /// More splits trained on besides `train_split` (e.g. `train_extra` from
    /// `splits --train-extra`); they may add persons. None may hold a person
    /// of the manifest's `test` split.
    #[serde(default)]
    pub extra_train_splits: Vec<String>,
    /// Validation queries: held-out images of training persons.
    #[serde(default = "default_val_query")]
    pub val_query_split: String,
    /// Validation gallery (training persons).
    #[serde(default = "default_train_split")]
    pub val_gallery_split: String,
    /// Persons per batch (P).
    #[serde(default = "default_p")]
    pub persons_per_batch: usize,
    /// Images per person (K).
    #[serde(default = "default_k")]
    pub images_per_person: usize,
    /// Decoding threads.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Keep decoded images in memory across epochs.
    #[serde(default = "default_true")]
    pub cache_decoded: bool,
}

fn default_train_split() -> String {
    "train".to_owned()
}
fn default_val_query() -> String {
    "val".to_owned()
}
fn default_p() -> usize {
    16
}
fn default_k() -> usize {
    4
}
fn default_workers() -> usize {
    2
}
fn default_true() -> bool {
    true
}

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
    /// output; `sup_con` is the supervised contrastive loss between the
    /// image feature and its composed-prompt text feature, both directions.
    PromptSg {
        /// The prompt and the interaction module.
        prompt: PromptSgConfig,
        /// Epochs, head, losses and optimisation.
        train: Stage2,
    },
}

/// PromptSG's prompt, interaction module and served feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptSgConfig {
    /// Composed prompt: `{}` is the pseudo-word, `{aspect}` the aspect.
    #[serde(default = "default_promptsg_template")]
    pub template: String,
    /// The hand aspect named in the prompt.
    #[serde(default = "default_aspect")]
    pub aspect: String,
    /// Attention heads of the interaction module (the paper: 8).
    #[serde(default = "default_heads")]
    pub heads: i64,
    /// Self-attention blocks after the cross-attention (the paper: 2).
    #[serde(default = "default_blocks")]
    pub blocks: i64,
    /// What is served: the interaction output with the cached simplified
    /// prompt (`fused`, the paper's inference) or the plain image feature
    /// (`image`).
    #[serde(default)]
    pub inference: PromptSgInference,
}

fn default_promptsg_template() -> String {
    handid_model::promptsg::DEFAULT_TEMPLATE.to_owned()
}
fn default_aspect() -> String {
    "dorsal right".to_owned()
}
fn default_heads() -> i64 {
    8
}
fn default_blocks() -> i64 {
    2
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
#[serde(deny_unknown_fields)]
pub struct Stage1 {
    /// Epochs (CLIP-ReID: 120).
    pub epochs: u64,
    /// Learnable context tokens per person (CLIP-ReID: 4).
    #[serde(default = "default_n_ctx")]
    pub n_ctx: i64,
    /// The prompt; `{}` marks where the `n_ctx` learnable context words go.
    #[serde(default = "default_template")]
    pub template: String,
    /// Batch size over the cached image features (CLIP-ReID: 64).
    #[serde(default = "default_stage1_batch")]
    pub batch_size: usize,
    /// Optimisation (CLIP-ReID: Adam, lr 3.5e-4, wd 1e-4, cosine with 5 warm-up epochs).
    pub optim: OptimConfig,
}

fn default_n_ctx() -> i64 {
    4
}
fn default_template() -> String {
    "A photo of a {} hand.".to_owned()
}
fn default_stage1_batch() -> usize {
    64
}

/// Fine-tuning of the image encoder with a re-id head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage2 {
    /// Epochs.
    pub epochs: u64,
    /// The head on top of the embedding.
    #[serde(default)]
    pub head: HeadConfig,
    /// Loss terms and weights.
    pub losses: LossConfig,
    /// Optimisation.
    pub optim: OptimConfig,
}

/// Classifier of the identity loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Classifier {
    /// A bias-free linear layer (BoT / CLIP-ReID).
    Linear,
    /// ArcFace (Deng et al., CVPR 2019).
    Arcface,
}

/// The re-id head: BNNeck (Luo et al., "Bag of Tricks and a Strong Baseline
/// for Deep Person Re-identification", CVPRW 2019) and a classifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadConfig {
    /// Put a BNNeck between the embedding and the classifier.
    #[serde(default = "default_true")]
    pub bnneck: bool,
    /// The classifier.
    #[serde(default = "default_classifier")]
    pub classifier: Classifier,
    /// ArcFace scale `s` (CLIP-FH: 30).
    #[serde(default = "default_arc_scale")]
    pub arcface_scale: f64,
    /// ArcFace margin `m` in radians (ArcFace paper: 0.5).
    #[serde(default = "default_arc_margin")]
    pub arcface_margin: f64,
    /// ArcFace easy margin.
    #[serde(default)]
    pub arcface_easy_margin: bool,
    /// Which side of the BNNeck is the embedding at inference (CLIP-ReID's
    /// `TEST.NECK_FEAT`): `before` (CLIP-ReID's choice) or `after` (Bag of
    /// Tricks' choice: the normalised feature, centred per dimension, which
    /// suits cosine similarity). `after` needs `bnneck: true`; the serving
    /// checkpoint then carries the BNNeck as its `neck`.
    #[serde(default)]
    pub neck_feat: NeckFeat,
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

fn default_classifier() -> Classifier {
    Classifier::Linear
}
fn default_arc_scale() -> f64 {
    30.0
}
fn default_arc_margin() -> f64 {
    0.5
}

impl Default for HeadConfig {
    fn default() -> Self {
        Self {
            bnneck: true,
            classifier: default_classifier(),
            arcface_scale: default_arc_scale(),
            arcface_margin: default_arc_margin(),
            arcface_easy_margin: false,
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

/// Loss terms; an absent term is off.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    /// Identity cross-entropy on the classifier's logits.
    #[serde(default)]
    pub id: Option<IdLoss>,
    /// Batch-hard triplet on the embedding.
    #[serde(default)]
    pub triplet: Option<TripletLoss>,
    /// Center loss on the embedding.
    #[serde(default)]
    pub center: Option<CenterLossConfig>,
    /// Supervised contrastive loss on the normalised embedding.
    #[serde(default)]
    pub sup_con: Option<SupConLoss>,
    /// Image-to-text cross-entropy against the stage-1 text features
    /// (CLIP-ReID only).
    #[serde(default)]
    pub i2t: Option<I2tLoss>,
}

/// Identity loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdLoss {
    /// Weight.
    #[serde(default = "one")]
    pub weight: f64,
    /// Label smoothing ε (Szegedy et al. 2016; BoT: 0.1).
    #[serde(default = "default_smoothing")]
    pub label_smoothing: f64,
}

fn one() -> f64 {
    1.0
}
fn default_smoothing() -> f64 {
    0.1
}

/// Batch-hard triplet loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TripletLoss {
    /// Weight.
    #[serde(default = "one")]
    pub weight: f64,
    /// Margin; absent: soft margin.
    #[serde(default = "default_margin")]
    pub margin: Option<f64>,
    /// L2-normalise the features first.
    #[serde(default)]
    pub normalize: bool,
}

fn default_margin() -> Option<f64> {
    Some(0.3)
}

/// Center loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CenterLossConfig {
    /// Weight (BoT: 0.0005).
    #[serde(default = "default_center_weight")]
    pub weight: f64,
    /// Learning rate of the centres' own SGD (BoT: 0.5).
    #[serde(default = "default_center_lr")]
    pub lr: f64,
}

fn default_center_weight() -> f64 {
    0.0005
}
fn default_center_lr() -> f64 {
    0.5
}

/// Supervised contrastive loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupConLoss {
    /// Final weight.
    #[serde(default = "one")]
    pub weight: f64,
    /// Temperature (SupCon paper: 0.07; CLIP-FH: 0.1).
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Epochs over which the weight ramps linearly from 0 to `weight`.
    #[serde(default)]
    pub ramp_epochs: u64,
}

fn default_temperature() -> f64 {
    0.07
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

/// Image-to-text cross-entropy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I2tLoss {
    /// Weight (CLIP-ReID: 1).
    #[serde(default = "one")]
    pub weight: f64,
}

/// Optimiser, learning rates per parameter group, schedule and numerics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// The update rule.
    #[serde(default)]
    pub optimizer: OptimizerKind,
    /// Base learning rate of the image encoder (and of everything not
    /// named by another group).
    pub lr: f64,
    /// Weight decay of the image encoder.
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    /// Learning rate of the new modules (head, classifier); default: `lr`.
    #[serde(default)]
    pub head_lr: Option<f64>,
    /// Weight decay of the new modules; default: `weight_decay`.
    #[serde(default)]
    pub head_weight_decay: Option<f64>,
    /// Learning rate of prompt parameters; default: `lr`.
    #[serde(default)]
    pub prompt_lr: Option<f64>,
    /// Weight decay of prompt parameters; default: `weight_decay`.
    #[serde(default)]
    pub prompt_weight_decay: Option<f64>,
    /// Learning-rate multiplier by epoch (CLIP-ReID steps its schedulers
    /// once per epoch; `warmup_steps`, `total_steps` and `milestones` count
    /// epochs here).
    #[serde(default = "default_schedule")]
    pub schedule: Schedule,
    /// Clip the total gradient norm to this value before each step.
    #[serde(default)]
    pub clip_grad_norm: Option<f64>,
    /// Batches whose gradients are summed before one optimizer step.
    #[serde(default = "default_accumulate")]
    pub accumulate: u64,
    /// `f32`, or `amp` (autocast with a dynamic loss scale, GPU only).
    #[serde(default)]
    pub precision: TrainPrecision,
}

fn default_wd() -> f64 {
    1e-4
}
fn default_schedule() -> Schedule {
    Schedule::Constant
}
fn default_accumulate() -> u64 {
    1
}

/// Numeric precision of training.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainPrecision {
    /// Everything in f32.
    #[default]
    F32,
    /// Mixed precision: autocast forward, loss scaling (GPU only).
    Amp,
}

/// Validation on training persons during training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    /// Validate every N epochs (and after the last).
    #[serde(default = "default_every")]
    pub every_epochs: u64,
    /// Images per forward pass.
    #[serde(default = "default_eval_batch")]
    pub batch_size: usize,
}

fn default_every() -> u64 {
    1
}
fn default_eval_batch() -> usize {
    64
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self {
            every_epochs: default_every(),
            batch_size: default_eval_batch(),
        }
    }
}

/// What `export` writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// False match rates at which thresholds are calibrated on validation persons.
    #[serde(default = "default_fmrs")]
    pub fmrs: Vec<f64>,
}

fn default_fmrs() -> Vec<f64> {
    vec![1e-2, 1e-3, 1e-4]
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self { fmrs: default_fmrs() }
    }
}

impl TrainConfig {
    /// Parses YAML; errors name the offending key.
    pub fn from_yaml(text: &str) -> anyhow::Result<Self> {
        let deserializer = serde_yaml::Deserializer::from_str(text);
        let config: TrainConfig = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let path = e.path().to_string();
            anyhow::anyhow!("{path}: {}", e.into_inner())
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads a config file.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_yaml(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Checks values serde cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        let d = &self.data;
        anyhow::ensure!(
            d.persons_per_batch >= 2 && d.images_per_person >= 1,
            "data.persons_per_batch must be at least 2 and data.images_per_person at least 1"
        );
        if let Some([h, w]) = self.model.input_size {
            anyhow::ensure!(
                h > 0 && w > 0,
                "model.input_size must be positive, got [{h}, {w}]"
            );
        }
        let vision = self.model.vision();
        vision
            .validate()
            .map_err(|e| anyhow::anyhow!("model.vision: {e}"))?;
        handid_model::ImageEncoder::feature_dim(&vision, self.model.feature)
            .map_err(|e| anyhow::anyhow!("model.feature: {e}"))?;
        anyhow::ensure!(
            self.model.text().output_dim == vision.output_dim,
            "model.text.output_dim ({}) must equal model.vision.output_dim ({}): both towers share one space",
            self.model.text().output_dim,
            vision.output_dim
        );
        let stages: Vec<(&str, &Stage2)> = match &self.method {
            Method::ZeroShot => Vec::new(),
            Method::Finetune(s) => vec![("method", s)],
            Method::PromptSg { prompt, train } => {
                anyhow::ensure!(
                    prompt.template.matches("{}").count() == 1,
                    "method.prompt.template must hold one {{}} for the pseudo-word, got {:?}",
                    prompt.template
                );
                let dim = self.model.vision().output_dim;
                anyhow::ensure!(
                    prompt.heads >= 1 && dim % prompt.heads == 0 && prompt.blocks >= 0,
                    "method.prompt.heads ({}) must divide the embedding width {dim}; blocks must be >= 0",
                    prompt.heads
                );
                anyhow::ensure!(
                    self.model.feature == Feature::Projected,
                    "model.feature must be projected for PromptSG (the interaction works in the joint space)"
                );
                vec![("method.train", train)]
            }
            Method::ClipReid { stage1, stage2 } => {
                anyhow::ensure!(
                    stage1.template.matches("{}").count() == 1,
                    "method.stage1.template must hold one {{}} where the context words go, got {:?}",
                    stage1.template
                );
                anyhow::ensure!(stage1.n_ctx >= 1, "method.stage1.n_ctx must be at least 1");
                anyhow::ensure!(
                    stage1.batch_size >= 2,
                    "method.stage1.batch_size must be at least 2"
                );
                check_optim("method.stage1.optim", &stage1.optim)?;
                vec![("method.stage2", stage2)]
            }
        };
        for (at, stage) in stages {
            check_optim(&format!("{at}.optim"), &stage.optim)?;
            let l = &stage.losses;
            anyhow::ensure!(
                l.id.is_some() || l.triplet.is_some() || l.sup_con.is_some() || l.i2t.is_some(),
                "{at}.losses: at least one of id, triplet, sup_con, i2t is needed"
            );
            anyhow::ensure!(
                stage.head.bnneck || stage.head.neck_feat == NeckFeat::Before,
                "{at}.head.neck_feat: after needs bnneck: true"
            );
            if l.i2t.is_some() {
                anyhow::ensure!(
                    matches!(self.method, Method::ClipReid { .. }),
                    "{at}.losses.i2t needs the stage-1 text features: use method kind clip_reid"
                );
            }
            if let Some(id) = &l.id {
                anyhow::ensure!(
                    (0.0..1.0).contains(&id.label_smoothing),
                    "{at}.losses.id.label_smoothing must be in [0, 1)"
                );
            }
        }
        anyhow::ensure!(
            self.export.fmrs.iter().all(|f| *f > 0.0 && *f < 1.0),
            "export.fmrs must lie in (0, 1)"
        );
        Ok(())
    }
}

fn check_optim(at: &str, optim: &OptimConfig) -> anyhow::Result<()> {
    anyhow::ensure!(optim.lr > 0.0, "{at}.lr must be positive");
    anyhow::ensure!(optim.accumulate >= 1, "{at}.accumulate must be at least 1");
    if let Some(c) = optim.clip_grad_norm {
        anyhow::ensure!(c > 0.0, "{at}.clip_grad_norm must be positive");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "
name: t
model: {arch: tiny_vit}
data: {manifest: m.txt}
method:
  kind: finetune
  epochs: 2
  losses: {id: {}, triplet: {margin: 0.3}}
  optim: {lr: 0.001}
";

    #[test]
    fn minimal_config_gets_the_documented_defaults() {
        let c = TrainConfig::from_yaml(MINIMAL).unwrap();
        assert_eq!(c.seed, 1);
        assert_eq!(c.data.persons_per_batch, 16);
        let Method::Finetune(s) = &c.method else { panic!() };
        assert_eq!(s.losses.id.as_ref().unwrap().label_smoothing, 0.1);
        assert!(s.head.bnneck);
        assert_eq!(s.optim.optimizer, OptimizerKind::default());
        assert_eq!(c.export.fmrs, vec![1e-2, 1e-3, 1e-4]);
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let bad = MINIMAL.replace("triplet: {margin: 0.3}", "triplet: {margn: 0.3}");
        let err = TrainConfig::from_yaml(&bad).unwrap_err().to_string();
        // Inside the tagged `method` enum serde can only point at `method`,
        // but the message names the key and the ones allowed.
        assert!(
            err.contains("method") && err.contains("margn") && err.contains("margin"),
            "{err}"
        );
        let bad = MINIMAL.replace("name: t", "name: t\nepochz: 3");
        let err = TrainConfig::from_yaml(&bad).unwrap_err().to_string();
        assert!(err.contains("epochz"), "{err}");
    }

    #[test]
    fn impossible_values_are_refused() {
        let bad = MINIMAL.replace("lr: 0.001", "lr: 0");
        assert!(
            TrainConfig::from_yaml(&bad)
                .unwrap_err()
                .to_string()
                .contains("method.optim.lr")
        );
        let bad = MINIMAL.replace("{id: {}, triplet: {margin: 0.3}}", "{i2t: {}}");
        assert!(
            TrainConfig::from_yaml(&bad)
                .unwrap_err()
                .to_string()
                .contains("clip_reid")
        );
        let bad = MINIMAL.replace("arch: tiny_vit", "arch: tiny_resnet, feature: class_token");
        assert!(
            TrainConfig::from_yaml(&bad)
                .unwrap_err()
                .to_string()
                .contains("model.feature")
        );
    }

    #[test]
    fn sup_con_weight_ramps_linearly() {
        let s = SupConLoss {
            weight: 1.0,
            temperature: 0.1,
            ramp_epochs: 4,
        };
        assert_eq!(s.weight_at(0), 0.25);
        assert_eq!(s.weight_at(3), 1.0);
        assert_eq!(s.weight_at(10), 1.0);
    }
}
