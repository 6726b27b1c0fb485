//! One error type for the model crate.

/// Errors of the model crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A device string that is neither `cpu`, `cuda` nor `cuda:N`.
    #[error("unknown device {0:?}: expected \"cpu\", \"cuda\" or \"cuda:N\"")]
    BadDevice(String),
    /// CUDA was asked for but cannot be used on this host.
    #[error("device {requested:?} is not available: {reason}")]
    CudaUnavailable {
        /// The device string the caller gave.
        requested: String,
        /// Why CUDA cannot be used.
        reason: String,
    },
    /// An error raised by libtorch.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Result alias for the model crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
