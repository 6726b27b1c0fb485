//! Contrastive losses between images and texts, and supervised contrastive
//! learning.
//!
//! - [`sup_con`]: SupCon (Khosla et al., "Supervised Contrastive Learning",
//!   NeurIPS 2020, eq. 2, "L_out"): every other sample of the same person is a
//!   positive for an anchor.
//! - [`sup_con_cross`]: CLIP-ReID's `SupConLoss(text, image, t_label, i_label)`
//!   (Li et al., "CLIP-ReID", AAAI 2023, stage 1 L_i2t / L_t2i): anchors from
//!   one modality against all samples of the other.
//! - [`image_text_contrastive`]: CLIP's symmetric InfoNCE (Radford et al.
//!   2021) where pair i is image i with text i.

use tch::{Kind, Tensor};

/// CLIP-ReID's cross-modal supervised contrastive loss: `anchors [n, d]` with
/// `anchor_labels [n]` against `contrast [m, d]` with `contrast_labels [m]`;
/// logits are dot products divided by `temperature` (features are expected
/// L2-normalised). Positives are the contrast samples of the anchor's person;
/// each anchor needs at least one.
pub fn sup_con_cross(
    anchors: &Tensor,
    contrast: &Tensor,
    anchor_labels: &Tensor,
    contrast_labels: &Tensor,
    temperature: f64,
) -> Tensor {
    let n = anchor_labels.size()[0];
    let m = contrast_labels.size()[0];
    let mask = anchor_labels
        .view([n, 1])
        .eq_tensor(&contrast_labels.view([1, m]))
        .to_kind(Kind::Float);
    let logits = anchors.matmul(&contrast.tr()) / temperature; // [n, m]
    mean_log_likelihood_of_positives(&logits, &mask, None)
        .neg()
        .mean(Kind::Float)
}

/// SupCon on one set of features `[batch, dim]` (L2-normalised) with labels
/// `[batch]`: each sample is an anchor, itself excluded from both the
/// positives and the denominator. Anchors without a positive are skipped.
pub fn sup_con(features: &Tensor, labels: &Tensor, temperature: f64) -> Tensor {
    let n = labels.size()[0];
    let not_self = Tensor::eye(n, (Kind::Float, features.device())).neg() + 1.0;
    let mask = labels
        .view([n, 1])
        .eq_tensor(&labels.view([1, n]))
        .to_kind(Kind::Float)
        * &not_self;
    let logits = features.matmul(&features.tr()) / temperature;
    let per_anchor = mean_log_likelihood_of_positives(&logits, &mask, Some(&not_self));
    let has_positive = mask.sum_dim_intlist(1, false, Kind::Float).gt(0.0);
    per_anchor.masked_select(&has_positive).neg().mean(Kind::Float)
}

/// Σ_p mask·log softmax(logits) / Σ_p mask, per row; `keep` removes entries
/// from the softmax denominator.
fn mean_log_likelihood_of_positives(logits: &Tensor, mask: &Tensor, keep: Option<&Tensor>) -> Tensor {
    // Subtracting the (detached) row maximum does not change the softmax but
    // keeps exp() finite at low temperature.
    let logits = logits - logits.amax([1], true).detach();
    let exp = match keep {
        Some(keep) => logits.exp() * keep,
        None => logits.exp(),
    };
    let log_prob = &logits - exp.sum_dim_intlist(1, true, Kind::Float).log();
    (mask * log_prob).sum_dim_intlist(1, false, Kind::Float)
        / mask.sum_dim_intlist(1, false, Kind::Float).clamp_min(1.0)
}

