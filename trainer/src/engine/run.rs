//! The training loop: data, phases (CLIP-ReID stage 1, fine-tuning),
//! validation on training persons, checkpoints every epoch, exact resume,
//! per-epoch CSV, curves and a summary line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use handid_eval::data::manifest::Manifest as SplitManifest;
use handid_eval::metrics::Similarity;
use handid_eval::metrics::rank::{ApKind, QueryScope, Ranking};
use handid_model::Tokenizer;
use handid_model::prompt::IdPromptLearner;
use indicatif::{ProgressBar, ProgressStyle};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use tch::{Device, Kind, Tensor, nn};

use super::optim::{Optimizer, OptimizerKind, ParamGroup};
use super::state::{self, Best, EpochRow, Tensors, TrainState, ValMetrics};
use crate::config::{LossConfig, Method, Stage1, Stage2, TrainConfig, TrainPrecision};
use crate::data::{Augment, Item, Loader, PkSampler};
use crate::losses::{self, CenterLoss, TripletMargin};
use crate::net::{Forward, ReidNet, seeded};

/// How a run is driven (beyond its config).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The run folder.
    pub out: PathBuf,
    /// Continue from `out/checkpoints/latest`.
    pub resume: bool,
    /// Stop cleanly after this run-wide epoch count (a later `--resume` continues).
    pub stop_after_epoch: Option<u64>,
    /// Show progress bars.
    pub progress: bool,
    /// Keep this many epoch checkpoints (besides `best`).
    pub keep_checkpoints: usize,
}

/// What a run reports at the end.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Run-wide epochs completed (all phases).
    pub epochs: u64,
    /// Whether every configured epoch is done.
    pub finished: bool,
    /// Best validation of the final phase.
    pub best: Option<Best>,
    /// Mean training throughput over the epochs run in this process.
    pub images_per_second: f64,
    /// The newest checkpoint.
    pub checkpoint: PathBuf,
}

/// The images of the run, labelled.
#[derive(Debug)]
pub struct RunData {
    /// Training items, labels 0..persons.
    pub train: Arc<Vec<Item>>,
    /// Class index -> person id.
    pub persons: Vec<String>,
    /// Validation queries (training persons).
    pub val_query: Arc<Vec<Item>>,
    /// Validation gallery (training persons).
    pub val_gallery: Arc<Vec<Item>>,
}

/// Reads the manifest's training and validation splits. Validation persons
/// must be training persons: a test person can never select a model.
pub fn load_data(config: &TrainConfig) -> anyhow::Result<RunData> {
    let d = &config.data;
    let manifest = SplitManifest::read(&d.manifest)
        .with_context(|| format!("reading the split manifest {}", d.manifest.display()))?;
    let root = match (&d.root, manifest.meta("root")) {
        (Some(root), _) => root.clone(),
        (None, Some(root)) => PathBuf::from(root),
        (None, None) => bail!("{} records no dataset root: set data.root", d.manifest.display()),
    };
    let train = manifest.split(&d.train_split);
    anyhow::ensure!(
        !train.is_empty(),
        "{} has no images in the training split {:?} (splits: {})",
        d.manifest.display(),
        d.train_split,
        manifest.split_names().join(", ")
    );
    let mut trained = train;
    for extra in &d.extra_train_splits {
        let entries = manifest.split(extra);
        anyhow::ensure!(
            !entries.is_empty(),
            "{} has no images in data.extra_train_splits {extra:?} (splits: {})",
            d.manifest.display(),
            manifest.split_names().join(", ")
        );
        trained.extend(entries);
    }
    // A test person must never train: `aspect:person` ids count as `person`.
    let test: std::collections::BTreeSet<&str> = manifest
        .split("test")
        .into_iter()
        .map(|e| e.person.as_str())
        .collect();
    if let Some(e) = trained.iter().find(|e| {
        test.contains(e.person.as_str()) || test.contains(e.person.rsplit(':').next().unwrap_or(""))
    }) {
        bail!(
            "split {:?} of {} trains on person {}, who is a test person",
            e.split,
            d.manifest.display(),
            e.person
        );
    }
    let mut persons: Vec<String> = trained.iter().map(|e| e.person.clone()).collect();
    persons.sort_unstable();
    persons.dedup();
    let label: BTreeMap<&str, i64> = persons.iter().map(String::as_str).zip(0..).collect();
    let items = |split: &str| -> anyhow::Result<Vec<Item>> {
        manifest
            .split(split)
            .iter()
            .map(|e| {
                let label = *label.get(e.person.as_str()).with_context(|| {
                    format!(
                        "split {split:?} holds person {} who is not in the training split {:?}: \
                         validation uses training persons only",
                        e.person, d.train_split
                    )
                })?;
                Ok(Item {
                    path: root.join(&e.image),
                    label,
                })
            })
            .collect()
    };
    let mut train = items(&d.train_split)?;
    for extra in &d.extra_train_splits {
        train.extend(items(extra)?);
    }
    Ok(RunData {
        train: Arc::new(train),
        val_query: Arc::new(items(&d.val_query_split)?),
        val_gallery: Arc::new(items(&d.val_gallery_split)?),
        persons,
    })
}

