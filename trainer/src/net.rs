//! The network being trained: CLIP (both towers, OpenAI CLIP key names at the
//! root of the VarStore, so the image tower exports unchanged into a serving
//! checkpoint), a BNNeck and an identity classifier under `head.`.
//!
//! The BatchNorm layers inside CLIP's ModifiedResNet keep their statistics
//! (inference mode) during fine-tuning, as usual with small re-id batches;
//! only the BNNeck learns batch statistics.

use std::path::Path;

use anyhow::Context;
use handid_model::checkpoint::Neck;
use handid_model::heads::{ArcFace, BnNeck, LinearClassifier};
use handid_model::promptsg::{ComposedPrompt, InversionNetwork, PromptSgHead};
use handid_model::{Clip, ClipConfig, Feature, ImageEncoder, Tokenizer};
use tch::{Device, Kind, Tensor, nn};

use crate::config::{
    Classifier, HeadConfig, ModelConfig, NeckFeat, OptimConfig, PromptSgConfig, PromptSgInference,
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

/// What one forward pass gives the losses.
#[derive(Debug)]
pub struct Forward {
    /// The embedding (the served feature, before the BNNeck).
    pub feature: Tensor,
    /// CLIP's projected image feature (the joint image-text space).
    pub projected: Tensor,
    /// Classifier logits, when the net has a classifier.
    pub logits: Option<Tensor>,
    /// PromptSG: the composed prompt's text feature of each image.
    pub text: Option<Tensor>,
}

/// CLIP + re-id head.
#[derive(Debug)]
pub struct ReidNet {
    /// Every variable: `visual.*`, CLIP's text tower at the root, `head.*`.
    pub vs: nn::VarStore,
    /// Both CLIP towers.
    pub clip: Clip,
    /// The BNNeck, when configured.
    pub neck: Option<BnNeck>,
    /// Whether the embedding is the BNNeck's output (`neck_feat: after`).
    pub embed_after_neck: bool,
    /// The classifier, when the method trains one.
    pub classifier: Option<ClassifierHead>,
    /// Which image-tower output is the embedding.
    pub feature: Feature,
    /// PromptSG's modules, when the method is PromptSG.
    pub promptsg: Option<PromptSgModules>,
}

impl ReidNet {
    /// A CLIP-initialised net with a head for `classes` persons (`head:
    /// None`: no head, e.g. zero-shot or prompt learning). Call it inside
    /// [`seeded`] for weights that depend on a seed only.
    pub fn new(
        model: &ModelConfig,
        head: Option<&HeadConfig>,
        classes: i64,
        device: Device,
    ) -> anyhow::Result<Self> {
        let vs = nn::VarStore::new(device);
        let vision = model.vision();
        let clip = Clip::new(
            vs.root(),
            &ClipConfig {
                vision: vision.clone(),
                text: model.text(),
            },
        )?;
        let dim = ImageEncoder::feature_dim(&vision, model.feature)?;
        let root = vs.root() / "head";
        let (neck, classifier) = match head {
            None => (None, None),
            Some(h) => {
                let neck = h.bnneck.then(|| BnNeck::new(&root / "bottleneck", dim));
                let classifier = match h.classifier {
                    Classifier::Linear => {
                        ClassifierHead::Linear(LinearClassifier::new(&root / "classifier", dim, classes))
                    }
                    Classifier::Arcface => {
                        ClassifierHead::ArcFace(ArcFace::new(&root / "classifier", dim, classes, h.arcface()))
                    }
                };
                (neck, Some(classifier))
            }
        };
        let embed_after_neck = neck.is_some() && head.is_some_and(|h| h.neck_feat == NeckFeat::After);
        Ok(Self {
            vs,
            clip,
            neck,
            embed_after_neck,
            classifier,
            feature: model.feature,
            promptsg: None,
        })
    }

    /// Adds PromptSG's modules under `promptsg.` (call inside [`seeded`]).
    pub fn add_promptsg(&mut self, config: &PromptSgConfig, tokenizer: &Tokenizer) -> anyhow::Result<()> {
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
            inversion: InversionNetwork::new(&root / "inversion", dim, self.clip.text.width()),
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

    /// The layer a serving checkpoint of this net applies after the feature.
    pub fn serving_neck(&self) -> Option<Neck> {
        (self.neck.is_some() && self.embed_after_neck).then_some(Neck::BatchNorm)
    }

    /// Copies CLIP weights (any format `handid_model::import` reads) into
    /// both towers; every CLIP variable must be present with its shape.
    pub fn load_clip_weights(&self, path: &Path) -> anyhow::Result<()> {
        let weights = handid_model::import::to_openai_keys(
            handid_model::import::read_weights(path)
                .with_context(|| format!("reading CLIP weights {}", path.display()))?,
        )?;
        let mut weights: std::collections::BTreeMap<String, Tensor> = weights.into_iter().collect();
        let mut missing = Vec::new();
        tch::no_grad(|| -> anyhow::Result<()> {
            for (name, var) in self.vs.variables() {
                if name.starts_with(HEAD) {
                    continue;
                }
                match weights.remove(&name) {
                    None => missing.push(name),
                    Some(w) => {
                        anyhow::ensure!(
                            w.size() == var.size(),
                            "{}: {name} is {:?} in the file but {:?} in model.arch",
                            path.display(),
                            w.size(),
                            var.size()
                        );
                        var.shallow_clone()
                            .copy_(&w.to_kind(var.kind()).to_device(var.device()));
                    }
                }
            }
            Ok(())
        })?;
        anyhow::ensure!(
            missing.is_empty(),
            "{} lacks {} CLIP tensors model.arch needs, e.g. {}",
            path.display(),
            missing.len(),
            missing.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
        );
        Ok(())
    }

    /// Image features for the losses; `train` picks BNNeck batch statistics
    /// and ArcFace margin logits (which need `labels`).
    pub fn forward(&self, pixels: &Tensor, labels: Option<&Tensor>, train: bool) -> anyhow::Result<Forward> {
        if let Some(sg) = &self.promptsg {
            // PromptSG: image -> pseudo-word -> composed prompt through the
            // text tower -> its feature queries the patch tokens.
            let (projected, tokens) = self
                .clip
                .visual
                .forward_feature_and_tokens(pixels, Feature::Projected)?;
            let pseudo = sg.inversion.forward_t(&projected, train);
            let text = sg.composed.forward(&self.clip.text, &pseudo)?;
            let fused = sg.head.interaction.forward(&text, &tokens)?;
            let logits = self.classify(&fused, labels, train);
            return Ok(Forward {
                feature: fused,
                projected,
                logits,
                text: Some(text),
            });
        }
        let (projected, class_token) = match &self.clip.visual {
            ImageEncoder::Vit(vit) => {
                let out = vit.forward(pixels)?;
                (out.pooled, Some(out.cls))
            }
            ImageEncoder::ModifiedResnet(resnet) => (resnet.forward(pixels)?, None),
        };
        let feature = match (self.feature, class_token) {
            (Feature::Projected | Feature::PromptSg { .. }, _) => projected.shallow_clone(),
            (Feature::ClassToken, Some(cls)) => cls,
            (Feature::ClassToken, None) => anyhow::bail!("a ResNet has no class token feature"),
        };
        let logits = self.classify(&feature, labels, train);
        Ok(Forward {
            feature,
            projected,
            logits,
            text: None,
        })
    }

    /// BNNeck then classifier.
    fn classify(&self, feature: &Tensor, labels: Option<&Tensor>, train: bool) -> Option<Tensor> {
        let necked = match &self.neck {
            Some(neck) => neck.forward_t(feature, train),
            None => feature.shallow_clone(),
        };
        match (&self.classifier, labels) {
            (None, _) => None,
            (Some(ClassifierHead::Linear(c)), _) => Some(c.forward(&necked)),
            (Some(ClassifierHead::ArcFace(a)), Some(labels)) if train => Some(a.forward(&necked, labels)),
            (Some(ClassifierHead::ArcFace(a)), _) => Some(a.cosine(&necked)),
        }
    }

    /// L2-normalised embeddings in inference mode: what the exported
    /// checkpoint serves.
    pub fn embed(&self, pixels: &Tensor) -> anyhow::Result<Tensor> {
        let out = tch::no_grad(|| -> anyhow::Result<Tensor> {
            match (&self.promptsg, self.serving_feature()) {
                (Some(sg), Feature::PromptSg { .. }) => {
                    let (_, tokens) = self
                        .clip
                        .visual
                        .forward_feature_and_tokens(pixels, Feature::Projected)?;
                    Ok(sg.head.forward(&tokens)?)
                }
                (_, feature) => Ok(self.clip.visual.forward_feature(pixels, feature)?),
            }
            .map(|f| match &self.neck {
                Some(neck) if self.embed_after_neck => neck.forward_t(&f, false),
                _ => f,
            })
        })?;
        Ok(&out / out.norm_scalaropt_dim(2.0, [1], true).clamp_min(1e-12))
    }

    /// L2-normalised projected image features (CLIP's joint image-text
    /// space) in inference mode, whatever the served feature.
    pub fn embed_projected(&self, pixels: &Tensor) -> anyhow::Result<Tensor> {
        let out = tch::no_grad(|| self.clip.visual.forward_feature(pixels, Feature::Projected))?;
        Ok(&out / out.norm_scalaropt_dim(2.0, [1], true).clamp_min(1e-12))
    }

    /// Sets which variables train: the image tower (all of it, or its last
    /// `unfreeze_last` blocks and what follows them) and the head; the text
    /// tower and the logit scale stay frozen.
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

    /// The optimizer's groups: `backbone` (trainable image-tower variables)
    /// and `head`, each with its configured rate and decay.
    pub fn param_groups(&self, optim: &OptimConfig) -> Vec<ParamGroup> {
        let mut backbone = Vec::new();
        let mut head = Vec::new();
        let mut vars: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, var) in vars {
            if !var.requires_grad() {
                continue;
            }
            if name.starts_with(HEAD) || name.starts_with(PROMPTSG) {
                head.push((name, var));
            } else {
                backbone.push((name, var));
            }
        }
        vec![
            ParamGroup {
                name: "backbone".into(),
                lr: optim.lr,
                weight_decay: optim.weight_decay,
                params: backbone,
            },
            ParamGroup {
                name: "head".into(),
                lr: optim.head_lr.unwrap_or(optim.lr),
                weight_decay: optim.head_weight_decay.unwrap_or(optim.weight_decay),
                params: head,
            },
        ]
    }

    /// The serving checkpoint's weights, sorted: the image tower, and for a
    /// fused PromptSG feature the interaction module and the simplified prompt.
    pub fn serving_weights(&self) -> Vec<(String, Tensor)> {
        let fused = matches!(self.serving_feature(), Feature::PromptSg { .. });
        let neck = self.serving_neck().is_some();
        let mut vars: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .filter_map(|(name, var)| {
                if neck && let Some(rest) = name.strip_prefix("head.bottleneck.") {
                    return Some((format!("neck.{rest}"), var));
                }
                let served = name.starts_with(VISUAL)
                    || (fused
                        && (name.starts_with("promptsg.interaction.") || name == "promptsg.simplified_text"));
                served.then_some((name, var))
            })
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }
}

/// BatchNorm statistics and the BNNeck's frozen bias are not trained.
fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean")
        || name.ends_with("running_var")
        || name.ends_with("bottleneck.bias")
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
