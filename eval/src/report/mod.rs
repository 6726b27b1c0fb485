//! Evaluation reports over query/gallery splits: Markdown, JSON, CSV and PNG
//! plots. Both `eval --embeddings` and the model-based evaluation build a
//! [`Report`] from per-split similarity matrices and write it here.

mod plots;

pub use plots::line_chart;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::metrics::summary::{EvalOptions, MetricRow, MetricSummary, SplitEvaluation, summarize};
use crate::{Error, Result};

/// Everything a report shows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Heading (what was evaluated).
    pub title: String,
    /// `(key, value)` provenance: input files, model, protocol, seed...
    pub provenance: Vec<(String, String)>,
    /// What was computed.
    pub options: EvalOptions,
    /// Mean and standard deviation of every figure over the splits.
    pub summary: Vec<MetricSummary>,
    /// Per-split figures.
    pub splits: Vec<SplitEvaluation>,
}

/// Whether a metric is a rate (shown in %) or a count.
fn is_rate(name: &str) -> bool {
    name != "queries_without_match"
}

fn shown(name: &str, value: f64) -> String {
    if is_rate(name) {
        format!("{:.2}", 100.0 * value)
    } else {
        format!("{value:.1}")
    }
}

impl Report {
    /// Summarises the splits.
    pub fn new(
        title: impl Into<String>,
        provenance: Vec<(String, String)>,
        options: EvalOptions,
        splits: Vec<SplitEvaluation>,
    ) -> Result<Self> {
        let summary = summarize(&splits.iter().map(SplitEvaluation::row).collect::<Vec<_>>())?;
        Ok(Self {
            title: title.into(),
            provenance,
            options,
            summary,
            splits,
        })
    }

    fn rows(&self) -> Vec<MetricRow> {
        self.splits.iter().map(SplitEvaluation::row).collect()
    }

    /// Markdown: summary table (mean ± std, in %), then one row per split.
    pub fn markdown(&self) -> String {
        let mut md = format!("# {}\n\n", self.title);
        for (k, v) in &self.provenance {
            let _ = writeln!(md, "- {k}: `{v}`");
        }
        let _ = writeln!(
            md,
            "- mAP: {} AP; similarity: cosine; {} split(s); rates in %, mean ± std (population) over splits; \
             queries whose person is not in the gallery count as misses\n",
            self.options.ap.name(),
            self.splits.len()
        );
        md.push_str("| metric | mean | std |\n|---|---:|---:|\n");
        for m in &self.summary {
            let _ = writeln!(
                md,
                "| {} | {} | {} |",
                m.name,
                shown(&m.name, m.mean),
                shown(&m.name, m.std)
            );
        }
        let rows = self.rows();
        if let Some(first) = rows.first() {
            md.push_str("\n## Per split\n\n| split | queries | gallery |");
            for (name, _) in &first.values {
                let _ = write!(md, " {name} |");
            }
            md.push_str("\n|---|---:|---:|");
            md.push_str(&"---:|".repeat(first.values.len()));
            md.push('\n');
            for (row, split) in rows.iter().zip(&self.splits) {
                let _ = write!(md, "| {} | {} | {} |", row.split, split.n_query, split.n_gallery);
                for (name, value) in &row.values {
                    let _ = write!(md, " {} |", shown(name, *value));
                }
                md.push('\n');
            }
        }
        md
    }

    /// CSV: one row per split, then `mean` and `std` rows; raw fractions.
    pub fn csv(&self) -> String {
        let rows = self.rows();
        let mut csv = String::from("split,n_query,n_gallery");
        for m in &self.summary {
            let _ = write!(csv, ",{}", m.name);
        }
        csv.push('\n');
        for (row, split) in rows.iter().zip(&self.splits) {
            let _ = write!(csv, "{},{},{}", row.split, split.n_query, split.n_gallery);
            for (_, v) in &row.values {
                let _ = write!(csv, ",{v}");
            }
            csv.push('\n');
        }
        for label in ["mean", "std"] {
            let _ = write!(csv, "{label},,");
            for m in &self.summary {
                let _ = write!(csv, ",{}", if label == "mean" { m.mean } else { m.std });
            }
            csv.push('\n');
        }
        csv
    }

    /// JSON of the whole report (ROC points left out; see the plots).
    pub fn json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|e| Error::Invalid(format!("report to JSON: {e}")))
    }

    /// Writes `report.md`, `report.json`, `report.csv` and the plots
    /// `cmc.png`, `roc.png`, `scores.png` into `dir`; returns the paths.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        let mut written = Vec::new();
        for (name, text) in [
            ("report.md", self.markdown()),
            ("report.json", self.json()?),
            ("report.csv", self.csv()),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(Error::io(&path))?;
            written.push(path);
        }
        written.extend(plots::write_all(self, dir)?);
        Ok(written)
    }
}
