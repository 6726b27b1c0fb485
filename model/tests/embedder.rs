//! Serving checkpoints and the Embedder, on tiny random models.

use std::path::Path;

use handid_model::checkpoint::{self, MANIFEST_FILE, WEIGHTS_FILE};
use handid_model::{
    ClipVisionConfig, Device, Embedder, Error, Manifest, Precision, Preprocess, create_random_checkpoint,
};
use tch::{Kind, Tensor};

fn tiny_checkpoint(seed: i64) -> (tempfile::TempDir, Manifest) {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest =
        create_random_checkpoint(dir.path(), &ClipVisionConfig::tiny_vit(), seed).expect("checkpoint");
    (dir, manifest)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn embedder_is_send_and_sync() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Embedder>();
}

#[test]
fn random_checkpoint_round_trips() {
    let (dir, written) = tiny_checkpoint(1);
    assert_eq!(Manifest::read(dir.path()).expect("read"), written);
    assert_eq!(
        written.model_id,
        checkpoint::sha256_file(&dir.path().join(WEIGHTS_FILE)).expect("hash")
    );
    assert_eq!(written.embedding_space, written.model_id);
    assert_eq!(written.preprocess, Preprocess::Clip { size: 32 });
    let embedder = Embedder::load(dir.path(), Device::Cpu).expect("load");
    assert_eq!(embedder.model_id(), written.model_id);
    assert_eq!(embedder.dim(), 16);
    assert_eq!(embedder.device(), Device::Cpu);
    assert_eq!(embedder.manifest(), &written);
}

#[test]
fn embeddings_are_normalised_and_a_batch_equals_its_singles() {
    let (dir, _) = tiny_checkpoint(2);
    let embedder = Embedder::load(dir.path(), Device::Cpu).expect("load");
    let pixels = Tensor::randn([5, 3, 32, 32], (Kind::Float, Device::Cpu));
    let batch = embedder.embed_batch(&pixels).expect("batch");
    assert_eq!(batch.size(), [5, 16]);
    assert_eq!(batch.kind(), Kind::Float);
    assert_eq!(batch.device(), Device::Cpu);
    let norms = batch.norm_scalaropt_dim(2, [1], false);
    assert!(max_abs_diff(&norms, &Tensor::ones([5], (Kind::Float, Device::Cpu))) < 1e-5);
    for i in 0..5 {
        let single = embedder.embed_batch(&pixels.narrow(0, i, 1)).expect("single");
        assert!(max_abs_diff(&single, &batch.narrow(0, i, 1)) < 1e-5, "row {i}");
    }
    // Distinct inputs give distinct embeddings (the model is not constant).
    assert!(max_abs_diff(&batch.get(0), &batch.get(1)) > 1e-3);
    assert_eq!(
        embedder
            .embed_batch(&pixels.narrow(0, 0, 0))
            .expect("empty")
            .size(),
        [0, 16]
    );
}

#[test]
fn wrong_pixel_shapes_are_errors() {
    let (dir, _) = tiny_checkpoint(3);
    let embedder = Embedder::load(dir.path(), Device::Cpu).expect("load");
    for shape in [
        vec![3, 32, 32],
        vec![1, 1, 32, 32],
        vec![1, 3, 32, 40],
        vec![2, 3, 16, 16],
    ] {
        let pixels = Tensor::zeros(shape.as_slice(), (Kind::Float, Device::Cpu));
        assert!(
            matches!(embedder.embed_batch(&pixels), Err(Error::InvalidInput(_))),
            "{shape:?}"
        );
    }
}

