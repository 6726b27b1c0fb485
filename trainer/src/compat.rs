//! Backward-compatible training (BCT; Shen, Xiong, Xia, Soatto, "Towards
//! Backward-Compatible Representation Learning", CVPR 2020).
//!
//! The new model φ_new trains with its own losses plus the *influence loss*,
//! the classification loss of its embedding through the old model's
//! classifier w_old, frozen: `L(w_new, φ_new) + λ L(w_old, φ_new)`.
//! Minimising it puts new embeddings where the old classifier expects the
//! old ones, so new queries can be searched against old templates directly.
//!
//! Which feature the old classifier sees: the part of the new model that
//! *is* the served embedding (what [`ReidNet::embed`] concatenates and
//! normalises), since that is what gets compared with the old templates;
//! the old classifier is applied the way it saw the old model's served
//! embedding. Two classifiers, chosen when the run starts:
//!
//! - **Trained** (the paper's main method): the old run's own head, branch by
//!   branch, on the new model's parts of the served embedding. The old model
//!   served each branch's feature before or after its BNNeck (`neck_feat`);
//!   a part taken before goes through the old (reduction and) BNNeck in
//!   inference mode, a part taken after goes straight to the old classifier.
//!   Linear logits as trained; an ArcFace head gives its cosine logits times
//!   its scale, without the margin. One cross-entropy per branch, each
//!   weighted λ (as the ID loss sums its branches). Needs an old *run*
//!   (serving checkpoints hold no classifier), the same branches of the same
//!   widths, and every training person of the new run among the old run's
//!   classes (matched by person id).
//! - **Synthesised** (the paper's sec. 3.3 answer for classes the old
//!   classifier lacks: their weights are the old model's mean feature of
//!   the class's images): every person's weight is the mean of the old
//!   model's served embeddings of that person's training images, computed
//!   once before training under no_grad with the old model in inference
//!   mode (so a resumed run recomputes the same ones), and the logits are
//!   the cosine of the new served embedding (concatenated parts,
//!   L2-normalised) to those means times `scale` (a normalised softmax: the
//!   means and the old templates are unit vectors compared by cosine). Used
//!   for an old serving checkpoint, for an old run whose classifier cannot
//!   be applied (other persons or another branch layout), and whenever
//!   `classifier: synthesised` asks; all weights are synthesised then, so
//!   one classifier scores every class alike.
//!
//! `classifier: auto` (the default) takes the trained head where it
//! applies, `trained` insists on it (and says why it cannot be had).
//!
//! The old model is frozen throughout: its head lives in a VarStore of its
//! own (never in the optimizer, never checkpointed), no variable of it
//! requires a gradient, and its BNNecks use running statistics. The run
//! records the old model ([`OldModelRecord`], in every checkpoint's state);
//! export declares its embedding space compatible.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use handid_model::checkpoint::{MANIFEST_FILE, Manifest, load_strict};
use handid_model::{DecodeLimits, Embedder, ImageEncoder, l2_normalize};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

use crate::config::{Compatibility, Method, NeckFeat, OldClassifier, PromptSgInference, TrainConfig};
use crate::data::Item;
use crate::engine::RunData;
use crate::engine::state::{self, Tensors, TrainState};
use crate::engine::steps::{LossTerm, part_name};
use crate::losses;
use crate::net::{Branch, Forward, HEAD, ReidNet, head_branches, seeded};

/// Which classifier the influence loss uses (see the module's doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InfluenceClassifier {
    /// The old run's trained head.
    Trained,
    /// Cosine classifier over the old model's class means.
    Synthesised,
}

/// What a run records of the old model it is trained compatible with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OldModelRecord {
    /// `method.compatibility.old` as configured.
    pub path: PathBuf,
    /// The old model's id: the sha256 of its serving weights (for a run, of
    /// the weights its `export` writes).
    pub model_id: String,
    /// The old model's embedding space, which the new model's serving
    /// manifest declares compatible.
    pub embedding_space: String,
    /// The old embedding's width.
    pub embedding_dim: usize,
    /// The influence loss's classifier.
    pub classifier: InfluenceClassifier,
}

/// The old model as `method.compatibility.old` names it, opened.
#[derive(Debug)]
pub struct OldModel {
    compatibility: Compatibility,
    /// Its serving manifest (for a run: of the checkpoint export would write).
    manifest: Manifest,
    /// A serving checkpoint of it: the configured folder, or a temporary one
    /// written from the run's checkpoint.
    serving: PathBuf,
    /// The training checkpoint, when the old model is a run.
    training: Option<(TrainState, Tensors)>,
    /// Holds the temporary serving checkpoint of an old run.
    _scratch: Option<tempfile::TempDir>,
}

