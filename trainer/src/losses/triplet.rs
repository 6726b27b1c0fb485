//! Batch-hard triplet loss (Hermans et al., "In Defense of the Triplet Loss
//! for Person Re-Identification", 2017), as CLIP-ReID's `TripletLoss`: for each
//! anchor, the farthest positive and the closest negative in the batch.

use tch::{Kind, Tensor};

/// The ranking penalty applied to `d(a, n) - d(a, p)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TripletMargin {
    /// `max(0, d_ap - d_an + margin)` (PyTorch's `MarginRankingLoss`).
    Hard(f64),
    /// `log(1 + exp(d_ap - d_an))` (PyTorch's `SoftMarginLoss`).
    Soft,
}

/// Pairwise Euclidean distances `[n, m]` between `x [n, d]` and `y [m, d]`,
/// clamped at 1e-12 before the square root as CLIP-ReID does (a zero distance
/// has no gradient otherwise).
pub fn euclidean_distances(x: &Tensor, y: &Tensor) -> Tensor {
    let xx = x.square().sum_dim_intlist(1, true, Kind::Float); // [n, 1]
    let yy = y.square().sum_dim_intlist(1, true, Kind::Float).tr(); // [1, m]
    (xx + yy - x.matmul(&y.tr()) * 2.0).clamp_min(1e-12).sqrt()
}

/// `features [batch, dim]`, `labels [batch]` -> scalar loss. Every anchor
/// needs a positive and a negative in the batch (the P x K sampler
/// guarantees it). With `normalize`, features are L2-normalised first.
pub fn batch_hard_triplet(
    features: &Tensor,
    labels: &Tensor,
    margin: TripletMargin,
    normalize: bool,
) -> Tensor {
    let features = if normalize {
        handid_model::l2_normalize(features)
    } else {
        features.shallow_clone()
    };
    let dist = euclidean_distances(&features, &features); // [batch, batch]
    let n = labels.size()[0];
    let same = labels.view([n, 1]).eq_tensor(&labels.view([1, n]));
    // hardest positive: largest distance among same-person pairs
    let d_ap = dist
        .masked_fill(&same.logical_not(), f64::NEG_INFINITY)
        .amax([1], false);
    // hardest negative: smallest distance among other-person pairs
    let d_an = dist.masked_fill(&same, f64::INFINITY).amin([1], false);
    let gap = &d_ap - &d_an;
    match margin {
        TripletMargin::Hard(m) => (gap + m).relu().mean(Kind::Float),
        TripletMargin::Soft => gap.softplus().mean(Kind::Float),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points() -> (Tensor, Tensor) {
        // Person 0 at x = 0 and x = 1; person 1 at x = 3 and x = 7 (1-D).
        let x = Tensor::from_slice(&[0.0f32, 1.0, 3.0, 7.0]).reshape([4, 1]);
        (x, Tensor::from_slice(&[0i64, 0, 1, 1]))
    }

    #[test]
    fn hard_margin_matches_hand_computation() {
        let (x, y) = points();
        // anchors: 0: ap 1, an 3 -> max(0, 1-3+0.3)=0;  1: ap 1, an 2 -> 0
        //          3: ap 4, an 2 -> 2.3;                7: ap 4, an 6 -> 0
        let loss = batch_hard_triplet(&x, &y, TripletMargin::Hard(0.3), false).double_value(&[]);
        assert!((loss - 2.3 / 4.0).abs() < 1e-5, "{loss}");
    }

    #[test]
    fn soft_margin_matches_hand_computation() {
        let (x, y) = points();
        let gaps = [1.0f64 - 3.0, 1.0 - 2.0, 4.0 - 2.0, 4.0 - 6.0];
        let expected = gaps.iter().map(|g| (1.0 + g.exp()).ln()).sum::<f64>() / 4.0;
        let loss = batch_hard_triplet(&x, &y, TripletMargin::Soft, false).double_value(&[]);
        assert!((loss - expected).abs() < 1e-5, "{loss} vs {expected}");
    }

    #[test]
    fn gradient_pulls_the_hard_positive_closer() {
        let (x, y) = points();
        let x = x.set_requires_grad(true);
        batch_hard_triplet(&x, &y, TripletMargin::Hard(0.3), false).backward();
        let g: Vec<f32> = x.grad().flatten(0, 1).try_into().expect("f32");
        // Anchor at 3 has its hard positive at 7: descending the gradient moves 7 towards 3.
        assert!(g[3] > 0.0, "{g:?}");
    }
}
