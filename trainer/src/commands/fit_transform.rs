//! `handid-trainer fit-transform`: fits the old-to-new template
//! transformation of forward-compatible training (Ramanujan et al., CVPR
//! 2022; [`handid_model::transform`]) on training persons' images: each
//! image embedded by the old and the new serving checkpoint, the network
//! trained to map the one onto the other (mean squared error), and written
//! as a small folder with its own manifest (from which model and space, to
//! which, how it was fitted).
//!
//! The recipe is the paper's code's: Adam (learning rate 5e-4, weight decay
//! 2^-15), a cosine schedule per epoch after a linear warm-up of 5 epochs,
//! 80 epochs, batches of 1024, an inner width of 2048; batch normalisation
//! learns from batch statistics in the first half of the epochs and uses
//! its running statistics in the second. Images of test persons are never
//! used: the command refuses a manifest whose fitting split shares a person
//! with a query or gallery split.
//!
//! `--side-info S` fits the paper's transform with side-information: S is
//! the side-information model (a serving checkpoint, e.g. one trained
//! self-supervised beside the old model, `configs/side_info_tiny.yaml`), whose
//! feature of each image is stored beside the old template at enrolment;
//! the transform takes both, and the manifest names S, so that evaluation
//! and the server feed it the same model's features.
//!
//! `--person-target W` (our addition, not in the paper; 0 by default)
//! moves each image's regression target W of the way from the image's own
//! new embedding toward its person's mean new embedding (training persons'
//! labels only, renormalised). What varies between one person's images in
//! B's space (pose, light) is what the old embedding predicts least well
//! for new persons; pulling the targets toward the person keeps the
//! identity and drops part of that. Measured on 1600 synthetic persons
//! (docs/model-upgrades.md): 0.3-0.7 all gain about 0.4-0.5 mAP with
//! side-information.
//!
//! `--arch linear` (ours, not the paper's) fits one affine map instead of
//! the paper's network, in closed form: the least-squares map from the old
//! embedding (and the side-information, concatenated) onto the targets,
//! ridge-regularised (`--ridge`, relative to the mean eigenvalue of the
//! inputs' Gram matrix; the bias is not penalised). Fitted on a few hundred
//! images (the 11k sample) the paper's network learns its training pairs
//! and maps new persons' templates worse than a linear map does; measured
//! in docs/model-upgrades.md. The epochs, batch, learning-rate, weight
//! decay, width and seed options are the network's and do not apply.
//! `--ridge auto` chooses the ridge from [`RIDGE_GRID`] by cross-validation
//! over the fitting persons: the persons fall into five folds, each fold's
//! images are mapped by the map fitted on the other folds, and the ridge
//! whose held-out mapped embeddings come closest to their targets (mean
//! cosine) is the one fitted on all of them. A person's images are never
//! split between the fitted and the held-out side, as a new person's
//! templates are never among the fitting images.
//!
//! `--views N` adds N - 1 augmented views of every fitting image (the
//! trainer's augmentation: padding + random crop and random erasing), each
//! view embedded by both models with the same random draws: more pairs from
//! the same persons, for datasets far smaller than the paper's ImageNet (its
//! code draws augmented training images for the transformation too).

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{Context, bail};
use handid_eval::data::manifest::Manifest;
use handid_model::{Embedder, SideInfo, TemplateTransform, TransformArch, TransformManifest, l2_normalize};
use tch::{Device, Kind, Tensor, nn, nn::OptimizerConfig};

use super::eval::{bar, dataset_root, embed_files, short};
use crate::data::{Augment, AugmentConfig, Loader};

/// Arguments of `fit-transform`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The old serving checkpoint (whose templates are stored).
    #[arg(long)]
    pub old: PathBuf,
    /// The new serving checkpoint.
    #[arg(long)]
    pub new: PathBuf,
    /// The side-information model (a serving checkpoint) whose features
    /// are stored beside the old templates; without it the old embedding is
    /// the side-information.
    #[arg(long)]
    pub side_info: Option<PathBuf>,
    /// Split manifest (from `splits`).
    #[arg(long)]
    pub manifest: PathBuf,
    /// Dataset root (default: the manifest's `root`).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// The manifest's splits of training persons' images to fit on
    /// (repeat for several, e.g. `--split train --split train_extra`).
    #[arg(long = "split", default_value = "train")]
    pub splits: Vec<String>,
    /// Folder to write the transform to.
    #[arg(long)]
    pub out: PathBuf,
    /// Epochs over the fitting images.
    #[arg(long, default_value_t = 80)]
    pub epochs: usize,
    /// Linear warm-up epochs before the cosine schedule.
    #[arg(long, default_value_t = 5)]
    pub warmup_epochs: usize,
    /// Embedding pairs per optimizer step.
    #[arg(long, default_value_t = 1024)]
    pub batch_size: usize,
    /// Adam's base learning rate.
    #[arg(long, default_value_t = 5e-4)]
    pub lr: f64,
    /// Adam's weight decay (L2, as torch.optim.Adam applies it).
    #[arg(long, default_value_t = 3.0517578125e-5)]
    pub weight_decay: f64,
    /// Width of the mixer's hidden layers.
    #[arg(long, default_value_t = 2048)]
    pub inner_dim: usize,
    /// Seed of the initial weights and the batch order.
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Images per forward pass when embedding.
    #[arg(long, default_value_t = 32)]
    pub embed_batch_size: usize,
    /// Views of each fitting image: the image as served, plus N - 1
    /// augmented ones (padding + random crop, random erasing), each embedded
    /// by both models with the same random draws.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub views: u32,
    /// The network: the paper's (`mlp`) or one affine map fitted in closed
    /// form (`linear`).
    #[arg(long, value_enum, default_value_t = Arch::Mlp)]
    pub arch: Arch,
    /// `--arch linear`'s ridge penalty on the map's weights, relative to
    /// the mean eigenvalue of the inputs' Gram matrix (0: plain least
    /// squares), or `auto`: chosen by cross-validation over the fitting
    /// persons.
    #[arg(long, default_value = "0.001", value_parser = parse_ridge)]
    pub ridge: Ridge,
    /// How far each fitting image's target moves from its own new
    /// embedding toward its person's mean new embedding: 0 (the paper)
    /// regresses onto the image's own embedding, 1 onto the person's mean.
    #[arg(long, default_value_t = 0.0)]
    pub person_target: f64,
}