/// The phases of a method, in order, with their epoch counts.
fn phases(method: &Method) -> Vec<(&'static str, u64)> {
    match method {
        Method::ZeroShot => vec![("zero_shot", 0)],
        Method::Finetune(s) => vec![("stage2", s.epochs)],
        Method::ClipReid { stage1, stage2 } => vec![("stage1", stage1.epochs), ("stage2", stage2.epochs)],
        Method::PromptSg { train, .. } => vec![("stage2", train.epochs)],
    }
}

/// Trains (or resumes) a run and returns its summary.
pub fn train(config: &TrainConfig, options: &RunOptions) -> anyhow::Result<RunSummary> {
    let device = handid_model::parse_device(&config.device).context("choosing the device (config.device)")?;
    let data = load_data(config)?;
    let classes = data.persons.len() as i64;
    std::fs::create_dir_all(&options.out).with_context(|| format!("creating {}", options.out.display()))?;

    let head = match &config.method {
        Method::ZeroShot => None,
        Method::Finetune(s) | Method::ClipReid { stage2: s, .. } | Method::PromptSg { train: s, .. } => {
            Some(&s.head)
        }
    };
    // Every variable is drawn under one seed: the net, then the prompts.
    let (net, prompt_learner) = seeded(config.seed, || -> anyhow::Result<_> {
        let mut net = ReidNet::new(&config.model, head, classes, device)?;
        if let Method::PromptSg { prompt, .. } = &config.method {
            let tokenizer =
                Tokenizer::from_env().context("loading CLIP's BPE vocabulary (HANDID_BPE_VOCAB)")?;
            net.add_promptsg(prompt, &tokenizer)?;
        }
        // CLIP-ReID's per-person prompts live in the net's VarStore
        // (`prompt_learner.cls_ctx`), so checkpoints hold them and a resumed
        // stage 2 recomputes the same text features.
        let prompt_learner = match &config.method {
            Method::ClipReid { stage1, .. } => {
                let tokenizer =
                    Tokenizer::from_env().context("loading CLIP's BPE vocabulary (HANDID_BPE_VOCAB)")?;
                let learner = IdPromptLearner::new(
                    &(net.vs.root() / "prompt_learner"),
                    &net.clip.text,
                    &tokenizer,
                    classes,
                    stage1.n_ctx,
                    &stage1.template,
                )
                .context("method.stage1.template")?;
                let _ = learner.ctx().set_requires_grad(false);
                Some(learner)
            }
            _ => None,
        };
        Ok((net, prompt_learner))
    })?;
    if let Some(weights) = &config.model.clip_weights {
        net.load_clip_weights(weights)?;
    }
    // PromptSG's inference query depends on the (frozen) text tower only.
    net.refresh_simplified_text()?;

    // Where to start: a fresh run or the latest checkpoint.
    let mut resumed: Option<(TrainState, Tensors)> = None;
    if options.resume {
        let dir = state::resolve(&options.out, "latest")?;
        let (saved, tensors) = state::load(&dir)?;
        if saved.config != *config {
            bail!(
                "{} was started with a different configuration; resume with the one in {}",
                options.out.display(),
                options.out.join("config.yaml").display()
            );
        }
        anyhow::ensure!(
            saved.persons == data.persons,
            "the training persons differ from the checkpoint's (was the manifest changed?)"
        );
        handid_model::checkpoint::load_strict(
            &net.vs,
            tensors
                .model
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
        )
        .context("restoring the model from the checkpoint")?;
        eprintln!(
            "resuming {} from {} ({} epochs done)",
            config.name,
            dir.display(),
            saved.history.len()
        );
        resumed = Some((saved, tensors));
    } else {
        if state::checkpoints_dir(&options.out).join("latest").exists() {
            bail!(
                "{} already holds a run; pass --resume to continue it or choose another --out",
                options.out.display()
            );
        }
        std::fs::write(options.out.join("config.yaml"), serde_yaml::to_string(config)?)?;
    }

    let preprocess = config.model.preprocess();
    let augment = Arc::new(Augment::new(config.augment.clone(), preprocess)?);
    let loader = |items: &Arc<Vec<Item>>| {
        Loader::new(
            items.clone(),
            augment.clone(),
            config.data.workers,
            config.data.cache_decoded,
            config.seed,
        )
    };
    let ctx = Ctx {
        config,
        options,
        device,
        data: &data,
        train_loader: loader(&data.train),
        val_query_loader: loader(&data.val_query),
        val_gallery_loader: loader(&data.val_gallery),
    };

    let mut history = resumed
        .as_ref()
        .map(|(s, _)| s.history.clone())
        .unwrap_or_default();
    let mut run_epoch = history.len() as u64;
    let mut best = None;
    let mut throughput = Vec::new();
    let mut checkpoint = PathBuf::new();
    let all_phases = phases(&config.method);
    let last_phase = all_phases.last().map(|p| p.0).unwrap_or("stage2");
    for (phase, epochs) in all_phases {
        // Epochs of this phase already done (from the resumed history).
        let done = history.iter().filter(|r| r.phase == phase).count() as u64;
        let needed = if phase == "zero_shot" { 1 } else { epochs };
        if done >= needed {
            if phase == last_phase {
                best = resumed.as_ref().and_then(|(s, _)| s.best);
            }
            continue;
        }
        let resume_here = resumed.take().filter(|(s, _)| s.phase == phase);
        let outcome = match (phase, &config.method) {
            ("zero_shot", _) => ctx.zero_shot(&net, &mut history)?,
            ("stage1", Method::ClipReid { stage1, .. }) => {
                let learner = prompt_learner.as_ref().context("the prompt learner")?;
                ctx.stage1(&net, learner, stage1, resume_here, &mut history, &mut run_epoch)?
            }
            ("stage2", Method::Finetune(s) | Method::PromptSg { train: s, .. }) => {
                ctx.stage2(&net, s, None, resume_here, &mut history, &mut run_epoch)?
            }
            ("stage2", Method::ClipReid { stage2, .. }) => {
                // The frozen stage-1 text feature of every person, normalised.
                let learner = prompt_learner.as_ref().context("the prompt learner")?;
                let all = Tensor::arange(classes, (Kind::Int64, device));
                let text = tch::no_grad(|| learner.text_features(&net.clip.text, &all))?;
                let text = l2(&text.to_kind(Kind::Float));
                ctx.stage2(
                    &net,
                    stage2,
                    Some(&text),
                    resume_here,
                    &mut history,
                    &mut run_epoch,
                )?
            }
            _ => bail!("unknown phase {phase}"),
        };
        throughput.extend(outcome.throughput);
        checkpoint = outcome.checkpoint;
        best = outcome.best;
        let more_phases = phase != last_phase;
        let stop_here = options
            .stop_after_epoch
            .is_some_and(|stop| history.len() as u64 >= stop);
        if !outcome.finished || (stop_here && more_phases) {
            return Ok(RunSummary {
                epochs: history.len() as u64,
                finished: false,
                best,
                images_per_second: mean(&throughput),
                checkpoint,
            });
        }
    }
    if checkpoint.as_os_str().is_empty() {
        checkpoint = state::resolve(&options.out, "latest")?;
    }
    write_curves(&options.out, &history);
    Ok(RunSummary {
        epochs: history.len() as u64,
        finished: true,
        best,
        images_per_second: mean(&throughput),
        checkpoint,
    })
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// How a phase ended.
struct PhaseOutcome {
    finished: bool,
    best: Option<Best>,
    throughput: Vec<f64>,
    checkpoint: PathBuf,
}

/// What every phase needs.
struct Ctx<'a> {
    config: &'a TrainConfig,
    options: &'a RunOptions,
    device: Device,
    data: &'a RunData,
    train_loader: Loader,
    val_query_loader: Loader,
    val_gallery_loader: Loader,
}

