//! Cross-entropy with label smoothing (Szegedy et al., "Rethinking the
//! Inception Architecture", CVPR 2016), as CLIP-ReID's `CrossEntropyLabelSmooth`:
//! targets are `(1 - ε) · one_hot + ε / classes`.

use tch::{Kind, Tensor};

/// `logits [batch, classes]`, `labels [batch]` -> scalar mean loss.
/// `epsilon = 0` is the plain cross-entropy.
pub fn cross_entropy_label_smooth(logits: &Tensor, labels: &Tensor, epsilon: f64) -> Tensor {
    let classes = logits.size()[1];
    let log_probs = logits.log_softmax(1, Kind::Float);
    let targets = labels.one_hot(classes).to_kind(Kind::Float) * (1.0 - epsilon) + epsilon / classes as f64;
    // mean over the batch of -Σ_c target_c · log p_c
    (-targets * log_probs)
        .sum_dim_intlist(1, false, Kind::Float)
        .mean(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_hand_computed_values() {
        // logits [[0, ln 3]]: p = [1/4, 3/4]; label 1.
        let logits = Tensor::from_slice(&[0.0f32, 3f32.ln()]).reshape([1, 2]);
        let labels = Tensor::from_slice(&[1i64]);
        let plain = cross_entropy_label_smooth(&logits, &labels, 0.0).double_value(&[]);
        assert!((plain - (4.0f64 / 3.0).ln()).abs() < 1e-6);
        // ε = 0.1: targets [0.05, 0.95]: -(0.05 ln 1/4 + 0.95 ln 3/4)
        let smooth = cross_entropy_label_smooth(&logits, &labels, 0.1).double_value(&[]);
        let expected = -(0.05 * 0.25f64.ln() + 0.95 * 0.75f64.ln());
        assert!((smooth - expected).abs() < 1e-6, "{smooth} vs {expected}");
        // Agrees with libtorch's own cross-entropy when ε = 0.
        let torch = logits.cross_entropy_for_logits(&labels).double_value(&[]);
        assert!((plain - torch).abs() < 1e-6);
    }
}
