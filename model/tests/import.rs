//! Importing CLIP weights: key renaming, architecture inference, strict checks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use handid_model::import::{OPENAI_HEAD_WIDTH, infer_vision_config, read_weights, to_openai_keys};
use handid_model::{ClipVisionConfig, Device, Embedder, Error};
use tch::{Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The tiny ViT's OpenAI-named weights and its input / open_clip output
/// (scripts/fixtures/make_clip_fixtures.py).
fn tiny_vit() -> (Vec<(String, Tensor)>, Tensor, Tensor) {
    let mut all: BTreeMap<String, Tensor> = Tensor::read_safetensors(fixture("tiny_vit.safetensors"))
        .expect("fixture")
        .into_iter()
        .collect();
    let pixels = all.remove("input.pixels").expect("pixels");
    let pooled = all.remove("expected.pooled").expect("pooled");
    all.remove("expected.tokens");
    (all.into_iter().collect(), pixels, pooled)
}

/// The tiny fixtures use 16-wide heads (make_clip_fixtures.py TINY_VIT).
fn import_checkpoint(src: &Path, out: &Path) -> handid_model::Result<handid_model::Manifest> {
    handid_model::import::import_checkpoint(src, out, 16)
}

fn listing_shapes(name: &str) -> BTreeMap<String, Vec<i64>> {
    std::fs::read_to_string(fixture(name))
        .expect("listing")
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .map(|(k, s)| {
            (
                k.to_owned(),
                s.split(',')
                    .filter(|d| !d.is_empty())
                    .map(|d| d.parse().expect("dim"))
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn architecture_is_inferred_from_full_size_shapes() {
    assert_eq!(
        infer_vision_config(&listing_shapes("openai_keys_vit_b16.tsv"), OPENAI_HEAD_WIDTH).expect("vit"),
        ClipVisionConfig::vit_b16()
    );
    assert_eq!(
        infer_vision_config(&listing_shapes("openai_keys_rn50.tsv"), OPENAI_HEAD_WIDTH).expect("rn50"),
        ClipVisionConfig::rn50()
    );
}

#[test]
fn an_imported_state_dict_embeds_as_open_clip() {
    let (weights, pixels, pooled) = tiny_vit();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("tiny.safetensors");
    // A full CLIP file also holds the text tower; import keeps the image tower only.
    let mut file: Vec<(String, Tensor)> = weights
        .iter()
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect();
    file.push(("logit_scale".to_owned(), Tensor::from(4.6f32)));
    file.push((
        "module.ln_final.weight".to_owned(),
        Tensor::ones([32], (Kind::Float, Device::Cpu)),
    ));
    Tensor::write_safetensors(&file, &src).expect("write");
    let out = dir.path().join("serving");
    let manifest = import_checkpoint(&src, &out).expect("import");
    assert_eq!(manifest.vision, ClipVisionConfig::tiny_vit());
    assert!(
        manifest
            .provenance
            .source
            .as_deref()
            .is_some_and(|s| s.starts_with("tiny.safetensors"))
    );
    let embedder = Embedder::load(&out, Device::Cpu).expect("load");
    let got = embedder.embed_batch(&pixels).expect("embed");
    let want = &pooled / pooled.norm_scalaropt_dim(2, [1], true);
    let diff = (&got - &want).abs().max().double_value(&[]);
    assert!(diff <= 1e-4, "differs from open_clip by {diff}");

    // fp16 weights (as in OpenAI's archives) are imported as f32.
    let half: Vec<(String, Tensor)> = weights
        .iter()
        .map(|(k, t)| (k.clone(), t.to_kind(Kind::Half)))
        .collect();
    let src16 = dir.path().join("half.safetensors");
    Tensor::write_safetensors(&half, &src16).expect("write");
    import_checkpoint(&src16, &dir.path().join("serving16")).expect("import fp16");
    let loaded = read_weights(&dir.path().join("serving16/model.safetensors")).expect("read");
    assert!(loaded.iter().all(|(_, t)| t.kind() == Kind::Float));
}

#[test]
fn truncated_files_missing_and_misshapen_tensors_are_named() {
    let (weights, _, _) = tiny_vit();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("w.safetensors");
    Tensor::write_safetensors(&weights, &src).expect("write");
    let bytes = std::fs::read(&src).expect("read");
    std::fs::write(&src, &bytes[..bytes.len() - 100]).expect("truncate");
    match import_checkpoint(&src, &dir.path().join("a")) {
        Err(Error::BadWeights { reason, .. }) => {
            assert!(
                reason.contains("truncated") && reason.contains("visual."),
                "{reason}"
            )
        }
        other => panic!("expected BadWeights, got {other:?}"),
    }
    std::fs::write(&src, &bytes[..20]).expect("truncate header");
    assert!(matches!(
        import_checkpoint(&src, &dir.path().join("b")),
        Err(Error::BadWeights { .. })
    ));

    let mut broken: Vec<(String, Tensor)> = weights
        .iter()
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect();
    broken.retain(|(k, _)| k != "visual.transformer.resblocks.1.mlp.c_fc.bias");
    for (k, t) in broken.iter_mut() {
        if k == "visual.ln_pre.weight" {
            *t = Tensor::ones([31], (Kind::Float, Device::Cpu));
        }
    }
    broken.push((
        "visual.mystery".to_owned(),
        Tensor::ones([1], (Kind::Float, Device::Cpu)),
    ));
    broken.push((
        "head.weight".to_owned(),
        Tensor::ones([1], (Kind::Float, Device::Cpu)),
    ));
    Tensor::write_safetensors(&broken, &src).expect("write");
    let message = import_checkpoint(&src, &dir.path().join("c"))
        .expect_err("accepted")
        .to_string();
    assert!(message.contains("head.weight"), "{message}");
    broken.retain(|(k, _)| k != "head.weight");
    Tensor::write_safetensors(&broken, &src).expect("write");
    let message = import_checkpoint(&src, &dir.path().join("d"))
        .expect_err("accepted")
        .to_string();
    for name in [
        "visual.transformer.resblocks.1.mlp.c_fc.bias",
        "visual.ln_pre.weight",
        "visual.mystery",
    ] {
        assert!(message.contains(name), "{name} not in {message}");
    }
}

/// Hugging Face `CLIPModel` names for a tiny ViT's OpenAI weights, written
/// out by hand from transformers' `modeling_clip.py`.
fn hugging_face_names(weights: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for (key, t) in weights {
        let t = t.shallow_clone();
        let hf = match key.as_str() {
            "visual.class_embedding" => "vision_model.embeddings.class_embedding".to_owned(),
            "visual.conv1.weight" => "vision_model.embeddings.patch_embedding.weight".to_owned(),
            "visual.positional_embedding" => "vision_model.embeddings.position_embedding.weight".to_owned(),
            "visual.ln_pre.weight" => "vision_model.pre_layrnorm.weight".to_owned(),
            "visual.ln_pre.bias" => "vision_model.pre_layrnorm.bias".to_owned(),
            "visual.ln_post.weight" => "vision_model.post_layernorm.weight".to_owned(),
            "visual.ln_post.bias" => "vision_model.post_layernorm.bias".to_owned(),
            "visual.proj" => {
                out.push(("visual_projection.weight".to_owned(), t.tr().contiguous()));
                continue;
            }
            other => {
                let rest = other
                    .strip_prefix("visual.transformer.resblocks.")
                    .expect("block key");
                let (layer, param) = rest.split_once('.').expect("layer");
                let base = format!("vision_model.encoder.layers.{layer}");
                if let Some(kind) = param.strip_prefix("attn.in_proj_") {
                    for (i, proj) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                        out.push((
                            format!("{base}.self_attn.{proj}.{kind}"),
                            t.chunk(3, 0)[i].shallow_clone(),
                        ));
                    }
                    continue;
                }
                let param = param
                    .replace("attn.out_proj", "self_attn.out_proj")
                    .replace("ln_1", "layer_norm1")
                    .replace("ln_2", "layer_norm2")
                    .replace("mlp.c_fc", "mlp.fc1")
                    .replace("mlp.c_proj", "mlp.fc2");
                format!("{base}.{param}")
            }
        };
        out.push((hf, t));
    }
    out.push((
        "vision_model.embeddings.position_ids".to_owned(),
        Tensor::arange(17, (Kind::Int64, Device::Cpu)).view([1, 17]),
    ));
    out.push((
        "text_projection.weight".to_owned(),
        Tensor::ones([16, 32], (Kind::Float, Device::Cpu)),
    ));
    out
}

#[test]
fn hugging_face_keys_become_openai_keys() {
    let (weights, _, _) = tiny_vit();
    let renamed: BTreeMap<String, Tensor> = to_openai_keys(hugging_face_names(&weights))
        .expect("rename")
        .into_iter()
        .collect();
    let mut want: BTreeMap<String, Tensor> = weights.into_iter().collect();
    assert_eq!(renamed["text_projection"].size(), [32, 16]);
    let text = renamed.keys().filter(|k| !k.starts_with("visual.")).count();
    assert_eq!(text, 1, "only text_projection is outside the image tower");
    for (key, t) in renamed.iter().filter(|(k, _)| k.starts_with("visual.")) {
        let original = want.remove(key).unwrap_or_else(|| panic!("unexpected {key}"));
        assert_eq!((t - original).abs().max().double_value(&[]), 0.0, "{key}");
    }
    assert!(
        want.is_empty(),
        "not produced: {:?}",
        want.keys().collect::<Vec<_>>()
    );
}

#[test]
fn an_fp16_torchscript_archive_imports_as_f32_and_embeds_as_open_clip() {
    let (_, pixels, pooled) = tiny_vit();
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = import_checkpoint(&fixture("tiny_vit_fp16.pt"), dir.path()).expect("import TorchScript");
    assert_eq!(manifest.vision, ClipVisionConfig::tiny_vit());
    let embedder = Embedder::load(dir.path(), Device::Cpu).expect("load");
    let got = embedder.embed_batch(&pixels).expect("embed");
    let want = &pooled / pooled.norm_scalaropt_dim(2, [1], true);
    // The archive's weights are the f32 fixture's rounded to fp16.
    let diff = (&got - &want).abs().max().double_value(&[]);
    assert!(diff <= 1e-2, "differs from open_clip by {diff}");
}

/// The tiny ResNet's OpenAI-named weights (BatchNorm statistics included) and
/// its input / open_clip output (make_clip_fixtures.py TINY_RESNET).
fn tiny_resnet() -> (BTreeMap<String, Tensor>, Tensor, Tensor) {
    let mut all: BTreeMap<String, Tensor> = Tensor::read_safetensors(fixture("tiny_resnet.safetensors"))
        .expect("fixture")
        .into_iter()
        .collect();
    let pixels = all.remove("input.pixels").expect("pixels");
    let pooled = all.remove("expected.pooled").expect("pooled");
    (all, pixels, pooled)
}

#[test]
fn an_rn50_style_torchscript_archive_imports_with_its_batchnorm_buffers() {
    // tiny_resnet_fp16.pt has RN50.pt's layout: TorchScript, fp16 convolutions
    // and projections, fp32 BatchNorm whose statistics are buffers.
    let (weights, pixels, pooled) = tiny_resnet();
    let raw = read_weights(&fixture("tiny_resnet_fp16.pt")).expect("read TorchScript");
    let counters = raw
        .iter()
        .filter(|(k, t)| k.ends_with(".num_batches_tracked") && t.kind() == Kind::Int64)
        .count();
    // 3 stem BatchNorms, 3 per block, 1 per downsample: 3 + 4 * (3 + 1)
    assert_eq!(counters, 19);
    let archive: BTreeMap<String, Tensor> = to_openai_keys(raw).expect("rename").into_iter().collect();
    assert_eq!(
        archive.keys().collect::<Vec<_>>(),
        weights.keys().collect::<Vec<_>>()
    );
    let mut halves = 0;
    for (key, t) in &archive {
        // Each tensor is the f32 fixture's, rounded to the archive's dtype.
        let want = weights[key].to_kind(t.kind());
        assert!(t.equal(&want), "{key} differs from the fixture's");
        if key.contains(".bn") || key.contains("downsample.1.") {
            assert_eq!(
                t.kind(),
                Kind::Float,
                "{key}: BatchNorm stays fp32, as in RN50.pt"
            );
        }
        halves += usize::from(t.kind() == Kind::Half);
    }
    assert!(
        archive.contains_key("visual.bn1.running_var")
            && archive.contains_key("visual.layer4.0.downsample.1.running_mean")
    );
    assert!(halves >= 20, "{halves} fp16 tensors");

    let dir = tempfile::tempdir().expect("tempdir");
    // make_clip_fixtures.py TINY_RESNET: head_width 32, i.e. 2 * 32 / 32 = 2 heads.
    let manifest = handid_model::import::import_checkpoint(&fixture("tiny_resnet_fp16.pt"), dir.path(), 32)
        .expect("import TorchScript");
    let want_config = ClipVisionConfig {
        backbone: handid_model::Backbone::ModifiedResnet {
            layers: [1, 1, 1, 1],
            last_stride: 2,
        },
        width: 2,
        heads: 2,
        image_size: 64,
        output_dim: 16,
    };
    assert_eq!(manifest.vision, want_config);
    let loaded = read_weights(&dir.path().join("model.safetensors")).expect("read");
    assert!(loaded.iter().all(|(_, t)| t.kind() == Kind::Float));
    let embedder = Embedder::load(dir.path(), Device::Cpu).expect("load");
    let got = embedder.embed_batch(&pixels).expect("embed");
    let want = &pooled / pooled.norm_scalaropt_dim(2, [1], true);
    // open_clip's output is for the f32 weights; the archive holds most of
    // them rounded to fp16 (relative error up to 2^-11), measured 1.4e-4.
    let diff = (&got - &want).abs().max().double_value(&[]);
    eprintln!("RN50-style TorchScript: max abs diff {diff:e} from open_clip (f32 weights)");
    assert!(diff <= 2e-3, "differs from open_clip by {diff}");

    // A zip that is not a whole archive is refused, with the reason.
    let bytes = std::fs::read(fixture("tiny_resnet_fp16.pt")).expect("read");
    let cut = dir.path().join("cut.pt");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
    match read_weights(&cut) {
        Err(Error::BadWeights { reason, .. }) => assert!(reason.contains("zip"), "{reason}"),
        other => panic!("expected BadWeights, got {other:?}"),
    }
}