/// Loss scaling for mixed precision (as `torch.cuda.amp.GradScaler`:
/// initial 2^16, halve on overflow, double after 2000 clean steps).
#[derive(Debug)]
struct LossScaler {
    enabled: bool,
    scale: f64,
    clean_steps: u64,
}

impl LossScaler {
    fn new(enabled: bool, scale: f64) -> Self {
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

impl Ctx<'_> {
    fn progress(&self, len: u64, what: String) -> ProgressBar {
        if !self.options.progress {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(len);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(what);
        bar
    }

    /// Embeds `items` in inference mode: `[n, dim]` normalised, CPU.
    fn embed(&self, net: &ReidNet, loader: &Loader, n: usize) -> anyhow::Result<Tensor> {
        let batch = self.config.validation.batch_size.max(1);
        let order: Vec<Vec<usize>> = (0..n)
            .collect::<Vec<_>>()
            .chunks(batch)
            .map(<[usize]>::to_vec)
            .collect();
        let mut rows = Vec::new();
        for b in loader.batches(order, 0, false) {
            let b = b?;
            rows.push(
                net.embed(&b.images.to_device(self.device))?
                    .to_device(Device::Cpu),
            );
        }
        anyhow::ensure!(!rows.is_empty(), "nothing to embed");
        Ok(Tensor::cat(&rows, 0))
    }

    /// Validation mAP and Rank-1 on training persons (held-out images as
    /// queries against the training images); `None` without a validation split.
    fn validate(&self, net: &ReidNet) -> anyhow::Result<Option<ValMetrics>> {
        let (q, g) = (&self.data.val_query, &self.data.val_gallery);
        if q.is_empty() || g.is_empty() {
            return Ok(None);
        }
        let qf = self.embed(net, &self.val_query_loader, q.len())?;
        let gf = self.embed(net, &self.val_gallery_loader, g.len())?;
        let sim: Vec<f32> = Vec::try_from(qf.matmul(&gf.tr()).flatten(0, 1))?;
        let sim = Similarity::new(&sim, q.len(), g.len())?;
        let q_ids: Vec<i64> = q.iter().map(|i| i.label).collect();
        let g_ids: Vec<i64> = g.iter().map(|i| i.label).collect();
        let ranking = Ranking::new(&sim, &q_ids, &g_ids)?;
        Ok(Some(ValMetrics {
            map: ranking.mean_ap(ApKind::NonInterpolated, QueryScope::All),
            rank1: ranking.rank_k(1, QueryScope::All),
        }))
    }

    /// The zero-shot baseline: validate the initial weights, save them.
    fn zero_shot(&self, net: &ReidNet, history: &mut Vec<EpochRow>) -> anyhow::Result<PhaseOutcome> {
        net.freeze_all();
        let start = Instant::now();
        let val = self.validate(net)?;
        history.push(EpochRow {
            phase: "zero_shot".into(),
            epoch: 0,
            step: 0,
            losses: Vec::new(),
            lrs: Vec::new(),
            val,
            images_per_second: 0.0,
            seconds: start.elapsed().as_secs_f64(),
        });
        let best = val.map(|val| Best { epoch: 0, val });
        let state = self.state("zero_shot", 0, 0, best, 1.0, history);
        let tensors = Tensors {
            model: sorted_vars(&net.vs),
            ..Tensors::default()
        };
        let checkpoint = self.save_epoch(0, &state, &tensors, true, history)?;
        Ok(PhaseOutcome {
            finished: true,
            best,
            throughput: Vec::new(),
            checkpoint,
        })
    }

    /// Writes the epoch's checkpoint (`latest`, and `best` when `is_best`)
    /// and rewrites `metrics.csv`; returns the checkpoint folder.
    fn save_epoch(
        &self,
        run_epoch: u64,
        state: &TrainState,
        tensors: &Tensors,
        is_best: bool,
        history: &[EpochRow],
    ) -> anyhow::Result<PathBuf> {
        let out = &self.options.out;
        let checkpoint = state::save(
            out,
            run_epoch,
            state,
            tensors,
            is_best,
            self.options.keep_checkpoints,
        )?;
        state::write_csv(&out.join("metrics.csv"), history)?;
        Ok(checkpoint)
    }

    /// Whether `--stop-after-epoch` asks to stop once `run_epoch` epochs are done.
    fn stop_requested(&self, run_epoch: u64) -> bool {
        self.options
            .stop_after_epoch
            .is_some_and(|stop| run_epoch >= stop)
    }

    fn state(
        &self,
        phase: &str,
        epoch: u64,
        step: u64,
        best: Option<Best>,
        loss_scale: f64,
        history: &[EpochRow],
    ) -> TrainState {
        TrainState {
            format: state::STATE_FORMAT,
            config: self.config.clone(),
            persons: self.data.persons.clone(),
            phase: phase.to_owned(),
            epoch,
            step,
            best,
            loss_scale,
            history: history.to_vec(),
        }
    }

    /// CLIP-ReID stage 1 (Li et al., AAAI 2023, sec. 3.2): both encoders
    /// frozen, the image features of the training set are computed once
    /// (evaluation view), and only the per-person context words learn,
    /// with the image-to-text and text-to-image supervised contrastive losses
    /// (eqs. 3-4) at CLIP's temperature.
    fn stage1(
        &self,
        net: &ReidNet,
        learner: &IdPromptLearner,
        stage: &Stage1,
        resume: Option<(TrainState, Tensors)>,
        history: &mut Vec<EpochRow>,
        run_epoch: &mut u64,
    ) -> anyhow::Result<PhaseOutcome> {
        net.freeze_all();
        let ctx = learner.ctx().set_requires_grad(true);
        let optim = &stage.optim;
        let mut optimizer = Optimizer::new(
            optim.optimizer.clone(),
            vec![ParamGroup {
                name: "prompt".into(),
                lr: optim.prompt_lr.unwrap_or(optim.lr),
                weight_decay: optim.prompt_weight_decay.unwrap_or(optim.weight_decay),
                params: vec![("prompt_learner.cls_ctx".to_owned(), ctx)],
            }],
        )?;
        let (mut epoch, mut step) = (0, 0);
        if let Some((saved, tensors)) = resume {
            optimizer.load_state_tensors(tensors.optimizer)?;
            (epoch, step) = (saved.epoch, saved.step);
        }
        let n = self.data.train.len();
        let bar = self.progress(n as u64, "stage1: caching image features".to_owned());
        let order: Vec<Vec<usize>> = (0..n)
            .collect::<Vec<_>>()
            .chunks(self.config.validation.batch_size.max(1))
            .map(<[usize]>::to_vec)
            .collect();
        let mut rows = Vec::new();
        for batch in self.train_loader.batches(order, 0, false) {
            let batch = batch?;
            bar.inc(batch.indices.len() as u64);
            rows.push(net.embed_projected(&batch.images.to_device(self.device))?);
        }
        bar.finish_and_clear();
        let features = Tensor::cat(&rows, 0);
        let labels: Vec<i64> = self.data.train.iter().map(|i| i.label).collect();
        let labels = Tensor::from_slice(&labels).to_device(self.device);
        let temperature = 1.0 / net.clip.logit_scale.exp().double_value(&[]);
        let batch_size = stage.batch_size.min(n).max(2);
        let mut checkpoint = PathBuf::new();
        while epoch < stage.epochs {
            let lr_factor = optim.schedule.factor(epoch);
            let start = Instant::now();
            // A fresh permutation per epoch from (seed, epoch) only.
            let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed);
            rng.set_stream(1 << 32 | epoch);
            let mut perm: Vec<i64> = (0..n as i64).collect();
            for i in (1..n).rev() {
                perm.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
            }
            let batches: Vec<&[i64]> = perm
                .chunks(batch_size)
                .filter(|c| c.len() == batch_size)
                .collect();
            let bar = self.progress(
                batches.len() as u64,
                format!("stage1 epoch {}/{}", epoch + 1, stage.epochs),
            );
            let mut sums: BTreeMap<&'static str, f64> = BTreeMap::new();
            for idx in &batches {
                let idx = Tensor::from_slice(idx).to_device(self.device);
                let y = labels.index_select(0, &idx);
                let image = features.index_select(0, &idx);
                let text = l2(&learner.text_features(&net.clip.text, &y)?.to_kind(Kind::Float));
                let i2t = losses::sup_con_cross(&image, &text, &y, &y, temperature);
                let t2i = losses::sup_con_cross(&text, &image, &y, &y, temperature);
                let total = &i2t + &t2i;
                *sums.entry("i2t").or_default() += i2t.double_value(&[]);
                *sums.entry("t2i").or_default() += t2i.double_value(&[]);
                *sums.entry("loss").or_default() += total.double_value(&[]);
                optimizer.zero_grad();
                total.backward();
                if let Some(max) = optim.clip_grad_norm {
                    optimizer.clip_grad_norm(max);
                }
                optimizer.step(lr_factor);
                step += 1;
                bar.inc(1);
            }
            bar.finish_and_clear();
            let seconds = start.elapsed().as_secs_f64();
            epoch += 1;
            *run_epoch += 1;
            let row = EpochRow {
                phase: "stage1".into(),
                epoch,
                step,
                losses: sums
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), v / batches.len().max(1) as f64))
                    .collect(),
                lrs: vec![("prompt".to_owned(), optimizer.groups()[0].lr * lr_factor)],
                val: None,
                images_per_second: (batches.len() * batch_size) as f64 / seconds.max(1e-9),
                seconds,
            };
            eprintln!("{}", describe(&row));
            history.push(row);
            let state = self.state("stage1", epoch, step, None, 1.0, history);
            let tensors = Tensors {
                model: sorted_vars(&net.vs),
                optimizer: optimizer.state_tensors(),
                ..Tensors::default()
            };
            checkpoint = self.save_epoch(*run_epoch, &state, &tensors, false, history)?;
            if self.stop_requested(*run_epoch) && epoch < stage.epochs {
                return Ok(PhaseOutcome {
                    finished: false,
                    best: None,
                    throughput: Vec::new(),
                    checkpoint,
                });
            }
        }
        let _ = learner.ctx().set_requires_grad(false);
        Ok(PhaseOutcome {
            finished: true,
            best: None,
            throughput: Vec::new(),
            checkpoint,
        })
    }

    /// Fine-tuning of the image encoder with the head and the configured
    /// losses; `text_features` (`[classes, dim]`, from CLIP-ReID stage 1)
    /// enable the image-to-text cross-entropy.
    fn stage2(
        &self,
        net: &ReidNet,
        stage: &Stage2,
        text_features: Option<&Tensor>,
        resume: Option<(TrainState, Tensors)>,
        history: &mut Vec<EpochRow>,
        run_epoch: &mut u64,
    ) -> anyhow::Result<PhaseOutcome> {
        let config = self.config;
        let losses = &stage.losses;
        net.set_trainable(config.model.unfreeze_last_blocks);
        let mut optimizer = Optimizer::new(stage.optim.optimizer.clone(), net.param_groups(&stage.optim))?;
        // Center loss: its centres have their own SGD (BoT, Luo et al. 2019).
        let center_vs = nn::VarStore::new(self.device);
        let feature_dim =
            handid_model::ImageEncoder::feature_dim(&config.model.vision(), config.model.feature)?;
        let center = losses.center.as_ref().map(|_| {
            seeded(self.config.seed.wrapping_add(1), || {
                CenterLoss::new(center_vs.root(), self.data.persons.len() as i64, feature_dim)
            })
        });
        let mut center_optimizer = match &losses.center {
            Some(c) => Some(Optimizer::new(
                OptimizerKind::Sgd {
                    momentum: 0.0,
                    nesterov: false,
                },
                vec![ParamGroup {
                    name: "center".into(),
                    lr: c.lr,
                    weight_decay: 0.0,
                    params: sorted_vars(&center_vs),
                }],
            )?),
            None => None,
        };
        let amp = stage.optim.precision == TrainPrecision::Amp;
        if amp && self.device == Device::Cpu {
            bail!("optim.precision amp needs a CUDA device; this run uses the CPU");
        }
        let (mut epoch, mut step, mut best, mut scaler) = (0, 0, None, LossScaler::new(amp, 65536.0));
        if let Some((saved, tensors)) = resume {
            optimizer.load_state_tensors(tensors.optimizer)?;
            if let (Some(opt), false) = (center_optimizer.as_mut(), tensors.center.is_empty()) {
                handid_model::checkpoint::load_strict(&center_vs, tensors.center)?;
                opt.load_state_tensors(tensors.center_optimizer)?;
            }
            (epoch, step, best) = (saved.epoch, saved.step, saved.best);
            scaler.scale = saved.loss_scale;
        }

        let labels: Vec<usize> = self.data.train.iter().map(|i| i.label as usize).collect();
        let sampler = PkSampler::new(
            &labels,
            config.data.persons_per_batch,
            config.data.images_per_person,
            config.seed,
        )?;
        let accumulate = stage.optim.accumulate.max(1);
        let mut throughput = Vec::new();
        let mut checkpoint = PathBuf::new();
        while epoch < stage.epochs {
            let lr_factor = stage.optim.schedule.factor(epoch);
            let batches = sampler.epoch(epoch);
            anyhow::ensure!(
                !batches.is_empty(),
                "the sampler drew no batch: too few images per person"
            );
            let n_batches = batches.len();
            let bar = self.progress(
                n_batches as u64,
                format!("stage2 epoch {}/{}", epoch + 1, stage.epochs),
            );
            let start = Instant::now();
            let mut sums: BTreeMap<&'static str, f64> = BTreeMap::new();
            let mut images = 0usize;
            optimizer.zero_grad();
            if let Some(c) = center_optimizer.as_mut() {
                c.zero_grad();
            }
            for (i, batch) in self.train_loader.batches(batches, epoch, true).enumerate() {
                let batch = batch?;
                let x = batch.images.to_device(self.device);
                let y = batch.labels.to_device(self.device);
                images += batch.indices.len();
                let forward = || net.forward(&x, Some(&y), true);
                let out = if amp {
                    tch::autocast(true, forward)?
                } else {
                    forward()?
                };
                let terms = loss_terms(net, &out, &y, losses, center.as_ref(), text_features, epoch)?;
                let total = terms
                    .iter()
                    .map(|(_, t)| t.shallow_clone())
                    .reduce(|a, b| a + b)
                    .unwrap_or_default();
                let total_value = total.double_value(&[]);
                if !total_value.is_finite() && !amp {
                    bail!(
                        "the loss became {total_value} at epoch {} batch {}: lower the learning rate or enable clip_grad_norm",
                        epoch + 1,
                        i + 1
                    );
                }
                for (name, t) in &terms {
                    *sums.entry(name).or_default() += t.double_value(&[]);
                }
                *sums.entry("loss").or_default() += total_value;
                (total * (scaler.scale / accumulate as f64)).backward();
                if ((i + 1) as u64).is_multiple_of(accumulate) || i + 1 == n_batches {
                    let ok = scaler.unscale(&mut optimizer);
                    if ok {
                        if let Some(max) = stage.optim.clip_grad_norm {
                            optimizer.clip_grad_norm(max);
                        }
                        optimizer.step(lr_factor);
                        if let (Some(c), Some(opt)) = (&losses.center, center_optimizer.as_mut()) {
                            // The centres' gradient is undone of the loss
                            // weight (BoT's `param.grad.data *= 1 / weight`).
                            opt.scale_grads(1.0 / (c.weight * scaler.scale));
                            opt.step(1.0);
                        }
                    }
                    step += 1;
                    optimizer.zero_grad();
                    if let Some(c) = center_optimizer.as_mut() {
                        c.zero_grad();
                    }
                }
                bar.set_message(format!("loss {:.4}", sums["loss"] / (i + 1) as f64));
                bar.inc(1);
            }
            bar.finish_and_clear();
            let seconds = start.elapsed().as_secs_f64();
            epoch += 1;
            *run_epoch += 1;
            let validate_now =
                epoch == stage.epochs || epoch.is_multiple_of(config.validation.every_epochs.max(1));
            let val = if validate_now { self.validate(net)? } else { None };
            let is_best = match (val, best) {
                (Some(v), Some(b)) => v.map > b.val.map,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if is_best {
                best = val.map(|val| Best { epoch, val });
            }
            let ips = images as f64 / seconds.max(1e-9);
            throughput.push(ips);
            let row = EpochRow {
                phase: "stage2".into(),
                epoch,
                step,
                losses: sums
                    .iter()
                    .map(|(n, v)| ((*n).to_owned(), v / n_batches as f64))
                    .collect(),
                lrs: optimizer
                    .groups()
                    .iter()
                    .map(|g| (g.name.clone(), g.lr * lr_factor))
                    .collect(),
                val,
                images_per_second: ips,
                seconds,
            };
            eprintln!("{}", describe(&row));
            history.push(row);
            let state = self.state("stage2", epoch, step, best, scaler.scale, history);
            let tensors = Tensors {
                model: sorted_vars(&net.vs),
                optimizer: optimizer.state_tensors(),
                center: if center.is_some() {
                    sorted_vars(&center_vs)
                } else {
                    Vec::new()
                },
                center_optimizer: center_optimizer
                    .as_ref()
                    .map(Optimizer::state_tensors)
                    .unwrap_or_default(),
            };
            checkpoint = self.save_epoch(*run_epoch, &state, &tensors, is_best, history)?;
            if self.stop_requested(*run_epoch) && epoch < stage.epochs {
                return Ok(PhaseOutcome {
                    finished: false,
                    best,
                    throughput,
                    checkpoint,
                });
            }
        }
        Ok(PhaseOutcome {
            finished: true,
            best,
            throughput,
            checkpoint,
        })
    }
}

