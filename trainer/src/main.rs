//! handid-trainer: fine-tunes CLIP for hand identity, evaluates it and
//! exports serving checkpoints.
//!
//! # Layout
//! - `main.rs`: the command line.
//! - `commands/` (in the library): one file per subcommand (`splits`,
//!   `synth`, `eval`, `replay`, `import`, `init`, `embed`, `train`, `export`, `calibrate`).

use anyhow::Context;
use clap::{Parser, Subcommand};
use handid_trainer::commands;

/// Command-line interface of the trainer.
#[derive(Debug, Parser)]
#[command(
    name = "handid-trainer",
    version,
    about = "Fine-tune, evaluate and export CLIP hand-identity models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check that libtorch loads and runs on the given device.
    Doctor {
        /// `cpu`, `cuda` or `cuda:N`.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Draw the protocol's seeded splits and write them as a manifest.
    Splits(commands::splits::Args),
    /// Write a synthetic identity-labelled hand dataset.
    Synth(commands::synth::Args),
    /// Evaluate precomputed embeddings over their splits; write a report.
    Eval(commands::eval::Args),
    /// Evaluate through a live handid server: enrol each split's gallery,
    /// identify every query, score as `eval` does, delete the gallery.
    Replay(commands::replay::Args),
    /// Import OpenAI / open_clip / Hugging Face CLIP weights as a serving checkpoint.
    Import(commands::import::ImportArgs),
    /// Write a serving checkpoint with random weights (the untrained baseline).
    Init(commands::init::InitArgs),
    /// Embed image files with a serving checkpoint.
    Embed(commands::embed::EmbedArgs),
    /// Train (or resume) the experiment a YAML config describes.
    Train(commands::train::TrainArgs),
    /// Write a run's checkpoint as a serving checkpoint with calibrated thresholds.
    Export(commands::export::ExportArgs),
    /// Calibrate a serving checkpoint's thresholds on training persons' images.
    Calibrate(commands::calibrate::CalibrateArgs),
    /// Fit the transformation of an old model's templates into a new
    /// model's space, on training persons' images (no template needs its
    /// image again).
    FitTransform(commands::fit_transform::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Doctor { device } => {
            let device = handid_model::parse_device(&device).context("choosing the device")?;
            let x = tch::Tensor::ones([2, 2], (tch::Kind::Float, device));
            let sum = x.sum(tch::Kind::Float).double_value(&[]);
            println!("libtorch OK on {device:?} (2x2 ones sum to {sum})");
        }
        Command::Splits(args) => commands::splits::run(args)?,
        Command::Synth(args) => commands::synth::run(args)?,
        Command::Eval(args) => commands::eval::run(args)?,
        Command::FitTransform(args) => commands::fit_transform::run(args)?,
        Command::Replay(args) => commands::replay::run(args)?,
        Command::Import(args) => commands::import::run(&args)?,
        Command::Init(args) => commands::init::run(&args)?,
        Command::Embed(args) => commands::embed::run(&args)?,
        Command::Train(args) => commands::train::run(&args)?,
        Command::Export(args) => commands::export::run(&args)?,
        Command::Calibrate(args) => commands::calibrate::run(&args)?,
    }
    Ok(())
}
