//! Export: a training checkpoint becomes a serving checkpoint (DESIGN.md):
//! the image tower's weights, the manifest (architecture, embedding
//! feature, preprocessing, a new embedding space, provenance with the
//! training config and validation metrics) and decision thresholds
//! calibrated at the configured false match rates on validation persons.
//!
//! Calibration embeds every image of the training persons that the run saw
//! or validated on (the manifest's training and validation splits) with the
//! **exported** checkpoint through `handid_model::Embedder`, the code path
//! serving uses, and scores every pair once: same person = genuine, other
//! person = impostor. The threshold at a FMR is the lowest score whose
//! impostor acceptance rate stays within it (`handid_eval`'s `at_fmr`).
//! Test persons are never read.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use handid_eval::metrics::verification::{PairScores, at_fmr};
use handid_model::checkpoint::{Manifest, Provenance, load_strict, write_checkpoint};
use handid_model::{DecodeLimits, Embedder, OperatingPoint};
use tch::Device;

use crate::config::TrainConfig;
use crate::data::Item;
use crate::engine::load_data;
use crate::engine::state::{self, TrainState};
use crate::net::ReidNet;

/// A calibrated operating point and how well the data supports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibrated {
    /// The threshold.
    pub point: OperatingPoint,
    /// FMR measured at it.
    pub measured_fmr: f64,
    /// TPR measured at it.
    pub tpr: f64,
}

/// What export wrote.
#[derive(Debug)]
pub struct Exported {
    /// The serving manifest as written.
    pub manifest: Manifest,
    /// Genuine and impostor pairs used for calibration.
    pub pairs: (usize, usize),
    /// Per FMR.
    pub calibrated: Vec<Calibrated>,
}

/// Writes the serving checkpoint of training checkpoint `checkpoint` to `out`.
pub fn export(checkpoint: &Path, out: &Path, data_root: Option<&Path>) -> anyhow::Result<Exported> {
    let (train_state, tensors) = state::load(checkpoint)?;
    let manifest = write_serving(&train_state, tensors.model, out)?;
    let items = match export_calibration_items(&train_state.config, data_root) {
        Ok(items) => items,
        Err(e) => {
            remove_serving(out);
            return Err(e);
        }
    };
    let calibration = match calibrate(out, &items, &train_state.config.export.fmrs) {
        Ok(calibration) => calibration,
        Err(e) => {
            // No half-written checkpoint a server could load without its
            // thresholds.
            remove_serving(out);
            // Only a run without pairs to calibrate on is pointed at
            // `--uncalibrated`; an unreadable image is just reported.
            if e.downcast_ref::<NoPairs>().is_none() {
                return Err(e);
            }
            return Err(e.context(
                "export --uncalibrated writes the checkpoint without thresholds (a side-information \
                 model's, which never decides a match; `handid-trainer calibrate` can add them later)",
            ));
        }
    };
    let mut manifest = manifest;
    manifest.thresholds = calibration.thresholds();
    manifest.write(out)?;
    Ok(Exported {
        manifest,
        pairs: calibration.pairs,
        calibrated: calibration.points,
    })
}

/// Writes the serving checkpoint of `checkpoint` to `out` without
/// thresholds: for a side-information model trained without identities
/// (every image its own person), which has no genuine pairs to calibrate
/// on and never decides a match.
pub fn export_uncalibrated(checkpoint: &Path, out: &Path) -> anyhow::Result<Manifest> {
    let (train_state, tensors) = state::load(checkpoint)?;
    write_serving(&train_state, tensors.model, out)
}

/// Removes what [`write_serving`] wrote to `out`.
fn remove_serving(out: &Path) {
    for file in [
        handid_model::checkpoint::MANIFEST_FILE,
        handid_model::checkpoint::WEIGHTS_FILE,
    ] {
        let _ = std::fs::remove_file(out.join(file));
    }
}

