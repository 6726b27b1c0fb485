//! The training engine end to end on a small synthetic dataset: fine-tuning
//! beats the untrained weights on validation persons, a stopped and resumed
//! run ends with the same weights as an uninterrupted one, and export writes
//! a serving checkpoint with calibrated thresholds that the server's
//! `Embedder` loads.

// A panic in a test is a failure with a location.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use handid_eval::data::synthetic::{self, Layout, SynthOptions};
use handid_eval::data::{MissingImages, folder, splits};
use handid_model::Embedder;
use handid_model::checkpoint::{Manifest, create_random_checkpoint};
use handid_trainer::commands::calibrate::{CalibrateArgs, calibration_items, run};
use handid_trainer::config::TrainConfig;
use handid_trainer::engine::{RunOptions, train};
use handid_trainer::export::calibrate;
use tch::Tensor;

/// 16 persons x 6 images, 32x32: a quarter of the persons are test persons.
fn dataset(dir: &Path) -> PathBuf {
    let root = dir.join("data");
    synthetic::generate(
        &root,
        &SynthOptions {
            persons: 16,
            images_per_person: 6,
            size: 32,
            seed: 3,
            layout: Layout::Folder,
        },
    )
    .expect("synthetic data");
    let dataset = folder::load(&root, MissingImages::Fail).expect("dataset");
    let manifest =
        splits::by_fraction(&dataset, 0.25, splits::SplitOptions { seed: 1, n_splits: 2 }).expect("splits");
    let path = dir.join("splits.tsv");
    manifest.write(&path).expect("manifest");
    path
}

fn config(manifest: &Path, method: &str) -> TrainConfig {
    TrainConfig::from_yaml(&format!(
        "
name: test
seed: 7
model: {{arch: tiny_vit}}
data: {{manifest: {manifest}, persons_per_batch: 4, images_per_person: 3, workers: 2}}
{method}
",
        manifest = manifest.display()
    ))
    .expect("config")
}

const FINETUNE: &str = "
method:
  kind: finetune
  epochs: EPOCHS
  losses: {id: {}, triplet: {margin: 0.3}, center: {weight: 0.0005}, sup_con: {weight: 0.5, ramp_epochs: 2}}
  optim: {lr: 0.001, schedule: {kind: step, warmup_steps: 2, warmup_factor: 0.1, milestones: [7], gamma: 0.1}, bias_lr_factor: 1.0, clip_grad_norm: 5.0}
";

/// libtorch's CPU kernels split reductions by the OpenMP team they get, and
/// concurrent callers may get teams of different sizes: the tests here train
/// one at a time so that exact-resume comparisons see one summation order.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn options(out: &Path) -> RunOptions {
    RunOptions {
        out: out.to_owned(),
        resume: false,
        stop_after_epoch: None,
        progress: false,
        keep_checkpoints: 2,
    }
}

fn weights(run: &Path) -> Vec<(String, Tensor)> {
    let dir = handid_trainer::engine::state::resolve(run, "latest").expect("checkpoint");
    let mut w = Tensor::read_safetensors(dir.join("model.safetensors")).expect("weights");
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

#[test]
fn finetuning_beats_the_untrained_weights_and_exports() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = dataset(dir.path());

    let untrained = train(
        &config(&manifest, "method: {kind: zero_shot}"),
        &options(&dir.path().join("zs")),
    )
    .expect("zero-shot run");
    let before = untrained.best.expect("validation ran").val;

    let cfg = config(&manifest, &FINETUNE.replace("EPOCHS", "8"));
    let run = dir.path().join("ft");
    let trained = train(&cfg, &options(&run)).expect("fine-tuning run");
    assert!(trained.finished);
    let after = trained.best.expect("validation ran").val;
    assert!(
        after.map > before.map + 0.05,
        "val mAP before {:.3}, after {:.3}",
        before.map,
        after.map
    );
    let csv = std::fs::read_to_string(run.join("metrics.csv")).expect("csv");
    assert!(
        csv.starts_with("phase,epoch,step,center,id,loss,sup_con,triplet,lr_backbone,lr_head,val_map"),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 1 + 8);
    assert!(run.join("curves_loss.png").is_file() && run.join("curves_val.png").is_file());

    // A second `train` into the same folder without --resume is refused.
    let err = train(&cfg, &options(&run)).unwrap_err().to_string();
    assert!(err.contains("--resume"), "{err}");

    let serving = dir.path().join("serving");
    let best = handid_trainer::engine::state::resolve(&run, "best").expect("best");
    let exported = handid_trainer::export::export(&best, &serving, None).expect("export");
    let m = &exported.manifest;
    assert_eq!(m.thresholds.len(), 3);
    assert!(
        m.thresholds.windows(2).all(|w| w[0].threshold <= w[1].threshold),
        "stricter FMR, higher threshold: {:?}",
        m.thresholds
    );
    assert!(m.provenance.metrics["val_map"] > before.map);
    assert_eq!(m.preprocess, cfg.model.preprocess());
    let embedder = Embedder::load(&serving, tch::Device::Cpu).expect("the server's loader accepts it");
    assert_eq!(embedder.model_id(), m.model_id);

    // `calibrate` on the images export used (the run's train and val
    // splits) finds export's thresholds: one code path.
    let items = calibration_items(&manifest, None, &["train".to_owned(), "val".to_owned()]).expect("items");
    let recalibrated = calibrate(&serving, &items, &cfg.export.fmrs).expect("calibrate");
    assert_eq!(recalibrated.thresholds(), m.thresholds);
    assert_eq!(recalibrated.pairs, exported.pairs);
}

