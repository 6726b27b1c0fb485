//! Importing real CLIP weights into a serving checkpoint.
//!
//! Accepted sources: OpenAI's TorchScript archives (`ViT-B-16.pt`, `RN50.pt`;
//! their fp16 weights become f32), OpenAI / open_clip state dicts saved as
//! safetensors, and Hugging Face `CLIPModel` safetensors. The architecture is
//! inferred from the tensor shapes as OpenAI CLIP `model.py` `build_model`
//! does; only the image tower goes into the serving checkpoint.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use tch::{Device, Tensor, nn};

use crate::checkpoint::{Manifest, Provenance, load_strict, named_variables, sha256_file, write_checkpoint};
use crate::config::{Backbone, ClipVisionConfig};
use crate::error::{Error, Result};
use crate::visual::{Feature, ImageEncoder};

mod torchscript;

/// Root-level keys of CLIP's text tower and logit scale: present in a full
/// CLIP file, not needed to serve images.
const TEXT_TOWER: [&str; 6] = [
    "token_embedding.",
    "positional_embedding",
    "transformer.",
    "ln_final.",
    "text_projection",
    "logit_scale",
];

/// Reads every tensor of a TorchScript archive (zip: parameters and
/// buffers) or safetensors file.
pub fn read_weights(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bad = |reason: String| Error::BadWeights {
        path: PathBuf::from(path),
        reason,
    };
    let mut magic = [0u8; 4];
    let mut file = fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    file.read_exact(&mut magic)
        .map_err(|_| bad("shorter than any weights file".to_owned()))?;
    if &magic == b"PK\x03\x04" {
        // A zip: a TorchScript archive. Its parameters and buffers (BatchNorm
        // statistics) carry the state-dict names.
        return torchscript::read_tensors(path).map_err(bad);
    }
    check_safetensors_layout(path).map_err(bad)?;
    Tensor::read_safetensors(path).map_err(|e| bad(e.to_string()))
}

/// Checks a safetensors header against the file size, so that a truncated
/// file is reported with the first tensor whose bytes are missing.
fn check_safetensors_layout(path: &Path) -> std::result::Result<(), String> {
    let bytes = fs::read(path).map_err(|e| e.to_string())?;
    let header_len = bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .ok_or("not safetensors (no header length)")?;
    let data_start = usize::try_from(header_len)
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&end| end <= bytes.len())
        .ok_or_else(|| format!("not safetensors, or truncated inside its {header_len}-byte header"))?;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..data_start]).map_err(|e| format!("not safetensors: header {e}"))?;
    let available = (bytes.len() - data_start) as u64;
    let mut ends: Vec<(u64, &String)> = header
        .iter()
        .filter(|(name, _)| name.as_str() != "__metadata__")
        .filter_map(|(name, info)| info["data_offsets"][1].as_u64().map(|end| (end, name)))
        .collect();
    ends.sort();
    match ends.iter().find(|(end, _)| *end > available) {
        Some((end, name)) => Err(format!(
            "truncated: tensor {name} needs bytes up to {end} of the data section, the file holds {available}"
        )),
        None => Ok(()),
    }
}