/// The weighted loss terms of one fine-tuning batch, by name (`id`,
/// `triplet`, `center`, `sup_con`, `i2t`); their sum is the loss.
/// `text_features` (`[classes, dim]`, normalised) enable `i2t`.
pub fn loss_terms(
    net: &ReidNet,
    out: &Forward,
    labels: &Tensor,
    losses: &LossConfig,
    center: Option<&CenterLoss>,
    text_features: Option<&Tensor>,
    epoch: u64,
) -> anyhow::Result<Vec<(&'static str, Tensor)>> {
    let feature = out.feature.to_kind(Kind::Float);
    let mut terms: Vec<(&'static str, Tensor)> = Vec::new();
    if let (Some(id), Some(logits)) = (&losses.id, &out.logits) {
        let ce = losses::cross_entropy_label_smooth(&logits.to_kind(Kind::Float), labels, id.label_smoothing);
        terms.push(("id", ce * id.weight));
    }
    if let Some(t) = &losses.triplet {
        let margin = t.margin.map_or(TripletMargin::Soft, TripletMargin::Hard);
        terms.push((
            "triplet",
            losses::batch_hard_triplet(&feature, labels, margin, t.normalize) * t.weight,
        ));
    }
    if let (Some(c), Some(center)) = (&losses.center, center) {
        terms.push(("center", center.forward(&feature, labels) * c.weight));
    }
    if let Some(s) = &losses.sup_con {
        let w = s.weight_at(epoch);
        if w > 0.0 {
            terms.push((
                "sup_con",
                losses::sup_con(&l2(&feature), labels, s.temperature) * w,
            ));
        }
    }
    if let (Some(t), Some(text)) = (&losses.i2t, text_features) {
        // CLIP-ReID eq. 5: softmax over the similarities of the image to
        // every person's stage-1 text feature, scaled by CLIP's temperature;
        // label smoothing as the ID loss.
        let scale = net.clip.logit_scale.exp().double_value(&[]);
        let logits = l2(&out.projected.to_kind(Kind::Float)).matmul(&text.tr()) * scale;
        let eps = losses.id.as_ref().map_or(0.0, |i| i.label_smoothing);
        terms.push((
            "i2t",
            losses::cross_entropy_label_smooth(&logits, labels, eps) * t.weight,
        ));
    }
    anyhow::ensure!(!terms.is_empty(), "no loss term applies to this method");
    Ok(terms)
}

/// One line per epoch on stderr.
fn describe(row: &EpochRow) -> String {
    let losses: Vec<String> = row.losses.iter().map(|(n, v)| format!("{n} {v:.4}")).collect();
    let val = row
        .val
        .map(|v| format!(", val mAP {:.1}% Rank-1 {:.1}%", 100.0 * v.map, 100.0 * v.rank1))
        .unwrap_or_default();
    format!(
        "{} epoch {}: {}{val}, {:.1} images/s, {:.1} s",
        row.phase,
        row.epoch,
        losses.join(", "),
        row.images_per_second,
        row.seconds
    )
}

/// L2-normalised rows.
pub fn l2(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2.0, [1], true).clamp_min(1e-12)
}

