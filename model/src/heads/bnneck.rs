//! The BNNeck.

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heads::seeded_store as vs;

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
}
