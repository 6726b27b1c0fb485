//! Manifest files: the single written form of a split, read by the offline
//! evaluator, the trainer's validation and the gRPC replay harness alike.
//!
//! Text, UTF-8, one line per image: `split<TAB>person<TAB>image`, the image
//! path relative to the dataset root (`/`-separated). Lines starting with `#`
//! are comments; `# key: value` comments record how the split was made
//! (dataset root, seed, aspect, ...). An image appears once per split it
//! belongs to (`train_all` contains `train` and `val`, for instance).

use std::collections::BTreeSet;
use std::path::Path;

use crate::{Error, Result};

/// First line of every manifest.
pub const MAGIC: &str = "# handid manifest v1";

/// One image in one split.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    /// Split name (`train`, `val`, `query0`, `gallery_all3`, ...).
    pub split: String,
    /// Person id.
    pub person: String,
    /// Image path relative to the dataset root.
    pub image: String,
}

/// Number of images and persons in one split.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SplitCount {
    /// Split name.
    pub split: String,
    /// Images in it.
    pub images: usize,
    /// Distinct persons in it.
    pub persons: usize,
}

/// A set of named splits over one dataset.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Manifest {
    /// `(key, value)` provenance, written as `# key: value`.
    pub meta: Vec<(String, String)>,
    /// The lines, in file order.
    pub entries: Vec<Entry>,
}

impl Manifest {
    /// The provenance value for `key`.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.meta.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Split names in order of first appearance.
    pub fn split_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for e in &self.entries {
            if !names.contains(&e.split.as_str()) {
                names.push(&e.split);
            }
        }
        names
    }

    /// The entries of one split, in file order (empty when it is absent).
    pub fn split(&self, name: &str) -> Vec<&Entry> {
        self.entries.iter().filter(|e| e.split == name).collect()
    }

    /// Images and persons per split, in order of first appearance.
    pub fn counts(&self) -> Vec<SplitCount> {
        self.split_names()
            .into_iter()
            .map(|name| {
                let entries = self.split(name);
                let persons: BTreeSet<&str> = entries.iter().map(|e| e.person.as_str()).collect();
                SplitCount {
                    split: name.to_string(),
                    images: entries.len(),
                    persons: persons.len(),
                }
            })
            .collect()
    }

    /// The file's text.
    pub fn to_text(&self) -> String {
        let mut out = format!("{MAGIC}\n");
        for (k, v) in &self.meta {
            out.push_str(&format!("# {k}: {v}\n"));
        }
        out.push_str("# columns: split person image\n");
        for e in &self.entries {
            out.push_str(&format!("{}\t{}\t{}\n", e.split, e.person, e.image));
        }
        out
    }

    /// Writes the file (creating its folder).
    pub fn write(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        }
        std::fs::write(path, self.to_text()).map_err(Error::io(path))
    }

    /// Reads a manifest; a malformed line is an error naming it.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
        let error = |line: usize, message: &str| Error::Parse {
            path: path.to_path_buf(),
            line,
            message: message.into(),
        };
        let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));
        if lines.next().map(|(_, l)| l) != Some(MAGIC) {
            return Err(error(
                1,
                "not a handid manifest (first line must be \"# handid manifest v1\")",
            ));
        }
        let mut manifest = Self::default();
        for (n, line) in lines {
            if let Some(comment) = line.strip_prefix('#') {
                if let Some((k, v)) = comment.trim().split_once(": ").filter(|(k, _)| *k != "columns") {
                    manifest.meta.push((k.to_string(), v.to_string()));
                }
                continue;
            }
            let fields: Vec<&str> = line.split('\t').collect();
            match fields[..] {
                [split, person, image] if !split.is_empty() && !person.is_empty() && !image.is_empty() => {
                    manifest.entries.push(Entry {
                        split: split.into(),
                        person: person.into(),
                        image: image.into(),
                    });
                }
                _ => return Err(error(n, "expected split<TAB>person<TAB>image")),
            }
        }
        Ok(manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let m = Manifest {
            meta: vec![("seed".into(), "3".into())],
            entries: vec![
                Entry {
                    split: "train".into(),
                    person: "a".into(),
                    image: "a/1.png".into(),
                },
                Entry {
                    split: "val".into(),
                    person: "a".into(),
                    image: "a/2.png".into(),
                },
                Entry {
                    split: "train".into(),
                    person: "b".into(),
                    image: "b/1.png".into(),
                },
            ],
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m/manifest.tsv");
        m.write(&path).unwrap();
        let back = Manifest::read(&path).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.meta("seed"), Some("3"));
        assert_eq!(back.split_names(), ["train", "val"]);
        assert_eq!(
            back.counts()[0],
            SplitCount {
                split: "train".into(),
                images: 2,
                persons: 2
            }
        );

        std::fs::write(&path, format!("{MAGIC}\ntrain\ta\ta/1.png\ntrain a\n")).unwrap();
        let err = Manifest::read(&path).unwrap_err().to_string();
        assert!(err.contains("manifest.tsv:3:"), "{err}");
    }
}
