//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong in handid-eval.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Inputs whose sizes or values do not fit together.
    #[error("invalid input: {0}")]
    Invalid(String),
    /// A file or folder could not be read or written.
    // The cause is part of the message (not a `source`), so that a reason
    // kept as text (skipped images) is complete and anyhow chains do not
    // repeat it.
    #[error("{path}: {cause}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        cause: std::io::Error,
    },
    /// A line of a text file (CSV, manifest) that cannot be understood.
    #[error("{path}:{line}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// An image that is missing or whose header does not decode.
    #[error("image {path}: {cause}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// The decoder's error.
        cause: image::ImageError,
    },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::Io`] for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |cause| Self::Io { path, cause }
    }
}
