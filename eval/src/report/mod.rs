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
    /// For a cross-model evaluation (new queries, old galleries): how it
    /// compares with each model alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compatibility: Option<Compatibility>,
}

/// The compatibility criterion of backward-compatible training (Shen et
/// al., "Towards Backward-Compatible Representation Learning", CVPR 2020,
/// Definition 1 in its empirical form): a new model is compatible with an
/// old one when its queries searched against the old model's gallery beat
/// the old model searched against itself, M(new, old) > M(old, old); how far
/// M(new, old) trails M(new, new) is what compatibility costs. Figures are
/// means over the splits.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Compatibility {
    /// The old model's folder and model id.
    pub old_model: String,
    /// The new model's folder and model id.
    pub new_model: String,
    /// mAP and Rank-1 of the old model alone.
    pub old_old: (f64, f64),
    /// mAP and Rank-1 of the new model alone.
    pub new_new: (f64, f64),
    /// mAP and Rank-1 of new queries against old galleries (mapped by
    /// [`Self::transform`] when there is one).
    pub new_old: (f64, f64),
    /// The transform applied to the old galleries, if any.
    pub transform: Option<String>,
}

impl Compatibility {
    /// M(new, old) > M(old, old), by mAP.
    pub fn compatible(&self) -> bool {
        self.new_old.0 > self.old_old.0
    }

    fn markdown(&self) -> String {
        let row = |name: &str, (map, rank1): (f64, f64)| {
            format!("| {name} | {:.2} | {:.2} |\n", 100.0 * map, 100.0 * rank1)
        };
        let mut md = String::from("\n## Compatibility\n\n");
        let _ = writeln!(
            md,
            "- old model: `{}`\n- new model: `{}`\n",
            self.old_model, self.new_model
        );
        md.push_str("| query model / gallery model | mAP | Rank-1 |\n|---|---:|---:|\n");
        md.push_str(&row("old / old: M(A,A)", self.old_old));
        md.push_str(&row("new / new: M(B,B)", self.new_new));
        match &self.transform {
            Some(t) => {
                let _ = writeln!(
                    md,
                    "| new / old through `{t}`: M(B,T(A)) | {:.2} | {:.2} |",
                    100.0 * self.new_old.0,
                    100.0 * self.new_old.1
                );
            }
            None => md.push_str(&row("new / old: M(B,A)", self.new_old)),
        }
        let crossed = if self.transform.is_some() {
            "M(B,T(A))"
        } else {
            "M(B,A)"
        };
        let _ = writeln!(
            md,
            "\nCompatible ({crossed} > M(A,A) by mAP, Shen et al. 2020): **{}** ({:+.2} mAP points against M(A,A)); \
             {crossed} trails M(B,B) by {:.2} mAP points.",
            if self.compatible() { "yes" } else { "no" },
            100.0 * (self.new_old.0 - self.old_old.0),
            100.0 * (self.new_new.0 - self.new_old.0)
        );
        md
    }
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
            compatibility: None,
        })
    }

    /// The mean of a metric over the splits (`mAP`, `rank1`, ...).
    pub fn mean(&self, metric: &str) -> Option<f64> {
        self.summary.iter().find(|m| m.name == metric).map(|m| m.mean)
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
        if let Some(compatibility) = &self.compatibility {
            md.push_str(&compatibility.markdown());
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
