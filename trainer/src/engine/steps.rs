//! One optimizer step of each training phase, batch by batch: the loss
//! terms of a batch, the backward pass and the update. The epoch loop
//! ([`super::train`]) drives these; the step-parity tests drive them with
//! the reference implementations' fixed batches.

use anyhow::{Context, bail};
use handid_model::{IdPromptLearner, l2_normalize};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use tch::{Device, Kind, Tensor, nn};

use super::optim::{Optimizer, OptimizerKind, ParamGroup};
use super::state::Tensors;
use crate::compat::Influence;
use crate::config::{LossConfig, Stage1, Stage2, TrainFeature, TrainPrecision};
use crate::losses::{self, CenterLoss, TripletMargin};
use crate::net::{Forward, ReidNet, seeded};

/// One loss term of a batch.
#[derive(Debug)]
pub struct LossTerm {
    /// `id`, `triplet_projected`, `i2t`, ... (a branch or feature suffix
    /// only when a loss has several parts).
    pub name: String,
    /// The unweighted value.
    pub value: Tensor,
    /// Its weight in the total.
    pub weight: f64,
}

impl LossTerm {
    pub(crate) fn new(name: impl Into<String>, value: Tensor, weight: f64) -> Self {
        Self {
            name: name.into(),
            value,
            weight,
        }
    }
}

/// What a training batch reports: each term's unweighted and weighted value.
#[derive(Debug, Clone, PartialEq)]
pub struct TermValue {
    /// The term's name.
    pub name: String,
    /// Unweighted.
    pub value: f64,
    /// Weighted (what the total sums).
    pub weighted: f64,
}

fn values(terms: &[LossTerm]) -> Vec<TermValue> {
    terms
        .iter()
        .map(|t| {
            let value = t.value.double_value(&[]);
            TermValue {
                name: t.name.clone(),
                value,
                weighted: value * t.weight,
            }
        })
        .collect()
}

fn total(terms: &[LossTerm]) -> Tensor {
    terms
        .iter()
        .map(|t| &t.value * t.weight)
        .reduce(|a, b| a + b)
        .unwrap_or_default()
}

fn feature_name(f: TrainFeature) -> &'static str {
    match f {
        TrainFeature::Penultimate => "penultimate",
        TrainFeature::Backbone => "backbone",
        TrainFeature::Projected => "projected",
        TrainFeature::Fused => "fused",
    }
}

/// `base` alone for a single part, `base_part` for each of several.
pub(crate) fn part_name(base: &str, part: TrainFeature, parts: usize) -> String {
    if parts == 1 {
        base.to_owned()
    } else {
        format!("{base}_{}", feature_name(part))
    }
}

