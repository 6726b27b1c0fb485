//! Re-identification heads put on top of a CLIP image encoder.
//!
//! Parameter names follow CLIP-ReID (`model/make_model_clipreid.py`):
//! `bottleneck.*` for the BNNeck, `classifier.weight` for the ID classifier,
//! so checkpoints of that code base load by name.

use tch::Tensor;
use tch::nn::{self, Init};

/// BNNeck of "Bag of Tricks and a Strong Baseline for Deep Person
/// Re-identification" (Luo et al., CVPRW 2019): a BatchNorm1d between the
/// metric-learning feature (triplet) and the classifier (ID loss), whose bias
/// is frozen at zero so the normalised feature stays centred.
#[derive(Debug)]
pub struct BnNeck {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
}

impl BnNeck {
    /// BatchNorm's eps and momentum, PyTorch's defaults.
    const EPS: f64 = 1e-5;
    const MOMENTUM: f64 = 0.1;

    /// Creates the neck under `p` (conventionally `p / "bottleneck"`).
    pub fn new(p: nn::Path, dim: i64) -> Self {
        Self {
            // weights_init_kaiming in CLIP-ReID sets BN weight 1, bias 0.
            weight: p.var("weight", &[dim], Init::Const(1.0)),
            bias: p.zeros_no_train("bias", &[dim]),
            running_mean: p.zeros_no_train("running_mean", &[dim]),
            running_var: p.ones_no_train("running_var", &[dim]),
        }
    }

    /// `[batch, dim]` -> `[batch, dim]`; batch statistics (and a running
    /// average update) in training, running statistics otherwise.
    pub fn forward_t(&self, features: &Tensor, train: bool) -> Tensor {
        features.batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            Self::MOMENTUM,
            Self::EPS,
            false,
        )
    }
}

/// The ID classifier of CLIP-ReID: a bias-free linear layer initialised with
/// N(0, 0.001) (`weights_init_classifier`).
#[derive(Debug)]
pub struct LinearClassifier {
    weight: Tensor,
}

impl LinearClassifier {
    /// Creates `weight: [classes, dim]` under `p` (conventionally
    /// `p / "classifier"`).
    pub fn new(p: nn::Path, dim: i64, classes: i64) -> Self {
        Self {
            weight: p.var(
                "weight",
                &[classes, dim],
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.001,
                },
            ),
        }
    }

    /// `[batch, dim]` -> logits `[batch, classes]`.
    pub fn forward(&self, features: &Tensor) -> Tensor {
        features.matmul(&self.weight.tr())
    }
}

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
        let x = features / features.norm_scalaropt_dim(2.0, [1], true).clamp_min(1e-12);
        let w = &self.weight / self.weight.norm_scalaropt_dim(2.0, [1], true).clamp_min(1e-12);
        x.matmul(&w.tr())
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
    use tch::{Device, Kind};

    fn vs() -> nn::VarStore {
        tch::manual_seed(0);
        nn::VarStore::new(Device::Cpu)
    }

    #[test]
    fn bnneck_normalises_in_training_and_uses_running_stats_in_eval() {
        let vs = vs();
        let neck = BnNeck::new(vs.root() / "bottleneck", 3);
        let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 3.0, 6.0, 9.0]).reshape([2, 3]);
        let y = neck.forward_t(&x, true);
        // Two samples: batch-normalised values are -1 and +1 (biased variance).
        let got: Vec<f32> = y.flatten(0, 1).try_into().expect("f32");
        for (g, e) in got.iter().zip([-1.0f32, -1.0, -1.0, 1.0, 1.0, 1.0]) {
            assert!((g - e).abs() < 1e-3, "{got:?}");
        }
        // Running mean moved 10% towards the batch mean [2, 4, 6].
        let names: Vec<String> = vs.variables().into_keys().collect();
        assert!(names.contains(&"bottleneck.running_mean".to_owned()), "{names:?}");
        let rm: Vec<f32> = vs.variables()["bottleneck.running_mean"]
            .shallow_clone()
            .try_into()
            .expect("f32");
        assert!((rm[0] - 0.2).abs() < 1e-6 && (rm[2] - 0.6).abs() < 1e-6, "{rm:?}");
        // The bias is frozen: not among the trainable variables.
        assert_eq!(vs.trainable_variables().len(), 1);
        // Eval mode is a fixed affine map: the same input gives the same output alone or in a batch.
        let one = neck.forward_t(&x.narrow(0, 0, 1), false);
        let both = neck.forward_t(&x, false).narrow(0, 0, 1);
        assert!(one.allclose(&both, 1e-6, 1e-6, false));
    }

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

    #[test]
    fn linear_classifier_has_clip_reid_names_and_shape() {
        let vs = vs();
        let head = LinearClassifier::new(vs.root() / "classifier", 8, 5);
        let logits = head.forward(&Tensor::ones([2, 8], (Kind::Float, Device::Cpu)));
        assert_eq!(logits.size(), vec![2, 5]);
        assert_eq!(vs.variables()["classifier.weight"].size(), vec![5, 8]);
    }
}
