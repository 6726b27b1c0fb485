//! Center loss (Wen et al., "A Discriminative Feature Learning Approach for
//! Deep Face Recognition", ECCV 2016), as torchreid/CLIP-ReID's `CenterLoss`:
//! the squared distance of each feature to its class centre, summed and
//! divided by the batch size. The centres are parameters with their own
//! optimizer (SGD, lr 0.5 in CLIP-ReID), so they live in their own VarStore.

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

/// Learnable class centres `[classes, dim]`.
#[derive(Debug)]
pub struct CenterLoss {
    centers: Tensor,
}

impl CenterLoss {
    /// Centres under `p / "centers"`, initialised N(0, 1) like the reference.
    pub fn new(p: nn::Path, classes: i64, dim: i64) -> Self {
        Self {
            centers: p.var(
                "centers",
                &[classes, dim],
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            ),
        }
    }

    /// `features [batch, dim]`, `labels [batch]` -> scalar loss.
    pub fn forward(&self, features: &Tensor, labels: &Tensor) -> Tensor {
        let batch = features.size()[0];
        let own = self.centers.index_select(0, labels); // [batch, dim]
        // The reference clamps each kept distance to [1e-12, 1e12].
        let d = (features - own)
            .square()
            .sum_dim_intlist(1, false, Kind::Float)
            .clamp(1e-12, 1e12);
        d.sum(Kind::Float) / batch as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;
    use tch::nn::OptimizerConfig;

    #[test]
    fn is_the_mean_squared_distance_to_own_centre() {
        let vs = nn::VarStore::new(Device::Cpu);
        let loss = CenterLoss::new(vs.root(), 2, 2);
        let mut centers = vs.variables()["centers"].shallow_clone();
        tch::no_grad(|| centers.copy_(&Tensor::from_slice(&[0.0f32, 0.0, 10.0, 10.0]).reshape([2, 2])));
        let x = Tensor::from_slice(&[1.0f32, 1.0, 10.0, 13.0]).reshape([2, 2]);
        let y = Tensor::from_slice(&[0i64, 1]);
        // (1 + 1) + (0 + 9) over a batch of 2
        assert!((loss.forward(&x, &y).double_value(&[]) - 5.5).abs() < 1e-6);
        // One SGD step with lr 0.5 on the centres moves them towards their features.
        let mut opt = nn::Sgd::default().build(&vs, 0.5).expect("sgd");
        opt.backward_step(&loss.forward(&x, &y));
        assert!(loss.forward(&x, &y).double_value(&[]) < 5.5);
    }
}