impl OldModel {
    /// Opens the old model: a serving checkpoint (a folder with
    /// `handid.yaml`), a training checkpoint (`state.yaml`), or a run folder
    /// (its `best` checkpoint, what `export` exports by default; `latest`
    /// when the run never validated). Nothing is written but a temporary
    /// serving checkpoint of an old run, whose weights give its model id.
    pub fn open(compatibility: &Compatibility) -> anyhow::Result<Self> {
        let path = &compatibility.old;
        let at = "method.compatibility.old";
        anyhow::ensure!(
            path.is_dir(),
            "{at}: {} is not a folder (name the old model's run folder, one of its training \
             checkpoints or its serving checkpoint)",
            path.display()
        );
        let (manifest, serving, training, scratch) = if path.join(MANIFEST_FILE).is_file() {
            let manifest =
                Manifest::read(path).with_context(|| format!("{at}: reading {}", path.display()))?;
            (manifest, path.clone(), None, None)
        } else {
            let checkpoint = if path.join("state.yaml").is_file() {
                path.clone()
            } else if state::checkpoints_dir(path).is_dir() {
                state::resolve_default(path).with_context(|| format!("{at}: {}", path.display()))?
            } else {
                bail!(
                    "{at}: {} holds no handid.yaml (a serving checkpoint), no state.yaml (a training \
                     checkpoint) and no checkpoints/ (a run folder)",
                    path.display()
                );
            };
            let (train_state, tensors) =
                state::load(&checkpoint).with_context(|| format!("{at}: {}", checkpoint.display()))?;
            let scratch = tempfile::tempdir().context("a temporary folder for the old model")?;
            let serving = scratch.path().join("serving");
            let model = tensors
                .model
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect();
            let manifest = crate::export::write_serving(&train_state, model, &serving)
                .with_context(|| format!("{at}: the serving weights of {}", checkpoint.display()))?;
            (manifest, serving, Some((train_state, tensors)), Some(scratch))
        };
        Ok(Self {
            compatibility: compatibility.clone(),
            manifest,
            serving,
            training,
            _scratch: scratch,
        })
    }

    /// `[items, dim]` on the CPU: the old model's embeddings of `items` (the
    /// validation gallery of `validation.select_by: cross_model_map` and
    /// the `val_cross_*` columns), as a server computes them.
    pub fn embed(&self, items: &[Item], device: Device, what: &str) -> anyhow::Result<Tensor> {
        embed_items(&self.serving, items, device, what)
    }

    /// The influence loss of `config`'s new model `net`, trained on `data`:
    /// checks that the old embedding is as wide as the new one, then builds
    /// the old run's trained classifier when it applies, else synthesises
    /// one from the old model's class means (module doc).
    pub fn influence(
        self,
        config: &TrainConfig,
        net: &ReidNet,
        data: &RunData,
        device: Device,
    ) -> anyhow::Result<Influence> {
        let at = "method.compatibility.old";
        let new_dim = ImageEncoder::feature_dim(&config.model.vision(), net.serving_feature())
            .context("the new model's embedding width")?;
        anyhow::ensure!(
            self.manifest.embedding_dim as i64 == new_dim,
            "{at}: the old model {} embeds into {} dimensions, this model into {new_dim}: a new \
             model is compatible with an old one only in an embedding of the old one's width",
            self.compatibility.old.display(),
            self.manifest.embedding_dim
        );
        let trained = match (&self.training, self.compatibility.classifier) {
            (_, OldClassifier::Synthesised) => Err("method.compatibility.classifier: synthesised".to_owned()),
            (Some((old, tensors)), _) => trained_head(old, tensors, config, net, &data.persons, device)?,
            (None, _) => Err("a serving checkpoint holds no classifier".to_owned()),
        };
        let classifier = match trained {
            Ok(head) => Frozen::Trained(head),
            Err(reason) if self.compatibility.classifier == OldClassifier::Trained => bail!(
                "method.compatibility.classifier: trained: the old model's classifier cannot score this \
                 run: {reason} (use auto or synthesised)"
            ),
            Err(reason) => Frozen::Synthesised {
                weights: class_means(&self.serving, data, device)
                    .with_context(|| format!("{at}: the old model's class means"))?,
                scale: self.compatibility.scale,
                reason,
            },
        };
        let record = OldModelRecord {
            path: self.compatibility.old.clone(),
            model_id: self.manifest.model_id.clone(),
            embedding_space: self.manifest.embedding_space.clone(),
            embedding_dim: self.manifest.embedding_dim,
            classifier: match classifier {
                Frozen::Trained(_) => InfluenceClassifier::Trained,
                Frozen::Synthesised { .. } => InfluenceClassifier::Synthesised,
            },
        };
        Ok(Influence {
            classifier,
            weight: self.compatibility.influence_weight,
            record,
        })
    }
}