#[test]
fn calibrate_gives_an_imported_checkpoint_thresholds_from_training_persons_only() {
    // create_random_checkpoint reseeds libtorch's global RNG, which would
    // change a run training meanwhile.
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = dataset(dir.path());
    let model = dir.path().join("init");
    let vision = handid_model::ClipVisionConfig::tiny_vit();
    let created = create_random_checkpoint(&model, &vision, 5).expect("checkpoint");
    assert!(created.thresholds.is_empty());
    let args = |splits: &[&str], dry_run: bool| CalibrateArgs {
        model: model.clone(),
        manifest: manifest.clone(),
        splits: splits.iter().map(|s| (*s).to_owned()).collect(),
        data: None,
        fmrs: vec![1e-1, 1e-2],
        dry_run,
    };

    // Test persons never calibrate, and nothing is written when refused.
    let err = run(&args(&["train_all", "test"], false)).unwrap_err().to_string();
    assert!(err.contains("test person"), "{err}");
    let err = run(&args(&["gallery0"], false)).unwrap_err().to_string();
    assert!(err.contains("test person"), "{err}");
    let err = run(&args(&["nope"], false)).unwrap_err().to_string();
    assert!(err.contains("no images in split \"nope\""), "{err}");
    let err = run(&CalibrateArgs {
        fmrs: vec![0.0],
        ..args(&["train_all"], false)
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("--fmr 0"), "{err}");
    run(&args(&["train_all"], true)).expect("dry run");
    assert!(Manifest::read(&model).expect("manifest").thresholds.is_empty());

    run(&args(&["train_all"], false)).expect("calibrate");
    let m = Manifest::read(&model).expect("manifest");
    assert_eq!(
        m.thresholds.iter().map(|p| p.fmr).collect::<Vec<_>>(),
        vec![1e-1, 1e-2]
    );
    assert!(
        m.thresholds[0].threshold <= m.thresholds[1].threshold,
        "{:?}",
        m.thresholds
    );
    assert_eq!(m.model_id, created.model_id, "the weights are untouched");
    assert!(!model.join("handid.yaml.partial").exists());
    // The server's loader reads the thresholds.
    let embedder = Embedder::load(&model, tch::Device::Cpu).expect("load");
    assert_eq!(embedder.manifest().thresholds, m.thresholds);
}

#[test]
fn stop_and_resume_ends_with_the_same_weights() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = dataset(dir.path());
    let cfg = config(&manifest, &FINETUNE.replace("EPOCHS", "3"));

    let straight = dir.path().join("straight");
    train(&cfg, &options(&straight)).expect("3 epochs");

    let split = dir.path().join("split");
    let stopped = train(
        &cfg,
        &RunOptions {
            stop_after_epoch: Some(1),
            ..options(&split)
        },
    )
    .expect("first epoch");
    assert!(!stopped.finished);
    // Resuming with another config is refused.
    let mut other = cfg.clone();
    other.seed += 1;
    let err = train(
        &other,
        &RunOptions {
            resume: true,
            ..options(&split)
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("different configuration"), "{err}");
    let resumed = train(
        &cfg,
        &RunOptions {
            resume: true,
            ..options(&split)
        },
    )
    .expect("resume");
    assert!(resumed.finished);
    assert_eq!(resumed.epochs, 3);

    let (a, b) = (weights(&straight), weights(&split));
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        let diff = (ta - tb).abs().max().double_value(&[]);
        assert!(diff <= 1e-6, "{na} differs by {diff}");
    }
}