#[test]
fn embeds_real_hand_photos_at_a_portrait_size() {
    // A portrait input (48x32, a 6x4 patch grid) on a model whose positional
    // embedding is 4x4: the embedding is interpolated.
    let (dir, mut manifest) = tiny_checkpoint(4);
    manifest.preprocess = Preprocess::Resize {
        height: 48,
        width: 32,
    };
    manifest.write(dir.path()).expect("rewrite manifest");
    let embedder = Embedder::load(dir.path(), Device::Cpu).expect("load");
    let hands = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/11k-hands-sample/Hands"
    ));
    let mut paths: Vec<_> = std::fs::read_dir(hands)
        .expect("sample")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    paths.sort();
    let images: Vec<_> = paths
        .iter()
        .take(3)
        .map(|p| {
            let bytes = std::fs::read(p).expect("read");
            handid_model::decode(&bytes, &Default::default()).expect("decode")
        })
        .collect();
    let emb = embedder.embed_images(&images).expect("embed");
    assert_eq!(emb.size(), [3, 16]);
    assert!(bool::try_from(emb.isfinite().all()).expect("bool"));
    let single = embedder.embed_images(&images[1..2]).expect("single");
    assert!(max_abs_diff(&single, &emb.narrow(0, 1, 1)) < 1e-5);
}

#[test]
fn bf16_inference_stays_close_to_f32() {
    let (dir, _) = tiny_checkpoint(5);
    let full = Embedder::load(dir.path(), Device::Cpu).expect("f32");
    let half = Embedder::load_with_precision(dir.path(), Device::Cpu, Precision::Bf16).expect("bf16");
    let pixels = Tensor::randn([3, 3, 32, 32], (Kind::Float, Device::Cpu));
    let a = full.embed_batch(&pixels).expect("f32");
    let b = half.embed_batch(&pixels).expect("bf16");
    assert_eq!(b.kind(), Kind::Float);
    let cosine = (&a * &b).sum_dim_intlist(&[1i64][..], false, Kind::Float);
    assert!(cosine.min().double_value(&[]) > 0.99, "{cosine}");
}

#[test]
fn strict_loading_names_missing_unexpected_and_misshapen_tensors() {
    let (dir, manifest) = tiny_checkpoint(6);
    let mut weights = checkpoint::read_safetensors(&dir.path().join(WEIGHTS_FILE)).expect("weights");
    weights.retain(|(name, _)| name != "visual.ln_post.bias");
    for (name, tensor) in weights.iter_mut() {
        if name == "visual.proj" {
            *tensor = Tensor::zeros([32, 15], (Kind::Float, Device::Cpu));
        }
    }
    weights.push((
        "visual.extra_head.weight".to_owned(),
        Tensor::zeros([2], (Kind::Float, Device::Cpu)),
    ));
    let bad = tempfile::tempdir().expect("tempdir");
    checkpoint::write_checkpoint(bad.path(), &weights, manifest).expect("write");
    let err = Embedder::load(bad.path(), Device::Cpu).expect_err("mismatch accepted");
    match &err {
        Error::WeightMismatch {
            missing,
            unexpected,
            wrong_shape,
        } => {
            assert_eq!(missing, &["visual.ln_post.bias"]);
            assert_eq!(unexpected, &["visual.extra_head.weight"]);
            assert_eq!(
                wrong_shape,
                &[("visual.proj".to_owned(), vec![32, 16], vec![32, 15])]
            );
        }
        other => panic!("expected WeightMismatch, got {other:?}"),
    }
    let message = err.to_string();
    for name in ["visual.ln_post.bias", "visual.extra_head.weight", "visual.proj"] {
        assert!(message.contains(name), "{message}");
    }
}

#[test]
fn tampered_weights_and_bad_manifests_are_refused() {
    let (dir, _) = tiny_checkpoint(7);
    let weights = dir.path().join(WEIGHTS_FILE);
    let mut bytes = std::fs::read(&weights).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&weights, &bytes).expect("write");
    assert!(matches!(
        Embedder::load(dir.path(), Device::Cpu),
        Err(Error::ModelIdMismatch { .. })
    ));

    let (dir, _) = tiny_checkpoint(8);
    let path = dir.path().join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).expect("manifest");
    std::fs::write(&path, format!("{text}surprise: 1\n")).expect("write");
    match Embedder::load(dir.path(), Device::Cpu) {
        Err(Error::Manifest { reason, .. }) => assert!(reason.contains("surprise"), "{reason}"),
        other => panic!("expected a manifest error, got {other:?}"),
    }
    std::fs::write(&path, text.replace("embedding_dim: 16", "embedding_dim: 17")).expect("write");
    assert!(matches!(
        Embedder::load(dir.path(), Device::Cpu),
        Err(Error::Manifest { .. })
    ));
    std::fs::remove_file(&path).expect("rm");
    assert!(matches!(
        Embedder::load(dir.path(), Device::Cpu),
        Err(Error::Io { .. })
    ));
}

