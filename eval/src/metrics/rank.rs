//! Ranking metrics: CMC / Rank-k, AP (non-interpolated and trapezoid), mINP.
//!
//! Reference implementations, reproduced to 1e-9 by `tests/metric_fixtures.rs`:
//! torchreid / FastReID `eval_market1501` (non-interpolated AP, mINP) and
//! MBA-Net `utils/evaluation_metrics.py` (trapezoid AP). Hands have no cameras,
//! so where `eval_market1501` discards gallery items of the query's person
//! *and camera*, the fixtures give queries and gallery distinct camera ids and
//! nothing is discarded; this module discards nothing either.

use super::Similarity;
use crate::Result;

/// Gallery indices sorted by descending score; equal scores keep gallery
/// order, so the ranking is deterministic whatever the platform.
pub fn rank_gallery(scores: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // `sort_by` is stable. Scores are finite (checked by `Similarity`), so
    // `partial_cmp` never fails; `total_cmp` is avoided because it orders
    // -0.0 before 0.0.
    order.sort_by(|&a, &b| {
        scores[b]
            .partial_cmp(&scores[a])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    order
}

/// How average precision is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApKind {
    /// Mean of the precision at each relevant item (torchreid, CLIP-ReID,
    /// CLIP-FH). With one match, AP = 1 / rank.
    NonInterpolated,
    /// Each relevant item adds (precision before it + precision at it) / 2
    /// times its recall step (Market-1501 original code, MBA-Net).
    Trapezoid,
}

impl ApKind {
    /// Short name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::NonInterpolated => "non-interpolated",
            Self::Trapezoid => "trapezoid",
        }
    }
}

/// Ranking outcome of one query.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryRanking {
    /// 0-based positions, in the ranked gallery, of the query's person's items.
    pub match_positions: Vec<usize>,
}

impl QueryRanking {
    /// Whether the gallery holds the query's person at all.
    pub fn has_match(&self) -> bool {
        !self.match_positions.is_empty()
    }

    /// 0-based position of the first correct match.
    pub fn first_match(&self) -> Option<usize> {
        self.match_positions.first().copied()
    }

    /// Average precision of this query (0 when it has no match).
    pub fn average_precision(&self, kind: ApKind) -> f64 {
        let n = self.match_positions.len();
        if n == 0 {
            return 0.0;
        }
        let sum: f64 = self
            .match_positions
            .iter()
            .enumerate()
            .map(|(i, &pos)| {
                let precision = (i + 1) as f64 / (pos + 1) as f64;
                match kind {
                    ApKind::NonInterpolated => precision,
                    ApKind::Trapezoid => {
                        // Precision just before this item: i hits in `pos` items
                        // (taken as 1 at the very top, as the Market-1501 code does).
                        let before = if pos == 0 { 1.0 } else { i as f64 / pos as f64 };
                        (before + precision) / 2.0
                    }
                }
            })
            .sum();
        sum / n as f64
    }

    /// Inverse negative penalty (FastReID's mINP term): number of matches
    /// over the rank of the hardest one; 0 when there is no match.
    pub fn inverse_negative_penalty(&self) -> f64 {
        match self.match_positions.last() {
            Some(&last) => self.match_positions.len() as f64 / (last + 1) as f64,
            None => 0.0,
        }
    }
}

/// Which queries an average is taken over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryScope {
    /// Every query; a query without a match counts as a miss (AP 0). This is
    /// handid's headline convention (PROTOCOL.md) and MBA-Net's.
    All,
    /// Only queries whose person is in the gallery (torchreid's convention).
    Matched,
}

/// Per-query rankings of a whole query set against one gallery.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranking {
    /// One entry per query, in query order.
    pub queries: Vec<QueryRanking>,
    /// Gallery size (length of the full CMC curve).
    pub n_gallery: usize,
}

