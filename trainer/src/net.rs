//! The network being trained: CLIP (both towers, OpenAI CLIP key names at the
//! root of the VarStore, so the image tower exports unchanged into a serving
//! checkpoint), the re-id head under `head.`, and the method's own modules:
//! CLIP-ReID's per-person prompts (`prompt_learner.`) or PromptSG's
//! inversion network and interaction module (`promptsg.`).
//!
//! The head has one branch per part of the embedding, each a BNNeck and a
//! classifier (CLIP-ReID's `make_model_clipreid.py`: `bottleneck` /
//! `classifier` on the backbone feature and `bottleneck_proj` /
//! `classifier_proj` on the projected one; a single branch otherwise). The
//! served embedding is the branches' features concatenated, before or after
//! their BNNecks (`TEST.NECK_FEAT`).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use handid_model::checkpoint::Neck;
use handid_model::heads::{ArcFace, BnNeck, LinearClassifier};
use handid_model::promptsg::{ComposedPrompt, InversionNetwork, PromptSgHead};
use handid_model::vit::resize_positional_embedding;
use handid_model::{
    Clip, ClipConfig, Feature, IdPromptLearner, ImageEncoder, ImageFeatures, Tokenizer, l2_normalize,
};
use tch::{Device, Kind, Tensor, nn};

use crate::config::{
    Classifier, HeadConfig, Method, NeckFeat, OptimConfig, PromptSgConfig, PromptSgInference, TrainConfig,
    TrainFeature,
};
use crate::engine::ParamGroup;

/// Runs `init` with libtorch's global generator seeded by `seed`, holding a
/// process-wide lock: variable initialisation draws from that one global
/// generator, so two nets built at once on different threads (tests, a
/// service training while serving) would otherwise interleave their draws
/// and the weights would no longer depend on the seed alone.
pub fn seeded<T>(seed: u64, init: impl FnOnce() -> T) -> T {
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = INIT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    tch::manual_seed(seed as i64);
    init()
}

/// Prefix of the head's variables.
pub const HEAD: &str = "head.";
/// Prefix of the image tower's variables.
pub const VISUAL: &str = "visual.";
/// Prefix of PromptSG's variables.
pub const PROMPTSG: &str = "promptsg.";
/// Prefix of CLIP-ReID's per-person prompts.
pub const PROMPT_LEARNER: &str = "prompt_learner.";
/// The modules the trainer adds to CLIP: CLIP weights never hold them, so
/// they keep their initialisers when CLIP weights load.
pub const NEW_MODULES: [&str; 3] = [HEAD, PROMPT_LEARNER, PROMPTSG];
/// Entries of OpenAI's TorchScript archives that describe the model rather
/// than weigh it (`build_model` deletes them before loading).
const OPENAI_METADATA: [&str; 3] = ["input_resolution", "context_length", "vocab_size"];

/// PromptSG's modules (Yang et al., CVPR 2024) and its composed prompt.
#[derive(Debug)]
pub struct PromptSgModules {
    /// Image feature -> pseudo-word (`promptsg.inversion.*`).
    pub inversion: InversionNetwork,
    /// "A photo of a {} dorsal right hand", tokenised.
    pub composed: ComposedPrompt,
    /// Interaction module and cached simplified prompt (`promptsg.interaction.*`,
    /// `promptsg.simplified_text`): what serving loads.
    pub head: PromptSgHead,
    /// The configuration.
    pub config: PromptSgConfig,
}

/// The identity classifier.
#[derive(Debug)]
pub enum ClassifierHead {
    /// Bias-free linear.
    Linear(LinearClassifier),
    /// ArcFace margin logits.
    ArcFace(ArcFace),
}

/// One part of the embedding with its BNNeck and classifier.
#[derive(Debug)]
pub struct Branch {
    /// The feature the branch sees.
    pub input: TrainFeature,
    /// Its width.
    pub dim: i64,
    reduction: Option<nn::Linear>,
    neck: Option<BnNeck>,
    classifier: Option<ClassifierHead>,
}

