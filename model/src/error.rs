//! One error type for the model crate.
//!
//! No variant ever carries image bytes: decoding errors keep only the
//! decoder's description of what was wrong.

use std::path::PathBuf;

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
    /// The encoded image is larger than the configured byte limit.
    #[error("image is {bytes} bytes, more than the limit of {max_bytes}")]
    ImageTooManyBytes {
        /// Size of the encoded input.
        bytes: usize,
        /// The limit.
        max_bytes: usize,
    },
    /// The image header declares more pixels than the configured limit.
    #[error("image is {width}x{height} pixels, more than the limit of {max_pixels}")]
    ImageTooManyPixels {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// The limit.
        max_pixels: u64,
    },
    /// The image header declares a side longer than the configured limit.
    #[error("image is {width}x{height} pixels, a side longer than the limit of {max_side} pixels")]
    ImageSideTooLong {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// The limit.
        max_side: u32,
    },
    /// The image header declares a shape no camera makes: the longer side
    /// is more than `max_ratio` times the shorter.
    #[error("image is {width}x{height} pixels, more elongated than the limit of {max_ratio}:1")]
    ImageAspectRatio {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// The limit (longer side / shorter side).
        max_ratio: u32,
    },
    /// The image is too small to show a hand.
    #[error("image is {width}x{height} pixels, its shorter side below the minimum of {min_side}")]
    ImageTooSmall {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// The limit.
        min_side: u32,
    },
    /// Decoding stopped because its caller no longer wants the result.
    #[error("decoding was cancelled")]
    Cancelled,
    /// The bytes are not a decodable image of an accepted format.
    #[error("cannot decode image: {0}")]
    Decode(String),
    /// A tensor, size or configuration value that the operation cannot take.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A checkpoint manifest that cannot be read, written or accepted.
    #[error("manifest {path}: {reason}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A weights file that cannot be read (truncated, not safetensors, ...).
    #[error("weights {path}: {reason}")]
    BadWeights {
        /// The weights file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The weights file does not hash to the model id its manifest declares.
    #[error("weights {path} hash to {actual}, but the manifest declares model id {expected}")]
    ModelIdMismatch {
        /// The weights file.
        path: PathBuf,
        /// The model id in the manifest.
        expected: String,
        /// The sha256 of the file.
        actual: String,
    },
    /// The weights do not match the model: every offending tensor is named.
    #[error(
        "weights do not match the model: {}",
        describe_mismatch(missing, unexpected, wrong_shape)
    )]
    WeightMismatch {
        /// Tensors the model needs that the weights lack.
        missing: Vec<String>,
        /// Tensors in the weights that the model has no place for.
        unexpected: Vec<String>,
        /// Tensors whose shape differs: (name, expected shape, shape found).
        wrong_shape: Vec<(String, Vec<i64>, Vec<i64>)>,
    },
}

fn describe_mismatch(
    missing: &[String],
    unexpected: &[String],
    wrong_shape: &[(String, Vec<i64>, Vec<i64>)],
) -> String {
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("missing {}", missing.join(", ")));
    }
    if !unexpected.is_empty() {
        parts.push(format!("unexpected {}", unexpected.join(", ")));
    }
    if !wrong_shape.is_empty() {
        let shapes: Vec<String> = wrong_shape
            .iter()
            .map(|(name, want, got)| format!("{name} (expected {want:?}, found {got:?})"))
            .collect();
        parts.push(format!("wrong shape {}", shapes.join(", ")));
    }
    parts.join("; ")
}

/// Result alias for the model crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