const CLIP_REID: &str = "
method:
  kind: clip_reid
  stage1:
    epochs: 3
    batch_size: 8
    optim: {lr: 0.01}
  stage2:
    epochs: 2
    losses: {id: {}, triplet: {margin: 0.3}, i2t: {weight: 1.0}}
    optim: {lr: 0.001}
";

#[test]
fn clip_reid_learns_prompts_then_finetunes_with_i2t_and_resumes_across_phases() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = dataset(dir.path());
    let cfg = config(&manifest, CLIP_REID);

    let straight = dir.path().join("straight");
    let summary = train(&cfg, &options(&straight)).expect("clip-reid run");
    assert!(summary.finished);
    let csv = std::fs::read_to_string(straight.join("metrics.csv")).expect("csv");
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 1 + 3 + 2, "{csv}");
    assert!(
        rows[1].starts_with("stage1,1,") && rows[4].starts_with("stage2,1,"),
        "{csv}"
    );
    // The stage-1 contrastive loss falls as the prompts learn.
    let header: Vec<&str> = rows[0].split(',').collect();
    let loss_col = header.iter().position(|h| *h == "loss").expect("loss column");
    let i2t_col = header.iter().position(|h| *h == "i2t").expect("i2t column");
    let value = |row: &str, col: usize| -> f64 { row.split(',').nth(col).unwrap().parse().unwrap() };
    assert!(value(rows[3], loss_col) < value(rows[1], loss_col), "{csv}");
    // Stage 2 trains with the image-to-text cross-entropy.
    assert!(value(rows[4], i2t_col) > 0.0, "{csv}");
    let names: Vec<String> = weights(&straight).into_iter().map(|(n, _)| n).collect();
    assert!(names.iter().any(|n| n == "prompt_learner.cls_ctx"), "{names:?}");

    // Stopped after the first stage-2 epoch, resumed: the same weights.
    let split = dir.path().join("split");
    let stopped = train(
        &cfg,
        &RunOptions {
            stop_after_epoch: Some(4),
            ..options(&split)
        },
    )
    .expect("stage 1 + one stage-2 epoch");
    assert!(!stopped.finished);
    train(
        &cfg,
        &RunOptions {
            resume: true,
            ..options(&split)
        },
    )
    .expect("resume");
    for ((na, ta), (_, tb)) in weights(&straight).iter().zip(&weights(&split)) {
        let diff = (ta - tb).abs().max().double_value(&[]);
        assert!(diff <= 1e-6, "{na} differs by {diff}");
    }

    // The serving checkpoint holds the image tower only.
    let serving = dir.path().join("serving");
    let best = handid_trainer::engine::state::resolve(&straight, "best").expect("best");
    handid_trainer::export::export(&best, &serving, None).expect("export");
    Embedder::load(&serving, tch::Device::Cpu).expect("loads");
}

const PROMPT_SG: &str = "
method:
  kind: prompt_sg
  prompt: {template: 'A photo of a {} {aspect} hand', aspect: dorsal right, heads: 2, blocks: 1}
  train:
    epochs: 3
    losses: {id: {}, triplet: {margin: 0.3, features: [fused, projected]}, image_text: {weight: 0.5}}
    optim: {lr: 0.001, head_lr: 0.001}
";

