//! Serving checkpoints: a folder holding `model.safetensors` (OpenAI CLIP key
//! names, f32) and the manifest `handid.yaml`.
//!
//! The model id is the sha256 of the weights file, so two checkpoints with the
//! same id compute the same embeddings, and a swapped or damaged file is
//! caught at load.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor, nn};

use crate::config::ClipVisionConfig;
use crate::error::{Error, Result};
use crate::image::Preprocess;
use crate::visual::{Feature, ImageEncoder};

/// The weights file of a serving checkpoint folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The manifest file of a serving checkpoint folder.
pub const MANIFEST_FILE: &str = "handid.yaml";
/// The manifest format this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// The longest side of a model's input (the preprocessing's output) a
/// manifest may ask for: CLIP's models take 224-448 pixels, and every
/// input a self-test or a call embeds is this size, so a manifest asking
/// for 65536 x 65536 would ask for tens of gigabytes per image (or, within
/// memory, a ViT attending over millions of tokens for hours).
pub const MAX_INPUT_SIDE: u32 = 1024;

/// The longest embedding space name (a model id is 64 hex characters).
pub const MAX_SPACE_CHARS: usize = 128;

/// A decision threshold calibrated at a false match rate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatingPoint {
    /// The false match rate on validation persons (e.g. 1e-3).
    pub fmr: f64,
    /// The cosine score at or above which two embeddings match.
    pub threshold: f32,
}

/// Where a checkpoint came from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// What produced it (e.g. `handid-trainer 0.1.0 train`, `random seed 7`).
    pub created_by: String,
    /// The source weights, when imported or fine-tuned from a file.
    #[serde(default)]
    pub source: Option<String>,
    /// The training dataset, when trained.
    #[serde(default)]
    pub dataset: Option<String>,
    /// The training configuration, verbatim.
    #[serde(default)]
    pub training_config: Option<serde_yaml::Value>,
    /// Validation metrics by name.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
}

/// The manifest `handid.yaml` of a serving checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Hex sha256 of the weights file.
    pub model_id: String,
    /// Short architecture name ([`ClipVisionConfig::architecture`]).
    pub architecture: String,
    /// Width of the embeddings.
    pub embedding_dim: usize,
    /// How images become input tensors.
    pub preprocess: Preprocess,
    /// Embeddings are comparable only within one space; a fine-tune that
    /// changes the weights starts a new one.
    pub embedding_space: String,
    /// Other spaces whose templates this model's embeddings may be compared with.
    #[serde(default)]
    pub compatible_spaces: Vec<String>,
    /// Calibrated thresholds, by false match rate.
    #[serde(default)]
    pub thresholds: Vec<OperatingPoint>,
    /// The image tower.
    pub vision: ClipVisionConfig,
    /// Which output of the tower is the embedding.
    pub feature: Feature,
    /// A layer between that feature and the L2 normalisation (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neck: Option<Neck>,
    /// Where the checkpoint came from.
    pub provenance: Provenance,
}

/// A layer applied to the tower's feature before the L2 normalisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Neck {
    /// The trained BNNeck in inference mode (running statistics), weights
    /// `neck.{weight,bias,running_mean,running_var}`: Bag of Tricks'
    /// "after BN" feature.
    BatchNorm,
}

impl Manifest {
    /// A manifest for `vision` with the CLIP preprocessing at its native size;
    /// `model_id` and an empty `embedding_space` are filled in by [`write_checkpoint`].
    pub fn new(vision: ClipVisionConfig, feature: Feature, provenance: Provenance) -> Result<Self> {
        let dim = ImageEncoder::feature_dim(&vision, feature)?;
        let size = u32::try_from(vision.image_size)
            .map_err(|_| Error::InvalidInput(format!("image size {}", vision.image_size)))?;
        Ok(Self {
            format_version: FORMAT_VERSION,
            model_id: String::new(),
            architecture: vision.architecture(),
            embedding_dim: dim as usize,
            preprocess: Preprocess::Clip { size },
            embedding_space: String::new(),
            compatible_spaces: Vec::new(),
            thresholds: Vec::new(),
            vision,
            feature,
            neck: None,
            provenance,
        })
    }

