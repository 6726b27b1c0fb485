//! Training checkpoints: what a run writes after every epoch so it can be
//! resumed exactly, exported, or inspected.
//!
//! Layout of a run folder:
//! ```text
//! RUN/config.yaml                 the configuration the run started with
//! RUN/metrics.csv                 one row per epoch (rewritten each epoch)
//! RUN/curves_loss.png, curves_val.png   written at the end
//! RUN/checkpoints/epoch-0003/     model.safetensors (every variable: both
//!                                 CLIP towers, head, prompts), optimizer.safetensors,
//!                                 center*.safetensors when used, state.yaml
//! RUN/checkpoints/latest          the name of the newest complete epoch folder
//! RUN/checkpoints/best/           a copy of the epoch with the best validation mAP
//! ```
//! An epoch folder is written under a temporary name and renamed when
//! complete, and `latest` is replaced atomically after that, so a crash
//! never leaves a half-written checkpoint behind `latest`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::compat::OldModelRecord;
use crate::config::{Phase, TrainConfig};

/// Version of the state file.
pub const STATE_FORMAT: u32 = 1;

/// Metrics of one validation pass (training persons only).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ValMetrics {
    /// Mean average precision (non-interpolated), in [0, 1].
    pub map: f64,
    /// Rank-1, in [0, 1].
    pub rank1: f64,
    /// Backward-compatible training only (`method.compatibility`): the same
    /// validation queries, embedded by the model being trained, searched
    /// against the *old* model's embeddings of the validation gallery, the
    /// cross-model search M(new, old) on training persons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_model: Option<CrossModelVal>,
}

/// M(new, old) on the validation split (see [`ValMetrics::cross_model`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CrossModelVal {
    /// Mean average precision (non-interpolated), in [0, 1].
    pub map: f64,
    /// Rank-1, in [0, 1].
    pub rank1: f64,
}

/// One row of `metrics.csv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRow {
    /// The phase the epoch belongs to.
    pub phase: Phase,
    /// Epoch within the phase, from 1.
    pub epoch: u64,
    /// Optimizer steps so far in the phase.
    pub step: u64,
    /// Mean of each weighted loss term over the epoch, by name, and `loss` (their sum).
    pub losses: Vec<(String, f64)>,
    /// Learning rate of each parameter group.
    pub lrs: Vec<(String, f64)>,
    /// Validation, when run this epoch.
    pub val: Option<ValMetrics>,
    /// Training throughput.
    pub images_per_second: f64,
    /// Wall time of the epoch.
    pub seconds: f64,
    /// Whether early stopping ended the phase after this epoch.
    #[serde(default)]
    pub early_stop: bool,
}

/// The best validation so far.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Best {
    /// Phase epoch (from 1).
    pub epoch: u64,
    /// Its validation.
    pub val: ValMetrics,
}

/// `state.yaml` of a training checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainState {
    /// [`STATE_FORMAT`].
    pub format: u32,
    /// The configuration of the run.
    pub config: TrainConfig,
    /// Class index -> person id of the training split.
    pub persons: Vec<String>,
    /// The phase this checkpoint ends.
    pub phase: Phase,
    /// Completed epochs of `phase`.
    pub epoch: u64,
    /// Optimizer steps of `phase`.
    pub step: u64,
    /// Best validation of the final phase so far.
    pub best: Option<Best>,
    /// Dynamic loss scale (mixed precision).
    pub loss_scale: f64,
    /// Every epoch so far, all phases.
    pub history: Vec<EpochRow>,
    /// The old model the run is trained backward-compatible with
    /// (`method.compatibility`): export declares its space compatible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compatible_with: Option<OldModelRecord>,
}

/// Tensors of one checkpoint, by file.
#[derive(Debug, Default)]
pub struct Tensors {
    /// `model.safetensors`.
    pub model: Vec<(String, Tensor)>,
    /// `optimizer.safetensors`.
    pub optimizer: Vec<(String, Tensor)>,
    /// `center.safetensors` (center-loss centres), when used.
    pub center: Vec<(String, Tensor)>,
    /// `center_optimizer.safetensors`, when used.
    pub center_optimizer: Vec<(String, Tensor)>,
}

const FILES: [&str; 4] = ["model", "optimizer", "center", "center_optimizer"];

impl Tensors {
    fn by_file(&self) -> [&Vec<(String, Tensor)>; 4] {
        [&self.model, &self.optimizer, &self.center, &self.center_optimizer]
    }
}