#[test]
fn promptsg_trains_and_serves_the_fused_feature_it_validated() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = dataset(dir.path());
    let cfg = config(&manifest, PROMPT_SG);
    let run = dir.path().join("run");
    let summary = train(&cfg, &options(&run)).expect("PromptSG run");
    let best = summary.best.expect("validation ran");
    let csv = std::fs::read_to_string(run.join("metrics.csv")).expect("csv");
    let header = csv.lines().next().unwrap();
    for term in [
        "image_text_i2t",
        "image_text_t2i",
        "triplet_fused",
        "triplet_projected",
        "id",
    ] {
        assert!(header.split(',').any(|h| h == term), "{term}: {csv}");
    }
    let trained = weights(&run);
    let names: Vec<&str> = trained.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"promptsg.inversion.fc1.weight") && names.contains(&"promptsg.simplified_text"));

    let serving = dir.path().join("serving");
    let checkpoint = handid_trainer::engine::state::resolve(&run, "best").expect("best");
    let exported = handid_trainer::export::export(&checkpoint, &serving, None).expect("export");
    assert_eq!(
        exported.manifest.feature,
        handid_model::Feature::PromptSg { heads: 2, blocks: 1 }
    );
    // The server's Embedder computes the feature validation measured: the
    // same val mAP from the exported checkpoint.
    let map = served_val_map(&serving, &cfg);
    assert!(
        (map - best.val.map).abs() < 1e-6,
        "served {map} vs validated {}",
        best.val.map
    );
}

/// Validation mAP computed from `serving` through the server's `Embedder`.
fn served_val_map(serving: &Path, cfg: &TrainConfig) -> f64 {
    let embedder = Embedder::load(serving, tch::Device::Cpu).expect("loads");
    let data = handid_trainer::engine::load_data(cfg).expect("data");
    let embed = |items: &[handid_trainer::data::Item]| -> Vec<f32> {
        let images: Vec<_> = items
            .iter()
            .map(|i| handid_model::decode(&std::fs::read(&i.path).unwrap(), &Default::default()).unwrap())
            .collect();
        Vec::try_from(embedder.embed_images(&images).unwrap().flatten(0, 1)).unwrap()
    };
    let (q, g) = (embed(&data.val_query), embed(&data.val_gallery));
    let dim = embedder.dim();
    let mut sim = Vec::new();
    for qv in q.chunks(dim) {
        for gv in g.chunks(dim) {
            sim.push(qv.iter().zip(gv).map(|(a, b)| a * b).sum::<f32>());
        }
    }
    let sim =
        handid_eval::metrics::Similarity::new(&sim, data.val_query.len(), data.val_gallery.len()).unwrap();
    let ids = |items: &[handid_trainer::data::Item]| items.iter().map(|i| i.label).collect::<Vec<_>>();
    let ranking =
        handid_eval::metrics::rank::Ranking::new(&sim, &ids(&data.val_query), &ids(&data.val_gallery))
            .unwrap();
    ranking.mean_ap(
        handid_eval::metrics::rank::ApKind::NonInterpolated,
        handid_eval::metrics::rank::QueryScope::All,
    )
}

#[test]
fn the_after_bnneck_feature_is_validated_exported_and_served_alike() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = dataset(dir.path());
    let method = FINETUNE
        .replace("EPOCHS", "3")
        .replace("  losses:", "  head: {neck_feat: after}\n  losses:");
    let cfg = config(&manifest, &method);
    let run = dir.path().join("run");
    let best = train(&cfg, &options(&run))
        .expect("run")
        .best
        .expect("validated")
        .val;

    let serving = dir.path().join("serving");
    let checkpoint = handid_trainer::engine::state::resolve(&run, "best").expect("best");
    let exported = handid_trainer::export::export(&checkpoint, &serving, None).expect("export");
    assert_eq!(
        exported.manifest.neck,
        Some(handid_model::checkpoint::Neck::BatchNorm)
    );
    let served = Tensor::read_safetensors(serving.join("model.safetensors")).expect("weights");
    let running_var = &served
        .iter()
        .find(|(n, _)| n == "neck.running_var")
        .expect("the neck is served")
        .1;
    assert!(
        f64::try_from((running_var - 1.0).abs().max()).unwrap() > 1e-3,
        "the neck's trained statistics are exported"
    );
    assert!(!served.iter().any(|(n, _)| n.starts_with("head.")));
    let map = served_val_map(&serving, &cfg);
    assert!(
        (map - best.map).abs() < 1e-6,
        "served {map} vs validated {}",
        best.map
    );

    // `after` needs a BNNeck.
    let mut bad = cfg.clone();
    if let handid_trainer::config::Method::Finetune(s) = &mut bad.method {
        s.head.bnneck = false;
    }
    let err = bad.validate().unwrap_err().to_string();
    assert!(err.contains("neck_feat"), "{err}");
}

