//! `handid-trainer export`: a run's checkpoint as a serving checkpoint with
//! calibrated thresholds.

use std::path::PathBuf;

use crate::engine::state;
use crate::export::{Calibration, export, export_uncalibrated};
use anyhow::Context;

/// Arguments of `export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The run folder (`train --out`).
    #[arg(long)]
    pub run: PathBuf,
    /// `best` (validation mAP on training persons), `latest`, or a checkpoint
    /// folder [default: `best`, `latest` where the run had no validation split].
    #[arg(long)]
    pub checkpoint: Option<String>,
    /// Serving checkpoint folder to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Dataset root, when it moved since training.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Write no thresholds: for a side-information model trained without
    /// identities (every image its own person), which has no genuine pairs
    /// to calibrate on and never decides a match (`calibrate` can add
    /// thresholds later).
    #[arg(long, conflicts_with = "data")]
    pub uncalibrated: bool,
}

/// Exports and prints the thresholds.
pub fn run(args: &ExportArgs) -> anyhow::Result<()> {
    let checkpoint = match &args.checkpoint {
        Some(which) => state::resolve(&args.run, which)?,
        None => state::resolve_default(&args.run)?,
    };
    if args.uncalibrated {
        let m = export_uncalibrated(&checkpoint, &args.out)
            .with_context(|| format!("exporting {}", checkpoint.display()))?;
        println!(
            "exported {} as model {} ({}, {}-d) to {}, without thresholds (--uncalibrated)",
            checkpoint.display(),
            m.model_id,
            m.architecture,
            m.embedding_dim,
            args.out.display()
        );
        return Ok(());
    }
    let exported = export(&checkpoint, &args.out, args.data.as_deref())
        .with_context(|| format!("exporting {}", checkpoint.display()))?;
    let m = &exported.manifest;
    println!(
        "exported {} as model {} ({}, {}-d) to {}",
        checkpoint.display(),
        m.model_id,
        m.architecture,
        m.embedding_dim,
        args.out.display()
    );
    let (genuine, impostor) = exported.pairs;
    println!("thresholds on validation persons ({genuine} genuine, {impostor} impostor pairs):");
    print_points(&Calibration {
        pairs: exported.pairs,
        points: exported.calibrated,
    });
    Ok(())
}

/// One line per operating point, with a note where the impostor pairs are
/// too few to measure the FMR asked for.
pub(crate) fn print_points(calibration: &Calibration) {
    let impostor = calibration.pairs.1;
    for c in &calibration.points {
        let note = if c.point.fmr * (impostor as f64) < 1.0 {
            " (fewer impostor pairs than 1/FMR: the threshold is the highest impostor score)"
        } else {
            ""
        };
        println!(
            "  FMR {:e}: threshold {:.4} (measured FMR {:.2e}, TPR {:.1}%){note}",
            c.point.fmr,
            c.point.threshold,
            c.measured_fmr,
            100.0 * c.tpr
        );
    }
}
