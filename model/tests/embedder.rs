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

/// `Embedder::load`'s refusal of `dir`'s manifest, which must be a
/// manifest error saying `says`.
fn refused(dir: &Path, says: &str) {
    match Embedder::load(dir, Device::Cpu) {
        Err(Error::Manifest { reason, .. }) => assert!(reason.contains(says), "{says:?} not in: {reason}"),
        other => panic!("expected a manifest error saying {says:?}, got {other:?}"),
    }
}

#[test]
fn the_parameter_floor_is_below_what_real_checkpoints_hold() {
    for config in [ClipVisionConfig::tiny_vit(), ClipVisionConfig::tiny_resnet()] {
        let dir = tempfile::tempdir().expect("tempdir");
        let manifest = create_random_checkpoint(dir.path(), &config, 3).expect("checkpoint");
        let held: i64 = checkpoint::read_safetensors(&dir.path().join(WEIGHTS_FILE))
            .expect("weights")
            .iter()
            .map(|(_, t)| t.numel() as i64)
            .sum();
        let floor = manifest.parameter_floor().expect("counted") as i64;
        // Below what the file holds, and close enough to it to matter.
        assert!(
            floor <= held && floor * 2 > held,
            "{config:?}: floor {floor}, held {held}"
        );
    }
}

#[test]
fn a_manifest_asking_for_more_than_its_weights_hold_is_refused_before_anything_is_allocated() {
    // Each of these, built, would ask for terabytes (or a vector of 10^16
    // blocks, which aborts the process): the weights file decides first.
    let (dir, manifest) = tiny_checkpoint(5);
    let edited = |edit: &dyn Fn(&mut Manifest)| {
        let mut m = manifest.clone();
        edit(&mut m);
        m.write(dir.path()).expect("write");
    };
    edited(&|m| {
        m.vision.backbone = handid_model::Backbone::Vit {
            patch_size: 8,
            layers: 10_000_000_000_000_000,
        }
    });
    refused(dir.path(), "needs at least");
    edited(&|m| m.vision.width = 32_768);
    refused(dir.path(), "needs at least");
    edited(&|m| m.vision.image_size = 8 * 65_536);
    refused(dir.path(), "needs at least");
    edited(&|m| {
        m.feature = handid_model::visual::Feature::PromptSg {
            heads: 2,
            blocks: 10_000_000_000_000_000,
        }
    });
    refused(dir.path(), "needs at least");
    let mut resnet = ClipVisionConfig::tiny_resnet();
    resnet.backbone = handid_model::Backbone::ModifiedResnet {
        layers: [1, 1, 1_000_000, 1],
        last_stride: 2,
    };
    edited(&|m| {
        m.vision = resnet.clone();
        m.preprocess = Preprocess::Clip { size: 64 };
    });
    refused(dir.path(), "needs at least");
    // The manifest as written loads.
    manifest.write(dir.path()).expect("write");
    Embedder::load(dir.path(), Device::Cpu).expect("the real manifest");
}

#[test]
fn thresholds_input_sizes_and_space_names_are_checked() {
    let (dir, manifest) = tiny_checkpoint(6);
    let edited = |edit: &dyn Fn(&mut Manifest)| {
        let mut m = manifest.clone();
        edit(&mut m);
        m.write(dir.path()).expect("write");
    };
    let point = |fmr: f64, threshold: f32| handid_model::OperatingPoint { fmr, threshold };
    // A threshold of -1 would accept every probe, NaN none.
    for (points, says) in [
        (vec![point(1e-3, -2.0)], "not a cosine score"),
        (vec![point(1e-3, f32::NAN)], "not a cosine score"),
        (vec![point(0.0, 0.5)], "not a rate"),
        (vec![point(f64::NAN, 0.5)], "not a rate"),
        (vec![point(1e-3, 0.5), point(1e-3, 0.6)], "two thresholds"),
    ] {
        edited(&|m| m.thresholds = points.clone());
        refused(dir.path(), says);
    }
    for size in [65_536, 4] {
        edited(&|m| m.preprocess = Preprocess::Clip { size });
        refused(dir.path(), "each side must be between");
    }
    edited(&|m| {
        m.preprocess = Preprocess::Resize {
            height: 1024,
            width: 8,
        }
    });
    Embedder::load(dir.path(), Device::Cpu).expect("the largest and smallest sides allowed");
    let long = "s".repeat(129);
    for space in ["", "two words", "line\nbreak", long.as_str()] {
        edited(&|m| m.embedding_space = space.to_owned());
        refused(dir.path(), "is not a name");
        edited(&|m| m.compatible_spaces = vec![space.to_owned()]);
        refused(dir.path(), "is not a name");
    }
    edited(&|m| m.thresholds = vec![point(1e-2, 0.3), point(1e-3, 1.0)]);
    Embedder::load(dir.path(), Device::Cpu).expect("valid thresholds");
}