#[test]
fn clip_reids_two_branches_are_served_as_validated_before_and_after_the_necks() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = dataset(dir.path());
    for neck in ["before", "after"] {
        let method = CLIP_REID.replace(
            "  stage2:\n",
            &format!("  stage2:\n    head: {{neck_feat: {neck}}}\n"),
        );
        let mut cfg = config(&manifest, &method);
        cfg.model.feature = handid_model::Feature::ClipReid;
        let run = dir.path().join(format!("run-{neck}"));
        let best = train(&cfg, &options(&run))
            .expect("run")
            .best
            .expect("validated")
            .val;
        let names: Vec<String> = weights(&run).into_iter().map(|(n, _)| n).collect();
        for head in [
            "head.classifier.weight",
            "head.classifier_proj.weight",
            "head.bottleneck_proj.weight",
        ] {
            assert!(names.iter().any(|n| n == head), "{head}: {names:?}");
        }
        let serving = dir.path().join(format!("serving-{neck}"));
        let checkpoint = handid_trainer::engine::state::resolve(&run, "best").expect("best");
        let exported = handid_trainer::export::export(&checkpoint, &serving, None).expect("export");
        let m = &exported.manifest;
        assert_eq!(m.feature, handid_model::Feature::ClipReid);
        // cat(class token 32, projection 16) of the tiny ViT.
        assert_eq!(m.embedding_dim, 48);
        assert_eq!(m.neck.is_some(), neck == "after");
        let map = served_val_map(&serving, &cfg);
        assert!(
            (map - best.map).abs() < 1e-6,
            "{neck}: served {map} vs validated {}",
            best.map
        );
    }
}

/// The dissertation's training switches: plain shuffled batches, a
/// schedule counted in optimizer steps, selection on Rank-1 and early stopping.
#[test]
fn plain_batches_step_schedules_and_early_stopping() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = dataset(dir.path());
    // A rate too small to change any ranking: every validation after the
    // first ties it, which is no improvement, so patience 2 ends the phase
    // after epoch 3 of 10; a tie still makes the later epoch the best (a
    // saturated validation must not export epoch 1's model).
    let method = "
method:
  kind: finetune
  epochs: 10
  losses: {id: {}, triplet: {margin: 0.3}}
  optim: {lr: 1.0e-12, schedule_unit: step, schedule: {kind: one_cycle, total_steps: 40, pct_start: 0.1, div_factor: 25.0, final_div_factor: 1.0e4}}
validation: {select_by: rank1, early_stop_patience: 2}
";
    let mut cfg = config(&manifest, method);
    cfg.data.sampler = handid_trainer::config::BatchSampler::Random { batch_size: 5 };
    let run = dir.path().join("run");
    let summary = train(&cfg, &options(&run)).expect("run");
    assert!(summary.finished);
    assert_eq!(summary.epochs, 3, "stopped early");
    assert_eq!(summary.best.expect("validated").epoch, 3);
    let best = handid_trainer::engine::state::resolve(&run, "best").expect("best");
    assert!(best.ends_with("best"), "{}", best.display());
    let (saved, _) = handid_trainer::engine::state::load(&best).expect("load");
    assert_eq!(saved.epoch, 3, "the best folder holds the last tied epoch");
    let csv = std::fs::read_to_string(run.join("metrics.csv")).expect("csv");
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 1 + 3, "{csv}");
    // 12 training persons x 5 images (one held out each) in batches of 5:
    // 12 optimizer steps per epoch, the schedule counting them.
    let header: Vec<&str> = rows[0].split(',').collect();
    let step = header.iter().position(|h| *h == "step").unwrap();
    assert_eq!(rows[1].split(',').nth(step), Some("12"), "{csv}");
    // A resume finds the phase over.
    let resumed = train(
        &cfg,
        &RunOptions {
            resume: true,
            ..options(&run)
        },
    )
    .expect("resume");
    assert!(resumed.finished);
    assert_eq!(resumed.epochs, 3);
}