    /// Reads and checks `dir/handid.yaml` (unknown keys are errors).
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let bad = |reason: String| Error::Manifest {
            path: path.clone(),
            reason,
        };
        let manifest: Manifest = serde_yaml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if manifest.format_version != FORMAT_VERSION {
            return Err(bad(format!(
                "format_version {} is not supported (this build reads {FORMAT_VERSION})",
                manifest.format_version
            )));
        }
        manifest.vision.validate().map_err(|e| bad(e.to_string()))?;
        manifest.check_values().map_err(bad)?;
        let dim =
            ImageEncoder::feature_dim(&manifest.vision, manifest.feature).map_err(|e| bad(e.to_string()))?;
        if dim as usize != manifest.embedding_dim {
            return Err(bad(format!(
                "embedding_dim {} but the {:?} feature of this model is {dim} wide",
                manifest.embedding_dim, manifest.feature
            )));
        }
        Ok(manifest)
    }

    /// The values a model's users act on, each within its meaning: the
    /// thresholds (a threshold of -1 would accept every probe, NaN none),
    /// the input size, the embedding spaces (stored and compared as names).
    fn check_values(&self) -> std::result::Result<(), String> {
        let mut fmrs = BTreeSet::new();
        for point in &self.thresholds {
            if !(point.fmr.is_finite() && point.fmr > 0.0 && point.fmr < 1.0) {
                return Err(format!("threshold fmr {} is not a rate in (0, 1)", point.fmr));
            }
            // A cosine; calibration may land a rounding step above 1.
            if !(point.threshold.is_finite() && (-1.001..=1.001).contains(&point.threshold)) {
                return Err(format!(
                    "the threshold at fmr {} is {}, not a cosine score in [-1, 1]",
                    point.fmr, point.threshold
                ));
            }
            if !fmrs.insert(point.fmr.to_bits()) {
                return Err(format!("fmr {} has two thresholds", point.fmr));
            }
        }
        let (height, width) = self.preprocess.input_size();
        let stride = self.vision.total_stride();
        for side in [height, width] {
            if side > MAX_INPUT_SIDE || i64::from(side) < stride {
                return Err(format!(
                    "preprocess makes {height}x{width} inputs: each side must be between the \
                     model's stride {stride} and {MAX_INPUT_SIDE} pixels"
                ));
            }
        }
        for space in std::iter::once(&self.embedding_space).chain(&self.compatible_spaces) {
            if space.is_empty()
                || space.len() > MAX_SPACE_CHARS
                || !space.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(format!(
                    "embedding space {:?} is not a name of 1 to {MAX_SPACE_CHARS} printable ASCII characters",
                    space.chars().take(MAX_SPACE_CHARS).collect::<String>()
                ));
            }
        }
        Ok(())
    }

    /// A lower bound on the parameters of the manifest's model: the image
    /// tower's ([`ClipVisionConfig::parameter_floor`]) and PromptSG's
    /// interaction module's (a cross-attention, 4 width^2, and 12 width^2
    /// per block); `None` when the count overflows.
    pub fn parameter_floor(&self) -> Option<u128> {
        let head = match self.feature {
            Feature::PromptSg { blocks, .. } => {
                let width = u128::try_from(self.vision.output_dim).ok()?;
                let blocks = u128::try_from(blocks.max(0)).ok()?;
                width
                    .checked_mul(width)?
                    .checked_mul(blocks.checked_mul(12)?.checked_add(4)?)?
            }
            _ => 0,
        };
        self.vision.parameter_floor()?.checked_add(head)
    }

    /// Refuses a manifest whose model needs more values than `weights`
    /// (its weights file, `bytes` long) can hold at 16 bits each, before
    /// anything is allocated for it.
    pub fn check_weights_hold(&self, weights: &Path, bytes: u64) -> Result<()> {
        let floor = self.parameter_floor();
        if floor.is_some_and(|n| n.saturating_mul(2) <= u128::from(bytes)) {
            return Ok(());
        }
        let needs = floor.map_or_else(
            || "more parameters than can be counted".to_owned(),
            |n| format!("at least {n} parameters"),
        );
        Err(Error::Manifest {
            path: weights.with_file_name(MANIFEST_FILE),
            reason: format!(
                "its model ({}) needs {needs}, more than {} ({bytes} bytes) holds: an edited or \
                 damaged manifest",
                self.vision.architecture(),
                weights.display()
            ),
        })
    }

    /// Writes `dir/handid.yaml` atomically (a temporary file renamed over
    /// it): a server reading the folder meanwhile sees the old manifest or
    /// the new one, never half of one.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST_FILE);
        let text = serde_yaml::to_string(self).map_err(|e| Error::Manifest {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let partial = dir.join(format!("{MANIFEST_FILE}.partial"));
        fs::write(&partial, text).map_err(|source| Error::Io {
            path: partial.clone(),
            source,
        })?;
        fs::rename(&partial, &path).map_err(|source| Error::Io { path, source })
    }
}