impl Branch {
    /// (Reduction,) BNNeck, classifier: the classifier's input and its
    /// logits; ArcFace margin logits in training (which need `labels`).
    fn classify(&self, feature: &Tensor, labels: Option<&Tensor>, train: bool) -> (Tensor, Option<Tensor>) {
        let reduced = match &self.reduction {
            Some(linear) => feature.apply(linear),
            None => feature.shallow_clone(),
        };
        let necked = self.neck(&reduced, train);
        let logits = match (&self.classifier, labels) {
            (None, _) => None,
            (Some(ClassifierHead::Linear(c)), _) => Some(c.forward(&necked)),
            (Some(ClassifierHead::ArcFace(a)), Some(labels)) if train => Some(a.forward(&necked, labels)),
            (Some(ClassifierHead::ArcFace(a)), _) => Some(a.cosine(&necked)),
        };
        (necked, logits)
    }

    /// The branch as a frozen classifier of its part of the served
    /// embedding (backward-compatible training's old classifier): a part
    /// taken after the BNNeck goes straight to the classifier, one taken
    /// before it through the reduction and the BNNeck with its running
    /// statistics (inference mode) first; ArcFace gives its cosine logits
    /// times `arcface_scale`, without the margin, as at inference.
    pub fn frozen_logits(&self, part: &Tensor, part_after_neck: bool, arcface_scale: f64) -> Option<Tensor> {
        let input = if part_after_neck {
            part.shallow_clone()
        } else {
            let reduced = match &self.reduction {
                Some(linear) => part.apply(linear),
                None => part.shallow_clone(),
            };
            self.neck(&reduced, false)
        };
        match self.classifier.as_ref()? {
            ClassifierHead::Linear(c) => Some(c.forward(&input)),
            ClassifierHead::ArcFace(a) => Some(a.cosine(&input) * arcface_scale),
        }
    }

    fn neck(&self, feature: &Tensor, train: bool) -> Tensor {
        match &self.neck {
            Some(neck) => neck.forward_t(feature, train),
            None => feature.shallow_clone(),
        }
    }
}

/// What one forward pass gives the losses.
#[derive(Debug)]
pub struct Forward {
    /// The image tower's features.
    pub image: ImageFeatures,
    /// PromptSG: the language-guided feature of each image.
    pub fused: Option<Tensor>,
    /// PromptSG: the composed prompt's text feature of each image.
    pub text: Option<Tensor>,
    /// Classifier logits, one per branch that has a classifier.
    pub logits: Vec<Tensor>,
    /// Each branch's part of the embedding as this pass computed it (after
    /// the branch's BNNeck when the embedding is taken after it): what the
    /// served embedding concatenates.
    pub parts: Vec<Tensor>,
}

impl Forward {
    /// One of the features.
    pub fn feature(&self, feature: TrainFeature) -> anyhow::Result<Tensor> {
        Ok(match feature {
            TrainFeature::Penultimate => self.image.penultimate.shallow_clone(),
            TrainFeature::Backbone => self.image.backbone.shallow_clone(),
            TrainFeature::Projected => self.image.projected.shallow_clone(),
            TrainFeature::Fused => self
                .fused
                .as_ref()
                .context("the fused feature exists for PromptSG only")?
                .shallow_clone(),
        })
    }
}

/// CLIP + re-id head (+ the method's modules).
#[derive(Debug)]
pub struct ReidNet {
    /// Every variable: `visual.*`, CLIP's text tower at the root, `head.*`,
    /// `prompt_learner.*`, `promptsg.*`.
    pub vs: nn::VarStore,
    /// Both CLIP towers.
    pub clip: Clip,
    /// The head's branches (none: zero-shot).
    pub branches: Vec<Branch>,
    /// Whether the embedding is taken after the BNNecks (`neck_feat: after`).
    embed_after_neck: bool,
    /// Which image-tower output is the embedding.
    pub feature: Feature,
    /// Whether a ResNet's BatchNorms use batch statistics in training.
    train_backbone_norm: bool,
    /// PromptSG's modules, when the method is PromptSG.
    pub promptsg: Option<PromptSgModules>,
    /// CLIP-ReID's per-person prompts, when the method is CLIP-ReID.
    pub prompt_learner: Option<IdPromptLearner>,
}

