//! libtorch is linked, found at run time (embedded RUNPATH) and computes.

use handid_model::{Device, Error, parse_device};
use tch::{Kind, Tensor};

#[test]
fn a_tensor_computation_runs_through_libtorch() {
    let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).reshape([2, 2]);
    let b = a.matmul(&a.transpose(0, 1)); // [[5, 11], [11, 25]]
    let got: Vec<f32> = b.flatten(0, 1).try_into().expect("f32 tensor");
    assert_eq!(got, vec![5.0, 11.0, 11.0, 25.0]);
    assert_eq!(b.kind(), Kind::Float);
    assert_eq!(b.device(), Device::Cpu);
}

#[test]
fn asking_for_cuda_without_a_gpu_says_why() {
    // No tch CUDA query may run before parse_device: libtorch caches its CUDA
    // hooks on first use, and they exist only once libtorch_cuda.so is loaded.
    if std::env::var_os("HANDID_EXPECT_GPU").is_some() {
        // A GPU host: cuda must work instead.
        let device = parse_device("cuda:0");
        assert!(matches!(device, Ok(Device::Cuda(0))), "{device:?}");
        return;
    }
    match parse_device("cuda") {
        Err(Error::CudaUnavailable { requested, reason }) => {
            assert_eq!(requested, "cuda");
            assert!(
                reason.contains("libtorch's CUDA library") || reason.contains("no GPU is visible"),
                "unclear reason: {reason}"
            );
        }
        other => panic!("expected CudaUnavailable, got {other:?}"),
    }
}