/// The influence loss: the new model's served embedding through the old
/// model's frozen classifier.
#[derive(Debug)]
pub struct Influence {
    classifier: Frozen,
    weight: f64,
    /// The old model, as the run records it.
    pub record: OldModelRecord,
}

/// The old run's head, rebuilt alone and frozen.
#[derive(Debug)]
struct TrainedHead {
    /// Holds the head's variables (`head.*`), none trainable.
    _vs: nn::VarStore,
    branches: Vec<Branch>,
    /// Whether the old model served its branches after their BNNecks.
    after_neck: bool,
    /// The old ArcFace scale (unused for a linear classifier).
    arcface_scale: f64,
    /// `[new classes]`: the old class of each of the new run's persons.
    old_labels: Tensor,
}

#[derive(Debug)]
enum Frozen {
    Trained(TrainedHead),
    Synthesised {
        /// `[classes, dim]` unit rows, one per person of the new run.
        weights: Tensor,
        scale: f64,
        /// Why the old run's classifier is not used.
        reason: String,
    },
}

impl Influence {
    /// One line saying which classifier the influence loss goes through and why.
    pub fn describe(&self) -> String {
        let r = &self.record;
        let through = match &self.classifier {
            Frozen::Trained(_) => "the old run's trained classifier".to_owned(),
            Frozen::Synthesised { reason, .. } => {
                format!("classifier weights synthesised from the old model's class means ({reason})")
            }
        };
        format!(
            "backward-compatible with {} (model {}, space {}): the influence loss (weight {}) through {through}",
            r.path.display(),
            r.model_id,
            r.embedding_space,
            self.weight
        )
    }

    /// The influence terms of a training batch (`out` from the new net's
    /// forward pass, `labels [batch]` the new run's classes): `influence`,
    /// or `influence_<feature>` per branch of a trained old head with
    /// several, each of weight λ.
    pub fn terms(&self, net: &ReidNet, out: &Forward, labels: &Tensor) -> anyhow::Result<Vec<LossTerm>> {
        let parts: Vec<Tensor> = net
            .served_parts(out)?
            .iter()
            .map(|p| p.to_kind(Kind::Float))
            .collect();
        match &self.classifier {
            Frozen::Trained(head) => {
                let targets = head.old_labels.index_select(0, labels);
                head.branches
                    .iter()
                    .zip(&parts)
                    .map(|(branch, part)| {
                        let logits = branch
                            .frozen_logits(part, head.after_neck, head.arcface_scale)
                            .context("the old head has no classifier")?;
                        Ok(LossTerm::new(
                            part_name("influence", branch.input, head.branches.len()),
                            losses::cross_entropy_label_smooth(&logits, &targets, 0.0),
                            self.weight,
                        ))
                    })
                    .collect()
            }
            Frozen::Synthesised { weights, scale, .. } => {
                let embedding = l2_normalize(&Tensor::cat(&parts, 1));
                let logits = embedding.matmul(&weights.tr()) * *scale;
                Ok(vec![LossTerm::new(
                    "influence",
                    losses::cross_entropy_label_smooth(&logits, labels, 0.0),
                    self.weight,
                )])
            }
        }
    }
}

/// Whether the served embedding of a model trained by `config` is made of
/// its head's branches (PromptSG serving the plain image feature is not).
fn serves_branches(config: &TrainConfig) -> bool {
    !matches!(&config.method, Method::PromptSg { prompt, .. } if prompt.inference == PromptSgInference::Image)
}

/// The old run's head as a frozen classifier of the new net's served parts,
/// or why it cannot be one: no head, other branches or widths, or a new
/// person the old run never classified.
fn trained_head(
    old: &TrainState,
    tensors: &Tensors,
    config: &TrainConfig,
    net: &ReidNet,
    persons: &[String],
    device: Device,
) -> anyhow::Result<Result<TrainedHead, String>> {
    let Some(head) = old.config.method.stage2().map(|s| &s.head) else {
        return Ok(Err("the old run is zero-shot: it has no classifier".to_owned()));
    };
    if !serves_branches(&old.config) || !serves_branches(config) {
        return Ok(Err(
            "a PromptSG model serving the plain image feature has no classifier on it".to_owned(),
        ));
    }
    let old_labels: Result<Vec<i64>, String> = persons
        .iter()
        .map(|p| {
            old.persons
                .iter()
                .position(|o| o == p)
                .map(|i| i as i64)
                .ok_or_else(|| format!("person {p} is not one of the old run's classes"))
        })
        .collect();
    let old_labels = match old_labels {
        Ok(labels) => labels,
        Err(reason) => return Ok(Err(reason)),
    };
    let vs = nn::VarStore::new(device);
    let branches = seeded(old.config.seed, || {
        head_branches(&(vs.root() / "head"), &old.config, head, old.persons.len() as i64)
    });
    let same_layout = branches.len() == net.branches.len()
        && branches
            .iter()
            .zip(&net.branches)
            .all(|(o, n)| o.input == n.input && o.dim == n.dim);
    if !same_layout {
        return Ok(Err(
            "the old head's branches (features, widths) differ from the new model's".to_owned(),
        ));
    }
    let weights: Vec<(String, Tensor)> = tensors
        .model
        .iter()
        .filter(|(name, _)| name.starts_with(HEAD))
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    load_strict(&vs, weights).context("method.compatibility.old: the old run's head")?;
    for (_, var) in vs.variables() {
        let _ = var.set_requires_grad(false);
    }
    Ok(Ok(TrainedHead {
        _vs: vs,
        branches,
        after_neck: head.bnneck && head.neck_feat == NeckFeat::After,
        arcface_scale: head.arcface_scale,
        old_labels: Tensor::from_slice(&old_labels).to_device(device),
    }))
}