/// `--ridge`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Ridge {
    /// This penalty.
    Fixed(f64),
    /// The penalty of [`RIDGE_GRID`] that maps held-out persons best.
    Auto,
}

impl std::fmt::Display for Ridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fixed(ridge) => write!(f, "{ridge}"),
            Self::Auto => f.write_str("auto"),
        }
    }
}

fn parse_ridge(text: &str) -> Result<Ridge, String> {
    if text == "auto" {
        return Ok(Ridge::Auto);
    }
    match text.parse::<f64>() {
        Ok(ridge) if ridge >= 0.0 && ridge.is_finite() => Ok(Ridge::Fixed(ridge)),
        _ => Err(format!(
            "expected `auto` or a finite number of at least 0, got {text:?}"
        )),
    }
}

/// The ridges `--ridge auto` chooses from (relative, as `--ridge`): none
/// (plain least squares, where the pairs determine the map), then half
/// decades from 1e-6 to 1.
pub const RIDGE_GRID: [f64; 14] = [
    0.0, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0,
];

/// Folds of `--ridge auto`'s cross-validation (fewer when there are fewer
/// persons).
const RIDGE_FOLDS: usize = 5;

/// `--arch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    /// The paper's network, fitted by gradient descent.
    Mlp,
    /// One affine map, fitted in closed form (ridge regression).
    Linear,
}

/// The regression targets with `--person-target weight`: each row of `new`
/// `[rows, d]` (row r the embedding of `persons[r % persons.len()]`'s image,
/// views following the images) moved `weight` of the way toward the unit
/// mean of its person's rows, then back to unit length.
fn person_targets(new: &Tensor, persons: &[&str], weight: f64) -> Tensor {
    let mut ids = std::collections::HashMap::new();
    let index: Vec<i64> = (0..new.size()[0] as usize)
        .map(|r| {
            let next = ids.len() as i64;
            *ids.entry(persons[r % persons.len()]).or_insert(next)
        })
        .collect();
    let index = Tensor::from_slice(&index).to_device(new.device());
    let sums = Tensor::zeros([ids.len() as i64, new.size()[1]], (Kind::Float, new.device()))
        .index_add(0, &index, new);
    let means = l2_normalize(&sums).index_select(0, &index);
    l2_normalize(&(new * (1.0 - weight) + means * weight))
}

/// The learning rate of `epoch`: linear warm-up, then half a cosine.
fn learning_rate(base: f64, epoch: usize, epochs: usize, warmup: usize) -> f64 {
    if epoch < warmup {
        base * (epoch + 1) as f64 / warmup as f64
    } else {
        let (e, span) = ((epoch - warmup) as f64, (epochs - warmup).max(1) as f64);
        0.5 * (1.0 + (std::f64::consts::PI * e / span).cos()) * base
    }
}

/// How the transform is fitted.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Epochs over the pairs.
    pub epochs: usize,
    /// Linear warm-up epochs.
    pub warmup_epochs: usize,
    /// Pairs per step.
    pub batch_size: usize,
    /// Base learning rate.
    pub lr: f64,
    /// Adam's (L2) weight decay.
    pub weight_decay: f64,
}

/// Fits `transform` to map `old` `[n, from]` (with its side-information
/// `[n, side]` when the transform takes one) onto `new` `[n, to]` (rows
/// paired) by mean squared error; calls `each_epoch` with each epoch's mean
/// loss and returns the last one. The batch order comes from libtorch's
/// global generator (seed it first).
pub fn fit(
    transform: &TemplateTransform,
    old: &Tensor,
    side: Option<&Tensor>,
    new: &Tensor,
    schedule: &Schedule,
    mut each_epoch: impl FnMut(f64),
) -> anyhow::Result<f64> {
    let mut optimizer = nn::Adam {
        wd: schedule.weight_decay,
        ..Default::default()
    }
    .build(transform.var_store(), schedule.lr)?;
    let n = old.size()[0];
    let mut last_loss = f64::NAN;
    for epoch in 0..schedule.epochs {
        optimizer.set_lr(learning_rate(
            schedule.lr,
            epoch,
            schedule.epochs,
            schedule.warmup_epochs,
        ));
        // Batch statistics in the first half, running ones in the second
        // (the paper's code's `switch_mode_to_eval`).
        let train_statistics = epoch < schedule.epochs / 2;
        let order = Tensor::randperm(n, (Kind::Int64, Device::Cpu)).to_device(old.device());
        let (mut sum, mut count) = (0.0, 0i64);
        for start in (0..n).step_by(schedule.batch_size) {
            let len = (n - start).min(schedule.batch_size as i64);
            // One pair cannot give batch statistics.
            if len < 2 && train_statistics {
                continue;
            }
            let index = order.narrow(0, start, len);
            let side = side.map(|s| s.index_select(0, &index));
            let mapped = transform.forward_t(&old.index_select(0, &index), side.as_ref(), train_statistics);
            let loss = mapped.mse_loss(&new.index_select(0, &index), tch::Reduction::Mean);
            optimizer.backward_step(&loss);
            sum += loss.double_value(&[]) * len as f64;
            count += len;
        }
        last_loss = sum / count.max(1) as f64;
        each_epoch(last_loss);
    }
    Ok(last_loss)
}

