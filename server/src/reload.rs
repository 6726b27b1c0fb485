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

/// Why a checkpoint was refused; each says which file or which check.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The checkpoint does not load: a manifest that is missing or does not
    /// agree with itself, weights that do not hash to the model id or do
    /// not fit the architecture (the message names the file).
    #[error(transparent)]
    Load(#[from] handid_model::Error),
    /// It loads, but its self-test fails.
    #[error(transparent)]
    SelfTest(#[from] SelfTestError),
    /// Another embedding space than the active model's, not declared
    /// compatible: its embeddings cannot be compared with the templates.
    #[error(
        "the checkpoint's embedding space {space:?} (compatible with {compatible:?}) is not the active \
         model's {active:?}"
    )]
    OtherSpace {
        /// The checkpoint's space.
        space: String,
        /// The spaces it declares compatible.
        compatible: Vec<String>,
        /// The active model's space.
        active: String,
    },
    /// Declares the active space compatible, but embeds into another width.
    #[error(
        "the checkpoint declares the active embedding space {active:?} compatible but embeds into {dim} \
         dimensions, the active model into {active_dim}"
    )]
    OtherWidth {
        /// The active model's space.
        active: String,
        /// The checkpoint's width.
        dim: usize,
        /// The active model's width.
        active_dim: usize,
    },
}

/// Why a model's self-test failed ([`self_test`]).
#[derive(Debug, thiserror::Error)]
pub enum SelfTestError {
    /// A broken device, injected by a test (`faults.rs`).
    #[error("self-test forward pass failed: the device is broken (injected)")]
    Injected,
    /// The forward pass failed (libtorch, the device).
    #[error("self-test forward pass failed: {0}")]
    Forward(#[source] handid_model::Error),
    /// Not one embedding of the declared width.
    #[error("self-test embedding has shape {shape:?}, the manifest declares embedding_dim {dim}")]
    Shape {
        /// What came out.
        shape: Vec<i64>,
        /// The manifest's width.
        dim: usize,
    },
    /// The embedding could not be read back.
    #[error("self-test embedding: {0}")]
    Read(#[source] tch::TchError),
    /// A NaN or an infinity.
    #[error("self-test embedding is not finite (value {index} is {value})")]
    NotFinite {
        /// The first such value.
        index: usize,
        /// It.
        value: f32,
    },
    /// Not L2-normalised.
    #[error("self-test embedding has norm {0}, not 1")]
    Norm(f64),
    /// The self-test panicked (caught by the forward thread).
    #[error("the self-test panicked: {0}")]
    Panicked(String),
}

/// Loads `dir` on `device` and runs the self-test; the error is the reason
/// for refusing it.
pub fn load_checked(dir: &Path, device: Device) -> Result<Embedder, ReloadError> {
    let embedder = Embedder::load(dir, device)?;
    self_test(&embedder)?;
    Ok(embedder)
}

/// Embeds one fixed synthetic input (a ramp over the preprocessed pixel
/// range) and checks the result is one finite, unit-norm vector of the
/// manifest's width.
pub fn self_test(embedder: &Embedder) -> Result<(), SelfTestError> {
    if crate::faults::model_broken() {
        return Err(SelfTestError::Injected);
    }
    let (height, width) = embedder.manifest().preprocess.input_size();
    let (height, width) = (i64::from(height), i64::from(width));
    // [1, 3, H, W]: values in [-2, 2], the range of CLIP-normalised pixels.
    let pixels = Tensor::linspace(-2.0, 2.0, 3 * height * width, (Kind::Float, Device::Cpu))
        .view([1, 3, height, width]);
    let out = embedder.embed_batch(&pixels).map_err(SelfTestError::Forward)?;
    let dim = embedder.dim();
    if out.size() != [1, dim as i64] {
        return Err(SelfTestError::Shape {
            shape: out.size(),
            dim,
        });
    }
    let values = Vec::<f32>::try_from(&out.get(0)).map_err(SelfTestError::Read)?;
    if let Some(index) = values.iter().position(|v| !v.is_finite()) {
        return Err(SelfTestError::NotFinite {
            index,
            value: values[index],
        });
    }
    let norm = values.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
    if (norm - 1.0).abs() > NORM_TOLERANCE {
        return Err(SelfTestError::Norm(norm));
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
pub fn compatible(active: &Manifest, new: &Manifest) -> Result<(), ReloadError> {
    if !spaces(new).contains(&active.embedding_space) {
        return Err(ReloadError::OtherSpace {
            space: new.embedding_space.clone(),
            compatible: new.compatible_spaces.clone(),
            active: active.embedding_space.clone(),
        });
    }
    if new.embedding_dim != active.embedding_dim {
        return Err(ReloadError::OtherWidth {
            active: active.embedding_space.clone(),
            dim: new.embedding_dim,
            active_dim: active.embedding_dim,
        });
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
        assert!(
            matches!(&refused, ReloadError::OtherSpace { active, .. } if *active == ma.embedding_space),
            "{refused:?}"
        );
        assert!(refused.to_string().contains(&ma.embedding_space), "{refused}");
        mb.compatible_spaces = vec![ma.embedding_space.clone()];
        compatible(&ma, &mb).expect("declared compatible");
        assert_eq!(
            spaces(&mb),
            [mb.embedding_space.clone(), ma.embedding_space.clone()]
        );
        mb.embedding_dim += 1;
        let refused = compatible(&ma, &mb).expect_err("other width");
        assert!(
            matches!(refused, ReloadError::OtherWidth { dim, active_dim, .. } if dim == active_dim + 1),
            "{refused:?}"
        );
        assert!(refused.to_string().contains("dimensions"), "{refused}");
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
        assert!(matches!(reason, ReloadError::Load(_)), "{reason:?}");
        assert!(reason.to_string().contains("model.safetensors"), "{reason}");
    }
}
