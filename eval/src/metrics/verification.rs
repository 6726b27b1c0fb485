//! Verification (1:1) from all query x gallery pairs: ROC, TPR at FMR, EER.
//!
//! A pair is accepted when its score is `>= threshold`. Genuine pairs share a
//! person, impostor pairs do not. FMR = accepted impostors / impostors,
//! TPR = accepted genuines / genuines, FNMR = 1 - TPR.

use super::{Similarity, threshold_at_rate};
use crate::{Error, Result};

/// The FMR targets reported by default.
pub const DEFAULT_FMRS: [f64; 3] = [1e-2, 1e-3, 1e-4];

/// Genuine and impostor scores of every query x gallery pair.
#[derive(Debug, Clone, PartialEq)]
pub struct PairScores {
    /// Scores of same-person pairs.
    pub genuine: Vec<f64>,
    /// Scores of different-person pairs.
    pub impostor: Vec<f64>,
}

impl PairScores {
    /// Splits every pair of the matrix into genuine and impostor scores.
    pub fn new<S, P>(sim: &Similarity<'_, S>, query_ids: &[P], gallery_ids: &[P]) -> Result<Self>
    where
        S: Copy + Into<f64>,
        P: PartialEq,
    {
        sim.check_ids(query_ids, gallery_ids)?;
        let (mut genuine, mut impostor) = (Vec::new(), Vec::new());
        for (q, qid) in query_ids.iter().enumerate() {
            for (score, gid) in sim.row(q).zip(gallery_ids) {
                if gid == qid {
                    genuine.push(score)
                } else {
                    impostor.push(score)
                }
            }
        }
        Ok(Self { genuine, impostor })
    }
}

/// One point of the ROC curve.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RocPoint {
    /// Pairs scoring `>= threshold` are accepted.
    pub threshold: f64,
    /// False match rate.
    pub fmr: f64,
    /// True positive (match) rate.
    pub tpr: f64,
}

/// The operating point at a target FMR.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct FmrPoint {
    /// The FMR asked for.
    pub target_fmr: f64,
    /// The lowest observed score whose FMR is within the target.
    pub threshold: f64,
    /// FMR actually reached at `threshold` (<= target).
    pub fmr: f64,
    /// TPR at `threshold`.
    pub tpr: f64,
}

/// Verification figures of one split.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Verification {
    /// Number of genuine pairs.
    pub n_genuine: usize,
    /// Number of impostor pairs.
    pub n_impostor: usize,
    /// ROC from the strictest threshold (nothing accepted) to the loosest.
    /// Left out of JSON reports: it has one point per distinct score.
    #[serde(skip)]
    pub roc: Vec<RocPoint>,
    /// Genuine and impostor score distributions.
    pub histogram: ScoreHistogram,
    /// One point per requested FMR.
    pub at_fmr: Vec<FmrPoint>,
    /// Equal error rate (FMR = FNMR), linearly interpolated on the ROC.
    pub eer: f64,
}

/// Genuine and impostor score counts over equal-width bins.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ScoreHistogram {
    /// Lower edge of the first bin (lowest score).
    pub lo: f64,
    /// Upper edge of the last bin (highest score).
    pub hi: f64,
    /// Genuine pairs per bin.
    pub genuine: Vec<usize>,
    /// Impostor pairs per bin.
    pub impostor: Vec<usize>,
}

/// Number of histogram bins in reports.
pub const HISTOGRAM_BINS: usize = 50;

/// Histogram of both score sets over `bins` bins spanning all scores.
pub fn histogram(pairs: &PairScores, bins: usize) -> ScoreHistogram {
    let all = || pairs.genuine.iter().chain(&pairs.impostor).copied();
    let lo = all().fold(f64::INFINITY, f64::min);
    let hi = all().fold(f64::NEG_INFINITY, f64::max);
    let bins = bins.max(1);
    let count = |scores: &[f64]| {
        let mut counts = vec![0; bins];
        for &s in scores {
            // The top score falls in the last bin; equal lo and hi in the first.
            let b = if hi > lo {
                (((s - lo) / (hi - lo)) * bins as f64) as usize
            } else {
                0
            };
            counts[b.min(bins - 1)] += 1;
        }
        counts
    };
    ScoreHistogram {
        lo,
        hi,
        genuine: count(&pairs.genuine),
        impostor: count(&pairs.impostor),
    }
}