impl ReidNet {
    /// The net `config` trains for `classes` persons, initialised from
    /// `config.seed` (CLIP weights are loaded separately, see
    /// [`ReidNet::load_clip_weights`]).
    pub fn build(config: &TrainConfig, classes: i64, device: Device) -> anyhow::Result<Self> {
        let tokenizer = || Tokenizer::from_env().context("loading CLIP's BPE vocabulary (HANDID_BPE_VOCAB)");
        // Every variable is drawn under one seed: the net, then the method's modules.
        seeded(config.seed, || -> anyhow::Result<Self> {
            let mut net = Self::new(config, classes, device)?;
            match &config.method {
                Method::PromptSg { prompt, .. } => net.add_promptsg(prompt, &tokenizer()?)?,
                Method::ClipReid { stage1, .. } => {
                    // In the net's VarStore (`prompt_learner.cls_ctx`), so
                    // checkpoints hold the prompts and a resumed stage 2
                    // recomputes the same text features.
                    let learner = IdPromptLearner::new(
                        &(net.vs.root() / "prompt_learner"),
                        &net.clip.text,
                        &tokenizer()?,
                        classes,
                        stage1.n_ctx,
                        &stage1.template,
                    )
                    .context("method.stage1.template")?;
                    let _ = learner.ctx().set_requires_grad(false);
                    net.prompt_learner = Some(learner);
                }
                Method::ZeroShot | Method::Finetune(_) => {}
            }
            Ok(net)
        })
    }

    /// CLIP and the head's branches.
    fn new(config: &TrainConfig, classes: i64, device: Device) -> anyhow::Result<Self> {
        let model = &config.model;
        let vs = nn::VarStore::new(device);
        let clip = Clip::new(
            vs.root(),
            &ClipConfig {
                vision: model.vision(),
                text: model.text(),
            },
        )?;
        let head = config.method.stage2().map(|s| &s.head);
        let branches = match head {
            Some(h) => head_branches(&(vs.root() / "head"), config, h, classes),
            None => Vec::new(),
        };
        let embed_after_neck = head.is_some_and(|h| h.bnneck && h.neck_feat == NeckFeat::After);
        Ok(Self {
            vs,
            clip,
            branches,
            embed_after_neck,
            feature: model.feature,
            train_backbone_norm: model.trains_backbone_norm(),
            promptsg: None,
            prompt_learner: None,
        })
    }

    /// Adds PromptSG's modules under `promptsg.`.
    fn add_promptsg(&mut self, config: &PromptSgConfig, tokenizer: &Tokenizer) -> anyhow::Result<()> {
        let root = self.vs.root() / "promptsg";
        let dim = self.clip.text.output_dim();
        let composed = ComposedPrompt::new(
            tokenizer,
            &config.template,
            &config.aspect,
            self.clip.text.context_length(),
        )
        .context("method.prompt.template")?;
        self.promptsg = Some(PromptSgModules {
            inversion: InversionNetwork::new(
                &root / "inversion",
                dim,
                config.inversion_hidden,
                self.clip.text.width(),
            ),
            composed,
            head: PromptSgHead::new(&root, dim, config.heads, config.blocks)?,
            config: config.clone(),
        });
        Ok(())
    }

    /// Computes the simplified prompt's feature with the (frozen) text tower
    /// and stores it in `promptsg.simplified_text` (after loading weights).
    pub fn refresh_simplified_text(&self) -> anyhow::Result<()> {
        if let Some(sg) = &self.promptsg {
            let text = sg.composed.simplified(&self.clip.text)?;
            tch::no_grad(|| {
                sg.head
                    .simplified_text
                    .shallow_clone()
                    .copy_(&text.to_kind(Kind::Float))
            });
        }
        Ok(())
    }

    /// The feature a serving checkpoint of this net declares.
    pub fn serving_feature(&self) -> Feature {
        match &self.promptsg {
            Some(sg) if sg.config.inference == PromptSgInference::Fused => Feature::PromptSg {
                heads: sg.config.heads,
                blocks: sg.config.blocks,
            },
            _ => self.feature,
        }
    }

    /// Whether the served embedding is the branches' features (PromptSG
    /// serving the plain image feature is not: no BNNeck saw it).
    fn serves_branches(&self) -> bool {
        !self
            .promptsg
            .as_ref()
            .is_some_and(|sg| sg.config.inference == PromptSgInference::Image)
    }