/// `[classes, dim]`: for each person of the run, the L2-normalised mean of
/// the old model's embeddings (served from the `serving` checkpoint, as a
/// server computes them) of the person's training images.
fn class_means(serving: &Path, data: &RunData, device: Device) -> anyhow::Result<Tensor> {
    let embeddings = embed_items(serving, &data.train, device, "old model's class means")?;
    let labels: Vec<i64> = data.train.iter().map(|item| item.label).collect();
    let sums = Tensor::zeros(
        [data.persons.len() as i64, embeddings.size()[1]],
        (Kind::Float, Device::Cpu),
    )
    .index_add(0, &Tensor::from_slice(&labels), &embeddings);
    Ok(l2_normalize(&sums).to_device(device))
}

/// `[items, dim]` on the CPU: the old model's embeddings of `items`, served
/// from the `serving` checkpoint on `device` as a server computes them.
fn embed_items(serving: &Path, items: &[Item], device: Device, what: &str) -> anyhow::Result<Tensor> {
    let embedder = Embedder::load(serving, device)?;
    let progress = crate::commands::eval::bar(items.len(), what)?;
    let mut rows = Vec::new();
    for chunk in items.chunks(32) {
        let images = chunk
            .iter()
            .map(|item| {
                let bytes =
                    std::fs::read(&item.path).with_context(|| format!("reading {}", item.path.display()))?;
                handid_model::decode(&bytes, &DecodeLimits::default())
                    .with_context(|| format!("decoding {}", item.path.display()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        rows.push(embedder.embed_images(&images)?.to_device(Device::Cpu));
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    anyhow::ensure!(!rows.is_empty(), "{what}: no image to embed");
    Ok(Tensor::cat(&rows, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The old head applied to a model's own served parts gives that model's
    /// own inference logits: `frozen_logits` is the old classifier as a
    /// function of the served embedding, before or after the BNNecks, for
    /// one branch or CLIP-ReID's two, linear or ArcFace.
    #[test]
    fn a_frozen_head_scores_the_served_parts_as_the_model_itself_does() {
        for (feature, neck, classifier) in [
            ("projected", "before", "linear"),
            ("projected", "after", "linear"),
            ("clip_reid", "before", "arcface"),
            ("clip_reid", "after", "linear"),
        ] {
            let config = TrainConfig::from_yaml(&format!(
                "name: t\nmodel: {{arch: tiny_vit, feature: {feature}}}\ndata: {{manifest: m}}\nmethod: \
                 {{kind: finetune, head: {{neck_feat: {neck}, classifier: {classifier}, arcface_scale: 16.0}}}}\n"
            ))
            .unwrap();
            let net = ReidNet::build(&config, 5, Device::Cpu).unwrap();
            let pixels = Tensor::randn([6, 3, 32, 32], (Kind::Float, Device::Cpu));
            // A training pass moves the BNNecks' running statistics away from identity.
            net.forward(&pixels, Some(&Tensor::from_slice(&[0i64, 1, 2, 3, 4, 0])), true)
                .unwrap();
            let out = tch::no_grad(|| net.forward(&pixels, None, false)).unwrap();
            let parts = net.served_parts(&out).unwrap();
            assert_eq!(parts.len(), if feature == "clip_reid" { 2 } else { 1 });
            let served = Tensor::cat(&parts, 1);
            let embedded = net.embed(&pixels).unwrap();
            assert!(l2_normalize(&served).allclose(&embedded, 1e-5, 1e-5, false));
            for ((branch, part), own) in net.branches.iter().zip(&parts).zip(&out.logits) {
                let frozen = branch.frozen_logits(part, neck == "after", 16.0).unwrap();
                let own = if classifier == "arcface" {
                    own * 16.0
                } else {
                    own.shallow_clone()
                };
                assert!(
                    frozen.allclose(&own, 1e-4, 1e-5, false),
                    "{feature} {neck} {classifier}"
                );
            }
        }
    }
}