/// Renames a state dict to OpenAI CLIP's keys, the one place any renaming
/// happens: strips a `module.` prefix (DistributedDataParallel), converts
/// Hugging Face `CLIPModel` keys (merging `q/k/v_proj` into `in_proj_*`,
/// transposing `visual_projection` / `text_projection`), and drops tensors
/// inference never reads (`position_ids`, BatchNorm `num_batches_tracked`).
pub fn to_openai_keys(weights: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::with_capacity(weights.len());
    // Hugging Face q/k/v projections, gathered by (OpenAI block prefix, weight|bias).
    let mut qkv: BTreeMap<(String, &'static str), [Option<Tensor>; 3]> = BTreeMap::new();
    for (name, tensor) in weights {
        let name = name.strip_prefix("module.").map(str::to_owned).unwrap_or(name);
        if name.ends_with("num_batches_tracked") || name.ends_with("position_ids") {
            continue;
        }
        let Some((tower, rest)) = hugging_face_tower(&name) else {
            out.push((name, tensor));
            continue;
        };
        if let Some(rest) = rest.strip_prefix("encoder.layers.") {
            let (layer, rest) = rest.split_once('.').unwrap_or((rest, ""));
            let block = format!("{tower}transformer.resblocks.{layer}");
            let (module, param) = rest.rsplit_once('.').unwrap_or((rest, ""));
            let param: &'static str = if param == "weight" { "weight" } else { "bias" };
            let slot = match module {
                "self_attn.q_proj" => Some(0),
                "self_attn.k_proj" => Some(1),
                "self_attn.v_proj" => Some(2),
                _ => None,
            };
            if let Some(slot) = slot {
                qkv.entry((block, param)).or_default()[slot] = Some(tensor);
                continue;
            }
            let module = match module {
                "self_attn.out_proj" => "attn.out_proj",
                "layer_norm1" => "ln_1",
                "layer_norm2" => "ln_2",
                "mlp.fc1" => "mlp.c_fc",
                "mlp.fc2" => "mlp.c_proj",
                other => other,
            };
            out.push((format!("{block}.{module}.{param}"), tensor));
            continue;
        }
        let renamed = match rest {
            "embeddings.class_embedding" => "class_embedding".to_owned(),
            "embeddings.patch_embedding.weight" => "conv1.weight".to_owned(),
            "embeddings.position_embedding.weight" => "positional_embedding".to_owned(),
            "embeddings.token_embedding.weight" => "token_embedding.weight".to_owned(),
            "pre_layrnorm.weight" => "ln_pre.weight".to_owned(),
            "pre_layrnorm.bias" => "ln_pre.bias".to_owned(),
            "post_layernorm.weight" => "ln_post.weight".to_owned(),
            "post_layernorm.bias" => "ln_post.bias".to_owned(),
            "final_layer_norm.weight" => "ln_final.weight".to_owned(),
            "final_layer_norm.bias" => "ln_final.bias".to_owned(),
            // `visual_projection` / `text_projection` are Linear [out, width]; OpenAI's are [width, out].
            "visual_projection.weight" => {
                out.push(("visual.proj".to_owned(), tensor.tr().contiguous()));
                continue;
            }
            "text_projection.weight" => {
                out.push(("text_projection".to_owned(), tensor.tr().contiguous()));
                continue;
            }
            other => other.to_owned(),
        };
        out.push((format!("{tower}{renamed}"), tensor));
    }
    for ((block, param), parts) in qkv {
        let [Some(q), Some(k), Some(v)] = parts else {
            return Err(Error::WeightMismatch {
                missing: vec![format!(
                    "{block} q_proj/k_proj/v_proj {param} (one of the three is absent)"
                )],
                unexpected: Vec::new(),
                wrong_shape: Vec::new(),
            });
        };
        let name = if param == "weight" {
            "in_proj_weight"
        } else {
            "in_proj_bias"
        };
        out.push((format!("{block}.attn.{name}"), Tensor::cat(&[q, k, v], 0)));
    }
    Ok(out)
}

/// For a Hugging Face key, the OpenAI prefix of its tower and the rest of
/// the key; `visual_projection` / `text_projection` count as their tower's.
fn hugging_face_tower(name: &str) -> Option<(&'static str, &str)> {
    if let Some(rest) = name.strip_prefix("vision_model.") {
        Some(("visual.", rest))
    } else if let Some(rest) = name.strip_prefix("text_model.") {
        Some(("", rest))
    } else if name == "visual_projection.weight" {
        Some(("visual.", name))
    } else if name == "text_projection.weight" {
        Some(("", name))
    } else {
        None
    }
}

/// Width of one attention head. The weights' shapes do not show the head
/// count; OpenAI's models all use 64 (`build_model`: `width // 64`).
pub const OPENAI_HEAD_WIDTH: i64 = 64;

/// The image tower's configuration from the shapes of OpenAI-named
/// `visual.*` tensors, as OpenAI CLIP `build_model` infers it, with heads of
/// `head_width` ([`OPENAI_HEAD_WIDTH`] for OpenAI's models).
pub fn infer_vision_config(shapes: &BTreeMap<String, Vec<i64>>, head_width: i64) -> Result<ClipVisionConfig> {
    if head_width <= 0 {
        return Err(Error::InvalidInput(format!("head width {head_width}")));
    }
    let dim = |key: &str, axis: usize| -> Result<i64> {
        shapes
            .get(key)
            .and_then(|s| s.get(axis).copied())
            .ok_or_else(|| Error::WeightMismatch {
                missing: vec![key.to_owned()],
                unexpected: Vec::new(),
                wrong_shape: Vec::new(),
            })
    };
    let square_side = |tokens: i64| {
        let side = ((tokens - 1) as f64).sqrt().round() as i64;
        (side * side + 1 == tokens).then_some(side)
    };
    let config = if shapes.contains_key("visual.proj") {
        let width = dim("visual.conv1.weight", 0)?;
        let patch_size = dim("visual.conv1.weight", 3)?;
        let layers = shapes
            .keys()
            .filter(|k| k.starts_with("visual.") && k.ends_with(".attn.in_proj_weight"))
            .count() as i64;
        let tokens = dim("visual.positional_embedding", 0)?;
        let grid = square_side(tokens).ok_or_else(|| {
            Error::InvalidInput(format!(
                "visual.positional_embedding has {tokens} rows, not 1 + a square"
            ))
        })?;
        ClipVisionConfig {
            backbone: Backbone::Vit { patch_size, layers },
            width,
            heads: width / head_width,
            image_size: patch_size * grid,
            output_dim: dim("visual.proj", 1)?,
        }
    } else {
        let mut layers = [0i64; 4];
        for (stage, count) in layers.iter_mut().enumerate() {
            let prefix = format!("visual.layer{}.", stage + 1);
            let blocks: BTreeSet<&str> = shapes
                .keys()
                .filter_map(|k| k.strip_prefix(&prefix))
                .filter_map(|rest| rest.split('.').next())
                .collect();
            *count = blocks.len() as i64;
        }
        let width = dim("visual.layer1.0.conv1.weight", 0)?;
        let tokens = dim("visual.attnpool.positional_embedding", 0)?;
        let side = square_side(tokens).ok_or_else(|| {
            Error::InvalidInput(format!(
                "visual.attnpool.positional_embedding has {tokens} rows, not 1 + a square"
            ))
        })?;
        ClipVisionConfig {
            backbone: Backbone::ModifiedResnet {
                layers,
                last_stride: 2,
            },
            width,
            heads: width * 32 / head_width,
            image_size: side * 32,
            output_dim: dim("visual.attnpool.c_proj.weight", 0)?,
        }
    };
    config.validate()?;
    Ok(config)
}

/// Imports CLIP weights from `src` into a serving checkpoint folder `out`
/// (image tower, f32, CLIP preprocessing at the native size). Missing,
/// misshapen and unknown tensors are all reported by name. `head_width` is
/// [`OPENAI_HEAD_WIDTH`] for every OpenAI model.
pub fn import_checkpoint(src: &Path, out: &Path, head_width: i64) -> Result<Manifest> {
    let weights = to_openai_keys(read_weights(src)?)?;
    let (visual, rest): (Vec<_>, Vec<_>) = weights.into_iter().partition(|(k, _)| k.starts_with("visual."));
    let unexpected: Vec<String> = rest
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| !TEXT_TOWER.iter().any(|prefix| k.starts_with(prefix)))
        .collect();
    if !unexpected.is_empty() {
        return Err(Error::WeightMismatch {
            missing: Vec::new(),
            unexpected,
            wrong_shape: Vec::new(),
        });
    }
    let shapes = visual.iter().map(|(k, t)| (k.clone(), t.size())).collect();
    let config = infer_vision_config(&shapes, head_width)?;
    let vs = nn::VarStore::new(Device::Cpu);
    ImageEncoder::new(vs.root() / "visual", &config)?;
    load_strict(&vs, visual)?;
    let source = src
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let provenance = Provenance {
        created_by: format!("handid-model {} import", env!("CARGO_PKG_VERSION")),
        source: Some(format!("{source} (sha256 {})", sha256_file(src)?)),
        ..Provenance::default()
    };
    let manifest = Manifest::new(config, Feature::Projected, provenance)?;
    write_checkpoint(out, &named_variables(&vs), manifest)
}