/// A VarStore's variables sorted by name.
pub fn sorted_vars(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    handid_model::checkpoint::named_variables(vs)
}

/// `curves_loss.png` and `curves_val.png` from the history (best effort:
/// a missing font or plotting error is reported, not fatal).
fn write_curves(out: &Path, history: &[EpochRow]) {
    let mut losses: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut map = Vec::new();
    let mut rank1 = Vec::new();
    for (x, row) in history.iter().enumerate() {
        let x = (x + 1) as f64;
        for (name, v) in &row.losses {
            losses
                .entry(format!("{} {name}", row.phase))
                .or_default()
                .push((x, *v));
        }
        if let Some(v) = row.val {
            map.push((x, 100.0 * v.map));
            rank1.push((x, 100.0 * v.rank1));
        }
    }
    let loss_series: Vec<(&str, Vec<(f64, f64)>)> =
        losses.iter().map(|(n, v)| (n.as_str(), v.clone())).collect();
    let plots = [
        ("curves_loss.png", "training losses", "loss", loss_series),
        (
            "curves_val.png",
            "validation (training persons)",
            "%",
            vec![("mAP", map), ("Rank-1", rank1)],
        ),
    ];
    for (file, title, y, series) in plots {
        if let Err(e) = handid_eval::report::line_chart(&out.join(file), title, "epoch", y, &series) {
            eprintln!("warning: {e}");
        }
    }
}
