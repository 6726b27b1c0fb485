//! `handid-trainer train`: runs (or resumes) the experiment a YAML config
//! describes and prints a summary line.

use std::path::PathBuf;

use crate::config::{Method, TrainConfig};
use crate::engine::{RunOptions, train};
use anyhow::Context;

/// Arguments of `train`.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// The experiment's YAML config (see `configs/`).
    #[arg(long)]
    pub config: PathBuf,
    /// Run folder: checkpoints, metrics.csv, curves.
    #[arg(long)]
    pub out: PathBuf,
    /// Overrides `data.manifest`.
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// Overrides `data.root`.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Overrides `device`.
    #[arg(long)]
    pub device: Option<String>,
    /// Overrides `model.clip_weights`.
    #[arg(long)]
    pub clip_weights: Option<PathBuf>,
    /// Overrides the epochs of the (last) fine-tuning stage; a cosine or
    /// one-cycle schedule that spanned the configured epochs spans these.
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Continue the run in `--out` from its latest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Stop cleanly after this many epochs in total (resume later).
    #[arg(long)]
    pub stop_after_epoch: Option<u64>,
    /// Epoch checkpoints kept besides `best`.
    #[arg(long, default_value_t = 2)]
    pub keep_checkpoints: usize,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

/// Applies the command-line overrides to the config file's contents.
pub fn effective_config(args: &TrainArgs) -> anyhow::Result<TrainConfig> {
    let mut config = TrainConfig::read(&args.config)?;
    if let Some(m) = &args.manifest {
        config.data.manifest = m.clone();
    }
    if let Some(d) = &args.data {
        config.data.root = Some(d.clone());
    }
    if let Some(d) = &args.device {
        config.device = d.clone();
    }
    if let Some(w) = &args.clip_weights {
        config.model.clip_weights = Some(w.clone());
    }
    if let Some(e) = args.epochs {
        match &mut config.method {
            Method::ZeroShot => anyhow::bail!("--epochs: a zero-shot run has no epochs"),
            Method::Finetune(s) | Method::ClipReid { stage2: s, .. } | Method::PromptSg { train: s, .. } => {
                // A schedule written to span the configured epochs spans the new count.
                use crate::engine::Schedule;
                if let Schedule::Cosine { total_steps, .. } | Schedule::OneCycle { total_steps, .. } =
                    &mut s.optim.schedule
                    && *total_steps == s.epochs
                {
                    *total_steps = e;
                }
                s.epochs = e
            }
        }
    }
    config.validate()?;
    Ok(config)
}

/// Runs the experiment.
pub fn run(args: &TrainArgs) -> anyhow::Result<()> {
    let config = effective_config(args).with_context(|| format!("loading {}", args.config.display()))?;
    let summary = train(
        &config,
        &RunOptions {
            out: args.out.clone(),
            resume: args.resume,
            stop_after_epoch: args.stop_after_epoch,
            progress: !args.quiet,
            keep_checkpoints: args.keep_checkpoints,
        },
    )?;
    let best = summary
        .best
        .map(|b| {
            let cross = b
                .val
                .cross_model
                .map(|c| format!(", against the old gallery mAP {:.1}%", 100.0 * c.map))
                .unwrap_or_default();
            format!(
                "best val mAP {:.1}% Rank-1 {:.1}%{cross} at epoch {}",
                100.0 * b.val.map,
                100.0 * b.val.rank1,
                b.epoch
            )
        })
        .unwrap_or_else(|| "no validation split".to_owned());
    println!(
        "{} {}: {} epochs, {:.1} images/s; {best}; checkpoint {}",
        config.name,
        if summary.finished {
            "finished"
        } else {
            "stopped (resume with --resume)"
        },
        summary.epochs,
        summary.images_per_second,
        summary.checkpoint.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Schedule;

    fn args(config: &str, epochs: Option<u64>) -> TrainArgs {
        TrainArgs {
            config: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/")).join(config),
            out: PathBuf::from("unused"),
            manifest: None,
            data: None,
            device: None,
            clip_weights: None,
            epochs,
            resume: false,
            stop_after_epoch: None,
            keep_checkpoints: 2,
            quiet: true,
        }
    }

    fn epochs_and_span(config: &TrainConfig) -> (u64, u64) {
        let Method::Finetune(s) = &config.method else {
            panic!("a fine-tuning config")
        };
        let Schedule::Cosine { total_steps, .. } = s.optim.schedule else {
            panic!("a cosine schedule")
        };
        (s.epochs, total_steps)
    }

    #[test]
    fn epochs_override_stretches_a_schedule_that_spanned_the_run() {
        // demo_tiny: 40 epochs, cosine over 40.
        let base = effective_config(&args("demo_tiny.yaml", None)).expect("config");
        assert_eq!(epochs_and_span(&base), (40, 40));
        let longer = effective_config(&args("demo_tiny.yaml", Some(400))).expect("config");
        assert_eq!(epochs_and_span(&longer), (400, 400));
        // A schedule of its own length is left alone.
        let mut config = base.clone();
        if let Method::Finetune(s) = &mut config.method
            && let Schedule::Cosine { total_steps, .. } = &mut s.optim.schedule
        {
            *total_steps = 30;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, serde_yaml::to_string(&config).expect("yaml")).expect("write");
        let mut a = args("demo_tiny.yaml", Some(400));
        a.config = path;
        assert_eq!(epochs_and_span(&effective_config(&a).expect("config")), (400, 30));
    }
}