fn rate(count: usize, n: usize) -> f64 {
    count as f64 / n as f64
}

/// ROC over every distinct score: one point per threshold, in descending
/// threshold order, starting with (FMR 0, TPR 0) at +infinity.
pub fn roc(pairs: &PairScores) -> Vec<RocPoint> {
    let mut all: Vec<(f64, bool)> = pairs
        .genuine
        .iter()
        .map(|&s| (s, true))
        .chain(pairs.impostor.iter().map(|&s| (s, false)))
        .collect();
    all.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal));
    let (n_gen, n_imp) = (pairs.genuine.len(), pairs.impostor.len());
    let mut points = vec![RocPoint {
        threshold: f64::INFINITY,
        fmr: 0.0,
        tpr: 0.0,
    }];
    let (mut gen_acc, mut imp_acc) = (0usize, 0usize);
    for (i, &(score, genuine)) in all.iter().enumerate() {
        if genuine {
            gen_acc += 1
        } else {
            imp_acc += 1
        }
        // One point per distinct score: emit after the last pair holding it.
        if all.get(i + 1).is_none_or(|next| next.0 < score) {
            points.push(RocPoint {
                threshold: score,
                fmr: rate(imp_acc, n_imp),
                tpr: rate(gen_acc, n_gen),
            });
        }
    }
    points
}

/// Equal error rate on a ROC (as built by [`roc`]): where FMR and
/// FNMR = 1 - TPR cross, interpolated linearly between the two ROC points
/// around the crossing.
pub fn eer(roc: &[RocPoint]) -> f64 {
    // d = FNMR - FMR goes from 1 (nothing accepted) down to -1 (everything).
    let d = |p: &RocPoint| (1.0 - p.tpr) - p.fmr;
    for pair in roc.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if d(b) <= 0.0 {
            let t = d(a) / (d(a) - d(b));
            return a.fmr + t * (b.fmr - a.fmr);
        }
    }
    // Unreachable for a ROC from `roc` (its last point accepts everything).
    1.0
}

/// TPR and threshold at a target FMR.
pub fn at_fmr(pairs: &PairScores, target_fmr: f64) -> FmrPoint {
    let threshold = threshold_at_rate(&pairs.impostor, &pairs.genuine, target_fmr);
    let accepted = |scores: &[f64]| scores.iter().filter(|&&s| s >= threshold).count();
    FmrPoint {
        target_fmr,
        threshold,
        fmr: rate(accepted(&pairs.impostor), pairs.impostor.len()),
        tpr: rate(accepted(&pairs.genuine), pairs.genuine.len()),
    }
}