    /// The layer a serving checkpoint of this net applies after the feature.
    pub fn serving_neck(&self) -> Option<Neck> {
        let necked = !self.branches.is_empty() && self.branches.iter().all(|b| b.neck.is_some());
        (necked && self.embed_after_neck && self.serves_branches()).then_some(Neck::BatchNorm)
    }

    /// Copies CLIP weights (any format `handid_model::import` reads) into
    /// both towers, strictly: every CLIP variable must be in the file with
    /// its shape, and every tensor of the file must be used (torchreid's
    /// "discarded layers", made an error). The modules the trainer adds
    /// ([`NEW_MODULES`]) keep their initialisers. A positional embedding
    /// laid out for another grid (the attention pool of a ResNet trained
    /// with last stride 1, a ViT at another resolution) is resized once,
    /// bilinearly, as CLIP-ReID does.
    pub fn load_clip_weights(&self, path: &Path) -> anyhow::Result<()> {
        let weights = handid_model::import::to_openai_keys(
            handid_model::import::read_weights(path)
                .with_context(|| format!("reading CLIP weights {}", path.display()))?,
        )?;
        let mut weights: BTreeMap<String, Tensor> = weights
            .into_iter()
            .filter(|(name, _)| !OPENAI_METADATA.contains(&name.as_str()))
            .collect();
        let grid = self.clip_grid();
        let mut missing = Vec::new();
        let mut wrong = Vec::new();
        tch::no_grad(|| {
            for (name, var) in self.vs.variables() {
                if NEW_MODULES.iter().any(|prefix| name.starts_with(prefix)) {
                    continue;
                }
                let Some(mut w) = weights.remove(&name) else {
                    missing.push(name);
                    continue;
                };
                if w.size() != var.size()
                    && (name == "visual.positional_embedding"
                        || name == "visual.attnpool.positional_embedding")
                    && let Some(resized) = resize_positional_embedding(&w, grid)
                {
                    w = resized;
                }
                if w.size() == var.size() {
                    var.shallow_clone()
                        .copy_(&w.to_kind(var.kind()).to_device(var.device()));
                } else {
                    wrong.push(format!(
                        "{name} is {:?} in the file, {:?} here",
                        w.size(),
                        var.size()
                    ));
                }
            }
        });
        let list = |names: &[String]| {
            let shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
            let more = names.len().saturating_sub(shown.len());
            format!(
                "{}{}",
                shown.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            )
        };
        let unused: Vec<String> = weights.into_keys().collect();
        let mut problems = Vec::new();
        if !missing.is_empty() {
            problems.push(format!(
                "lacks {} CLIP tensors model.arch needs: {}",
                missing.len(),
                list(&missing)
            ));
        }
        if !wrong.is_empty() {
            problems.push(format!(
                "has {} tensors of another shape than model.arch: {}",
                wrong.len(),
                list(&wrong)
            ));
        }
        if !unused.is_empty() {
            problems.push(format!(
                "has {} tensors this CLIP does not have (another architecture?): {}",
                unused.len(),
                list(&unused)
            ));
        }
        anyhow::ensure!(problems.is_empty(), "{} {}", path.display(), problems.join("; "));
        Ok(())
    }

    /// Side of the positional-embedding grid of the image tower.
    fn clip_grid(&self) -> i64 {
        let pos = self
            .vs
            .variables()
            .into_iter()
            .find(|(n, _)| n == "visual.positional_embedding" || n == "visual.attnpool.positional_embedding")
            .map(|(_, t)| t.size()[0])
            .unwrap_or(1);
        ((pos - 1) as f64).sqrt().round() as i64
    }

