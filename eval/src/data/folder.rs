//! The generic layout `<root>/<person>/<image>` (torchvision ImageFolder,
//! re-id convention): one folder per person, images of any of
//! [`IMAGE_EXTENSIONS`](super::IMAGE_EXTENSIONS), grey or colour.

use std::path::Path;

use super::{Dataset, IMAGE_EXTENSIONS, MissingImages, Sample, keep_readable};
use crate::{Error, Result};

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// A name usable in a manifest line (tab-separated, one line per image).
fn manifest_safe(name: &str, path: &Path) -> Result<String> {
    if name.contains(['\t', '\n', '\r']) {
        return Err(Error::Invalid(format!(
            "{}: names with tabs or line breaks are not supported",
            path.display()
        )));
    }
    Ok(name.to_string())
}

/// Loads every image one level below each person folder of `root`. Files of
/// other types and hidden entries are ignored; a folder without images adds
/// no person.
pub fn load(root: &Path, missing: MissingImages) -> Result<Dataset> {
    let mut samples = Vec::new();
    for person_dir in std::fs::read_dir(root).map_err(Error::io(root))? {
        let person_dir = person_dir.map_err(Error::io(root))?.path();
        let Some(person) = person_dir.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if person.starts_with('.') || !person_dir.is_dir() {
            continue;
        }
        let person = manifest_safe(person, &person_dir)?;
        for file in std::fs::read_dir(&person_dir).map_err(Error::io(&person_dir))? {
            let file = file.map_err(Error::io(&person_dir))?.path();
            let Some(name) = file.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if name.starts_with('.') || !is_image(&file) {
                continue;
            }
            let image = format!("{person}/{}", manifest_safe(name, &file)?);
            samples.push(Sample {
                person: person.clone(),
                image,
            });
        }
    }
    if samples.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no <person>/<image> files found",
            root.display()
        )));
    }
    keep_readable(root, samples, missing)
}
