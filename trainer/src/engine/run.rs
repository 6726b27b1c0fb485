//! The training loop: data, the method's phases ([`Phase`]) through one
//! epoch loop ([`Ctx::run_phase`]: progress, loss sums, validation on
//! training persons, a checkpoint every epoch, the stop check), exact
//! resume, per-epoch CSV, curves and a summary line. What a phase does with
//! a batch is in [`super::steps`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use handid_eval::data::manifest::Manifest as SplitManifest;
use handid_eval::metrics::Similarity;
use handid_eval::metrics::rank::{ApKind, QueryScope, Ranking};
use indicatif::{ProgressBar, ProgressStyle};
use tch::{Device, Kind, Tensor, nn};

use super::state::{self, Best, CrossModelVal, EpochRow, Tensors, TrainState, ValMetrics};
use super::steps::{ImageTrainer, PromptTrainer, TermValue};
use crate::compat::{OldModel, OldModelRecord};
use crate::config::{BatchSampler, Method, Phase, SelectBy, TrainConfig};
use crate::data::{Augment, Item, Loader, PkSampler, Sampler};
use crate::net::ReidNet;

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

/// Trains (or resumes) a run and returns its summary.
pub fn train(config: &TrainConfig, options: &RunOptions) -> anyhow::Result<RunSummary> {
    let device = handid_model::parse_device(&config.device).context("choosing the device (config.device)")?;
    let data = load_data(config)?;
    let classes = data.persons.len() as i64;
    // Backward-compatible training's old model, opened (and refused) before
    // anything is written.
    let old = match config.method.stage2().and_then(|s| s.compatibility.as_ref()) {
        Some(compatibility) => Some(OldModel::open(compatibility)?),
        None => None,
    };

    let net = ReidNet::build(config, classes, device)?;
    if let Some(weights) = &config.model.clip_weights {
        net.load_clip_weights(weights)?;
    }
    // PromptSG's inference query depends on the (frozen) text tower only.
    net.refresh_simplified_text()?;
    // The old model's embeddings of the validation gallery, once: every
    // validation of a backward-compatible run also searches them with the
    // new model's queries (M(new, old) on training persons).
    let old_val_gallery = match &old {
        Some(old) if !data.val_query.is_empty() && !data.val_gallery.is_empty() => {
            Some(old.embed(&data.val_gallery, device, "old model's validation gallery")?)
        }
        _ => None,
    };
    let influence = match old {
        Some(old) => Some(old.influence(config, &net, &data, device)?),
        None => None,
    };
    if let Some(influence) = &influence {
        eprintln!("{}", influence.describe());
    }
    let compatible_with = influence.as_ref().map(|i| i.record.clone());
    std::fs::create_dir_all(&options.out).with_context(|| format!("creating {}", options.out.display()))?;

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
        if let (Some(then), Some(now)) = (&saved.compatible_with, &compatible_with) {
            anyhow::ensure!(
                then == now,
                "the old model of method.compatibility changed since the run started (model {}, {:?} \
                 classifier then; model {}, {:?} now)",
                then.model_id,
                then.classifier,
                now.model_id,
                now.classifier
            );
        }
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
        compatible_with,
        old_val_gallery,
    };

    let mut history = resumed
        .as_ref()
        .map(|(s, _)| s.history.clone())
        .unwrap_or_default();
    let mut run_epoch = history.len() as u64;
    let mut best = None;
    let mut throughput = Vec::new();
    let mut checkpoint = PathBuf::new();
    let phases = config.method.phases();
    let last_phase = phases.last().map(|p| p.0);
    for (phase, epochs) in phases {
        let done = history.iter().filter(|r| r.phase == phase).count() as u64;
        let stopped_early = history.iter().any(|r| r.phase == phase && r.early_stop);
        if done >= epochs || stopped_early {
            if Some(phase) == last_phase {
                best = resumed.as_ref().and_then(|(s, _)| s.best);
            }
            continue;
        }
        let resume_here = resumed.take().filter(|(s, _)| s.phase == phase);
        let outcome = match phase {
            Phase::ZeroShot => {
                net.freeze_all();
                ctx.run_phase(
                    &net,
                    phase,
                    epochs,
                    &mut ZeroShot,
                    resume_here,
                    &mut history,
                    &mut run_epoch,
                )?
            }
            Phase::Stage1 => {
                let Method::ClipReid { stage1, .. } = &config.method else {
                    bail!("only CLIP-ReID has a prompt-learning phase");
                };
                let (features, labels) = ctx.cached_features(&net)?;
                let mut runner = PromptPhase {
                    trainer: PromptTrainer::new(&net, stage1, features, labels)?,
                    seed: config.seed,
                };
                ctx.run_phase(
                    &net,
                    phase,
                    epochs,
                    &mut runner,
                    resume_here,
                    &mut history,
                    &mut run_epoch,
                )?
            }
            Phase::Stage2 => {
                let stage = config
                    .method
                    .stage2()
                    .context("the method has no image-training stage")?;
                // CLIP-ReID: every person's frozen stage-1 text feature.
                let text = match &net.prompt_learner {
                    Some(learner) => {
                        let all = Tensor::arange(classes, (Kind::Int64, device));
                        Some(
                            tch::no_grad(|| learner.text_features(&net.clip.text, &all))?
                                .to_kind(Kind::Float),
                        )
                    }
                    None => None,
                };
                let labels: Vec<usize> = data.train.iter().map(|i| i.label as usize).collect();
                let sampler = match config.data.sampler {
                    BatchSampler::Pk => Sampler::Pk(PkSampler::new(
                        &labels,
                        config.data.persons_per_batch,
                        config.data.images_per_person,
                        config.seed,
                    )?),
                    BatchSampler::Random { batch_size } => Sampler::Random {
                        items: labels.len(),
                        batch_size,
                        seed: config.seed,
                    },
                };
                let mut runner = ImagePhase {
                    trainer: ImageTrainer::new(
                        &net,
                        stage,
                        text,
                        config.model.unfreeze_last_blocks,
                        classes,
                        config.seed,
                    )?
                    .with_influence(influence.as_ref()),
                    sampler,
                    loader: &ctx.train_loader,
                    device,
                };
                ctx.run_phase(
                    &net,
                    phase,
                    epochs,
                    &mut runner,
                    resume_here,
                    &mut history,
                    &mut run_epoch,
                )?
            }
        };
        throughput.extend(outcome.throughput);
        checkpoint = outcome.checkpoint;
        best = outcome.best;
        let more_phases = Some(phase) != last_phase;
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

/// Whether validation `v` is strictly better than `b` by the selecting metric
/// (Rank-1 ties broken by mAP).
fn improves(select_by: SelectBy, v: ValMetrics, b: ValMetrics) -> bool {
    match select_by {
        SelectBy::Map => v.map > b.map,
        SelectBy::Rank1 => (v.rank1, v.map) > (b.rank1, b.map),
        // A validation without the cross-model search (none in a run whose
        // config asks for it) never improves on one with it.
        SelectBy::CrossModelMap => {
            (v.cross_model.map(|c| c.map), v.map) > (b.cross_model.map(|c| c.map), b.map)
        }
    }
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

/// What differs between phases; the epoch loop around it is [`Ctx::run_phase`].
trait PhaseRunner {
    /// Restores the optimizer state of a resumed checkpoint of this phase.
    fn resume(&mut self, tensors: Tensors, state: &TrainState) -> anyhow::Result<()>;
    /// Trains the 0-based `epoch`, handing each batch's loss terms to
    /// `record`; returns the images trained on (0: none, no throughput).
    fn epoch(
        &mut self,
        epoch: u64,
        bar: &ProgressBar,
        record: &mut dyn FnMut(&[TermValue]),
    ) -> anyhow::Result<usize>;
    /// Each parameter group's learning rate in the 0-based `epoch`.
    fn lrs(&self, epoch: u64) -> Vec<(String, f64)>;
    /// Optimizer steps taken in the phase.
    fn steps(&self) -> u64;
    /// What to checkpoint besides the model.
    fn tensors(&self) -> Tensors;
    /// The loss scale of mixed precision.
    fn loss_scale(&self) -> f64 {
        1.0
    }
    /// Whether the phase changes the embedding, so validation means something.
    fn validates(&self) -> bool;
}

/// The zero-shot baseline: no training, the initial weights validated and saved.
struct ZeroShot;

impl PhaseRunner for ZeroShot {
    fn resume(&mut self, _: Tensors, _: &TrainState) -> anyhow::Result<()> {
        Ok(())
    }
    fn epoch(&mut self, _: u64, _: &ProgressBar, _: &mut dyn FnMut(&[TermValue])) -> anyhow::Result<usize> {
        Ok(0)
    }
    fn lrs(&self, _: u64) -> Vec<(String, f64)> {
        Vec::new()
    }
    fn steps(&self) -> u64 {
        0
    }
    fn tensors(&self) -> Tensors {
        Tensors::default()
    }
    fn validates(&self) -> bool {
        true
    }
}

/// CLIP-ReID stage 1 over the cached image features.
struct PromptPhase<'a> {
    trainer: PromptTrainer<'a>,
    seed: u64,
}

impl PhaseRunner for PromptPhase<'_> {
    fn resume(&mut self, tensors: Tensors, state: &TrainState) -> anyhow::Result<()> {
        self.trainer.optimizer.load_state_tensors(tensors.optimizer)?;
        self.trainer.steps = state.step;
        Ok(())
    }
    fn epoch(
        &mut self,
        epoch: u64,
        bar: &ProgressBar,
        record: &mut dyn FnMut(&[TermValue]),
    ) -> anyhow::Result<usize> {
        let batches = self.trainer.epoch_batches(self.seed, epoch);
        bar.set_length(batches.len() as u64);
        for indices in &batches {
            record(&self.trainer.batch(indices, epoch)?);
            bar.inc(1);
        }
        Ok(0)
    }
    fn lrs(&self, epoch: u64) -> Vec<(String, f64)> {
        group_lrs(&self.trainer.optimizer, self.trainer.lr_factor(epoch))
    }
    fn steps(&self) -> u64 {
        self.trainer.steps
    }
    fn tensors(&self) -> Tensors {
        self.trainer.tensors()
    }
    fn validates(&self) -> bool {
        false
    }
}

