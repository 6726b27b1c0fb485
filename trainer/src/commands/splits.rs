//! `handid-trainer splits`: draws the protocol's splits and writes them as a
//! manifest file (PROTOCOL.md section 2).

use std::path::PathBuf;

use anyhow::{Context, bail};
use handid_eval::data::hands11k::{self, Aspect, Filter};
use handid_eval::data::splits::{self, DEFAULT_SEED, DEFAULT_SPLITS, SplitOptions};
use handid_eval::data::{Dataset, MissingImages, folder};

/// Dataset layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DatasetLayout {
    /// `Hands/` + `HandInfo.csv` (11k Hands); persons split by id threshold.
    #[value(name = "11k")]
    Hands11k,
    /// `<root>/<person>/<image>`; persons split by `--test-fraction`.
    Folder,
}

/// Arguments of `splits`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Dataset root.
    #[arg(long)]
    pub data: PathBuf,
    /// Dataset layout.
    #[arg(long, value_enum, default_value = "11k")]
    pub layout: DatasetLayout,
    /// 11k aspect (`dorsal_right`, `dorsal_left`, `palmar_right`, `palmar_left`).
    #[arg(long, default_value = "dorsal_right")]
    pub aspect: String,
    /// 11k: also write `gallery_all{i}` (all aspects' galleries as distractors).
    #[arg(long)]
    pub gallery_all: bool,
    /// 11k: also write `train_extra`: the training persons' images the
    /// protocol leaves out (accessories; other aspects as separate
    /// identities), for `data.extra_train_splits` when data is scarce.
    #[arg(long)]
    pub train_extra: bool,
    /// Folder layout: share of persons that go to `test`.
    #[arg(long, default_value_t = 0.5)]
    pub test_fraction: f64,
    /// Seed of every random draw (recorded in the manifest).
    #[arg(long, default_value_t = DEFAULT_SEED)]
    pub seed: u64,
    /// Number of query/gallery splits.
    #[arg(long, default_value_t = DEFAULT_SPLITS)]
    pub splits: usize,
    /// Leave out (and count) missing or undecodable images instead of failing.
    #[arg(long)]
    pub skip_unreadable: bool,
    /// Manifest file to write.
    #[arg(long)]
    pub out: PathBuf,
}

fn report_skipped(dataset: &Dataset) {
    if !dataset.skipped.is_empty() {
        eprintln!("skipped {} unreadable image(s):", dataset.skipped.len());
        for (path, why) in &dataset.skipped {
            eprintln!("  {}: {why}", path.display());
        }
    }
}

/// Runs the command.
pub fn run(args: Args) -> anyhow::Result<()> {
    let missing = if args.skip_unreadable {
        MissingImages::Skip
    } else {
        MissingImages::Fail
    };
    let options = SplitOptions {
        seed: args.seed,
        n_splits: args.splits,
    };
    let root = args.data.display().to_string();
    let manifest = match args.layout {
        DatasetLayout::Hands11k => {
            let Some(aspect) = Aspect::parse(&args.aspect) else {
                bail!(
                    "unknown aspect {:?} (dorsal_right, dorsal_left, palmar_right, palmar_left)",
                    args.aspect
                )
            };
            // All aspects are loaded so that gallery_all can draw from them.
            let load = |without_accessories: bool| -> anyhow::Result<Vec<hands11k::HandInfo>> {
                let filter = Filter {
                    aspect: None,
                    without_accessories,
                };
                let (rows, dataset) =
                    hands11k::load(&args.data, filter, missing).context("reading the 11k dataset")?;
                report_skipped(&dataset);
                Ok(rows)
            };
            let mut manifest = splits::hands11k(&load(true)?, aspect, options, args.gallery_all, &root)?;
            if args.train_extra {
                let extra = splits::hands11k_train_extra(&load(false)?, aspect, &manifest);
                manifest.entries.extend(extra);
            }
            manifest
        }
        DatasetLayout::Folder => {
            if args.train_extra {
                bail!("--train-extra needs the 11k layout (it reads HandInfo.csv's aspects and accessories)");
            }
            let dataset = folder::load(&args.data, missing).context("reading the dataset folders")?;
            report_skipped(&dataset);
            splits::by_fraction(&dataset, args.test_fraction, options)?
        }
    };
    manifest
        .write(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!("{:<14} {:>7} {:>8}", "split", "images", "persons");
    for c in manifest.counts() {
        println!("{:<14} {:>7} {:>8}", c.split, c.images, c.persons);
    }
    println!("wrote {} (seed {})", args.out.display(), args.seed);
    Ok(())
}
