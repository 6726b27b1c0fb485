//! Open-set identification (ISO/IEC 19795-1): FNIR at FPIR.
//!
//! Each query is searched twice against the split's gallery:
//! - *mated* (its person enrolled): a hit at threshold `t` when the top
//!   candidate is the right person and scores `>= t`; FNIR = share of mated
//!   searches that are not hits;
//! - *non-mated* (its person held out of the gallery, PROTOCOL.md): a false
//!   positive at `t` when the best remaining candidate scores `>= t`; FPIR =
//!   share of non-mated searches with a false positive.
//!
//! Holding out one person at a time only removes that person's gallery
//! columns, so the non-mated top score is the best score among the other
//! persons, and every query yields one non-mated search. Queries whose
//! person is not in the gallery give only a non-mated search.

use super::{Similarity, threshold_at_rate};
use crate::{Error, Result};

/// The FPIR targets reported by default.
pub const DEFAULT_FPIRS: [f64; 2] = [1e-2, 1e-3];

/// Outcome of every mated and non-mated search.
#[derive(Debug, Clone, PartialEq)]
pub struct Searches {
    /// Per mated search: the top score when the top candidate is right,
    /// `None` when it is someone else (a miss at every threshold).
    pub mated: Vec<Option<f64>>,
    /// Per non-mated search: the best score among other persons.
    pub non_mated: Vec<f64>,
}

impl Searches {
    /// Runs both searches for every query. Equal top scores go to the first
    /// gallery item, as in the ranking.
    pub fn new<S, P>(sim: &Similarity<'_, S>, query_ids: &[P], gallery_ids: &[P]) -> Result<Self>
    where
        S: Copy + Into<f64>,
        P: PartialEq,
    {
        sim.check_ids(query_ids, gallery_ids)?;
        let (mut mated, mut non_mated) = (Vec::new(), Vec::new());
        for (q, qid) in query_ids.iter().enumerate() {
            let mut top: Option<(f64, bool)> = None;
            let mut best_other: Option<f64> = None;
            for (score, gid) in sim.row(q).zip(gallery_ids) {
                let same = gid == qid;
                if top.is_none_or(|(t, _)| score > t) {
                    top = Some((score, same));
                }
                if !same && best_other.is_none_or(|b| score > b) {
                    best_other = Some(score);
                }
            }
            if gallery_ids.contains(qid) {
                mated.push(top.and_then(|(score, right)| right.then_some(score)));
            }
            // A gallery holding only this person leaves nothing to search.
            non_mated.extend(best_other);
        }
        Ok(Self { mated, non_mated })
    }
}

/// FNIR at one FPIR target.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct FpirPoint {
    /// The FPIR asked for.
    pub target_fpir: f64,
    /// The lowest observed score whose FPIR is within the target.
    pub threshold: f64,
    /// FPIR actually reached at `threshold` (<= target).
    pub fpir: f64,
    /// False negative identification rate at `threshold`.
    pub fnir: f64,
}

/// FNIR at `target_fpir`.
pub fn fnir_at_fpir(searches: &Searches, target_fpir: f64) -> Result<FpirPoint> {
    if searches.mated.is_empty() || searches.non_mated.is_empty() {
        return Err(Error::Invalid(format!(
            "open-set evaluation needs mated and non-mated searches (got {} and {})",
            searches.mated.len(),
            searches.non_mated.len()
        )));
    }
    let hits: Vec<f64> = searches.mated.iter().flatten().copied().collect();
    let threshold = threshold_at_rate(&searches.non_mated, &hits, target_fpir);
    let false_positives = searches.non_mated.iter().filter(|&&s| s >= threshold).count();
    let hits_kept = hits.iter().filter(|&&s| s >= threshold).count();
    Ok(FpirPoint {
        target_fpir,
        threshold,
        fpir: false_positives as f64 / searches.non_mated.len() as f64,
        fnir: 1.0 - hits_kept as f64 / searches.mated.len() as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn searches_by_hand() {
        // Gallery persons [1, 2, 3]; queries of persons 1, 2 and 4.
        #[rustfmt::skip]
        let sim = [
            0.9, 0.3, 0.2, // person 1: right at top (0.9); best other 0.3
            0.8, 0.6, 0.1, // person 2: person 1 on top: miss; best other 0.8
            0.4, 0.5, 0.7, // person 4: not enrolled; best other 0.7
        ];
        let s = Searches::new(&Similarity::new(&sim, 3, 3).unwrap(), &[1, 2, 4], &[1, 2, 3]).unwrap();
        assert_eq!(s.mated, vec![Some(0.9), None]);
        assert_eq!(s.non_mated, vec![0.3, 0.8, 0.7]);
    }

    #[test]
    fn fnir_at_fpir_by_hand() {
        // 100 non-mated top scores 0.00..0.99; mated: hits at 0.995, 0.985,
        // 0.5, and one wrong top candidate.
        let searches = Searches {
            mated: vec![Some(0.995), Some(0.985), Some(0.5), None],
            non_mated: (0..100).map(|i| i as f64 / 100.0).collect(),
        };
        // FPIR 1e-2 allows one false positive (0.99): threshold is the lowest
        // score above 0.98, i.e. 0.985; two of four mated searches pass.
        let p = fnir_at_fpir(&searches, 1e-2).unwrap();
        assert_eq!((p.threshold, p.fpir, p.fnir), (0.985, 0.01, 0.5));
        // FPIR 1e-3 allows none: the lowest score above 0.99 is 0.995.
        let p = fnir_at_fpir(&searches, 1e-3).unwrap();
        assert_eq!((p.threshold, p.fpir, p.fnir), (0.995, 0.0, 0.75));
        assert!(
            fnir_at_fpir(
                &Searches {
                    mated: vec![],
                    non_mated: vec![0.1]
                },
                0.01
            )
            .is_err()
        );
    }
}