impl Ranking {
    /// Ranks the gallery for every query.
    pub fn new<S, P>(sim: &Similarity<'_, S>, query_ids: &[P], gallery_ids: &[P]) -> Result<Self>
    where
        S: Copy + Into<f64>,
        P: PartialEq,
    {
        sim.check_ids(query_ids, gallery_ids)?;
        let queries = query_ids
            .iter()
            .enumerate()
            .map(|(q, qid)| {
                let scores: Vec<f64> = sim.row(q).collect();
                let match_positions = rank_gallery(&scores)
                    .into_iter()
                    .enumerate()
                    .filter(|&(_, g)| gallery_ids[g] == *qid)
                    .map(|(pos, _)| pos)
                    .collect();
                QueryRanking { match_positions }
            })
            .collect();
        Ok(Self {
            queries,
            n_gallery: sim.n_gallery(),
        })
    }

    /// Number of queries whose person is not in the gallery (reported
    /// separately: they count as misses under [`QueryScope::All`]).
    pub fn n_without_match(&self) -> usize {
        self.queries.iter().filter(|q| !q.has_match()).count()
    }

    fn scoped(&self, scope: QueryScope) -> impl Iterator<Item = &QueryRanking> {
        self.queries
            .iter()
            .filter(move |q| scope == QueryScope::All || q.has_match())
    }

    fn mean(&self, scope: QueryScope, f: impl Fn(&QueryRanking) -> f64) -> f64 {
        let (sum, n) = self
            .scoped(scope)
            .fold((0.0, 0usize), |(s, n), q| (s + f(q), n + 1));
        if n == 0 { 0.0 } else { sum / n as f64 }
    }

    /// Full CMC curve: entry `k - 1` is the share of queries whose first
    /// correct match is within the top `k`.
    pub fn cmc(&self, scope: QueryScope) -> Vec<f64> {
        let mut hits = vec![0usize; self.n_gallery];
        let mut n = 0usize;
        for q in self.scoped(scope) {
            n += 1;
            if let Some(first) = q.first_match() {
                hits[first] += 1;
            }
        }
        let mut cumulative = 0usize;
        hits.iter()
            .map(|&h| {
                cumulative += h;
                if n == 0 { 0.0 } else { cumulative as f64 / n as f64 }
            })
            .collect()
    }

    /// Rank-k accuracy (k >= 1; a k beyond the gallery size is clamped to it).
    pub fn rank_k(&self, k: usize, scope: QueryScope) -> f64 {
        let k = k.clamp(1, self.n_gallery);
        self.mean(scope, |q| {
            if q.first_match().is_some_and(|f| f < k) {
                1.0
            } else {
                0.0
            }
        })
    }

    /// Mean average precision.
    pub fn mean_ap(&self, kind: ApKind, scope: QueryScope) -> f64 {
        self.mean(scope, |q| q.average_precision(kind))
    }

    /// Mean inverse negative penalty (mINP, FastReID).
    pub fn minp(&self, scope: QueryScope) -> f64 {
        self.mean(scope, QueryRanking::inverse_negative_penalty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_keep_gallery_order() {
        assert_eq!(
            rank_gallery(&[0.5, 0.9, 0.5, -0.0, 0.0, 0.9]),
            vec![1, 5, 0, 2, 3, 4]
        );
    }

    #[test]
    fn ap_by_hand() {
        // Matches at ranks 1 and 3 (positions 0 and 2).
        let q = QueryRanking {
            match_positions: vec![0, 2],
        };
        assert!((q.average_precision(ApKind::NonInterpolated) - (1.0 + 2.0 / 3.0) / 2.0).abs() < 1e-15);
        // Trapezoid: (1 + 1)/2 * 1/2 + (1/2 + 2/3)/2 * 1/2.
        let expected = 0.5 + (0.5 + 2.0 / 3.0) / 4.0;
        assert!((q.average_precision(ApKind::Trapezoid) - expected).abs() < 1e-15);
        assert!((q.inverse_negative_penalty() - 2.0 / 3.0).abs() < 1e-15);
        // A single match at rank 4: AP = 1/4 (PROTOCOL.md).
        let single = QueryRanking {
            match_positions: vec![3],
        };
        assert_eq!(single.average_precision(ApKind::NonInterpolated), 0.25);
    }

    #[test]
    fn queries_without_match_are_misses_under_all_scope() {
        let sim = [0.9, 0.1, 0.2, 0.8, 0.7, 0.6];
        let ranking = Ranking::new(&Similarity::new(&sim, 3, 2).unwrap(), &[1, 2, 3], &[1, 2]).unwrap();
        assert_eq!(ranking.n_without_match(), 1);
        assert_eq!(ranking.cmc(QueryScope::All), vec![2.0 / 3.0, 2.0 / 3.0]);
        assert_eq!(ranking.cmc(QueryScope::Matched), vec![1.0, 1.0]);
        assert_eq!(ranking.rank_k(1, QueryScope::All), 2.0 / 3.0);
        assert_eq!(ranking.mean_ap(ApKind::NonInterpolated, QueryScope::Matched), 1.0);
    }

    #[test]
    fn mismatched_shapes_are_rejected() {
        assert!(Similarity::new(&[0.0f32; 5], 2, 3).is_err());
        assert!(Similarity::new(&[f64::NAN; 6], 2, 3).is_err());
        let sim = Similarity::new(&[0.0f32; 6], 2, 3).unwrap();
        assert!(Ranking::new(&sim, &[1], &[1, 2, 3]).is_err());
    }
}