#[test]
fn a_batch_norm_neck_is_applied_with_its_running_statistics() {
    let (plain_dir, plain) = tiny_checkpoint(4);
    let plain_embedder = Embedder::load(plain_dir.path(), Device::Cpu).expect("load");
    // The same tower plus a neck with chosen statistics.
    let mut weights = Tensor::read_safetensors(plain_dir.path().join(WEIGHTS_FILE)).expect("weights");
    let dim = plain.embedding_dim as i64;
    let opts = (Kind::Float, Device::Cpu);
    let (w, b) = (Tensor::rand([dim], opts) + 0.5, Tensor::randn([dim], opts) * 0.1);
    let (mean, var) = (Tensor::randn([dim], opts), Tensor::rand([dim], opts) + 0.1);
    for (name, t) in [
        ("weight", &w),
        ("bias", &b),
        ("running_mean", &mean),
        ("running_var", &var),
    ] {
        weights.push((format!("neck.{name}"), t.shallow_clone()));
    }
    let mut manifest = plain.clone();
    manifest.neck = Some(checkpoint::Neck::BatchNorm);
    manifest.embedding_space = String::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let written = checkpoint::write_checkpoint(dir.path(), &weights, manifest).expect("write");
    assert_eq!(
        Manifest::read(dir.path()).expect("read").neck,
        Some(checkpoint::Neck::BatchNorm)
    );
    let embedder = Embedder::load(dir.path(), Device::Cpu).expect("load");
    assert_eq!(embedder.model_id(), written.model_id);

    // Reference: the tower's raw (unnormalised) feature through the same
    // BatchNorm formula, then L2-normalised.
    let pixels = Tensor::randn([3, 3, 32, 32], opts);
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let encoder = handid_model::ImageEncoder::new(vs.root() / "visual", &plain.vision).expect("encoder");
    let tower: Vec<(String, Tensor)> =
        Tensor::read_safetensors(plain_dir.path().join(WEIGHTS_FILE)).expect("w");
    checkpoint::load_strict(&vs, tower).expect("load tower");
    let raw = tch::no_grad(|| encoder.forward_feature(&pixels, plain.feature)).expect("forward");
    let normed = (&raw - &mean) / (&var + 1e-5).sqrt() * &w + &b;
    let expected = &normed / normed.norm_scalaropt_dim(2, [1], true);
    let got = embedder.embed_batch(&pixels).expect("embed");
    assert!(
        max_abs_diff(&got, &expected) < 1e-5,
        "{}",
        max_abs_diff(&got, &expected)
    );
    // And it is not the plain embedding.
    let plain_out = plain_embedder.embed_batch(&pixels).expect("embed");
    assert!(max_abs_diff(&got, &plain_out) > 1e-2);

    // A neck declared in the manifest but missing from the weights is named.
    let missing = tempfile::tempdir().expect("tempdir");
    let mut m = plain.clone();
    m.neck = Some(checkpoint::Neck::BatchNorm);
    m.embedding_space = String::new();
    let tower: Vec<(String, Tensor)> =
        Tensor::read_safetensors(plain_dir.path().join(WEIGHTS_FILE)).expect("w");
    checkpoint::write_checkpoint(missing.path(), &tower, m).expect("write");
    let err = Embedder::load(missing.path(), Device::Cpu)
        .expect_err("the neck tensors are missing")
        .to_string();
    assert!(err.contains("neck.running_mean"), "{err}");
}