    /// Features, PromptSG's outputs and logits for the losses; `train`
    /// picks batch statistics (BNNecks, PromptSG's BatchNorm, a ResNet's
    /// BatchNorms unless frozen) and ArcFace margin logits (which need `labels`).
    pub fn forward(&self, pixels: &Tensor, labels: Option<&Tensor>, train: bool) -> anyhow::Result<Forward> {
        let image =
            self.clip
                .visual
                .forward_t(pixels, train && self.train_backbone_norm, self.promptsg.is_some())?;
        let (fused, text) = match &self.promptsg {
            Some(sg) => {
                // Image -> pseudo-word -> composed prompt through the text
                // tower -> its feature queries the patch tokens.
                let tokens = image.tokens.as_ref().context("patch tokens")?;
                let pseudo = sg.inversion.forward_t(&image.projected, train);
                let text = sg.composed.forward(&self.clip.text, &pseudo)?;
                let fused = sg.head.interaction.forward(&text, tokens)?;
                (Some(fused), Some(text))
            }
            None => (None, None),
        };
        let mut out = Forward {
            image,
            fused,
            text,
            logits: Vec::new(),
            parts: Vec::new(),
        };
        for branch in &self.branches {
            let feature = out.feature(branch.input)?;
            let (necked, logits) = branch.classify(&feature, labels, train);
            out.parts
                .push(if self.embed_after_neck { necked } else { feature });
            if let Some(logits) = logits {
                out.logits.push(logits);
            }
        }
        Ok(out)
    }

    /// The served embedding's parts in a training pass `out`, before the L2
    /// normalisation: the branches' parts when the embedding is made of
    /// them ([`ReidNet::embed`]), else the image tower's serving feature.
    pub fn served_parts(&self, out: &Forward) -> anyhow::Result<Vec<Tensor>> {
        if self.branches.is_empty() || !self.serves_branches() {
            return Ok(vec![out.image.select(self.feature)?]);
        }
        Ok(out.parts.iter().map(Tensor::shallow_clone).collect())
    }

    /// Whether the served embedding is made of the branches' parts taken
    /// after their BNNecks.
    pub fn embeds_after_neck(&self) -> bool {
        self.embed_after_neck
    }

    /// L2-normalised embeddings in inference mode: what the exported
    /// checkpoint serves (the branches' features, through their BNNecks
    /// with running statistics when `neck_feat: after`, concatenated).
    pub fn embed(&self, pixels: &Tensor) -> anyhow::Result<Tensor> {
        let out = tch::no_grad(|| -> anyhow::Result<Tensor> {
            if let (Some(sg), Feature::PromptSg { .. }) = (&self.promptsg, self.serving_feature()) {
                let (_, tokens) = self
                    .clip
                    .visual
                    .forward_feature_and_tokens(pixels, Feature::Projected)?;
                let fused = sg.head.forward(&tokens)?;
                return Ok(self.through_necks(vec![fused]));
            }
            let image = self.clip.visual.forward_t(pixels, false, false)?;
            if self.branches.is_empty() || !self.serves_branches() {
                return Ok(image.select(self.serving_feature())?);
            }
            let parts = self
                .branches
                .iter()
                .map(|b| match b.input {
                    TrainFeature::Penultimate => image.penultimate.shallow_clone(),
                    TrainFeature::Backbone => image.backbone.shallow_clone(),
                    TrainFeature::Projected | TrainFeature::Fused => image.projected.shallow_clone(),
                })
                .collect();
            Ok(self.through_necks(parts))
        })?;
        Ok(l2_normalize(&out))
    }

    /// The branches' parts (in branch order) through their necks when the
    /// embedding is taken after them, concatenated.
    fn through_necks(&self, parts: Vec<Tensor>) -> Tensor {
        let parts: Vec<Tensor> = parts
            .into_iter()
            .zip(&self.branches)
            .map(|(part, branch)| {
                if self.embed_after_neck {
                    branch.neck(&part, false)
                } else {
                    part
                }
            })
            .collect();
        Tensor::cat(&parts, 1)
    }

    /// CLIP's projected image features (the joint image-text space), not
    /// normalised, in inference mode: what CLIP-ReID's stage 1 caches
    /// (`model(img, get_image=True)` = `image_features_proj[:, 0]`).
    pub fn projected_features(&self, pixels: &Tensor) -> anyhow::Result<Tensor> {
        Ok(tch::no_grad(|| {
            self.clip.visual.forward_feature(pixels, Feature::Projected)
        })?)
    }