/// The checkpoints folder of a run.
pub fn checkpoints_dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

/// Writes `run/checkpoints/epoch-NNNN` (NNNN = `index`, a run-wide epoch
/// count), points `latest` at it, copies it to `best` when `is_best`, and
/// removes older epoch folders beyond the newest `keep`.
pub fn save(
    run: &Path,
    index: u64,
    state: &TrainState,
    tensors: &Tensors,
    is_best: bool,
    keep: usize,
) -> anyhow::Result<PathBuf> {
    let dir = checkpoints_dir(run);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = format!("epoch-{index:04}");
    let tmp = dir.join(format!(".{name}.tmp"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    write_folder(&tmp, state, tensors)?;
    let final_dir = dir.join(&name);
    if final_dir.exists() {
        fs::remove_dir_all(&final_dir)?;
    }
    fs::rename(&tmp, &final_dir)?;
    let latest_tmp = dir.join(".latest.tmp");
    fs::write(&latest_tmp, &name)?;
    fs::rename(&latest_tmp, dir.join("latest"))?;
    if is_best {
        let best_tmp = dir.join(".best.tmp");
        if best_tmp.exists() {
            fs::remove_dir_all(&best_tmp)?;
        }
        write_folder(&best_tmp, state, tensors)?;
        let best = dir.join("best");
        if best.exists() {
            fs::remove_dir_all(&best)?;
        }
        fs::rename(&best_tmp, &best)?;
    }
    // Prune old epochs (the names sort by epoch).
    let mut epochs: Vec<PathBuf> = fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("epoch-"))
        })
        .collect();
    epochs.sort();
    let excess = epochs.len().saturating_sub(keep.max(1));
    for old in &epochs[..excess] {
        fs::remove_dir_all(old).with_context(|| format!("removing {}", old.display()))?;
    }
    Ok(final_dir)
}

fn write_folder(dir: &Path, state: &TrainState, tensors: &Tensors) -> anyhow::Result<()> {
    fs::create_dir_all(dir)?;
    for (file, list) in FILES.iter().zip(tensors.by_file()) {
        if list.is_empty() {
            continue;
        }
        let cpu: Vec<(&str, Tensor)> = list
            .iter()
            .map(|(n, t)| (n.as_str(), t.to_device(tch::Device::Cpu).contiguous()))
            .collect();
        let path = dir.join(format!("{file}.safetensors"));
        Tensor::write_safetensors(&cpu, &path).with_context(|| format!("writing {}", path.display()))?;
    }
    // The state goes last: a folder with state.yaml is complete.
    let path = dir.join("state.yaml");
    fs::write(&path, serde_yaml::to_string(state)?).with_context(|| format!("writing {}", path.display()))
}

/// The checkpoint a run stands for when none is named: `best` where the run
/// validated, `latest` where it had no validation split (no `best` exists).
pub fn resolve_default(run: &Path) -> anyhow::Result<PathBuf> {
    let validated = checkpoints_dir(run).join("best").join("state.yaml").is_file();
    resolve(run, if validated { "best" } else { "latest" })
}

/// Resolves `which` for a run: `latest`, `best`, or a checkpoint folder path.
pub fn resolve(run: &Path, which: &str) -> anyhow::Result<PathBuf> {
    let dir = checkpoints_dir(run);
    if which == "best" && !dir.join("best").exists() && dir.join("latest").is_file() {
        bail!(
            "{} has no `best` checkpoint: `best` is chosen by validation mAP, and this run had \
             no validation split; name `latest` instead",
            run.display()
        );
    }
    let path = match which {
        "latest" => {
            let latest = dir.join("latest");
            let name = fs::read_to_string(&latest).with_context(|| {
                format!(
                    "{} has no checkpoint yet ({} is missing)",
                    run.display(),
                    latest.display()
                )
            })?;
            dir.join(name.trim())
        }
        "best" => dir.join("best"),
        other => PathBuf::from(other),
    };
    anyhow::ensure!(
        path.join("state.yaml").is_file(),
        "{} is not a complete training checkpoint (no state.yaml)",
        path.display()
    );
    Ok(path)
}