/// The loss terms of one image-training batch (`id`, `triplet`, `center`,
/// `sup_con`, `i2t`, `image_text_*`). `text_features` (`[classes, dim]`,
/// CLIP-ReID's stage-1 prompts through the text tower, not normalised)
/// enable `i2t`.
pub fn loss_terms(
    net: &ReidNet,
    out: &Forward,
    labels: &Tensor,
    losses: &LossConfig,
    center: Option<&CenterLoss>,
    text_features: Option<&Tensor>,
    epoch: u64,
) -> anyhow::Result<Vec<LossTerm>> {
    let float = |t: Tensor| t.to_kind(Kind::Float);
    let branch_inputs: Vec<TrainFeature> = net.branches.iter().map(|b| b.input).collect();
    let mut terms = Vec::new();
    if let Some(id) = &losses.id {
        // CLIP-ReID's make_loss: ID_LOSS = sum over the classifiers' scores.
        for (input, logits) in branch_inputs.iter().zip(&out.logits) {
            terms.push(LossTerm::new(
                part_name("id", *input, out.logits.len()),
                losses::cross_entropy_label_smooth(
                    &float(logits.shallow_clone()),
                    labels,
                    id.label_smoothing,
                ),
                id.weight,
            ));
        }
    }
    if let Some(t) = &losses.triplet {
        let margin = t.margin.map_or(TripletMargin::Soft, TripletMargin::Hard);
        let features = if t.features.is_empty() {
            branch_inputs.clone()
        } else {
            t.features.clone()
        };
        for f in &features {
            terms.push(LossTerm::new(
                part_name("triplet", *f, features.len()),
                losses::batch_hard_triplet(&float(out.feature(*f)?), labels, margin, t.normalize),
                t.weight,
            ));
        }
    }
    let first = || -> anyhow::Result<Tensor> {
        let input = branch_inputs.first().copied().context("the net has no head")?;
        Ok(float(out.feature(input)?))
    };
    if let (Some(c), Some(center)) = (&losses.center, center) {
        terms.push(LossTerm::new(
            "center",
            center.forward(&first()?, labels),
            c.weight,
        ));
    }
    if let Some(s) = &losses.sup_con {
        let w = s.weight_at(epoch);
        if w > 0.0 {
            terms.push(LossTerm::new(
                "sup_con",
                losses::sup_con(&l2_normalize(&first()?), labels, s.temperature),
                w,
            ));
        }
    }
    if let (Some(t), Some(text)) = (&losses.i2t, text_features) {
        // CLIP-ReID stage 2 (`processor_clipreid_stage2.py`: `logits =
        // image_features @ text_features.t()`): the raw projected image
        // feature against every person's raw stage-1 text feature, no
        // normalisation and no temperature (the norms play its part), then
        // the label-smoothed cross-entropy.
        let logits = float(out.image.projected.shallow_clone()).matmul(&text.tr());
        terms.push(LossTerm::new(
            "i2t",
            losses::cross_entropy_label_smooth(&logits, labels, t.label_smoothing),
            t.weight,
        ));
    }
    if let Some(it) = &losses.image_text {
        // PromptSG eqs. 4-6: supervised contrastive loss between each image
        // feature and the text features, both directions; the text of an
        // image is its composed prompt (PromptSG) or its person's stage-1
        // prompt (CLIP-ReID).
        let text = match (&out.text, text_features) {
            (Some(composed), _) => composed.shallow_clone(),
            (None, Some(prompts)) => prompts.index_select(0, labels),
            (None, None) => bail!("losses.image_text has no text features to contrast with"),
        };
        let image = l2_normalize(&float(out.image.projected.shallow_clone()));
        let text = l2_normalize(&float(text));
        let tau = match it.temperature {
            Some(t) => t,
            None => 1.0 / net.clip.logit_scale.exp().double_value(&[]),
        };
        terms.push(LossTerm::new(
            "image_text_i2t",
            losses::sup_con_cross(&image, &text, labels, labels, tau),
            it.weight,
        ));
        terms.push(LossTerm::new(
            "image_text_t2i",
            losses::sup_con_cross(&text, &image, labels, labels, tau),
            it.weight,
        ));
    }
    anyhow::ensure!(!terms.is_empty(), "no loss term applies to this method");
    Ok(terms)
}

/// Loss scaling for mixed precision (as `torch.cuda.amp.GradScaler`:
/// initial 2^16, halve on overflow, double after 2000 clean steps).
#[derive(Debug)]
pub struct LossScaler {
    enabled: bool,
    /// The current scale (1 when disabled).
    pub scale: f64,
    clean_steps: u64,
}

impl LossScaler {
    /// A scaler starting at `scale` when `enabled`.
    pub fn new(enabled: bool, scale: f64) -> Self {
        Self {
            enabled,
            scale: if enabled { scale } else { 1.0 },
            clean_steps: 0,
        }
    }

    /// Unscales the gradients; false when they overflowed (skip the step).
    fn unscale(&mut self, optimizer: &mut Optimizer) -> bool {
        if !self.enabled {
            return true;
        }
        optimizer.scale_grads(1.0 / self.scale);
        let norm = optimizer.clip_grad_norm(f64::INFINITY);
        if norm.is_finite() {
            self.clean_steps += 1;
            if self.clean_steps.is_multiple_of(2000) {
                self.scale *= 2.0;
            }
            true
        } else {
            self.scale /= 2.0;
            self.clean_steps = 0;
            false
        }
    }
}

