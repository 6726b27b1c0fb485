//! handid-model: CLIP in tch for hand-based identity matching.
//!
//! # Layout
//! - [`image`]: decoding untrusted image bytes, CLIP preprocessing.
//! - [`config`]: model configurations and presets.
//! - [`transformer`], [`vit`], [`resnet`], [`visual`]: CLIP's image tower, one struct per
//!   module of OpenAI CLIP `model.py`, variables named by the checkpoint keys.
//! - [`text`]: CLIP's text tower; [`tokenizer`]: its BPE tokenizer; [`clip`]: both towers and the logit scale.
//! - [`checkpoint`]: the serving checkpoint folder (weights + manifest) and
//!   strict loading.
//! - [`import`]: OpenAI / open_clip / Hugging Face weights to a serving checkpoint.
//! - [`embedder`]: a loaded checkpoint that turns images into embeddings.
//! - [`transform`]: a fitted old-to-new embedding transformation (upgrading
//!   stored templates without images).
//! - [`device`]: choosing `cpu` / `cuda[:N]`, loading libtorch's CUDA library
//!   at run time so one binary serves CPU-only and GPU hosts.
//! - [`error`]: the crate's error type.
//! - [`ops`]: small tensor operations ([`l2_normalize`]).
//! - [`heads`]: BNNeck, linear and ArcFace classifiers (re-id heads).
//! - [`prompt`]: CLIP-ReID's per-identity prompt learner; [`promptsg`]: PromptSG's
//!   inversion network, composed prompt and interaction module.

pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod device;
pub mod embedder;
pub mod error;
pub mod heads;
pub mod image;
pub mod import;
pub mod ops;
pub mod prompt;
pub mod promptsg;
pub mod resnet;
pub mod text;
pub mod tokenizer;
pub mod transform;
pub mod transformer;
pub mod visual;
pub mod vit;

pub use checkpoint::{Manifest, OperatingPoint, Provenance, create_random_checkpoint};
pub use clip::{Clip, ClipConfig};
pub use config::{Backbone, ClipVisionConfig};
pub use device::{Device, parse_device};
pub use embedder::{Embedder, Precision};
pub use error::{Error, Result};
pub use image::{DecodeLimits, Preprocess, decode};
pub use ops::l2_normalize;
pub use prompt::IdPromptLearner;
pub use promptsg::{ComposedPrompt, InteractionModule, InversionNetwork};
pub use text::{ClipTextConfig, TextTransformer};
pub use tokenizer::Tokenizer;
pub use transform::{SideInfo, TemplateTransform, TransformArch, TransformManifest};
pub use visual::{Feature, ImageEncoder, ImageFeatures};
