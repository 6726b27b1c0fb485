//! Turning images into L2-normalised embeddings with a serving checkpoint.

use std::path::Path;
use std::sync::{Mutex, PoisonError};

use image::RgbImage;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

use crate::checkpoint::{Manifest, Neck, WEIGHTS_FILE, load_strict, read_safetensors, sha256_file};
use crate::error::{Error, Result};
use crate::heads::BnNeck;
use crate::ops::l2_normalize;
use crate::promptsg::PromptSgHead;
use crate::visual::{Feature, ImageEncoder};

/// The dtype the weights and activations use at inference.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// 32-bit float: exact, the only sensible choice on a CPU.
    #[default]
    F32,
    /// 16-bit float: about twice the GPU throughput; layer norms stay in f32.
    F16,
    /// bfloat16: f32's range with f16's speed on recent GPUs.
    Bf16,
}

impl Precision {
    fn kind(self) -> Kind {
        match self {
            Precision::F32 => Kind::Float,
            Precision::F16 => Kind::Half,
            Precision::Bf16 => Kind::BFloat16,
        }
    }
}

/// A loaded serving checkpoint that embeds images.
///
/// `Send + Sync`: share it behind an `Arc`. Forward passes are serialised by
/// a mutex (tch tensors are not `Sync`); callers batch requests, and libtorch
/// spreads each forward over all cores or the GPU.
#[derive(Debug)]
pub struct Embedder {
    manifest: Manifest,
    encoder: Mutex<ImageEncoder>,
    /// PromptSG's interaction module, for [`Feature::PromptSg`] checkpoints.
    promptsg: Option<Mutex<PromptSgHead>>,
    /// The BNNeck, for [`Neck::BatchNorm`] checkpoints.
    neck: Option<Mutex<BnNeck>>,
    device: Device,
    precision: Precision,
}

impl Embedder {
    /// Loads a serving checkpoint folder in f32.
    pub fn load(dir: &Path, device: Device) -> Result<Embedder> {
        Self::load_with_precision(dir, device, Precision::F32)
    }

    /// Loads a serving checkpoint folder, checking that the weights hash to
    /// the manifest's model id and match the model tensor by tensor.
    pub fn load_with_precision(dir: &Path, device: Device, precision: Precision) -> Result<Embedder> {
        let manifest = Manifest::read(dir)?;
        let weights_path = dir.join(WEIGHTS_FILE);
        let actual = sha256_file(&weights_path)?;
        if actual != manifest.model_id {
            return Err(Error::ModelIdMismatch {
                path: weights_path,
                expected: manifest.model_id,
                actual,
            });
        }
        // Nothing is allocated for a model its weights cannot hold.
        let bytes = std::fs::metadata(&weights_path)
            .map_err(|source| Error::Io {
                path: weights_path.clone(),
                source,
            })?
            .len();
        manifest.check_weights_hold(&weights_path, bytes)?;
        let mut vs = nn::VarStore::new(device);
        let encoder = ImageEncoder::new(vs.root() / "visual", &manifest.vision)?;
        let promptsg = match manifest.feature {
            Feature::PromptSg { heads, blocks } => Some(Mutex::new(PromptSgHead::new(
                vs.root() / "promptsg",
                manifest.vision.output_dim,
                heads,
                blocks,
            )?)),
            _ => None,
        };
        let neck = manifest.neck.map(|Neck::BatchNorm| {
            Mutex::new(BnNeck::new(vs.root() / "neck", manifest.embedding_dim as i64))
        });
        load_strict(&vs, read_safetensors(&weights_path)?)?;
        // The encoder holds shallow copies of the variables, so converting
        // the store in place converts the encoder too.
        vs.set_kind(precision.kind());
        tracing::info!(model_id = %manifest.model_id, architecture = %manifest.architecture, ?device, ?precision, "model loaded");
        Ok(Embedder {
            manifest,
            encoder: Mutex::new(encoder),
            promptsg,
            neck,
            device,
            precision,
        })
    }

    /// The checkpoint's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The model id (sha256 of the weights).
    pub fn model_id(&self) -> &str {
        &self.manifest.model_id
    }

    /// The embedding width.
    pub fn dim(&self) -> usize {
        self.manifest.embedding_dim
    }

    /// Where the model runs.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The inference dtype.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// `[N, 3, H, W]` f32 pixels, preprocessed as the manifest says ->
    /// `[N, D]` f32 L2-normalised embeddings on the CPU.
    pub fn embed_batch(&self, pixels: &Tensor) -> Result<Tensor> {
        let (height, width) = self.manifest.preprocess.input_size();
        let size = pixels.size();
        let expected = [i64::from(height), i64::from(width)];
        if size.len() != 4 || size[1] != 3 || size[2..] != expected {
            return Err(Error::InvalidInput(format!(
                "expected pixels [N, 3, {height}, {width}], got {size:?}"
            )));
        }
        if size[0] == 0 {
            return Ok(Tensor::zeros([0, self.dim() as i64], (Kind::Float, Device::Cpu)));
        }
        let encoder = self.encoder.lock().unwrap_or_else(PoisonError::into_inner);
        let features = tch::no_grad(|| {
            let x = pixels.to_device(self.device).to_kind(self.precision.kind());
            match &self.promptsg {
                Some(head) => {
                    let (_, tokens) = encoder.forward_feature_and_tokens(&x, self.manifest.feature)?;
                    head.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .forward(&tokens)
                }
                None => encoder.forward_feature(&x, self.manifest.feature),
            }
            .map(|f| match &self.neck {
                Some(neck) => neck
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .forward_t(&f, false),
                None => f,
            })
        })?;
        // Normalise in f32: half-precision norms of 512 values lose digits.
        Ok(l2_normalize(&features.to_kind(Kind::Float)).to_device(Device::Cpu))
    }

    /// Preprocesses `images` as the manifest says and embeds them in one batch.
    pub fn embed_images(&self, images: &[RgbImage]) -> Result<Tensor> {
        let pixels: Vec<Tensor> = images
            .iter()
            .map(|img| self.manifest.preprocess.apply(img))
            .collect::<Result<_>>()?;
        if pixels.is_empty() {
            return Ok(Tensor::zeros([0, self.dim() as i64], (Kind::Float, Device::Cpu)));
        }
        self.embed_batch(&Tensor::stack(&pixels, 0))
    }
}
