//! Loading a serving checkpoint on the side and deciding whether it may
//! replace the active one.
//!
//! A checkpoint is accepted only after three checks, all before it serves a
//! single call: the manifest reads and agrees with itself (`Manifest::read`),
//! the weights hash to the manifest's model id and match the architecture
//! tensor by tensor (`Embedder::load`), and a self-test forward pass gives
//! one finite, unit-norm embedding of the declared width ([`self_test`]).
//! Loading reads and hashes the whole weights file and runs libtorch: it is
//! blocking work, run on tokio's blocking pool by the caller.

use std::path::Path;

use handid_model::{Embedder, Manifest};
use tch::{Device, Kind, Tensor};

/// How far the self-test embedding's norm may stray from 1 (f32 rounding of
/// a few hundred squares stays orders of magnitude below this).
const NORM_TOLERANCE: f64 = 1e-3;

/// How an operator asked for a checkpoint to be taken in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadMode {
    /// Replace the active model; only a compatible checkpoint is accepted.
    Swap,
    /// Load a checkpoint of another embedding space next to the active one
    /// (enrolments embed with both) until it is promoted.
    StageMigration,
}

/// Loads `dir` on `device` and runs the self-test; the error is the reason
/// for refusing it, naming the file and the problem.
pub fn load_checked(dir: &Path, device: Device) -> Result<Embedder, String> {
    let embedder = Embedder::load(dir, device).map_err(|e| e.to_string())?;
    self_test(&embedder)?;
    Ok(embedder)
}

/// Embeds one fixed synthetic input (a ramp over the preprocessed pixel
/// range) and checks the result is one finite, unit-norm vector of the
/// manifest's width.
pub fn self_test(embedder: &Embedder) -> Result<(), String> {
    if crate::faults::model_broken() {
        return Err("self-test forward pass failed: the device is broken (injected)".to_owned());
    }
    let (height, width) = embedder.manifest().preprocess.input_size();
    let (height, width) = (i64::from(height), i64::from(width));
    // [1, 3, H, W]: values in [-2, 2], the range of CLIP-normalised pixels.
    let pixels = Tensor::linspace(-2.0, 2.0, 3 * height * width, (Kind::Float, Device::Cpu))
        .view([1, 3, height, width]);
    let out = embedder
        .embed_batch(&pixels)
        .map_err(|e| format!("self-test forward pass failed: {e}"))?;
    let dim = embedder.dim();
    if out.size() != [1, dim as i64] {
        return Err(format!(
            "self-test embedding has shape {:?}, the manifest declares embedding_dim {dim}",
            out.size()
        ));
    }
    let values = Vec::<f32>::try_from(&out.get(0)).map_err(|e| format!("self-test embedding: {e}"))?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(format!(
            "self-test embedding is not finite (value {i} is {})",
            values[i]
        ));
    }
    let norm = values.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
    if (norm - 1.0).abs() > NORM_TOLERANCE {
        return Err(format!("self-test embedding has norm {norm}, not 1"));
    }
    Ok(())
}

/// The embedding spaces whose templates a model can be compared with: its
/// own and those it declares compatible.
pub fn spaces(manifest: &Manifest) -> Vec<String> {
    let mut spaces = vec![manifest.embedding_space.clone()];
    for space in &manifest.compatible_spaces {
        if !spaces.contains(space) {
            spaces.push(space.clone());
        }
    }
    spaces
}

/// Whether `new` may replace `active` directly: same embedding space, or a
/// space `new` declares compatible, and the same width (a template of
/// another width could not even be scored). `Err` says why not.
pub fn compatible(active: &Manifest, new: &Manifest) -> Result<(), String> {
    if !spaces(new).contains(&active.embedding_space) {
        return Err(format!(
            "the checkpoint's embedding space {:?} (compatible with {:?}) is not the active model's {:?}",
            new.embedding_space, new.compatible_spaces, active.embedding_space
        ));
    }
    if new.embedding_dim != active.embedding_dim {
        return Err(format!(
            "the checkpoint declares the active embedding space {:?} compatible but embeds into {} \
             dimensions, the active model into {}",
            active.embedding_space, new.embedding_dim, active.embedding_dim
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use handid_model::{ClipVisionConfig, create_random_checkpoint};

    #[test]
    fn a_random_checkpoint_passes_and_compatibility_follows_the_manifest() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        let config = ClipVisionConfig::tiny_vit();
        let ma = create_random_checkpoint(a.path(), &config, 1).expect("a");
        let mut mb = create_random_checkpoint(b.path(), &config, 2).expect("b");
        let embedder = load_checked(a.path(), Device::Cpu).expect("valid checkpoint");
        assert_eq!(embedder.model_id(), ma.model_id);

        let refused = compatible(&ma, &mb).expect_err("different spaces");
        assert!(refused.contains(&ma.embedding_space), "{refused}");
        mb.compatible_spaces = vec![ma.embedding_space.clone()];
        compatible(&ma, &mb).expect("declared compatible");
        assert_eq!(
            spaces(&mb),
            [mb.embedding_space.clone(), ma.embedding_space.clone()]
        );
        mb.embedding_dim += 1;
        let refused = compatible(&ma, &mb).expect_err("other width");
        assert!(refused.contains("dimensions"), "{refused}");
    }

    #[test]
    fn a_damaged_weights_file_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        create_random_checkpoint(dir.path(), &ClipVisionConfig::tiny_vit(), 3).expect("checkpoint");
        let weights = dir.path().join("model.safetensors");
        let mut bytes = std::fs::read(&weights).expect("read");
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(&weights, bytes).expect("write");
        let reason = load_checked(dir.path(), Device::Cpu).expect_err("damaged");
        assert!(reason.contains("model.safetensors"), "{reason}");
    }
}
