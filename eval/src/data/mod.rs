//! Datasets (11k Hands and the generic folder layout), seeded splits,
//! manifest files and synthetic identity data.
//!
//! - [`hands11k`]: `<root>/Hands/*.jpg` + `<root>/HandInfo.csv`;
//! - [`folder`]: `<root>/<person>/<image>` (ImageFolder / re-id convention);
//! - [`splits`]: PROTOCOL.md section 2, deterministic from one seed;
//! - [`manifest`]: the split files every consumer reads;
//! - [`synthetic`]: a generator of learnable identity-labelled hand images.

pub mod folder;
pub mod hands11k;
pub mod manifest;
mod rng;
pub mod splits;
pub mod synthetic;

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// One labelled image.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Sample {
    /// Person id as written in manifests: the folder name, or for 11k the
    /// 7-digit zero-padded id (`0000004`).
    pub person: String,
    /// Image path relative to the dataset root, `/`-separated.
    pub image: String,
}

/// What to do with an image that is missing or whose header does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingImages {
    /// Fail with an error naming the file (default).
    #[default]
    Fail,
    /// Leave it out and count it in [`Dataset::skipped`].
    Skip,
}

/// Samples of a dataset, sorted by person then image.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Dataset root; sample paths are relative to it.
    pub root: PathBuf,
    /// The readable samples.
    pub samples: Vec<Sample>,
    /// Images left out under [`MissingImages::Skip`], with the reason.
    pub skipped: Vec<(PathBuf, String)>,
}

/// Image file extensions the readers accept (lower case).
pub const IMAGE_EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "pgm", "bmp"];

/// Checks that `path` exists and its header decodes (format and size),
/// without decoding the pixels.
pub fn check_image(path: &Path) -> Result<()> {
    let image_error = |cause| Error::Image {
        path: path.to_path_buf(),
        cause,
    };
    image::ImageReader::open(path)
        .map_err(Error::io(path))?
        .with_guessed_format()
        .map_err(Error::io(path))?
        .into_dimensions()
        .map_err(image_error)?;
    Ok(())
}

/// Keeps the samples whose image is readable; fails on the first unreadable
/// one under [`MissingImages::Fail`].
pub(crate) fn keep_readable(root: &Path, samples: Vec<Sample>, missing: MissingImages) -> Result<Dataset> {
    let mut kept = Vec::with_capacity(samples.len());
    let mut skipped = Vec::new();
    for sample in samples {
        let path = root.join(&sample.image);
        match (check_image(&path), missing) {
            (Ok(()), _) => kept.push(sample),
            (Err(e), MissingImages::Fail) => return Err(e),
            (Err(e), MissingImages::Skip) => skipped.push((path, e.to_string())),
        }
    }
    kept.sort();
    Ok(Dataset {
        root: root.to_path_buf(),
        samples: kept,
        skipped,
    })
}