    /// Sets which variables train: the image tower (all of it, or its last
    /// `unfreeze_last` blocks and what follows them), the head and
    /// PromptSG's modules; the text tower, the logit scale and CLIP-ReID's
    /// prompts stay frozen (`make_optimizer_2stage`).
    pub fn set_trainable(&self, unfreeze_last: Option<usize>) {
        let vars = self.vs.variables();
        let mut blocks: Vec<(usize, usize)> = vars
            .keys()
            .filter_map(|name| name.strip_prefix(VISUAL).and_then(block_key))
            .collect();
        blocks.sort_unstable();
        blocks.dedup();
        let first_trainable = unfreeze_last.map(|n| blocks.len().saturating_sub(n));
        for (name, var) in vars {
            let train = if is_buffer(&name) {
                false
            } else if let Some(rest) = name.strip_prefix(VISUAL) {
                match (first_trainable, block_key(rest)) {
                    (None, _) => true,
                    (Some(first), Some(key)) => {
                        blocks.iter().position(|b| *b == key).is_some_and(|i| i >= first)
                    }
                    // After the blocks: ViT ln_post + proj, ResNet attention pool.
                    (Some(_), None) => {
                        rest.starts_with("ln_post") || rest == "proj" || rest.starts_with("attnpool")
                    }
                }
            } else {
                name.starts_with(HEAD) || name.starts_with(PROMPTSG)
            };
            let _ = var.set_requires_grad(train);
        }
    }

    /// Freezes every variable (prompt learning, zero-shot).
    pub fn freeze_all(&self) {
        for (_, var) in self.vs.variables() {
            let _ = var.set_requires_grad(false);
        }
    }

    /// The optimizer's groups over the trainable variables: `backbone` (the
    /// image tower) and `head` (heads, PromptSG's modules), each with its
    /// rate and decay; with `bias_lr_factor != 1` or `bias_weight_decay`
    /// set, every variable whose name holds `bias` goes to a `.bias` twin
    /// group (CLIP-ReID's `make_optimizer_prompt.py`: `if "bias" in key`).
    pub fn param_groups(&self, optim: &OptimConfig) -> Vec<ParamGroup> {
        let split_bias = optim.bias_lr_factor != 1.0 || optim.bias_weight_decay.is_some();
        let mut groups: Vec<ParamGroup> = Vec::new();
        for (name, var) in handid_model::checkpoint::named_variables(&self.vs) {
            if !var.requires_grad() {
                continue;
            }
            let new_module = name.starts_with(HEAD) || name.starts_with(PROMPTSG);
            let (mut group, mut lr, mut weight_decay) = if new_module {
                (
                    "head".to_owned(),
                    optim.head_lr.unwrap_or(optim.lr),
                    optim.head_weight_decay.unwrap_or(optim.weight_decay),
                )
            } else {
                ("backbone".to_owned(), optim.lr, optim.weight_decay)
            };
            if split_bias && name.contains("bias") {
                group.push_str(".bias");
                lr *= optim.bias_lr_factor;
                weight_decay = optim.bias_weight_decay.unwrap_or(weight_decay);
            }
            match groups.iter_mut().find(|g| g.name == group) {
                Some(g) => g.params.push((name, var)),
                None => groups.push(ParamGroup {
                    name: group,
                    lr,
                    weight_decay,
                    params: vec![(name, var)],
                }),
            }
        }
        let order = ["backbone", "backbone.bias", "head", "head.bias"];
        groups.sort_by_key(|g| order.iter().position(|o| *o == g.name));
        groups
    }