/// Training the image encoder and heads on the sampler's batches.
struct ImagePhase<'a> {
    trainer: ImageTrainer<'a>,
    sampler: Sampler,
    loader: &'a Loader,
    device: Device,
}

impl PhaseRunner for ImagePhase<'_> {
    fn resume(&mut self, tensors: Tensors, state: &TrainState) -> anyhow::Result<()> {
        self.trainer.resume(tensors, state.loss_scale)?;
        self.trainer.steps = state.step;
        Ok(())
    }
    fn epoch(
        &mut self,
        epoch: u64,
        bar: &ProgressBar,
        record: &mut dyn FnMut(&[TermValue]),
    ) -> anyhow::Result<usize> {
        let batches = self.sampler.epoch(epoch);
        anyhow::ensure!(
            !batches.is_empty(),
            "the sampler drew no batch: too few images per person"
        );
        let n = batches.len();
        bar.set_length(n as u64);
        let mut images = 0;
        for (i, batch) in self.loader.batches(batches, epoch, true).enumerate() {
            let batch = batch?;
            images += batch.indices.len();
            let x = batch.images.to_device(self.device);
            let y = batch.labels.to_device(self.device);
            record(&self.trainer.batch(&x, &y, epoch, i + 1 == n)?);
            bar.inc(1);
        }
        Ok(images)
    }
    fn lrs(&self, epoch: u64) -> Vec<(String, f64)> {
        group_lrs(&self.trainer.optimizer, self.trainer.lr_factor(epoch))
    }
    fn steps(&self) -> u64 {
        self.trainer.steps
    }
    fn tensors(&self) -> Tensors {
        self.trainer.tensors()
    }
    fn loss_scale(&self) -> f64 {
        self.trainer.scaler.scale
    }
    fn validates(&self) -> bool {
        true
    }
}