/// Reads a checkpoint folder's state and tensors.
pub fn load(dir: &Path) -> anyhow::Result<(TrainState, Tensors)> {
    let path = dir.join("state.yaml");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let state: TrainState =
        serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    anyhow::ensure!(
        state.format == STATE_FORMAT,
        "{}: state format {} is not supported (this build reads {STATE_FORMAT})",
        path.display(),
        state.format
    );
    let read = |file: &str| -> anyhow::Result<Vec<(String, Tensor)>> {
        let path = dir.join(format!("{file}.safetensors"));
        if !path.exists() {
            return Ok(Vec::new());
        }
        Tensor::read_safetensors(&path).with_context(|| format!("reading {}", path.display()))
    };
    let tensors = Tensors {
        model: read("model")?,
        optimizer: read("optimizer")?,
        center: read("center")?,
        center_optimizer: read("center_optimizer")?,
    };
    anyhow::ensure!(
        !tensors.model.is_empty(),
        "{} has no model.safetensors",
        dir.display()
    );
    Ok((state, tensors))
}

/// `metrics.csv`: one row per epoch, a column per loss term and group rate.
pub fn write_csv(path: &Path, history: &[EpochRow]) -> anyhow::Result<()> {
    let mut loss_names: Vec<&str> = Vec::new();
    let mut lr_names: Vec<&str> = Vec::new();
    for row in history {
        for (n, _) in &row.losses {
            if !loss_names.contains(&n.as_str()) {
                loss_names.push(n);
            }
        }
        for (n, _) in &row.lrs {
            if !lr_names.contains(&n.as_str()) {
                lr_names.push(n);
            }
        }
    }
    // The cross-model columns only for a backward-compatible run.
    let cross = history
        .iter()
        .any(|r| r.val.is_some_and(|v| v.cross_model.is_some()));
    let mut out = String::from("phase,epoch,step");
    for n in &loss_names {
        out.push_str(&format!(",{n}"));
    }
    for n in &lr_names {
        out.push_str(&format!(",lr_{n}"));
    }
    out.push_str(",val_map,val_rank1");
    if cross {
        out.push_str(",val_cross_map,val_cross_rank1");
    }
    out.push_str(",images_per_second,seconds\n");
    let find = |list: &[(String, f64)], name: &str| {
        list.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| format!("{v}"))
            .unwrap_or_default()
    };
    for row in history {
        out.push_str(&format!("{},{},{}", row.phase.name(), row.epoch, row.step));
        for n in &loss_names {
            out.push_str(&format!(",{}", find(&row.losses, n)));
        }
        for n in &lr_names {
            out.push_str(&format!(",{}", find(&row.lrs, n)));
        }
        let (map, r1) = row
            .val
            .map(|v| (format!("{}", v.map), format!("{}", v.rank1)))
            .unwrap_or_default();
        out.push_str(&format!(",{map},{r1}"));
        if cross {
            let (map, r1) = row
                .val
                .and_then(|v| v.cross_model)
                .map(|c| (format!("{}", c.map), format!("{}", c.rank1)))
                .unwrap_or_default();
            out.push_str(&format!(",{map},{r1}"));
        }
        out.push_str(&format!(",{:.2},{:.2}\n", row.images_per_second, row.seconds));
    }
    fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run folder whose checkpoints are complete (state.yaml) but empty.
    fn run_with(names: &[&str], latest: &str) -> tempfile::TempDir {
        let run = tempfile::tempdir().expect("tempdir");
        let dir = checkpoints_dir(run.path());
        for name in names {
            fs::create_dir_all(dir.join(name)).expect("mkdir");
            fs::write(dir.join(name).join("state.yaml"), "").expect("state");
        }
        fs::write(dir.join("latest"), latest).expect("latest");
        run
    }

    #[test]
    fn a_run_without_validation_defaults_to_latest_and_names_the_missing_best() {
        let run = run_with(&["epoch-0001", "epoch-0002"], "epoch-0002");
        let chosen = resolve_default(run.path()).expect("default");
        assert_eq!(chosen, checkpoints_dir(run.path()).join("epoch-0002"));
        let err = resolve(run.path(), "best").unwrap_err().to_string();
        assert!(
            err.contains("no `best` checkpoint")
                && err.contains("no validation split")
                && err.contains("`latest`"),
            "{err}"
        );
    }

    #[test]
    fn a_validated_run_defaults_to_best() {
        let run = run_with(&["epoch-0001", "epoch-0002", "best"], "epoch-0002");
        assert_eq!(
            resolve_default(run.path()).expect("default"),
            checkpoints_dir(run.path()).join("best")
        );
        assert_eq!(
            resolve(run.path(), "latest").expect("latest"),
            checkpoints_dir(run.path()).join("epoch-0002")
        );
    }
}