/// Center loss with its centres' own SGD (BoT, Luo et al. 2019).
#[derive(Debug)]
struct Centers {
    loss: CenterLoss,
    vs: nn::VarStore,
    optimizer: Optimizer,
    weight: f64,
}

/// Training of the image encoder and heads (CLIP-ReID stage 2, fine-tuning,
/// PromptSG), one batch at a time.
#[derive(Debug)]
pub struct ImageTrainer<'a> {
    net: &'a ReidNet,
    stage: &'a Stage2,
    text_features: Option<Tensor>,
    /// The optimizer of the net's trainable variables.
    pub optimizer: Optimizer,
    centers: Option<Centers>,
    /// The loss scale (mixed precision).
    pub scaler: LossScaler,
    amp: bool,
    /// Batches whose gradients wait for the next step.
    pending: u64,
    /// Optimizer steps taken.
    pub steps: u64,
    /// Backward-compatible training's influence loss.
    influence: Option<&'a Influence>,
}

impl<'a> ImageTrainer<'a> {
    /// Makes the image tower and heads trainable (all of the tower, or its
    /// last `unfreeze_last` blocks) and builds the optimizers; the centres
    /// of a center loss are drawn from `seed + 1`. `text_features` (`[classes,
    /// dim]`) enable CLIP-ReID's `i2t`.
    pub fn new(
        net: &'a ReidNet,
        stage: &'a Stage2,
        text_features: Option<Tensor>,
        unfreeze_last: Option<usize>,
        classes: i64,
        seed: u64,
    ) -> anyhow::Result<Self> {
        net.set_trainable(unfreeze_last);
        let optimizer = Optimizer::new(stage.optim.optimizer.clone(), net.param_groups(&stage.optim))?;
        let device = net.vs.device();
        let centers = match &stage.losses.center {
            Some(c) => {
                let vs = nn::VarStore::new(device);
                let dim = net.branches.first().context("a center loss needs a head")?.dim;
                let loss = seeded(seed.wrapping_add(1), || CenterLoss::new(vs.root(), classes, dim));
                let optimizer = Optimizer::new(
                    OptimizerKind::Sgd {
                        momentum: 0.0,
                        nesterov: false,
                    },
                    vec![ParamGroup {
                        name: "center".into(),
                        lr: c.lr,
                        weight_decay: 0.0,
                        params: handid_model::checkpoint::named_variables(&vs),
                    }],
                )?;
                Some(Centers {
                    loss,
                    vs,
                    optimizer,
                    weight: c.weight,
                })
            }
            None => None,
        };
        let amp = stage.optim.precision == TrainPrecision::Amp;
        if amp && device == Device::Cpu {
            bail!("optim.precision amp needs a CUDA device; this run uses the CPU");
        }
        Ok(Self {
            net,
            stage,
            text_features,
            optimizer,
            centers,
            scaler: LossScaler::new(amp, 65536.0),
            amp,
            pending: 0,
            steps: 0,
            influence: None,
        })
    }

    /// Adds backward-compatible training's influence loss to every batch's
    /// terms (`influence`, weighted λ).
    pub fn with_influence(mut self, influence: Option<&'a Influence>) -> Self {
        self.influence = influence;
        self
    }

    /// The schedule's multiplier of the base rates for the next step, in
    /// the 0-based `epoch`.
    pub fn lr_factor(&self, epoch: u64) -> f64 {
        self.stage.optim.lr_factor(epoch, self.steps)
    }

    /// Restores the optimizers and centres of a checkpoint.
    pub fn resume(&mut self, tensors: Tensors, loss_scale: f64) -> anyhow::Result<()> {
        self.optimizer.load_state_tensors(tensors.optimizer)?;
        if let (Some(c), false) = (self.centers.as_mut(), tensors.center.is_empty()) {
            handid_model::checkpoint::load_strict(&c.vs, tensors.center)?;
            c.optimizer.load_state_tensors(tensors.center_optimizer)?;
        }
        self.scaler.scale = loss_scale;
        Ok(())
    }

