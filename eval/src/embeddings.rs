//! Precomputed embeddings: the input of `handid-trainer eval --embeddings`.
//!
//! A safetensors file with, for each split `i` (`0`, `1`, ...):
//! - `query{i}`: F32 `[n_query, dim]` and `query{i}_ids`: I64 `[n_query]`;
//! - `gallery{i}`: F32 `[n_gallery, dim]` and `gallery{i}_ids`: I64 `[n_gallery]`.
//!
//! Splits are read from 0 up to the first missing index. Vectors need not be
//! normalised: similarity is the cosine (PROTOCOL.md section 3). Ids are
//! integers: map person names to integers when writing (the 11k ids already
//! are). In numpy: `safetensors.numpy.save_file({"query0": q, "query0_ids": qi,
//! ...}, path)`.

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::{Error, Result};

/// Row-major vectors with one person id per row.
#[derive(Debug, Clone, PartialEq)]
pub struct Vectors {
    /// `[n, dim]`, row-major.
    pub values: Vec<f32>,
    /// Vector length.
    pub dim: usize,
    /// One id per row.
    pub ids: Vec<i64>,
}

impl Vectors {
    /// Checks that `values` holds `ids.len()` rows of `dim`.
    pub fn new(values: Vec<f32>, dim: usize, ids: Vec<i64>) -> Result<Self> {
        if dim == 0 || values.len() != ids.len() * dim {
            return Err(Error::Invalid(format!(
                "{} values for {} ids of dimension {dim}",
                values.len(),
                ids.len()
            )));
        }
        Ok(Self { values, dim, ids })
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there is no vector.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    fn normalised_rows(&self) -> Vec<Vec<f64>> {
        self.values
            .chunks(self.dim)
            .map(|row| {
                let norm = row
                    .iter()
                    .map(|&x| f64::from(x).powi(2))
                    .sum::<f64>()
                    .sqrt()
                    .max(1e-12);
                row.iter().map(|&x| f64::from(x) / norm).collect()
            })
            .collect()
    }
}

/// Cosine similarity matrix `[query.len(), gallery.len()]`, row-major.
pub fn cosine_similarity(query: &Vectors, gallery: &Vectors) -> Result<Vec<f64>> {
    if query.dim != gallery.dim {
        return Err(Error::Invalid(format!(
            "query dimension {} != gallery dimension {}",
            query.dim, gallery.dim
        )));
    }
    let g = gallery.normalised_rows();
    Ok(query
        .normalised_rows()
        .iter()
        .flat_map(|q| {
            g.iter()
                .map(move |g| q.iter().zip(g).map(|(a, b)| a * b).sum::<f64>())
        })
        .collect())
}

/// Query and gallery vectors of one split.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitEmbeddings {
    /// Split name (its index).
    pub name: String,
    /// Query vectors.
    pub query: Vectors,
    /// Gallery vectors.
    pub gallery: Vectors,
}

fn tensor<'a>(st: &'a SafeTensors<'a>, name: &str, path: &Path) -> Result<Option<TensorView<'a>>> {
    match st.tensor(name) {
        Ok(t) => Ok(Some(t)),
        Err(safetensors::SafeTensorError::TensorNotFound(_)) => Ok(None),
        Err(e) => Err(Error::Invalid(format!("{}: tensor {name}: {e}", path.display()))),
    }
}

fn vectors(st: &SafeTensors<'_>, name: &str, path: &Path) -> Result<Vectors> {
    let bad = |m: String| Error::Invalid(format!("{}: {m}", path.display()));
    let v = tensor(st, name, path)?.ok_or_else(|| bad(format!("tensor {name} is missing")))?;
    let ids_name = format!("{name}_ids");
    let ids = tensor(st, &ids_name, path)?.ok_or_else(|| bad(format!("tensor {ids_name} is missing")))?;
    if v.dtype() != Dtype::F32 || v.shape().len() != 2 {
        return Err(bad(format!(
            "{name} must be F32 [n, dim], is {:?} {:?}",
            v.dtype(),
            v.shape()
        )));
    }
    if ids.dtype() != Dtype::I64 || ids.shape().len() != 1 {
        return Err(bad(format!(
            "{ids_name} must be I64 [n], is {:?} {:?}",
            ids.dtype(),
            ids.shape()
        )));
    }
    // safetensors stores little-endian; chunks avoid alignment assumptions.
    let values = v
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let ids = ids
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
        .collect();
    Vectors::new(values, v.shape()[1], ids).map_err(|e| bad(format!("{name}: {e}")))
}

/// Reads every split of an embeddings file.
pub fn read(path: &Path) -> Result<Vec<SplitEmbeddings>> {
    let bytes = std::fs::read(path).map_err(Error::io(path))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::Invalid(format!("{}: not a safetensors file: {e}", path.display())))?;
    let mut splits = Vec::new();
    while tensor(&st, &format!("query{}", splits.len()), path)?.is_some() {
        let i = splits.len();
        splits.push(SplitEmbeddings {
            name: i.to_string(),
            query: vectors(&st, &format!("query{i}"), path)?,
            gallery: vectors(&st, &format!("gallery{i}"), path)?,
        });
    }
    if splits.is_empty() {
        return Err(Error::Invalid(format!("{}: no tensor query0", path.display())));
    }
    Ok(splits)
}

/// Writes splits in the format [`read`] expects.
pub fn write(path: &Path, splits: &[SplitEmbeddings]) -> Result<()> {
    let mut buffers: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (i, s) in splits.iter().enumerate() {
        for (role, v) in [("query", &s.query), ("gallery", &s.gallery)] {
            let values = v.values.iter().flat_map(|x| x.to_le_bytes()).collect();
            let ids = v.ids.iter().flat_map(|x| x.to_le_bytes()).collect();
            buffers.push((format!("{role}{i}"), Dtype::F32, vec![v.len(), v.dim], values));
            buffers.push((format!("{role}{i}_ids"), Dtype::I64, vec![v.len()], ids));
        }
    }
    let views = buffers
        .iter()
        .map(|(name, dtype, shape, data)| {
            TensorView::new(*dtype, shape.clone(), data)
                .map(|view| (name.clone(), view))
                .map_err(|e| Error::Invalid(format!("tensor {name}: {e}")))
        })
        .collect::<Result<HashMap<_, _>>>()?;
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_cosine() {
        let q = Vectors::new(vec![3.0, 4.0, 1.0, 0.0], 2, vec![1, 2]).unwrap();
        let g = Vectors::new(vec![0.0, 2.0], 2, vec![1]).unwrap();
        let split = SplitEmbeddings {
            name: "0".into(),
            query: q.clone(),
            gallery: g.clone(),
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.safetensors");
        write(
            &path,
            &[
                split.clone(),
                SplitEmbeddings {
                    name: "1".into(),
                    ..split.clone()
                },
            ],
        )
        .unwrap();
        let back = read(&path).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0], split);
        assert_eq!(cosine_similarity(&q, &g).unwrap(), vec![0.8, 0.0]);
        assert!(Vectors::new(vec![1.0; 3], 2, vec![1, 2]).is_err());
    }
}
