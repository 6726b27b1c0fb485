//! Device selection.
//!
//! rustc links with `--as-needed`, so `libtorch_cuda.so` never becomes a
//! dependency of our binaries and they start on hosts without CUDA. To use a
//! GPU we `dlopen` that library ourselves (`RTLD_NOW | RTLD_GLOBAL`) before the
//! first CUDA call: its static initialisers register libtorch's CUDA hooks
//! (DESIGN.md, "libtorch without internet"). When that fails, the error says
//! why instead of libtorch's generic "no CUDA" message.
//!
//! Call [`parse_device`] before any other CUDA query of tch
//! (`tch::Cuda::is_available`, ...): libtorch resolves its CUDA hooks once, on
//! first use, and a query made before the library is loaded pins the
//! CPU-only stub for the life of the process (seen on an H200 host).

use std::ffi::{CStr, CString};
use std::sync::OnceLock;

use crate::error::{Error, Result};

pub use tch::Device;

/// Parses `cpu`, `cuda` (device 0) or `cuda:N`, loading and checking CUDA
/// when a GPU is asked for.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    let index = match spec {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => match spec.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(index)) => index,
            _ => return Err(Error::BadDevice(spec.to_owned())),
        },
    };
    let unavailable = |reason: String| Error::CudaUnavailable {
        requested: spec.to_owned(),
        reason,
    };
    load_cuda_runtime().map_err(unavailable)?;
    let count = tch::Cuda::device_count();
    if count <= 0 {
        return Err(unavailable(
            "libtorch's CUDA library loaded, but no GPU is visible (no NVIDIA driver, or CUDA_VISIBLE_DEVICES hides them)"
                .to_owned(),
        ));
    }
    if index >= count as usize {
        return Err(unavailable(format!("only {count} GPU(s) are visible")));
    }
    Ok(Device::Cuda(index))
}

/// Loads `libtorch_cuda.so` once per process; later calls return the first
/// outcome.
pub fn load_cuda_runtime() -> std::result::Result<(), String> {
    static LOADED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    LOADED.get_or_init(dlopen_torch_cuda).clone()
}

fn dlopen_torch_cuda() -> std::result::Result<(), String> {
    // An explicit path wins; else the dynamic linker searches LD_LIBRARY_PATH
    // and the RUNPATH our build scripts embed (libtorch's lib folder).
    let name = std::env::var("HANDID_LIBTORCH_CUDA").unwrap_or_else(|_| "libtorch_cuda.so".to_owned());
    let c_name = CString::new(name.clone()).map_err(|_| format!("bad library path {name:?}"))?;
    // SAFETY: dlopen/dlerror are called with a valid NUL-terminated string;
    // the handle is deliberately leaked so the library stays loaded for the
    // life of the process (libtorch keeps pointers into it).
    #[allow(unsafe_code)]
    let error = unsafe {
        let handle = libc::dlopen(c_name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL);
        if handle.is_null() {
            let message = libc::dlerror();
            Some(if message.is_null() {
                "unknown dlopen error".to_owned()
            } else {
                CStr::from_ptr(message).to_string_lossy().into_owned()
            })
        } else {
            None
        }
    };
    match error {
        None => Ok(()),
        Some(message) => Err(format!(
            "cannot load libtorch's CUDA library ({message}); this host has no usable CUDA libtorch: \
             on a GPU host, point LD_LIBRARY_PATH (or HANDID_LIBTORCH_CUDA) at a CUDA build of torch 2.11's lib folder"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_garbage() {
        assert_eq!(parse_device("cpu").ok(), Some(Device::Cpu));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            assert!(
                matches!(parse_device(bad), Err(Error::BadDevice(_))),
                "{bad:?} accepted"
            );
        }
    }
}
