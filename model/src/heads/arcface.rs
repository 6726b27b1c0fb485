//! The ArcFace classifier.

use tch::Tensor;
use tch::nn::{self, Init};

use crate::ops::l2_normalize;

/// Settings of an [`ArcFace`] classifier.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ArcFaceConfig {
    /// Feature scale `s` (ArcFace paper: 64; CLIP-FH: 30).
    pub scale: f64,
    /// Additive angular margin `m` in radians (ArcFace paper: 0.5).
    pub margin: f64,
    /// Apply the margin only where `cos θ > 0` (the "easy margin" variant).
    pub easy_margin: bool,
}

impl Default for ArcFaceConfig {
    fn default() -> Self {
        Self {
            scale: 30.0,
            margin: 0.5,
            easy_margin: false,
        }
    }
}

/// ArcFace classifier (Deng et al., "ArcFace: Additive Angular Margin Loss
/// for Deep Face Recognition", CVPR 2019): logits are `s * cos(θ_y + m)` for
/// the true class and `s * cos θ_j` for the others, with θ the angle between
/// the normalised feature and the normalised class weight.
#[derive(Debug)]
pub struct ArcFace {
    weight: Tensor,
    config: ArcFaceConfig,
}

impl ArcFace {
    /// Creates `weight: [classes, dim]` (Xavier-uniform, as the reference
    /// implementation) under `p`.
    pub fn new(p: nn::Path, dim: i64, classes: i64, config: ArcFaceConfig) -> Self {
        let bound = (6.0 / (dim + classes) as f64).sqrt();
        Self {
            weight: p.var(
                "weight",
                &[classes, dim],
                Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            ),
            config,
        }
    }

    /// Cosine logits without margin, `[batch, classes]`: what inference uses.
    pub fn cosine(&self, features: &Tensor) -> Tensor {
        l2_normalize(features).matmul(&l2_normalize(&self.weight).tr())
    }

    /// Margin logits for training: `features [batch, dim]`, `labels [batch]`
    /// (int64) -> `[batch, classes]`, ready for cross-entropy.
    pub fn forward(&self, features: &Tensor, labels: &Tensor) -> Tensor {
        let ArcFaceConfig {
            scale,
            margin,
            easy_margin,
        } = self.config;
        let cosine = self.cosine(features);
        let sine = (1.0f64 - cosine.square()).clamp(0.0, 1.0).sqrt();
        // cos(θ + m) = cos θ cos m - sin θ sin m
        let phi = &cosine * margin.cos() - &sine * margin.sin();
        let phi = if easy_margin {
            phi.where_self(&cosine.gt(0.0), &cosine)
        } else {
            // Past θ = π - m, cos(θ + m) stops decreasing; the reference
            // switches to the linear penalty cos θ - m sin m there.
            let threshold = (std::f64::consts::PI - margin).cos();
            let fallback = &cosine - (std::f64::consts::PI - margin).sin() * margin;
            phi.where_self(&cosine.gt(threshold), &fallback)
        };
        let one_hot = labels.one_hot(cosine.size()[1]).to_kind(cosine.kind());
        (&one_hot * phi + (1.0f64 - &one_hot) * cosine) * scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heads::seeded_store as vs;
    use tch::{Device, Kind};

    #[test]
    fn arcface_penalises_only_the_true_class() {
        let vs = vs();
        let head = ArcFace::new(
            vs.root() / "arcface",
            4,
            3,
            ArcFaceConfig {
                scale: 10.0,
                margin: 0.3,
                easy_margin: false,
            },
        );
        let x = Tensor::randn([5, 4], (Kind::Float, Device::Cpu));
        let labels = Tensor::from_slice(&[0i64, 1, 2, 0, 1]);
        let logits = head.forward(&x, &labels);
        let plain = head.cosine(&x) * 10.0;
        for (row, &label) in [0i64, 1, 2, 0, 1].iter().enumerate() {
            for class in 0..3 {
                let l = logits.double_value(&[row as i64, class]);
                let p = plain.double_value(&[row as i64, class]);
                if class == label {
                    // Hand-computed: s * cos(acos(c) + m), or the linear fallback past π - m.
                    let c = p / 10.0;
                    let theta = c.acos();
                    let expected = if theta + 0.3 < std::f64::consts::PI {
                        10.0 * (theta + 0.3).cos()
                    } else {
                        10.0 * (c - (std::f64::consts::PI - 0.3).sin() * 0.3)
                    };
                    assert!((l - expected).abs() < 1e-4, "row {row}: {l} vs {expected}");
                    assert!(l < p, "the margin must lower the true-class logit");
                } else {
                    assert!((l - p).abs() < 1e-5);
                }
            }
        }
    }

    #[test]
    fn easy_margin_leaves_obtuse_angles_alone() {
        let vs = vs();
        let head = ArcFace::new(
            vs.root(),
            2,
            2,
            ArcFaceConfig {
                scale: 1.0,
                margin: 0.5,
                easy_margin: true,
            },
        );
        // A feature pointing away from every class weight: cos < 0 for its class.
        let w = vs.variables()["weight"].shallow_clone();
        let x = -w.narrow(0, 0, 1);
        let logits = head.forward(&x, &Tensor::from_slice(&[0i64]));
        let plain = head.cosine(&x);
        assert!(plain.double_value(&[0, 0]) < 0.0);
        assert!((logits.double_value(&[0, 0]) - plain.double_value(&[0, 0])).abs() < 1e-6);
    }
}