    /// The serving checkpoint's weights, sorted: the image tower, the
    /// BNNecks concatenated into one `neck.*` when the embedding is taken
    /// after them (a BatchNorm is per dimension, so one over the
    /// concatenated parts is the parts' BatchNorms side by side), and for a
    /// fused PromptSG feature the interaction module and the simplified prompt.
    pub fn serving_weights(&self) -> Vec<(String, Tensor)> {
        let fused = matches!(self.serving_feature(), Feature::PromptSg { .. });
        let vars = self.vs.variables();
        let mut out: Vec<(String, Tensor)> = vars
            .iter()
            .filter(|(name, _)| {
                name.starts_with(VISUAL)
                    || (fused
                        && (name.starts_with("promptsg.interaction.") || *name == "promptsg.simplified_text"))
            })
            .map(|(n, v)| (n.clone(), v.shallow_clone()))
            .collect();
        if self.serving_neck().is_some() {
            for part in ["weight", "bias", "running_mean", "running_var"] {
                let pieces: Vec<&Tensor> = (0..self.branches.len())
                    .filter_map(|i| {
                        let suffix = if i == 0 { "" } else { "_proj" };
                        vars.get(&format!("head.bottleneck{suffix}.{part}"))
                    })
                    .collect();
                out.push((format!("neck.{part}"), Tensor::cat(&pieces, 0)));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// The features `config`'s head has a branch on, in branch order.
fn branch_inputs(config: &TrainConfig) -> Vec<TrainFeature> {
    match (&config.method, config.model.feature) {
        (Method::ZeroShot, _) => Vec::new(),
        (Method::PromptSg { .. }, _) => vec![TrainFeature::Fused],
        (_, Feature::ClipReid) => vec![TrainFeature::Backbone, TrainFeature::Projected],
        (_, Feature::ClassToken) => vec![TrainFeature::Backbone],
        (_, Feature::Projected | Feature::PromptSg { .. }) => vec![TrainFeature::Projected],
    }
}

/// The head's branches under `root` (`head.` in the net's VarStore) for
/// `classes` persons: what [`ReidNet::build`] makes, and what
/// backward-compatible training rebuilds alone from an old run's checkpoint.
pub fn head_branches(root: &nn::Path, config: &TrainConfig, h: &HeadConfig, classes: i64) -> Vec<Branch> {
    let vision = config.model.vision();
    let mut branches = Vec::new();
    for (i, input) in branch_inputs(config).into_iter().enumerate() {
        let dim = match input {
            TrainFeature::Backbone => ImageEncoder::backbone_dim(&vision),
            TrainFeature::Penultimate => ImageEncoder::penultimate_dim(&vision),
            TrainFeature::Projected | TrainFeature::Fused => vision.output_dim,
        };
        // CLIP-ReID's names: the second branch's modules end in `_proj`.
        let suffix = if i == 0 { "" } else { "_proj" };
        let reduction = h.reduction_dim.map(|r| {
            let config = nn::LinearConfig {
                bias: false,
                ..Default::default()
            };
            nn::linear(root / format!("reduction{suffix}"), dim, r, config)
        });
        let head_dim = h.reduction_dim.unwrap_or(dim);
        branches.push(Branch {
            input,
            dim,
            reduction,
            neck: h
                .bnneck
                .then(|| BnNeck::new(root / format!("bottleneck{suffix}"), head_dim)),
            classifier: Some(classifier(
                &(root / format!("classifier{suffix}")),
                h,
                head_dim,
                classes,
            )),
        });
    }
    branches
}

fn classifier(p: &nn::Path, head: &HeadConfig, dim: i64, classes: i64) -> ClassifierHead {
    match head.classifier {
        Classifier::Linear => ClassifierHead::Linear(LinearClassifier::new(p.clone(), dim, classes)),
        Classifier::Arcface => ClassifierHead::ArcFace(ArcFace::new(p.clone(), dim, classes, head.arcface())),
    }
}

/// Variables no optimizer touches: BatchNorm statistics, the BNNecks'
/// biases (frozen at zero: `bottleneck.bias.requires_grad_(False)` in
/// CLIP-ReID), PromptSG's cached simplified prompt.
fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean")
        || name.ends_with("running_var")
        || (name.starts_with("head.bottleneck") && name.ends_with(".bias"))
        || name.ends_with("simplified_text")
}

/// The block a `visual.` variable belongs to, in forward order: ViT
/// `transformer.resblocks.{i}` -> (0, i), ResNet `layer{s}.{j}` -> (s, j).
fn block_key(name: &str) -> Option<(usize, usize)> {
    let index = |s: &str| s.split('.').next().and_then(|i| i.parse::<usize>().ok());
    if let Some(rest) = name.strip_prefix("transformer.resblocks.") {
        return Some((0, index(rest)?));
    }
    let rest = name.strip_prefix("layer")?;
    let (stage, rest) = rest.split_once('.')?;
    Some((stage.parse().ok()?, index(rest)?))
}
