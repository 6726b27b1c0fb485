//! `handid-trainer eval --embeddings FILE`: scores precomputed query/gallery
//! vectors over every split they hold and writes the report (Markdown, JSON,
//! CSV, PNG plots). The file format is `handid_eval::embeddings`.

use std::path::PathBuf;

use anyhow::Context;
use handid_eval::embeddings;
use handid_eval::metrics::Similarity;
use handid_eval::metrics::rank::ApKind;
use handid_eval::metrics::summary::{EvalOptions, SplitEvaluation};
use handid_eval::report::Report;
use indicatif::{ProgressBar, ProgressStyle};

/// AP definitions on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Ap {
    /// torchreid / CLIP-FH.
    NonInterpolated,
    /// Market-1501 original / MBA-Net.
    Trapezoid,
}

/// Arguments of `eval`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Safetensors file with `query{i}`, `gallery{i}` (F32 [n, dim]) and
    /// `query{i}_ids`, `gallery{i}_ids` (I64 [n]) for each split i.
    #[arg(long)]
    pub embeddings: PathBuf,
    /// Folder for report.md, report.json, report.csv and the plots.
    #[arg(long)]
    pub out: PathBuf,
    /// AP definition of the headline mAP.
    #[arg(long, value_enum, default_value = "non-interpolated")]
    pub ap: Ap,
}

/// Runs the command.
pub fn run(args: Args) -> anyhow::Result<()> {
    let splits = embeddings::read(&args.embeddings).context("reading the embeddings")?;
    let options = EvalOptions {
        ap: match args.ap {
            Ap::NonInterpolated => ApKind::NonInterpolated,
            Ap::Trapezoid => ApKind::Trapezoid,
        },
        ..EvalOptions::default()
    };
    let bar = ProgressBar::new(splits.len() as u64)
        .with_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} splits").context("progress style")?,
        )
        .with_message("evaluating");
    let mut evaluations = Vec::with_capacity(splits.len());
    for split in &splits {
        let sim = embeddings::cosine_similarity(&split.query, &split.gallery)?;
        let sim = Similarity::new(&sim, split.query.len(), split.gallery.len())?;
        let evaluation =
            SplitEvaluation::new(&split.name, &sim, &split.query.ids, &split.gallery.ids, &options)
                .with_context(|| format!("evaluating split {}", split.name))?;
        evaluations.push(evaluation);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let provenance = vec![("embeddings".to_string(), args.embeddings.display().to_string())];
    let report = Report::new(
        "Evaluation of precomputed embeddings",
        provenance,
        options,
        evaluations,
    )?;
    let written = report
        .write(&args.out)
        .with_context(|| format!("writing the report to {}", args.out.display()))?;
    print!(
        "{}",
        report
            .markdown()
            .split("\n## Per split")
            .next()
            .unwrap_or_default()
    );
    for path in written {
        println!("wrote {}", path.display());
    }
    Ok(())
}
