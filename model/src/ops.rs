//! Small tensor operations shared by the model, the trainer and the server.

use tch::Tensor;

/// Rows of `x` (`[n, d]`, or any shape: the last dimension) scaled to unit
/// L2 norm, as `torch.nn.functional.normalize(x, dim=-1)` (eps 1e-12, so an
/// all-zero row stays zero instead of becoming NaN).
pub fn l2_normalize(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2.0, [-1], true).clamp_min(1e-12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_get_unit_norm_and_zero_rows_stay_zero() {
        let x = Tensor::from_slice(&[3.0f32, 4.0, 0.0, 0.0]).view([2, 2]);
        let y = l2_normalize(&x);
        let v: Vec<f32> = Vec::try_from(y.flatten(0, 1)).expect("values");
        assert_eq!(v, [0.6, 0.8, 0.0, 0.0]);
    }
}