fn group_lrs(optimizer: &super::Optimizer, factor: f64) -> Vec<(String, f64)> {
    optimizer
        .groups()
        .iter()
        .map(|g| (g.name.clone(), g.lr * factor))
        .collect()
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
    /// The old model of backward-compatible training, recorded in every checkpoint.
    compatible_with: Option<OldModelRecord>,
    /// `[val gallery, dim]`: the old model's embeddings of the validation
    /// gallery (backward-compatible training with a validation split).
    old_val_gallery: Option<Tensor>,
}

impl Ctx<'_> {
    fn progress(&self, what: String) -> ProgressBar {
        if !self.options.progress {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(what);
        bar
    }

    /// The epoch loop every phase shares: trains the phase's remaining
    /// epochs, sums the loss terms, validates, writes a checkpoint and a
    /// `metrics.csv` row per epoch and stops when `--stop-after-epoch` says so.
    // The loop's state is the run's: passing it whole reads better than a struct made for it.
    #[allow(clippy::too_many_arguments)]
    fn run_phase(
        &self,
        net: &ReidNet,
        phase: Phase,
        epochs: u64,
        runner: &mut dyn PhaseRunner,
        resume: Option<(TrainState, Tensors)>,
        history: &mut Vec<EpochRow>,
        run_epoch: &mut u64,
    ) -> anyhow::Result<PhaseOutcome> {
        let (mut epoch, mut best) = (0, None);
        if let Some((saved, tensors)) = resume {
            runner.resume(tensors, &saved)?;
            (epoch, best) = (saved.epoch, saved.best);
        }
        let validation = &self.config.validation;
        // Validations since the last strict improvement (early stopping),
        // from the history on resume.
        let mut stale = 0u64;
        let mut record: Option<ValMetrics> = None;
        for v in history.iter().filter(|r| r.phase == phase).filter_map(|r| r.val) {
            if record.is_none_or(|b| improves(validation.select_by, v, b)) {
                (record, stale) = (Some(v), 0);
            } else {
                stale += 1;
            }
        }
        let mut throughput = Vec::new();
        let mut checkpoint = PathBuf::new();
        while epoch < epochs {
            let bar = self.progress(format!("{} epoch {}/{epochs}", phase.name(), epoch + 1));
            let start = Instant::now();
            let mut sums: BTreeMap<String, f64> = BTreeMap::new();
            let mut batches = 0usize;
            let images = runner.epoch(epoch, &bar, &mut |terms| {
                batches += 1;
                let total: f64 = terms.iter().map(|t| t.weighted).sum();
                for t in terms {
                    *sums.entry(t.name.clone()).or_default() += t.weighted;
                }
                *sums.entry("loss".to_owned()).or_default() += total;
                bar.set_message(format!("loss {:.4}", sums["loss"] / batches as f64));
            })?;
            bar.finish_and_clear();
            let seconds = start.elapsed().as_secs_f64();
            let lrs = runner.lrs(epoch);
            epoch += 1;
            *run_epoch += 1;
            let validate_now = runner.validates()
                && (epoch == epochs || epoch.is_multiple_of(self.config.validation.every_epochs.max(1)));
            let val = if validate_now { self.validate(net)? } else { None };
            // A validation as good as the best replaces it: the later epoch
            // has trained longer, and a saturated metric (a small validation
            // set at 100% from the first epoch) must not keep epoch 1. Only a
            // strictly better one resets early stopping's count.
            let (is_best, improved) = match (val, best) {
                (Some(v), Some(b)) => (
                    !improves(validation.select_by, b.val, v),
                    improves(validation.select_by, v, b.val),
                ),
                (Some(_), None) => (true, true),
                (None, _) => (false, false),
            };
            if is_best {
                best = val.map(|val| Best { epoch, val });
            }
            if improved {
                stale = 0;
            } else if val.is_some() {
                stale += 1;
            }
            let early_stop = phase == Phase::Stage2
                && epoch < epochs
                && validation
                    .early_stop_patience
                    .is_some_and(|patience| stale >= patience);
            let ips = images as f64 / seconds.max(1e-9);
            if images > 0 {
                throughput.push(ips);
            }
            let row = EpochRow {
                phase,
                epoch,
                step: runner.steps(),
                losses: sums
                    .into_iter()
                    .map(|(n, v)| (n, v / batches.max(1) as f64))
                    .collect(),
                lrs,
                val,
                images_per_second: ips,
                seconds,
                early_stop,
            };
            eprintln!("{}", describe(&row));
            if early_stop {
                eprintln!(
                    "{}: no better validation {} in {stale} validations: stopping early",
                    phase.name(),
                    match validation.select_by {
                        SelectBy::Map => "mAP",
                        SelectBy::Rank1 => "Rank-1",
                        SelectBy::CrossModelMap => "cross-model mAP",
                    }
                );
            }
            history.push(row);
            let state = TrainState {
                format: state::STATE_FORMAT,
                config: self.config.clone(),
                persons: self.data.persons.clone(),
                phase,
                epoch,
                step: runner.steps(),
                best,
                loss_scale: runner.loss_scale(),
                history: history.clone(),
                compatible_with: self.compatible_with.clone(),
            };
            let tensors = Tensors {
                model: sorted_vars(&net.vs),
                ..runner.tensors()
            };
            checkpoint = state::save(
                &self.options.out,
                *run_epoch,
                &state,
                &tensors,
                is_best,
                self.options.keep_checkpoints,
            )?;
            state::write_csv(&self.options.out.join("metrics.csv"), history)?;
            if early_stop {
                break;
            }
            let stop = self
                .options
                .stop_after_epoch
                .is_some_and(|stop| *run_epoch >= stop);
            if stop && epoch < epochs {
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

    /// Runs `items` through `f` in inference-sized batches (the evaluation
    /// view: no augmentation) and concatenates the rows, on the CPU.
    fn embed_all(
        &self,
        loader: &Loader,
        n: usize,
        f: impl Fn(&Tensor) -> anyhow::Result<Tensor>,
    ) -> anyhow::Result<Tensor> {
        let batch = self.config.validation.batch_size.max(1);
        let order: Vec<Vec<usize>> = (0..n)
            .collect::<Vec<_>>()
            .chunks(batch)
            .map(<[usize]>::to_vec)
            .collect();
        let mut rows = Vec::new();
        for b in loader.batches(order, 0, false) {
            rows.push(f(&b?.images.to_device(self.device))?.to_device(Device::Cpu));
        }
        anyhow::ensure!(!rows.is_empty(), "nothing to embed");
        Ok(Tensor::cat(&rows, 0))
    }

    /// CLIP-ReID stage 1's cache: the raw projected feature of every
    /// training image (inference mode) and its person, on the run's device.
    fn cached_features(&self, net: &ReidNet) -> anyhow::Result<(Tensor, Tensor)> {
        let n = self.data.train.len();
        let features = self.embed_all(&self.train_loader, n, |x| net.projected_features(x))?;
        let labels: Vec<i64> = self.data.train.iter().map(|i| i.label).collect();
        Ok((
            features.to_kind(Kind::Float).to_device(self.device),
            Tensor::from_slice(&labels).to_device(self.device),
        ))
    }

    /// Validation mAP and Rank-1 on training persons (held-out images as
    /// queries against the training images); `None` without a validation split.
    fn validate(&self, net: &ReidNet) -> anyhow::Result<Option<ValMetrics>> {
        let (q, g) = (&self.data.val_query, &self.data.val_gallery);
        if q.is_empty() || g.is_empty() {
            return Ok(None);
        }
        let qf = self.embed_all(&self.val_query_loader, q.len(), |x| net.embed(x))?;
        let gf = self.embed_all(&self.val_gallery_loader, g.len(), |x| net.embed(x))?;
        let q_ids: Vec<i64> = q.iter().map(|i| i.label).collect();
        let g_ids: Vec<i64> = g.iter().map(|i| i.label).collect();
        let search = |gallery: &Tensor| -> anyhow::Result<(f64, f64)> {
            let sim: Vec<f32> = Vec::try_from(qf.matmul(&gallery.tr()).flatten(0, 1))?;
            let sim = Similarity::new(&sim, q.len(), g.len())?;
            let ranking = Ranking::new(&sim, &q_ids, &g_ids)?;
            Ok((
                ranking.mean_ap(ApKind::NonInterpolated, QueryScope::All),
                ranking.rank_k(1, QueryScope::All),
            ))
        };
        let (map, rank1) = search(&gf)?;
        let cross_model = match &self.old_val_gallery {
            Some(old) => {
                let (map, rank1) = search(&old.to_kind(qf.kind()))?;
                Some(CrossModelVal { map, rank1 })
            }
            None => None,
        };
        Ok(Some(ValMetrics {
            map,
            rank1,
            cross_model,
        }))
    }
}

/// One line per epoch on stderr.
fn describe(row: &EpochRow) -> String {
    let losses: Vec<String> = row.losses.iter().map(|(n, v)| format!("{n} {v:.4}")).collect();
    let val = row
        .val
        .map(|v| {
            let cross = v
                .cross_model
                .map(|c| format!(", against the old gallery mAP {:.1}%", 100.0 * c.map))
                .unwrap_or_default();
            format!(
                ", val mAP {:.1}% Rank-1 {:.1}%{cross}",
                100.0 * v.map,
                100.0 * v.rank1
            )
        })
        .unwrap_or_default();
    format!(
        "{} epoch {}: {}{val}, {:.1} images/s, {:.1} s",
        row.phase.name(),
        row.epoch,
        losses.join(", "),
        row.images_per_second,
        row.seconds
    )
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
    let mut cross_map = Vec::new();
    for (x, row) in history.iter().enumerate() {
        let x = (x + 1) as f64;
        for (name, v) in &row.losses {
            losses
                .entry(format!("{} {name}", row.phase.name()))
                .or_default()
                .push((x, *v));
        }
        if let Some(v) = row.val {
            map.push((x, 100.0 * v.map));
            rank1.push((x, 100.0 * v.rank1));
            if let Some(c) = v.cross_model {
                cross_map.push((x, 100.0 * c.map));
            }
        }
    }
    let loss_series: Vec<(&str, Vec<(f64, f64)>)> =
        losses.iter().map(|(n, v)| (n.as_str(), v.clone())).collect();
    let plots = [
        ("curves_loss.png", "training losses", "loss", loss_series),
        ("curves_val.png", "validation (training persons)", "%", {
            let mut series = vec![("mAP", map), ("Rank-1", rank1)];
            if !cross_map.is_empty() {
                series.push(("mAP against the old model's gallery", cross_map));
            }
            series
        }),
    ];
    for (file, title, y, series) in plots {
        if let Err(e) = handid_eval::report::line_chart(&out.join(file), title, "epoch", y, &series) {
            eprintln!("warning: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn improvement_is_strict_and_rank1_ties_fall_to_map() {
        let m = |map, rank1| ValMetrics {
            map,
            rank1,
            cross_model: None,
        };
        assert!(improves(SelectBy::Map, m(0.6, 0.1), m(0.5, 0.9)));
        assert!(
            !improves(SelectBy::Map, m(0.5, 0.9), m(0.5, 0.1)),
            "a tie is no improvement"
        );
        assert!(improves(SelectBy::Rank1, m(0.1, 0.6), m(0.9, 0.5)));
        assert!(improves(SelectBy::Rank1, m(0.6, 0.5), m(0.5, 0.5)));
        assert!(!improves(SelectBy::Rank1, m(0.5, 0.5), m(0.5, 0.5)));
        // The cross-model search decides; the new model's own mAP breaks ties.
        let x = |map, cross| ValMetrics {
            map,
            rank1: 0.0,
            cross_model: Some(CrossModelVal {
                map: cross,
                rank1: 0.0,
            }),
        };
        assert!(improves(SelectBy::CrossModelMap, x(0.1, 0.6), x(0.9, 0.5)));
        assert!(improves(SelectBy::CrossModelMap, x(0.6, 0.5), x(0.5, 0.5)));
        assert!(!improves(SelectBy::CrossModelMap, x(0.5, 0.5), x(0.5, 0.5)));
        assert!(improves(SelectBy::CrossModelMap, x(0.0, 0.0), m(0.9, 0.9)));
        assert!(!improves(SelectBy::CrossModelMap, m(0.9, 0.9), x(0.0, 0.0)));
    }
}