/// The ridge-regularised least-squares affine map from `old` `[n, from]`
/// (with `side` `[n, s]` concatenated) onto `new` `[n, to]`: minimises
/// |X W + b - Y|^2 + λ |W|^2, λ being `ridge` times the mean eigenvalue of
/// XᵀX (its trace over its width), the bias unpenalised; solved in double
/// precision on the CPU. Returns the weight `[to, from + s]` and the bias
/// `[to]`.
pub fn fit_linear(
    old: &Tensor,
    side: Option<&Tensor>,
    new: &Tensor,
    ridge: f64,
) -> anyhow::Result<(Tensor, Tensor)> {
    let cpu = (Kind::Double, Device::Cpu);
    let x = match side {
        Some(side) => Tensor::cat(&[old, side], 1),
        None => old.shallow_clone(),
    }
    .to_device(Device::Cpu)
    .to_kind(Kind::Double);
    let y = new.to_device(Device::Cpu).to_kind(Kind::Double);
    let (n, width) = (x.size()[0], x.size()[1]);
    let lambda = ridge * x.square().sum(Kind::Double).double_value(&[]) / width as f64;
    let inputs = Tensor::cat(&[&x, &Tensor::ones([n, 1], cpu)], 1);
    let mut penalty = vec![lambda; width as usize];
    penalty.push(0.0);
    let gram = inputs.tr().matmul(&inputs) + Tensor::from_slice(&penalty).diag(0);
    // A (numerically) singular system has no one solution: fewer independent
    // pairs than the map's width and bias, and no ridge to decide.
    let eigenvalues = gram.linalg_eigvalsh("L");
    let (lowest, highest) = (
        eigenvalues.min().double_value(&[]),
        eigenvalues.max().double_value(&[]),
    );
    anyhow::ensure!(
        lowest > highest * 1e-12,
        "the least-squares map is not determined by {n} fitting pairs of width {width} with --ridge \
         {ridge} (give a positive --ridge or more images)"
    );
    let solution = Tensor::f_linalg_solve(&gram, &inputs.tr().matmul(&y), true)?;
    Ok((
        solution.narrow(0, 0, width).tr().contiguous(),
        solution.get(width),
    ))
}

/// The fold of every row for a cross-validation over persons: row `r` is
/// an image of `persons[r % persons.len()]` (views follow the images), the
/// persons sorted by name and dealt to `folds` folds in turn, so that all
/// of a person's rows share a fold. Returns the folds of the rows and how
/// many folds there are (`folds`, or the number of persons when fewer).
fn person_folds(rows: usize, persons: &[&str], folds: usize) -> (Vec<usize>, usize) {
    let names: BTreeSet<&str> = persons.iter().copied().collect();
    let folds = folds.min(names.len()).max(1);
    let fold_of: std::collections::HashMap<&str, usize> = names
        .into_iter()
        .enumerate()
        .map(|(i, name)| (name, i % folds))
        .collect();
    let row_folds = (0..rows).map(|r| fold_of[persons[r % persons.len()]]).collect();
    (row_folds, folds)
}

/// How well each ridge of `grid` maps persons it was not fitted on: per
/// ridge, the mean cosine between the held-out rows mapped (the map fitted
/// on the other folds, see [`person_folds`]) and their targets `new`, over
/// every row (NaN for a ridge that does not determine the map on every
/// fold); and the number of folds. Needs at least two persons.
pub fn cross_validate_ridge(
    old: &Tensor,
    side: Option<&Tensor>,
    new: &Tensor,
    persons: &[&str],
    grid: &[f64],
) -> anyhow::Result<(usize, Vec<(f64, f64)>)> {
    let rows = old.size()[0] as usize;
    let (row_folds, folds) = person_folds(rows, persons, RIDGE_FOLDS);
    anyhow::ensure!(
        folds >= 2,
        "--ridge auto needs images of at least two persons to hold one out"
    );
    let cpu = |t: &Tensor| t.to_device(Device::Cpu).to_kind(Kind::Double);
    let (old, new) = (cpu(old), cpu(new));
    let side = side.map(cpu);
    let mut cosine_sums = vec![0.0; grid.len()];
    for fold in 0..folds {
        let pick = |held: bool| {
            let index: Vec<i64> = (0..rows)
                .filter(|&r| (row_folds[r] == fold) == held)
                .map(|r| r as i64)
                .collect();
            Tensor::from_slice(&index)
        };
        let (fitted, held) = (pick(false), pick(true));
        let part = |t: &Tensor, index: &Tensor| t.index_select(0, index);
        let side_fitted = side.as_ref().map(|s| part(s, &fitted));
        let inputs = match &side {
            Some(side) => Tensor::cat(&[part(&old, &held), part(side, &held)], 1),
            None => part(&old, &held),
        };
        let targets = l2_normalize(&part(&new, &held));
        for (sum, &ridge) in cosine_sums.iter_mut().zip(grid) {
            // A ridge too small to determine the map on some fold (0 on
            // fewer pairs than the width) is out of the choice: NaN.
            *sum += match fit_linear(
                &part(&old, &fitted),
                side_fitted.as_ref(),
                &part(&new, &fitted),
                ridge,
            ) {
                Ok((weight, bias)) => {
                    let mapped = l2_normalize(&(inputs.matmul(&weight.tr()) + &bias));
                    (mapped * &targets).sum(Kind::Double).double_value(&[])
                }
                Err(_) => f64::NAN,
            };
        }
    }
    let scores = grid
        .iter()
        .zip(cosine_sums)
        .map(|(&ridge, sum)| (ridge, sum / rows as f64))
        .collect();
    Ok((folds, scores))
}

