//! Every metric of one query/gallery split, and mean/std over splits.

use super::Similarity;
use super::openset::{self, FpirPoint, Searches};
use super::rank::{ApKind, QueryScope, Ranking};
use super::verification::{self, PairScores, Verification};
use crate::{Error, Result};

/// What to compute.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EvalOptions {
    /// AP definition of the headline mAP.
    pub ap: ApKind,
    /// CMC ranks reported as Rank-k.
    pub ranks: Vec<usize>,
    /// FMR targets for verification.
    pub fmrs: Vec<f64>,
    /// FPIR targets for open-set identification.
    pub fpirs: Vec<f64>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            ap: ApKind::NonInterpolated,
            ranks: vec![1, 5, 10],
            fmrs: verification::DEFAULT_FMRS.to_vec(),
            fpirs: openset::DEFAULT_FPIRS.to_vec(),
        }
    }
}

/// All figures of one split. Rates are fractions in [0, 1].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SplitEvaluation {
    /// Split name (e.g. `0`, or `query0/gallery0`).
    pub split: String,
    /// Number of queries.
    pub n_query: usize,
    /// Number of gallery items.
    pub n_gallery: usize,
    /// Queries whose person is not in the gallery (counted as misses).
    pub n_without_match: usize,
    /// AP definition used for `map`.
    pub ap: ApKind,
    /// Full CMC curve over all queries.
    pub cmc: Vec<f64>,
    /// `(k, Rank-k)` for each requested k.
    pub rank_k: Vec<(usize, f64)>,
    /// Mean average precision over all queries.
    pub map: f64,
    /// Mean inverse negative penalty over all queries.
    pub minp: f64,
    /// Verification over all query x gallery pairs.
    pub verification: Verification,
    /// FNIR at each requested FPIR.
    pub open_set: Vec<FpirPoint>,
}

impl SplitEvaluation {
    /// Computes every figure for one split.
    pub fn new<S, P>(
        split: impl Into<String>,
        sim: &Similarity<'_, S>,
        query_ids: &[P],
        gallery_ids: &[P],
        options: &EvalOptions,
    ) -> Result<Self>
    where
        S: Copy + Into<f64>,
        P: PartialEq,
    {
        let ranking = Ranking::new(sim, query_ids, gallery_ids)?;
        let pairs = PairScores::new(sim, query_ids, gallery_ids)?;
        let searches = Searches::new(sim, query_ids, gallery_ids)?;
        Ok(Self {
            split: split.into(),
            n_query: sim.n_query(),
            n_gallery: sim.n_gallery(),
            n_without_match: ranking.n_without_match(),
            ap: options.ap,
            cmc: ranking.cmc(QueryScope::All),
            rank_k: options
                .ranks
                .iter()
                .map(|&k| (k, ranking.rank_k(k, QueryScope::All)))
                .collect(),
            map: ranking.mean_ap(options.ap, QueryScope::All),
            minp: ranking.minp(QueryScope::All),
            verification: verification::evaluate(&pairs, &options.fmrs)?,
            open_set: options
                .fpirs
                .iter()
                .map(|&f| openset::fnir_at_fpir(&searches, f))
                .collect::<Result<_>>()?,
        })
    }

    /// The scalar figures, named as in reports, in a fixed order.
    pub fn row(&self) -> MetricRow {
        let mut values: Vec<(String, f64)> = self
            .rank_k
            .iter()
            .map(|&(k, v)| (format!("rank{k}"), v))
            .collect();
        values.push(("mAP".into(), self.map));
        values.push(("mINP".into(), self.minp));
        values.push(("EER".into(), self.verification.eer));
        for p in &self.verification.at_fmr {
            values.push((format!("TPR@FMR={}", p.target_fmr), p.tpr));
        }
        for p in &self.open_set {
            values.push((format!("FNIR@FPIR={}", p.target_fpir), p.fnir));
        }
        values.push(("queries_without_match".into(), self.n_without_match as f64));
        MetricRow {
            split: self.split.clone(),
            values,
        }
    }
}

/// Named scalar figures of one split.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MetricRow {
    /// Split name.
    pub split: String,
    /// `(metric, value)` in report order.
    pub values: Vec<(String, f64)>,
}

/// Mean and standard deviation of one metric over splits.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MetricSummary {
    /// Metric name.
    pub name: String,
    /// Mean over splits.
    pub mean: f64,
    /// Population standard deviation over splits (numpy's default, ddof = 0,
    /// as the published 10-split tables use).
    pub std: f64,
}

/// Mean and standard deviation of every metric over `rows`, which must all
/// name the same metrics in the same order.
pub fn summarize(rows: &[MetricRow]) -> Result<Vec<MetricSummary>> {
    let first = rows
        .first()
        .ok_or_else(|| Error::Invalid("no split to summarise".into()))?;
    let names: Vec<&str> = first.values.iter().map(|(n, _)| n.as_str()).collect();
    if let Some(bad) = rows
        .iter()
        .find(|r| !r.values.iter().map(|(n, _)| n.as_str()).eq(names.iter().copied()))
    {
        return Err(Error::Invalid(format!(
            "split {} has other metrics than split {}",
            bad.split, first.split
        )));
    }
    let n = rows.len() as f64;
    Ok(names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mean = rows.iter().map(|r| r.values[i].1).sum::<f64>() / n;
            let var = rows.iter().map(|r| (r.values[i].1 - mean).powi(2)).sum::<f64>() / n;
            MetricSummary {
                name: (*name).to_string(),
                mean,
                std: var.sqrt(),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(split: &str, values: &[(&str, f64)]) -> MetricRow {
        MetricRow {
            split: split.into(),
            values: values.iter().map(|&(n, v)| (n.into(), v)).collect(),
        }
    }

    #[test]
    fn mean_and_population_std() {
        let s = summarize(&[
            row("0", &[("a", 1.0), ("b", 0.5)]),
            row("1", &[("a", 3.0), ("b", 0.5)]),
        ])
        .unwrap();
        assert_eq!(
            s[0],
            MetricSummary {
                name: "a".into(),
                mean: 2.0,
                std: 1.0
            }
        );
        assert_eq!(
            s[1],
            MetricSummary {
                name: "b".into(),
                mean: 0.5,
                std: 0.0
            }
        );
        assert!(summarize(&[]).is_err());
        assert!(summarize(&[row("0", &[("a", 1.0)]), row("1", &[("c", 1.0)])]).is_err());
    }

    #[test]
    fn split_evaluation_of_a_perfect_matrix() {
        // Two persons, two queries each, one gallery image each; the right
        // gallery image always scores highest.
        let sim = [0.9, 0.1, 0.8, 0.2, 0.3, 0.7, 0.0, 0.95];
        let e = SplitEvaluation::new(
            "0",
            &Similarity::new(&sim, 4, 2).unwrap(),
            &["a", "a", "b", "b"],
            &["a", "b"],
            &EvalOptions::default(),
        )
        .unwrap();
        assert_eq!(e.rank_k, vec![(1, 1.0), (5, 1.0), (10, 1.0)]);
        assert_eq!((e.map, e.minp, e.verification.eer), (1.0, 1.0, 0.0));
        assert!(e.open_set.iter().all(|p| p.fnir == 0.0));
        let names: Vec<String> = e.row().values.into_iter().map(|(n, _)| n).collect();
        assert_eq!(names[..5], ["rank1", "rank5", "rank10", "mAP", "mINP"]);
    }
}