/// CLIP's symmetric contrastive loss over matched pairs `(image_i, text_i)`:
/// `logit_scale · image @ textᵀ`, cross-entropy in both directions, averaged.
pub fn image_text_contrastive(image: &Tensor, text: &Tensor, logit_scale: f64) -> Tensor {
    let n = image.size()[0];
    let targets = Tensor::arange(n, (Kind::Int64, image.device()));
    let logits = image.matmul(&text.tr()) * logit_scale;
    (logits.cross_entropy_for_logits(&targets) + logits.tr().cross_entropy_for_logits(&targets)) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(rows: &[[f32; 2]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let t = Tensor::from_slice(&flat).reshape([rows.len() as i64, 2]);
        handid_model::l2_normalize(&t)
    }

    #[test]
    fn sup_con_cross_matches_hand_computation() {
        // Two anchors, three contrast samples; anchor 0 (person 0) has positives 0 and 2.
        let a = unit(&[[1.0, 0.0], [0.0, 1.0]]);
        let c = unit(&[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]);
        let la = Tensor::from_slice(&[0i64, 1]);
        let lc = Tensor::from_slice(&[0i64, 1, 0]);
        let t = 0.5;
        let loss = sup_con_cross(&a, &c, &la, &lc, t).double_value(&[]);
        let s = std::f64::consts::FRAC_1_SQRT_2;
        // anchor 0: logits [1, 0, s]/t; positives {0, 2}
        let z0 = [1.0 / t, 0.0, s / t];
        let lse0 = z0.iter().map(|z: &f64| z.exp()).sum::<f64>().ln();
        let l0 = -((z0[0] - lse0) + (z0[2] - lse0)) / 2.0;
        // anchor 1: logits [0, 1, s]/t; positive {1}
        let z1 = [0.0, 1.0 / t, s / t];
        let lse1 = z1.iter().map(|z: &f64| z.exp()).sum::<f64>().ln();
        let l1 = -(z1[1] - lse1);
        assert!(
            (loss - (l0 + l1) / 2.0).abs() < 1e-5,
            "{loss} vs {}",
            (l0 + l1) / 2.0
        );
    }

    #[test]
    fn sup_con_excludes_self_and_is_lower_for_clustered_features() {
        let labels = Tensor::from_slice(&[0i64, 0, 1, 1]);
        let clustered = unit(&[[1.0, 0.05], [1.0, -0.05], [0.05, 1.0], [-0.05, 1.0]]);
        let mixed = unit(&[[1.0, 0.05], [0.05, 1.0], [1.0, -0.05], [-0.05, 1.0]]);
        let good = sup_con(&clustered, &labels, 0.1).double_value(&[]);
        let bad = sup_con(&mixed, &labels, 0.1).double_value(&[]);
        assert!(good < bad, "{good} !< {bad}");
        // Hand check for the clustered case, anchor 0: its positive is sample 1,
        // denominator over samples 1, 2, 3 (self excluded).
        let f: Vec<f32> = clustered.flatten(0, 1).try_into().expect("f32");
        let dot = |i: usize, j: usize| (f[2 * i] * f[2 * j] + f[2 * i + 1] * f[2 * j + 1]) as f64 / 0.1;
        let per = |i: usize, p: usize| {
            let others: Vec<usize> = (0..4).filter(|&j| j != i).collect();
            let lse = others.iter().map(|&j| dot(i, j).exp()).sum::<f64>().ln();
            -(dot(i, p) - lse)
        };
        let expected = (per(0, 1) + per(1, 0) + per(2, 3) + per(3, 2)) / 4.0;
        assert!((good - expected).abs() < 1e-4, "{good} vs {expected}");
    }

    #[test]
    fn contrastive_is_symmetric_and_low_for_matched_pairs() {
        let img = unit(&[[1.0, 0.0], [0.0, 1.0]]);
        let matched = image_text_contrastive(&img, &img, 10.0).double_value(&[]);
        let swapped = image_text_contrastive(&img, &img.flip([0]), 10.0).double_value(&[]);
        // logits diag 10, off 0: -ln(e^10 / (e^10 + 1))
        let expected = (1.0 + (-10.0f64).exp()).ln();
        assert!((matched - expected).abs() < 1e-5);
        assert!(swapped > matched);
    }
}