/// The ridge of the best held-out cosine (the larger ridge of a tie; NaN
/// scores never win).
fn best_ridge(scores: &[(f64, f64)]) -> (f64, f64) {
    scores
        .iter()
        .copied()
        .fold((f64::NAN, f64::MIN), |best, (ridge, cosine)| {
            if cosine >= best.1 { (ridge, cosine) } else { best }
        })
}

/// Runs the command.
pub fn run(args: Args) -> anyhow::Result<()> {
    if args.epochs == 0 || args.batch_size < 2 || args.inner_dim == 0 {
        bail!("--epochs and --inner-dim must be at least 1, --batch-size at least 2");
    }
    if !(0.0..=1.0).contains(&args.person_target) {
        bail!(
            "--person-target must be between 0 and 1, got {}",
            args.person_target
        );
    }
    if args.warmup_epochs >= args.epochs {
        bail!(
            "--warmup-epochs ({}) must be fewer than --epochs ({})",
            args.warmup_epochs,
            args.epochs
        );
    }
    let manifest = Manifest::read(&args.manifest)?;
    let root = dataset_root(args.data.as_deref(), &manifest, &args.manifest)?;
    let mut entries = Vec::new();
    for split in &args.splits {
        let found = manifest.split(split);
        if found.is_empty() {
            bail!("{} has no split {split:?}", args.manifest.display());
        }
        entries.extend(found);
    }
    // Training persons only: a person of a query or gallery split would
    // make the evaluation of the transform optimistic.
    let fitting: BTreeSet<&str> = entries.iter().map(|e| e.person.as_str()).collect();
    let test_splits = manifest
        .split_names()
        .into_iter()
        .filter(|name| name.starts_with("query") || name.starts_with("gallery"));
    for name in test_splits {
        if let Some(e) = manifest
            .split(name)
            .iter()
            .find(|e| fitting.contains(e.person.as_str()))
        {
            bail!(
                "the fitting splits {:?} share person {:?} with {name}: fit on training persons only",
                args.splits,
                e.person
            );
        }
    }
    let images: Vec<&str> = entries.iter().map(|e| e.image.as_str()).collect();
    let device = handid_model::parse_device(&args.device).context("choosing the device")?;
    let embed = |model: &PathBuf| -> anyhow::Result<(Tensor, Embedder)> {
        let embedder =
            Embedder::load(model, device).with_context(|| format!("loading {}", model.display()))?;
        let vectors = embed_files(&embedder, &root, &images, args.embed_batch_size)?;
        let mut flat: Vec<f32> = vectors.into_iter().flat_map(|(_, v)| v).collect();
        if args.views > 1 {
            flat.extend(embed_views(&embedder, &root, &images, &args)?);
        }
        let rows = images.len() as i64 * i64::from(args.views);
        let rows = Tensor::from_slice(&flat).view([rows, embedder.dim() as i64]);
        Ok((rows.to_device(device), embedder))
    };
    let (old, old_model) = embed(&args.old)?;
    let (new, new_model) = embed(&args.new)?;
    // Zero leaves the paper's targets untouched.
    let new = if args.person_target > 0.0 {
        let persons: Vec<&str> = entries.iter().map(|e| e.person.as_str()).collect();
        person_targets(&new, &persons, args.person_target)
    } else {
        new
    };
    let side = args.side_info.as_ref().map(embed).transpose()?;

    tch::manual_seed(args.seed);
    let (from, to) = (old_model.manifest(), new_model.manifest());
    let mut transform = TemplateTransform::new(
        TransformManifest {
            from_model: from.model_id.clone(),
            from_space: from.embedding_space.clone(),
            to_model: to.model_id.clone(),
            to_space: to.embedding_space.clone(),
            from_dim: old_model.dim(),
            to_dim: new_model.dim(),
            arch: match args.arch {
                Arch::Mlp => TransformArch::Mlp,
                Arch::Linear => TransformArch::Linear,
            },
            inner_dim: match args.arch {
                Arch::Mlp => args.inner_dim,
                Arch::Linear => 0,
            },
            side_info: side.as_ref().map(|(_, model)| SideInfo {
                model: model.model_id().to_owned(),
                space: model.manifest().embedding_space.clone(),
                dim: model.dim(),
            }),
            provenance: Vec::new(),
        },
        device,
    );
    let side = side.map(|(features, _)| features);
    // How `--ridge auto` chose `--arch linear`'s ridge.
    let mut ridge_selection = None;
    let (last_loss, fitted_ridge) = match args.arch {
        Arch::Mlp => {
            let progress = bar(args.epochs, "fitting the transform")?;
            let schedule = Schedule {
                epochs: args.epochs,
                warmup_epochs: args.warmup_epochs,
                batch_size: args.batch_size,
                lr: args.lr,
                weight_decay: args.weight_decay,
            };
            let last_loss = fit(&transform, &old, side.as_ref(), &new, &schedule, |epoch_loss| {
                progress.set_message(format!("fitting the transform (loss {epoch_loss:.5})"));
                progress.inc(1);
            })?;
            progress.finish_and_clear();
            (last_loss, None)
        }
        Arch::Linear => {
            let ridge = match args.ridge {
                Ridge::Fixed(ridge) => ridge,
                Ridge::Auto => {
                    let persons: Vec<&str> = entries.iter().map(|e| e.person.as_str()).collect();
                    let (folds, scores) =
                        cross_validate_ridge(&old, side.as_ref(), &new, &persons, &RIDGE_GRID)?;
                    let (ridge, cosine) = best_ridge(&scores);
                    anyhow::ensure!(
                        ridge.is_finite(),
                        "--ridge auto: no ridge of the grid determines the map on every fold"
                    );
                    let table = scores
                        .iter()
                        .map(|(ridge, cosine)| {
                            if cosine.is_nan() {
                                format!("{ridge}: not determined")
                            } else {
                                format!("{ridge}: {cosine:.4}")
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(", ");
                    println!(
                        "--ridge auto: {ridge} (mean cosine of held-out persons' mapped embeddings to their \
                         targets, {folds} folds of persons: {table})"
                    );
                    ridge_selection = Some(format!("auto, held-out cosine {cosine:.4} ({table})"));
                    ridge
                }
            };
            let (weight, bias) = fit_linear(&old, side.as_ref(), &new, ridge)?;
            transform.set_affine(&weight, &bias)?;
            let loss = tch::no_grad(|| {
                transform
                    .forward_t(&old, side.as_ref(), false)
                    .mse_loss(&new, tch::Reduction::Mean)
            })
            .double_value(&[]);
            (loss, Some(ridge))
        }
    };
    // How close the mapped old embeddings come to the new ones (the cosine
    // a stored template will have with its person's new embedding).
    let agreement = tch::no_grad(|| {
        let mapped = l2_normalize(&transform.forward_t(&old, side.as_ref(), false));
        (mapped * l2_normalize(&new))
            .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
            .mean(Kind::Float)
    })
    .double_value(&[]);
    let persons = fitting.len();
    let mut provenance: Vec<(String, String)> = vec![
        ("manifest".into(), args.manifest.display().to_string()),
        ("splits".into(), args.splits.join(",")),
        ("images".into(), images.len().to_string()),
        ("views".into(), args.views.to_string()),
        (
            "side_info".into(),
            args.side_info
                .as_ref()
                .map_or("none (the old embedding)".to_owned(), |p| p.display().to_string()),
        ),
        ("persons".into(), persons.to_string()),
    ];
    provenance.extend(match args.arch {
        Arch::Mlp => vec![
            ("epochs".into(), args.epochs.to_string()),
            ("batch_size".into(), args.batch_size.to_string()),
            ("lr".into(), args.lr.to_string()),
        ],
        Arch::Linear => vec![
            ("arch".into(), "linear (least squares)".to_owned()),
            ("ridge".into(), fitted_ridge.unwrap_or(0.0).to_string()),
        ],
    });
    if let Some(selection) = ridge_selection {
        provenance.push(("ridge_selection".into(), selection));
    }
    provenance.extend([
        ("person_target".into(), args.person_target.to_string()),
        ("seed".into(), args.seed.to_string()),
        ("final_mse".into(), format!("{last_loss:.6}")),
        ("mean_cosine_to_new".into(), format!("{agreement:.4}")),
    ]);
    transform.set_provenance(provenance);
    transform
        .save(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "fitted {} -> {} on {} images of {persons} persons: final MSE {last_loss:.6}, mean cosine to the new \
         embeddings {agreement:.4}; wrote {}",
        short(&from.model_id),
        short(&to.model_id),
        images.len(),
        args.out.display()
    );
    Ok(())
}

/// The embeddings of `args.views - 1` augmented views of each image, view
/// after view, in the order of `images`. The random draws of view `v` of
/// image `i` depend on the seed, `v` and `i` only, so the old and the new
/// model see the same crops and erasures (for equal input sizes).
fn embed_views(
    embedder: &Embedder,
    root: &std::path::Path,
    images: &[&str],
    args: &Args,
) -> anyhow::Result<Vec<f32>> {
    let augment = Augment::new(AugmentConfig::default(), embedder.manifest().preprocess.clone())?;
    let progress = bar(images.len(), "decoding the fitting images")?;
    let resized = images
        .iter()
        .map(|image| {
            let path = root.join(image);
            let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let decoded = handid_model::decode(&bytes, &handid_model::DecodeLimits::default())
                .with_context(|| format!("decoding {}", path.display()))?;
            progress.inc(1);
            augment.resize(&decoded)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    progress.finish_and_clear();
    let extra = args.views as usize - 1;
    let progress = bar(images.len() * extra, "embedding augmented views")?;
    let mut out = Vec::with_capacity(images.len() * extra * embedder.dim());
    let seed = args.seed as u64;
    for view in 1..=extra {
        let batch = args.embed_batch_size.max(1);
        for (start, chunk) in (0..resized.len())
            .step_by(batch)
            .map(|s| (s, &resized[s..(s + batch).min(resized.len())]))
        {
            let pixels = chunk
                .iter()
                .enumerate()
                .map(|(k, image)| {
                    augment.train_resized(image, &mut Loader::image_rng(seed, view as u64, 0, start + k))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let features = embedder
                .embed_batch(&Tensor::stack(&pixels, 0))
                .context("embedding augmented views")?;
            out.extend(
                Vec::<f32>::try_from(features.to_device(Device::Cpu).flatten(0, -1))
                    .context("reading embeddings")?,
            );
            progress.inc(chunk.len() as u64);
        }
    }
    progress.finish_and_clear();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An 8-d to 8-d transform with a 64-wide mixer, from libtorch's
    /// global generator.
    fn small_transform(side_info: Option<SideInfo>) -> TemplateTransform {
        TemplateTransform::new(
            TransformManifest {
                from_model: "a".into(),
                from_space: "a".into(),
                to_model: "b".into(),
                to_space: "b".into(),
                from_dim: 8,
                to_dim: 8,
                arch: TransformArch::Mlp,
                inner_dim: 64,
                side_info,
                provenance: Vec::new(),
            },
            Device::Cpu,
        )
    }

    /// 120 epochs of 64 pairs at 2e-3, no weight decay.
    fn quick_schedule() -> Schedule {
        Schedule {
            epochs: 120,
            warmup_epochs: 5,
            batch_size: 64,
            lr: 2e-3,
            weight_decay: 0.0,
        }
    }

    /// A map the network can learn (a fixed rotation of 8-d unit vectors):
    /// fitted on 512 pairs, it carries 256 unseen old vectors close to their
    /// new images (mean cosine 0.95 measured; about 0 before).
    #[test]
    fn fitting_learns_a_map_that_holds_for_unseen_embeddings() {
        tch::manual_seed(3);
        let options = (Kind::Float, Device::Cpu);
        let (rotation, _) = Tensor::linalg_qr(&Tensor::randn([8, 8], options), "reduced");
        let old = l2_normalize(&Tensor::randn([768, 8], options));
        let new = old.matmul(&rotation);
        let transform = small_transform(None);
        let (fitting, unseen) = (old.narrow(0, 0, 512), old.narrow(0, 512, 256));
        let schedule = quick_schedule();
        let mut epochs = 0;
        let loss = fit(
            &transform,
            &fitting,
            None,
            &new.narrow(0, 0, 512),
            &schedule,
            |_| epochs += 1,
        )
        .expect("fit");
        assert_eq!(epochs, 120);
        assert!(loss < 0.01, "final loss {loss}");
        let cosine = |a: &Tensor, b: &Tensor| {
            (a * b)
                .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
                .mean(Kind::Float)
                .double_value(&[])
        };
        let before = cosine(&unseen, &new.narrow(0, 512, 256));
        let after = cosine(
            &transform.apply(&unseen, None).expect("apply"),
            &new.narrow(0, 512, 256),
        );
        assert!(
            after > 0.9,
            "unseen vectors mapped to cosine {after} (before: {before})"
        );
        assert!(after > before + 0.5, "before {before}, after {after}");
    }

    /// With a side-information model the transform learns from the side
    /// branch what the old embedding does not hold: here the new vectors are
    /// a rotation of the side-information, the old ones unrelated noise.
    #[test]
    fn side_information_carries_what_the_old_embedding_lacks() {
        tch::manual_seed(5);
        let options = (Kind::Float, Device::Cpu);
        let (rotation, _) = Tensor::linalg_qr(&Tensor::randn([8, 8], options), "reduced");
        let old = l2_normalize(&Tensor::randn([768, 8], options));
        let side = l2_normalize(&Tensor::randn([768, 8], options));
        let new = side.matmul(&rotation);
        let transform = small_transform(Some(SideInfo {
            model: "s".into(),
            space: "s".into(),
            dim: 8,
        }));
        let schedule = quick_schedule();
        let fitting = |t: &Tensor| t.narrow(0, 0, 512);
        fit(
            &transform,
            &fitting(&old),
            Some(&fitting(&side)),
            &fitting(&new),
            &schedule,
            |_| {},
        )
        .expect("fit");
        let unseen = |t: &Tensor| t.narrow(0, 512, 256);
        let mapped = transform
            .apply(&unseen(&old), Some(&unseen(&side)))
            .expect("apply");
        let cosine = (mapped * unseen(&new))
            .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        // 0.87-0.95 measured (the seed is global: parallel tests draw from it
        // too); unrelated vectors have cosine about 0.
        assert!(cosine > 0.75, "unseen vectors mapped to cosine {cosine}");
    }

    /// The closed-form linear map: without a ridge it recovers an exact
    /// affine relation (side-information included, the bias unpenalised);
    /// with one it solves the ridge's normal equations, Xᵀ(XW + b - Y) =
    /// -λW, shrinking the weights; too few pairs without a ridge are refused.
    #[test]
    fn the_linear_map_is_the_ridge_least_squares_solution() {
        let options = (Kind::Double, Device::Cpu);
        tch::manual_seed(7);
        let old = l2_normalize(&Tensor::randn([40, 5], options));
        let side = l2_normalize(&Tensor::randn([40, 3], options));
        let (m_old, m_side) = (Tensor::randn([5, 6], options), Tensor::randn([3, 6], options));
        let offset = Tensor::randn([6], options);
        let new = old.matmul(&m_old) + side.matmul(&m_side) + &offset;
        let (weight, bias) = fit_linear(&old, Some(&side), &new, 0.0).expect("fit");
        assert_eq!(weight.size(), [6, 8]);
        assert!(weight.allclose(&Tensor::cat(&[&m_old, &m_side], 0).tr(), 1e-8, 1e-8, false));
        assert!(bias.allclose(&offset, 1e-8, 1e-8, false));

        let noisy = &new + Tensor::randn([40, 6], options);
        let (plain, _) = fit_linear(&old, None, &noisy, 0.0).expect("fit");
        let (shrunk, bias) = fit_linear(&old, None, &noisy, 0.5).expect("fit");
        let lambda = 0.5 * old.square().sum(Kind::Double).double_value(&[]) / 5.0;
        let residual = old.matmul(&shrunk.tr()) + &bias - &noisy;
        assert!(
            old.tr()
                .matmul(&residual)
                .allclose(&(shrunk.tr() * -lambda), 1e-8, 1e-8, false)
        );
        assert!(
            residual
                .sum_dim_intlist([0i64].as_slice(), false, Kind::Double)
                .abs()
                .max()
                .double_value(&[])
                < 1e-8
        );
        let norm = |w: &Tensor| w.square().sum(Kind::Double).double_value(&[]);
        assert!(norm(&shrunk) < norm(&plain));

        let err = fit_linear(&old.narrow(0, 0, 4), None, &new.narrow(0, 0, 4), 0.0)
            .expect_err("4 pairs cannot determine a 5-wide map and its bias")
            .to_string();
        assert!(err.contains("--ridge"), "{err}");
        let (weight, _) =
            fit_linear(&old.narrow(0, 0, 4), None, &new.narrow(0, 0, 4), 1e-3).expect("a ridge decides");
        assert_eq!(weight.size(), [6, 5]);
    }

    /// Cross-validation folds hold whole persons: every row of a person
    /// (views included) in one fold, persons dealt in turn by name, no more
    /// folds than persons.
    #[test]
    fn person_folds_keep_each_persons_rows_together() {
        // Four images of three persons, two views each: eight rows.
        let persons = ["q", "p", "r", "p"];
        let (folds, count) = person_folds(8, &persons, 5);
        assert_eq!(count, 3);
        assert_eq!(folds, [1, 0, 2, 0, 1, 0, 2, 0]);
        let (folds, count) = person_folds(8, &persons, 2);
        assert_eq!(count, 2);
        assert_eq!(folds, [1, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(person_folds(2, &["p", "p"], 5).1, 1);
    }

    /// Standard normal doubles of `shape` from a small generator of the
    /// test's own (xorshift64*, Box-Muller), advancing `state`.
    fn gaussian(state: &mut u64, shape: &[i64]) -> Tensor {
        let mut uniform = || {
            *state ^= *state >> 12;
            *state ^= *state << 25;
            *state ^= *state >> 27;
            let bits = state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11;
            (bits as f64 + 0.5) / (1u64 << 53) as f64
        };
        let count: i64 = shape.iter().product();
        let values: Vec<f64> = (0..count)
            .map(|_| {
                let (u, v) = (uniform(), uniform());
                (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
            })
            .collect();
        Tensor::from_slice(&values).view(shape)
    }

    /// `--ridge auto`'s criterion: an exact affine relation is best fitted
    /// with the least shrinkage of the grid; targets that are mostly noise,
    /// with about as many pairs as the map's width, with a large ridge; a
    /// ridge that leaves the map undetermined is never chosen.
    /// And it scores persons held out: targets that are each person's own
    /// random vector, unrelated to the old embeddings, are learnt by a row
    /// split (a person's other images seen) but not by the person folds.
    #[test]
    fn ridge_auto_scores_maps_on_persons_held_out() {
        // Drawn from the test's own generator: libtorch's is global, and
        // tests running beside this one draw from it too.
        let mut draws = 11u64;
        let mut randn = |shape: &[i64]| gaussian(&mut draws, shape);
        let names: Vec<String> = (0..40).map(|i| format!("p{i:02}")).collect();
        let persons: Vec<&str> = (0..200).map(|r| names[r % 40].as_str()).collect();
        let old = l2_normalize(&randn(&[200, 8]));
        let new = old.matmul(&randn(&[8, 6])) + randn(&[6]);
        let (folds, scores) = cross_validate_ridge(&old, None, &new, &persons, &RIDGE_GRID).expect("cv");
        assert_eq!(folds, 5);
        assert_eq!(scores.len(), RIDGE_GRID.len());
        let (ridge, cosine) = best_ridge(&scores);
        assert!(ridge <= 1e-6, "{scores:?}");
        assert!(cosine > 0.999, "{scores:?}");

        let old = l2_normalize(&randn(&[48, 32]));
        let signal = old.matmul(&randn(&[32, 6]));
        let new = &signal * 0.2 + randn(&[48, 6]);
        let persons: Vec<&str> = (0..48).map(|r| names[r % 16].as_str()).collect();
        let (_, scores) = cross_validate_ridge(&old, None, &new, &persons, &RIDGE_GRID).expect("cv");
        let (ridge, _) = best_ridge(&scores);
        assert!(ridge >= 0.1, "{scores:?}");
        // Fewer pairs than the width: no ridge, no one map; out of the
        // choice.
        let (_, scores) = cross_validate_ridge(
            &old.narrow(0, 0, 30),
            None,
            &new.narrow(0, 0, 30),
            &persons[..30],
            &RIDGE_GRID,
        )
        .expect("cv");
        assert!(
            scores[0].1.is_nan() && scores[1..].iter().all(|s| s.1.is_finite()),
            "{scores:?}"
        );
        assert!(best_ridge(&scores).0 > 0.0);
        assert!(best_ridge(&[(0.0, f64::NAN)]).0.is_nan());

        // Six images of each of 20 persons: near-identical old embeddings
        // per person, a random new vector per person.
        let codes = randn(&[20, 32]);
        let index: Vec<i64> = (0..120).map(|r| r % 20).collect();
        let index = Tensor::from_slice(&index);
        let old = l2_normalize(&(codes.index_select(0, &index) + randn(&[120, 32]) * 0.05));
        let new = randn(&[20, 6]).index_select(0, &index);
        let persons: Vec<&str> = (0..120).map(|r| names[r % 20].as_str()).collect();
        let (_, scores) = cross_validate_ridge(&old, None, &new, &persons, &[1e-3]).expect("cv");
        assert!(scores[0].1 < 0.3, "held-out persons: {scores:?}");
        // The same fit scored on rows of persons it saw (every person's
        // rows but one image): near the targets.
        let fitted: Vec<i64> = (20..120).collect();
        let seen: Vec<i64> = (0..20).collect();
        let (fitted, seen) = (Tensor::from_slice(&fitted), Tensor::from_slice(&seen));
        let (weight, bias) = fit_linear(
            &old.index_select(0, &fitted),
            None,
            &new.index_select(0, &fitted),
            1e-3,
        )
        .expect("fit");
        let mapped = l2_normalize(&(old.index_select(0, &seen).matmul(&weight.tr()) + bias));
        let on_seen = (mapped * l2_normalize(&new.index_select(0, &seen)))
            .sum(Kind::Double)
            .double_value(&[])
            / 20.0;
        assert!(on_seen > 0.8, "seen persons: {on_seen}");

        assert!(
            cross_validate_ridge(&old.narrow(0, 0, 3), None, &new.narrow(0, 0, 3), &["p"], &[1e-3])
                .expect_err("one person")
                .to_string()
                .contains("two persons")
        );
    }

    /// Person targets: 0 changes nothing, 1 gives every row of a person
    /// the person's unit mean (views included, rows after the images), and
    /// a weight in between the renormalised blend, unit length and closer
    /// to the mean than the row was.
    #[test]
    fn person_targets_move_rows_toward_their_persons_mean() {
        let options = (Kind::Float, Device::Cpu);
        tch::manual_seed(7);
        // Three images (persons p, q, p), two views each: six rows.
        let new = l2_normalize(&Tensor::randn([6, 5], options));
        let persons = ["p", "q", "p"];
        let same = |a: &Tensor, b: &Tensor| a.allclose(b, 1e-6, 1e-6, false);
        assert!(same(&person_targets(&new, &persons, 0.0), &new));

        let p_mean = l2_normalize(
            &new.index_select(0, &Tensor::from_slice(&[0i64, 2, 3, 5]))
                .sum_dim_intlist([0i64].as_slice(), true, Kind::Float),
        );
        let q_mean = l2_normalize(
            &new.index_select(0, &Tensor::from_slice(&[1i64, 4]))
                .sum_dim_intlist([0i64].as_slice(), true, Kind::Float),
        );
        let full = person_targets(&new, &persons, 1.0);
        for (row, mean) in [
            (0, &p_mean),
            (1, &q_mean),
            (2, &p_mean),
            (3, &p_mean),
            (4, &q_mean),
            (5, &p_mean),
        ] {
            assert!(same(&full.narrow(0, row, 1), mean), "row {row}");
        }

        let part = person_targets(&new, &persons, 0.3);
        let expected = l2_normalize(&(new.narrow(0, 1, 1) * 0.7 + &q_mean * 0.3));
        assert!(same(&part.narrow(0, 1, 1), &expected));
        let norms = part.norm_scalaropt_dim(2.0, [1], false);
        assert!(same(&norms, &Tensor::ones([6], options)));
        let cosine = |a: &Tensor, b: &Tensor| (a * b).sum(Kind::Float).double_value(&[]);
        for row in [0, 2, 3, 5] {
            let (moved, was) = (part.narrow(0, row, 1), new.narrow(0, row, 1));
            assert!(cosine(&moved, &p_mean) > cosine(&was, &p_mean), "row {row}");
        }
    }

    #[test]
    fn the_schedule_warms_up_then_follows_half_a_cosine() {
        assert!((learning_rate(1.0, 0, 80, 5) - 0.2).abs() < 1e-12);
        assert!((learning_rate(1.0, 4, 80, 5) - 1.0).abs() < 1e-12);
        assert!((learning_rate(1.0, 5, 80, 5) - 1.0).abs() < 1e-12);
        assert!(learning_rate(1.0, 79, 80, 5) < 0.001);
        assert!((learning_rate(1.0, 5 + 75 / 2, 80, 5) - 0.5).abs() < 0.03);
    }
}