/// Writes a serving checkpoint: the weights as f32 safetensors, then the
/// manifest with `model_id` set to their sha256 (and `embedding_space` set to
/// the model id when empty). The manifest is written last, so a folder with a
/// manifest is complete.
pub fn write_checkpoint(
    dir: &Path,
    weights: &[(String, Tensor)],
    mut manifest: Manifest,
) -> Result<Manifest> {
    fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_owned(),
        source,
    })?;
    let weights_path = dir.join(WEIGHTS_FILE);
    let f32_weights: Vec<(&str, Tensor)> = weights
        .iter()
        .map(|(name, t)| {
            (
                name.as_str(),
                t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous(),
            )
        })
        .collect();
    Tensor::write_safetensors(&f32_weights, &weights_path)?;
    manifest.model_id = sha256_file(&weights_path)?;
    if manifest.embedding_space.is_empty() {
        manifest.embedding_space = manifest.model_id.clone();
    }
    manifest.write(dir)?;
    Ok(manifest)
}

/// A valid serving checkpoint with CLIP-initialised random weights, for tests
/// and the demo. The weights depend only on `seed` (libtorch's global RNG is
/// reseeded).
pub fn create_random_checkpoint(dir: &Path, config: &ClipVisionConfig, seed: i64) -> Result<Manifest> {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    ImageEncoder::new(vs.root() / "visual", config)?;
    let manifest = Manifest::new(
        config.clone(),
        Feature::Projected,
        Provenance {
            created_by: format!(
                "handid-model {} random weights, seed {seed}",
                env!("CARGO_PKG_VERSION")
            ),
            ..Provenance::default()
        },
    )?;
    write_checkpoint(dir, &named_variables(&vs), manifest)
}

/// The variables of `vs`, sorted by name.
pub fn named_variables(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Copies `tensors` into the variables of `vs`, requiring an exact match:
/// every variable present, no tensor left over, every shape equal. All
/// offending names are reported at once. Values are converted to each
/// variable's dtype and device.
pub fn load_strict(vs: &nn::VarStore, tensors: Vec<(String, Tensor)>) -> Result<()> {
    let variables = vs.variables();
    let mut wrong_shape = Vec::new();
    let mut unexpected = Vec::new();
    let mut seen = BTreeSet::new();
    for (name, tensor) in &tensors {
        match variables.get(name) {
            None => unexpected.push(name.clone()),
            Some(var) if var.size() != tensor.size() => {
                wrong_shape.push((name.clone(), var.size(), tensor.size()));
            }
            Some(_) => {
                seen.insert(name.as_str());
            }
        }
    }
    let mut missing: Vec<String> = variables
        .keys()
        .filter(|name| !seen.contains(name.as_str()) && !wrong_shape.iter().any(|(n, _, _)| n == *name))
        .cloned()
        .collect();
    if !(missing.is_empty() && unexpected.is_empty() && wrong_shape.is_empty()) {
        missing.sort();
        unexpected.sort();
        wrong_shape.sort();
        return Err(Error::WeightMismatch {
            missing,
            unexpected,
            wrong_shape,
        });
    }
    tch::no_grad(|| {
        for (name, tensor) in &tensors {
            if let Some(var) = variables.get(name) {
                let mut var = var.shallow_clone();
                var.f_copy_(&tensor.to_kind(var.kind()).to_device(var.device()))?;
            }
        }
        Ok::<(), tch::TchError>(())
    })?;
    Ok(())
}

/// Reads a safetensors file, naming the file in the error.
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    Tensor::read_safetensors(path).map_err(|e| Error::BadWeights {
        path: PathBuf::from(path),
        reason: e.to_string(),
    })
}
