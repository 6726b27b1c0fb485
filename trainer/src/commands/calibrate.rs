//! `handid-trainer calibrate`: decision thresholds for a serving checkpoint
//! that has none (an `import` or `init` checkpoint, or one exported before
//! the data existed), measured on training persons' images with the code
//! `export` uses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use handid_eval::data::manifest::Manifest as SplitManifest;
use handid_model::checkpoint::Manifest;

use crate::data::Item;
use crate::export::{Calibration, calibrate};

/// Arguments of `calibrate`.
#[derive(Debug, clap::Args)]
pub struct CalibrateArgs {
    /// The serving checkpoint folder; its `handid.yaml` gets the thresholds.
    #[arg(long)]
    pub model: PathBuf,
    /// A split manifest written by `handid-trainer splits`.
    #[arg(long)]
    pub manifest: PathBuf,
    /// Splits whose images are scored (repeatable). Only training persons:
    /// a split holding a person of the manifest's `test` split is refused.
    #[arg(long = "split", default_value = "train_all")]
    pub splits: Vec<String>,
    /// Dataset root (default: the manifest's `root`).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// False match rates to calibrate at (repeatable).
    #[arg(long = "fmr", default_values_t = [1e-2, 1e-3, 1e-4])]
    pub fmrs: Vec<f64>,
    /// Print the thresholds without writing them.
    #[arg(long)]
    pub dry_run: bool,
}

/// Calibrates, prints and (unless `--dry-run`) writes the thresholds.
pub fn run(args: &CalibrateArgs) -> anyhow::Result<()> {
    if let Some(bad) = args.fmrs.iter().find(|f| !(**f > 0.0 && **f < 1.0)) {
        bail!("--fmr {bad}: a false match rate lies in (0, 1)");
    }
    // Read first: a folder that is no checkpoint fails before any embedding.
    let mut manifest = Manifest::read(&args.model)?;
    let items = calibration_items(&args.manifest, args.data.as_deref(), &args.splits)?;
    let calibration = calibrate(&args.model, &items, &args.fmrs)
        .with_context(|| format!("calibrating {}", args.model.display()))?;
    print(&args.model, &manifest, &args.splits, &calibration);
    if args.dry_run {
        println!("--dry-run: {} unchanged", args.model.display());
        return Ok(());
    }
    manifest.thresholds = calibration.thresholds();
    manifest.write(&args.model)?;
    println!(
        "wrote the thresholds to {}",
        args.model.join(handid_model::checkpoint::MANIFEST_FILE).display()
    );
    Ok(())
}

/// The images of `splits`, labelled by person, after checking that none of
/// them is a test person (`aspect:person` ids count as `person`).
pub fn calibration_items(
    manifest_path: &Path,
    root: Option<&Path>,
    splits: &[String],
) -> anyhow::Result<Vec<Item>> {
    let manifest = SplitManifest::read(manifest_path)
        .with_context(|| format!("reading the split manifest {}", manifest_path.display()))?;
    let root = match (root, manifest.meta("root")) {
        (Some(root), _) => root.to_owned(),
        (None, Some(root)) => PathBuf::from(root),
        (None, None) => bail!("{} records no dataset root: pass --data", manifest_path.display()),
    };
    let test: std::collections::BTreeSet<&str> = manifest
        .split("test")
        .into_iter()
        .map(|e| e.person.as_str())
        .collect();
    let mut labels: BTreeMap<String, i64> = BTreeMap::new();
    let mut items = Vec::new();
    for split in splits {
        let entries = manifest.split(split);
        if entries.is_empty() {
            bail!(
                "{} has no images in split {split:?} (splits: {})",
                manifest_path.display(),
                manifest.split_names().join(", ")
            );
        }
        for e in entries {
            let person = e.person.rsplit(':').next().unwrap_or("");
            if test.contains(e.person.as_str()) || test.contains(person) {
                bail!(
                    "split {split:?} of {} holds person {}, a test person: thresholds are calibrated on \
                     training persons only, so that the test persons' results stay unbiased",
                    manifest_path.display(),
                    e.person
                );
            }
            let next = labels.len() as i64;
            let label = *labels.entry(e.person.clone()).or_insert(next);
            items.push(Item {
                path: root.join(&e.image),
                label,
            });
        }
    }
    Ok(items)
}

fn print(model: &Path, manifest: &Manifest, splits: &[String], calibration: &Calibration) {
    let (genuine, impostor) = calibration.pairs;
    println!(
        "model {} ({}, {}-d) in {}",
        manifest.model_id,
        manifest.architecture,
        manifest.embedding_dim,
        model.display()
    );
    if !manifest.thresholds.is_empty() {
        println!("replacing {} thresholds it had", manifest.thresholds.len());
    }
    println!(
        "thresholds on the splits {} ({genuine} genuine, {impostor} impostor pairs):",
        splits.join(", ")
    );
    super::export::print_points(calibration);
}