/// Writes the serving checkpoint (weights and manifest, no thresholds yet)
/// of a training checkpoint's state and model tensors to `out`. A run
/// trained backward-compatibly declares its old model's space compatible.
/// The same checkpoint always gives the same weights file, hence the same
/// model id: backward-compatible training learns an old run's id this way.
pub fn write_serving(
    train_state: &TrainState,
    model: Vec<(String, tch::Tensor)>,
    out: &Path,
) -> anyhow::Result<Manifest> {
    let TrainState { config, persons, .. } = train_state;
    // Every weight is overwritten from the checkpoint; the seed only makes
    // the (discarded) initialisation reproducible.
    let net = ReidNet::build(config, persons.len() as i64, Device::Cpu)?;
    let names: std::collections::BTreeSet<String> = net.vs.variables().into_keys().collect();
    let model: Vec<_> = model.into_iter().filter(|(n, _)| names.contains(n)).collect();
    load_strict(&net.vs, model).context("loading the training checkpoint's weights")?;

    let mut metrics = BTreeMap::new();
    if let Some(best) = train_state.best {
        metrics.insert("val_map".to_owned(), best.val.map);
        metrics.insert("val_rank1".to_owned(), best.val.rank1);
        if let Some(cross) = best.val.cross_model {
            metrics.insert("val_cross_map".to_owned(), cross.map);
            metrics.insert("val_cross_rank1".to_owned(), cross.rank1);
        }
        metrics.insert("epoch".to_owned(), best.epoch as f64);
    }
    let provenance = Provenance {
        created_by: format!(
            "handid-trainer {} export of {} ({} phase, epoch {})",
            env!("CARGO_PKG_VERSION"),
            config.name,
            train_state.phase.name(),
            train_state.epoch
        ),
        source: config
            .model
            .clip_weights
            .as_ref()
            .map(|p| p.display().to_string()),
        dataset: Some(config.data.manifest.display().to_string()),
        training_config: Some(serde_yaml::to_value(config)?),
        metrics,
    };
    let mut manifest = Manifest::new(config.model.vision(), net.serving_feature(), provenance)?;
    manifest.preprocess = config.model.preprocess();
    manifest.neck = net.serving_neck();
    // BCT (Shen et al., CVPR 2020): the new embeddings may be compared
    // with the old model's templates, so a server swaps it in directly.
    manifest.compatible_spaces = train_state
        .compatible_with
        .iter()
        .map(|old| old.embedding_space.clone())
        .collect();
    write_checkpoint(out, &net.serving_weights(), manifest)
        .with_context(|| format!("writing the serving checkpoint {}", out.display()))
}

/// The images export calibrates on: the run's training and validation
/// images (training persons only, as `load_data` guarantees).
fn export_calibration_items(config: &TrainConfig, data_root: Option<&Path>) -> anyhow::Result<Vec<Item>> {
    let mut config = config.clone();
    if let Some(root) = data_root {
        config.data.root = Some(root.to_owned());
    }
    let data = load_data(&config)?;
    Ok(data.train.iter().chain(data.val_query.iter()).cloned().collect())
}

/// Thresholds measured on a set of labelled images.
#[derive(Debug)]
pub struct Calibration {
    /// Genuine and impostor pairs scored.
    pub pairs: (usize, usize),
    /// One per requested FMR, in the order asked.
    pub points: Vec<Calibrated>,
}

impl Calibration {
    /// The operating points as a manifest stores them.
    pub fn thresholds(&self) -> Vec<OperatingPoint> {
        self.points.iter().map(|c| c.point.clone()).collect()
    }
}

/// Calibration found no genuine or no impostor pair among its images.
#[derive(Debug, thiserror::Error)]
#[error("calibration needs at least two persons with two images each among the training persons")]
pub struct NoPairs;

/// Embeds `items` (an image once, however often it is listed) with the
/// serving checkpoint in `checkpoint` through `handid_model::Embedder`, the
/// code path serving uses, scores every pair once (same label = genuine,
/// other label = impostor), and finds the threshold at each of `fmrs`.
pub fn calibrate(checkpoint: &Path, items: &[Item], fmrs: &[f64]) -> anyhow::Result<Calibration> {
    let mut items = items.to_vec();
    items.sort_by(|a, b| a.path.cmp(&b.path));
    items.dedup_by(|a, b| a.path == b.path);
    let embedder = Embedder::load(checkpoint, Device::Cpu)?;
    let mut vectors: Vec<f32> = Vec::new();
    let progress = crate::commands::eval::bar(items.len(), "calibrating")?;
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
        vectors.extend(Vec::<f32>::try_from(
            embedder.embed_images(&images)?.flatten(0, 1),
        )?);
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    let dim = embedder.dim();
    let mut pairs = PairScores {
        genuine: Vec::new(),
        impostor: Vec::new(),
    };
    for i in 0..items.len() {
        for j in i + 1..items.len() {
            let a = &vectors[i * dim..(i + 1) * dim];
            let b = &vectors[j * dim..(j + 1) * dim];
            let score: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x * y)).sum();
            if items[i].label == items[j].label {
                pairs.genuine.push(score);
            } else {
                pairs.impostor.push(score);
            }
        }
    }
    if pairs.genuine.is_empty() || pairs.impostor.is_empty() {
        return Err(NoPairs.into());
    }
    let points = fmrs
        .iter()
        .map(|&fmr| {
            let p = at_fmr(&pairs, fmr);
            Calibrated {
                point: OperatingPoint {
                    fmr,
                    threshold: p.threshold as f32,
                },
                measured_fmr: p.fmr,
                tpr: p.tpr,
            }
        })
        .collect();
    Ok(Calibration {
        pairs: (pairs.genuine.len(), pairs.impostor.len()),
        points,
    })
}