#[test]
fn extra_training_splits_add_persons_but_never_a_test_person() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dataset(dir.path());
    let mut manifest = handid_eval::data::manifest::Manifest::read(&path).expect("manifest");
    let base = handid_trainer::engine::load_data(&config(&path, "method: {kind: zero_shot}")).expect("data");

    // Another trait of two training persons, as `splits --train-extra` writes it.
    let extra: Vec<_> = manifest
        .split("val")
        .into_iter()
        .take(2)
        .map(|e| handid_eval::data::manifest::Entry {
            split: "train_extra".into(),
            person: format!("palmar_left:{}", e.person),
            image: e.image.clone(),
        })
        .collect();
    manifest.entries.extend(extra);
    manifest.write(&path).expect("write");
    let with_extra = |path: &Path| {
        let mut cfg = config(path, "method: {kind: zero_shot}");
        cfg.data.extra_train_splits = vec!["train_extra".into()];
        handid_trainer::engine::load_data(&cfg)
    };
    let data = with_extra(&path).expect("data");
    assert_eq!(data.persons.len(), base.persons.len() + 2);
    assert_eq!(data.train.len(), base.train.len() + 2);
    assert!(data.persons.iter().any(|p| p.starts_with("palmar_left:")));

    // A test person's image, even under an aspect prefix, is refused by name.
    let test = manifest.split("test")[0].clone();
    manifest.entries.push(handid_eval::data::manifest::Entry {
        split: "train_extra".into(),
        person: format!("dorsal_left:{}", test.person),
        image: test.image,
    });
    manifest.write(&path).expect("write");
    let err = with_extra(&path).expect_err("a test person trains").to_string();
    assert!(err.contains("test person") && err.contains(&test.person), "{err}");

    // A named extra split that is absent is an error too.
    let mut cfg = config(&path, "method: {kind: zero_shot}");
    cfg.data.extra_train_splits = vec!["nope".into()];
    let err = handid_trainer::engine::load_data(&cfg)
        .expect_err("absent split")
        .to_string();
    assert!(err.contains("nope"), "{err}");
}

/// A run in which every training image is its own person (how a
/// side-information model is trained without identities) has no genuine
/// pair to calibrate on: export refuses and leaves no checkpoint a server
/// could load without thresholds; `export_uncalibrated` writes it.
#[test]
fn a_run_without_two_images_of_a_person_exports_only_uncalibrated() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = dataset(dir.path());
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    let own: String = text
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            match fields.as_slice() {
                _ if line.starts_with('#') => Some(format!("{line}\n")),
                ["train", _, image] => Some(format!("train\t{}\t{image}\n", image.replace('/', "_"))),
                _ => None,
            }
        })
        .collect();
    let own_manifest = dir.path().join("own.tsv");
    std::fs::write(&own_manifest, own).expect("own manifest");
    let run = dir.path().join("run");
    let summary = train(
        &config(&own_manifest, "method: {kind: zero_shot}"),
        &options(&run),
    )
    .expect("run");
    assert!(summary.best.is_none(), "no validation split");
    let checkpoint = handid_trainer::engine::state::resolve_default(&run).expect("latest");

    let serving = dir.path().join("serving");
    let err = handid_trainer::export::export(&checkpoint, &serving, None).expect_err("no genuine pairs");
    let err = format!("{err:#}");
    assert!(
        err.contains("two persons with two images") && err.contains("--uncalibrated"),
        "{err}"
    );
    assert!(
        !serving.join("handid.yaml").exists() && !serving.join("model.safetensors").exists(),
        "nothing half-written"
    );

    let m = handid_trainer::export::export_uncalibrated(&checkpoint, &serving).expect("uncalibrated");
    assert!(m.thresholds.is_empty());
    let served = Embedder::load(&serving, tch::Device::Cpu).expect("loads");
    assert_eq!(served.model_id(), m.model_id);

    // A run with persons but an image gone by export time: the error names
    // the image and does not suggest an uncalibrated export.
    let labelled = dir.path().join("labelled");
    train(
        &config(&manifest, "method: {kind: zero_shot}"),
        &options(&labelled),
    )
    .expect("run");
    let checkpoint = handid_trainer::engine::state::resolve(&labelled, "best").expect("best");
    let gone = handid_eval::data::manifest::Manifest::read(&manifest)
        .expect("manifest")
        .split("train")[0]
        .image
        .clone();
    std::fs::remove_file(dir.path().join("data").join(&gone)).expect("remove an image");
    let serving = dir.path().join("serving-labelled");
    let err = handid_trainer::export::export(&checkpoint, &serving, None).expect_err("an image is gone");
    let err = format!("{err:#}");
    assert!(err.contains(&gone) && !err.contains("--uncalibrated"), "{err}");
    assert!(!serving.join("handid.yaml").exists(), "nothing half-written");
}
