//! The bias-free linear ID classifier.

use tch::Tensor;
use tch::nn::{self, Init};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heads::seeded_store as vs;
    use tch::{Device, Kind};

    #[test]
    fn linear_classifier_has_clip_reid_names_and_shape() {
        let vs = vs();
        let head = LinearClassifier::new(vs.root() / "classifier", 8, 5);
        let logits = head.forward(&Tensor::ones([2, 8], (Kind::Float, Device::Cpu)));
        assert_eq!(logits.size(), vec![2, 5]);
        assert_eq!(vs.variables()["classifier.weight"].size(), vec![5, 8]);
    }
}