/// ROC, EER and the operating points at `fmrs`.
pub fn evaluate(pairs: &PairScores, fmrs: &[f64]) -> Result<Verification> {
    if pairs.genuine.is_empty() || pairs.impostor.is_empty() {
        return Err(Error::Invalid(format!(
            "verification needs genuine and impostor pairs (got {} and {})",
            pairs.genuine.len(),
            pairs.impostor.len()
        )));
    }
    let roc = roc(pairs);
    Ok(Verification {
        n_genuine: pairs.genuine.len(),
        n_impostor: pairs.impostor.len(),
        eer: eer(&roc),
        at_fmr: fmrs.iter().map(|&f| at_fmr(pairs, f)).collect(),
        roc,
        histogram: histogram(pairs, HISTOGRAM_BINS),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(genuine: &[f64], impostor: &[f64]) -> PairScores {
        PairScores {
            genuine: genuine.to_vec(),
            impostor: impostor.to_vec(),
        }
    }

    #[test]
    fn pairs_from_matrix() {
        let sim = [0.9f32, 0.25, 0.5, 0.75];
        let p = PairScores::new(&Similarity::new(&sim, 2, 2).unwrap(), &[7, 8], &[7, 9]).unwrap();
        assert_eq!(p.genuine, vec![0.9f32 as f64]);
        assert_eq!(p.impostor, vec![0.25, 0.5, 0.75]);
    }

    #[test]
    fn roc_by_hand() {
        // genuine 0.9 0.8 0.4; impostor 0.8 0.3
        let r = roc(&pairs(&[0.9, 0.8, 0.4], &[0.8, 0.3]));
        let got: Vec<(f64, f64, f64)> = r.iter().map(|p| (p.threshold, p.fmr, p.tpr)).collect();
        assert_eq!(
            got,
            vec![
                (f64::INFINITY, 0.0, 0.0),
                (0.9, 0.0, 1.0 / 3.0),
                (0.8, 0.5, 2.0 / 3.0),
                (0.4, 0.5, 1.0),
                (0.3, 1.0, 1.0),
            ]
        );
    }

    #[test]
    fn eer_by_hand() {
        // Separable scores: EER 0.
        assert_eq!(eer(&roc(&pairs(&[0.9, 0.8], &[0.1, 0.2]))), 0.0);
        // genuine 0.9 0.5, impostor 0.6 0.1: at threshold 0.6, FMR = FNMR = 0.5.
        assert_eq!(eer(&roc(&pairs(&[0.9, 0.5], &[0.6, 0.1]))), 0.5);
        // genuine 0.5 0.5, impostor 0.5 0.1: from +inf (FMR 0, FNMR 1) to 0.5
        // (FMR 0.5, FNMR 0) in one step; FNMR - FMR goes 1 -> -0.5, so the
        // crossing is 2/3 of the way: EER = 2/3 * 0.5 = 1/3.
        let e = eer(&roc(&pairs(&[0.5, 0.5], &[0.5, 0.1])));
        assert!((e - 1.0 / 3.0).abs() < 1e-15, "{e}");
    }

    #[test]
    fn tpr_at_fmr_by_hand() {
        // 10 impostors 0.0..0.9, genuine 0.95 0.85 0.5.
        let imp: Vec<f64> = (0..10).map(|i| i as f64 / 10.0).collect();
        let p = pairs(&[0.95, 0.85, 0.5], &imp);
        // FMR 0.1 allows one impostor (0.9): threshold is the lowest score
        // above the second-highest impostor 0.8, i.e. 0.85.
        let op = at_fmr(&p, 0.1);
        assert_eq!((op.threshold, op.fmr, op.tpr), (0.85, 0.1, 2.0 / 3.0));
        // FMR 0.01 allows none: the lowest score above 0.9 is 0.95.
        let op = at_fmr(&p, 0.01);
        assert_eq!((op.threshold, op.fmr, op.tpr), (0.95, 0.0, 1.0 / 3.0));
        // FMR 1 accepts everything.
        let op = at_fmr(&p, 1.0);
        assert_eq!((op.threshold, op.fmr, op.tpr), (0.0, 1.0, 1.0));
        // No score above the top impostor: the threshold accepts nothing seen.
        let op = at_fmr(&pairs(&[0.1], &[0.9]), 0.01);
        assert_eq!((op.threshold, op.fmr, op.tpr), (0.9f64.next_up(), 0.0, 0.0));
    }

    #[test]
    fn evaluation_needs_both_kinds_of_pairs() {
        assert!(evaluate(&pairs(&[0.5], &[]), &DEFAULT_FMRS).is_err());
        let v = evaluate(&pairs(&[0.9, 0.8], &[0.1, 0.2, 0.3]), &DEFAULT_FMRS).unwrap();
        assert_eq!((v.n_genuine, v.n_impostor, v.eer), (2, 3, 0.0));
        assert!(v.at_fmr.iter().all(|p| p.tpr == 1.0 && p.fmr == 0.0));
    }

    #[test]
    fn histogram_by_hand() {
        let h = histogram(&pairs(&[1.0, 0.9], &[0.0, 0.2, 0.5]), 4);
        assert_eq!((h.lo, h.hi), (0.0, 1.0));
        assert_eq!(h.genuine, vec![0, 0, 0, 2]);
        assert_eq!(h.impostor, vec![2, 0, 1, 0]);
    }
}