    /// The optimizer state and centres to checkpoint (the model is saved apart).
    pub fn tensors(&self) -> Tensors {
        Tensors {
            optimizer: self.optimizer.state_tensors(),
            center: self
                .centers
                .as_ref()
                .map(|c| handid_model::checkpoint::named_variables(&c.vs))
                .unwrap_or_default(),
            center_optimizer: self
                .centers
                .as_ref()
                .map(|c| c.optimizer.state_tensors())
                .unwrap_or_default(),
            ..Tensors::default()
        }
    }

    /// Trains on one batch (`pixels [B, 3, H, W]`, `labels [B]`) of the
    /// 0-based `epoch`: forward, loss terms, backward; the optimizers step
    /// after every `optim.accumulate` batches and after the epoch's `last`
    /// one, at the schedule's rate for `epoch`.
    pub fn batch(
        &mut self,
        pixels: &Tensor,
        labels: &Tensor,
        epoch: u64,
        last: bool,
    ) -> anyhow::Result<Vec<TermValue>> {
        let optim = &self.stage.optim;
        let accumulate = optim.accumulate.max(1);
        if self.pending == 0 {
            self.optimizer.zero_grad();
            if let Some(c) = self.centers.as_mut() {
                c.optimizer.zero_grad();
            }
        }
        let forward = || self.net.forward(pixels, Some(labels), true);
        let out = if self.amp {
            tch::autocast(true, forward)?
        } else {
            forward()?
        };
        let mut terms = loss_terms(
            self.net,
            &out,
            labels,
            &self.stage.losses,
            self.centers.as_ref().map(|c| &c.loss),
            self.text_features.as_ref(),
            epoch,
        )?;
        if let Some(influence) = self.influence {
            terms.extend(influence.terms(self.net, &out, labels)?);
        }
        let values = values(&terms);
        let total_value: f64 = values.iter().map(|v| v.weighted).sum();
        if !total_value.is_finite() && !self.amp {
            bail!(
                "the loss became {total_value} in epoch {}: lower the learning rate or enable clip_grad_norm",
                epoch + 1
            );
        }
        (total(&terms) * (self.scaler.scale / accumulate as f64)).backward();
        self.pending += 1;
        if self.pending == accumulate || last {
            self.pending = 0;
            if self.scaler.unscale(&mut self.optimizer) {
                if let Some(max) = optim.clip_grad_norm {
                    self.optimizer.clip_grad_norm(max);
                }
                self.optimizer.step(self.lr_factor(epoch));
                if let Some(c) = self.centers.as_mut() {
                    // The centres' gradient is undone of the loss weight
                    // (BoT's `param.grad.data *= 1 / weight`).
                    c.optimizer.scale_grads(1.0 / (c.weight * self.scaler.scale));
                    c.optimizer.step(1.0);
                }
            }
            self.steps += 1;
        }
        Ok(values)
    }
}

/// CLIP-ReID stage 1 (Li et al., AAAI 2023, sec. 3.2; the official
/// `processor_clipreid_stage1.py`): both encoders frozen, the image
/// features of the training set cached once, and only the per-person
/// context words learn, with the image-to-text and text-to-image supervised
/// contrastive losses (eqs. 3-4) on the raw (not normalised) features at
/// temperature 1 (`loss/supcontrast.py`: `self.temperature = 1.0`; the
/// features' norms act as the learnt temperature), or on normalised ones at
/// `stage1.temperature` when a recipe sets it.
#[derive(Debug)]
pub struct PromptTrainer<'a> {
    net: &'a ReidNet,
    learner: &'a IdPromptLearner,
    stage: &'a Stage1,
    features: Tensor,
    labels: Tensor,
    /// The optimizer of `prompt_learner.cls_ctx`.
    pub optimizer: Optimizer,
    /// Optimizer steps taken.
    pub steps: u64,
}

impl<'a> PromptTrainer<'a> {
    /// Freezes the net but the prompts; `features [N, dim]` are the cached
    /// image features of the training images, `labels [N]` their persons.
    pub fn new(
        net: &'a ReidNet,
        stage: &'a Stage1,
        features: Tensor,
        labels: Tensor,
    ) -> anyhow::Result<Self> {
        let learner = net
            .prompt_learner
            .as_ref()
            .context("CLIP-ReID's prompt learner")?;
        net.freeze_all();
        let ctx = learner.ctx().set_requires_grad(true);
        let optim = &stage.optim;
        let optimizer = Optimizer::new(
            optim.optimizer.clone(),
            vec![ParamGroup {
                name: "prompt".into(),
                lr: optim.prompt_lr.unwrap_or(optim.lr),
                weight_decay: optim.prompt_weight_decay.unwrap_or(optim.weight_decay),
                params: vec![("prompt_learner.cls_ctx".to_owned(), ctx)],
            }],
        )?;
        Ok(Self {
            net,
            learner,
            stage,
            features,
            labels,
            optimizer,
            steps: 0,
        })
    }

    /// The cached features' batches of the 0-based `epoch`: a fresh
    /// permutation drawn from `(seed, epoch)` only, cut into `batch_size`
    /// pieces, the last one partial (the official loop runs `num_image //
    /// batch + 1` iterations; when `batch_size` divides the images its last
    /// one is empty and only moves the prompts by Adam's momentum, which we
    /// skip).
    pub fn epoch_batches(&self, seed: u64, epoch: u64) -> Vec<Vec<i64>> {
        let n = self.labels.size()[0] as usize;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(1 << 32 | epoch);
        let mut perm: Vec<i64> = (0..n as i64).collect();
        for i in (1..n).rev() {
            perm.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        perm.chunks(self.stage.batch_size.max(1))
            .map(<[i64]>::to_vec)
            .collect()
    }

    /// One optimizer step on the cached features `indices` of the 0-based `epoch`.
    pub fn batch(&mut self, indices: &[i64], epoch: u64) -> anyhow::Result<Vec<TermValue>> {
        let device = self.features.device();
        let idx = Tensor::from_slice(indices).to_device(device);
        let labels = self.labels.index_select(0, &idx);
        let image = self.features.index_select(0, &idx);
        let text = self
            .learner
            .text_features(&self.net.clip.text, &labels)?
            .to_kind(Kind::Float);
        let (image, text, tau) = match self.stage.temperature {
            Some(tau) => (l2_normalize(&image), l2_normalize(&text), tau),
            None => (image, text, 1.0),
        };
        let terms = vec![
            LossTerm::new(
                "i2t",
                losses::sup_con_cross(&image, &text, &labels, &labels, tau),
                1.0,
            ),
            LossTerm::new(
                "t2i",
                losses::sup_con_cross(&text, &image, &labels, &labels, tau),
                1.0,
            ),
        ];
        let values = values(&terms);
        self.optimizer.zero_grad();
        total(&terms).backward();
        if let Some(max) = self.stage.optim.clip_grad_norm {
            self.optimizer.clip_grad_norm(max);
        }
        self.optimizer.step(self.lr_factor(epoch));
        self.steps += 1;
        Ok(values)
    }

    /// The schedule's multiplier of the base rate for the next step, in the
    /// 0-based `epoch`.
    pub fn lr_factor(&self, epoch: u64) -> f64 {
        self.stage.optim.lr_factor(epoch, self.steps)
    }

    /// The optimizer state to checkpoint.
    pub fn tensors(&self) -> Tensors {
        Tensors {
            optimizer: self.optimizer.state_tensors(),
            ..Tensors::default()
        }
    }
}

impl Drop for PromptTrainer<'_> {
    fn drop(&mut self) {
        let _ = self.learner.ctx().set_requires_grad(false);
    }
}
