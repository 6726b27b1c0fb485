//! Starting from CLIP weights, as users do: a small but complete CLIP (both
//! towers, OpenAI key names) written to a file, loaded strictly, and every
//! committed config's method trained from it for an epoch of each phase.

// A panic in a test is a failure with a location.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use handid_eval::data::synthetic::{self, Layout, SynthOptions};
use handid_eval::data::{MissingImages, folder, splits};
use handid_model::{Backbone, Clip, ClipConfig, ClipVisionConfig};
use handid_trainer::config::{Arch, Method, TrainConfig};
use handid_trainer::engine::{RunOptions, train};
use handid_trainer::net::ReidNet;
use tch::{Device, Tensor, nn};

/// 8 persons x 4 images, 64 px: a quarter of the persons are test persons.
fn dataset(dir: &Path) -> PathBuf {
    let root = dir.join("data");
    synthetic::generate(
        &root,
        &SynthOptions {
            persons: 8,
            images_per_person: 4,
            size: 64,
            seed: 5,
            layout: Layout::Folder,
        },
    )
    .unwrap();
    let dataset = folder::load(&root, MissingImages::Fail).unwrap();
    let manifest =
        splits::by_fraction(&dataset, 0.25, splits::SplitOptions { seed: 1, n_splits: 1 }).unwrap();
    let path = dir.join("splits.tsv");
    manifest.write(&path).unwrap();
    path
}

/// A random CLIP of `arch`'s towers saved with OpenAI's keys, as a user's
/// `ViT-B-16.pt` / `RN50.pt` holds them (both towers and `logit_scale`).
fn clip_file(dir: &Path, arch: Arch) -> PathBuf {
    let (vision, text) = arch.towers();
    let vs = nn::VarStore::new(Device::Cpu);
    tch::manual_seed(11);
    Clip::new(vs.root(), &ClipConfig { vision, text }).unwrap();
    let path = dir.join(format!("{arch:?}.safetensors"));
    let tensors = handid_model::checkpoint::named_variables(&vs);
    Tensor::write_safetensors(&tensors, &path).unwrap();
    path
}

fn options(out: &Path) -> RunOptions {
    RunOptions {
        out: out.to_owned(),
        resume: false,
        stop_after_epoch: None,
        progress: false,
        keep_checkpoints: 1,
    }
}

/// `config` at test size: its method and its recipe's choices kept (the
/// tiny tower of the same family, a ResNet's last stride), one epoch per
/// phase, small batches.
fn shrunk(mut config: TrainConfig, manifest: &Path, weights: &Path, arch: Arch) -> TrainConfig {
    config.device = "cpu".to_owned();
    config.model.arch = arch;
    config.model.vision = None;
    config.model.text = None;
    config.model.clip_weights = Some(weights.to_owned());
    config.model.input_size = config
        .model
        .input_size
        .map(|_| [arch.towers().0.image_size as u32; 2]);
    config.model.unfreeze_last_blocks = config.model.unfreeze_last_blocks.map(|n| n.min(1));
    config.data.manifest = manifest.to_owned();
    config.data.root = None;
    config.data.extra_train_splits.clear();
    config.data.persons_per_batch = 3;
    config.data.images_per_person = 2;
    config.data.workers = 1;
    config.validation.batch_size = 16;
    match &mut config.method {
        Method::ZeroShot => {}
        Method::Finetune(s) => s.epochs = 1,
        Method::ClipReid { stage1, stage2 } => {
            stage1.epochs = 1;
            stage1.batch_size = 4;
            stage2.epochs = 1;
        }
        Method::PromptSg { prompt, train } => {
            train.epochs = 1;
            prompt.heads = 2;
            prompt.inversion_hidden = 32;
        }
    }
    if let Some(stage) = config.method.stage2_mut() {
        stage.optim.precision = handid_trainer::config::TrainPrecision::F32;
    }
    config.validate().unwrap();
    config
}

#[test]
fn every_committed_config_trains_from_clip_weights() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dataset(dir.path());
    let vit = clip_file(dir.path(), Arch::TinyVit);
    let resnet = clip_file(dir.path(), Arch::TinyResnet);
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut kinds = std::collections::BTreeSet::new();
    let mut names: Vec<PathBuf> = std::fs::read_dir(&configs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("server.yaml"))
        .collect();
    names.sort();
    for path in names {
        let config = TrainConfig::read(&path).unwrap();
        let resnet_family = matches!(config.model.vision().backbone, Backbone::ModifiedResnet { .. });
        let (arch, weights) = if resnet_family {
            (Arch::TinyResnet, &resnet)
        } else {
            (Arch::TinyVit, &vit)
        };
        let config = shrunk(config, &manifest, weights, arch);
        let kind = format!(
            "{}/{arch:?}",
            serde_yaml::to_value(&config.method).unwrap()["kind"]
                .as_str()
                .unwrap()
        );
        let out = dir.path().join(&config.name);
        let summary = train(&config, &options(&out)).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        assert!(summary.finished, "{}", path.display());
        kinds.insert(kind);
    }
    // Every method on both families: the ones no committed config covers
    // with the method's own defaults (its paper's recipe).
    for kind in ["zero_shot", "finetune", "clip_reid", "prompt_sg"] {
        for (arch, weights) in [(Arch::TinyVit, &vit), (Arch::TinyResnet, &resnet)] {
            if kinds.contains(&format!("{kind}/{arch:?}")) {
                continue;
            }
            let config = TrainConfig::from_yaml(&format!(
                "name: default_{kind}_{arch:?}\ndata: {{manifest: m}}\nmethod: {{kind: {kind}}}\n"
            ))
            .unwrap();
            let config = shrunk(config, &manifest, weights, arch);
            let out = dir.path().join(&config.name);
            let summary =
                train(&config, &options(&out)).unwrap_or_else(|e| panic!("{kind} on {arch:?}: {e:#}"));
            assert!(summary.finished);
        }
    }
    assert!(
        kinds.len() >= 6,
        "the committed configs cover most methods and families: {kinds:?}"
    );
}

/// Tensors by name, as a weights file holds them.
type Named = Vec<(String, Tensor)>;

/// The net a config builds, with a fresh seed.
fn net_for(arch: Arch, last_stride: Option<i64>, method: &str) -> ReidNet {
    let config = TrainConfig::from_yaml(&format!(
        "name: t\ndata: {{manifest: m}}\nmodel: {{arch: {}, last_stride: {}}}\nmethod: {method}\n",
        serde_yaml::to_value(arch).unwrap().as_str().unwrap(),
        last_stride.map_or("null".to_owned(), |s| s.to_string())
    ))
    .unwrap();
    ReidNet::build(&config, 4, Device::Cpu).unwrap()
}

#[test]
fn clip_weights_load_strictly_and_leave_the_new_modules_to_their_initialisers() {
    let dir = tempfile::tempdir().unwrap();
    let file = clip_file(dir.path(), Arch::TinyVit);
    let saved: std::collections::BTreeMap<String, Tensor> =
        Tensor::read_safetensors(&file).unwrap().into_iter().collect();

    for method in [
        "{kind: clip_reid}",
        "{kind: prompt_sg, prompt: {heads: 2}}",
        "{kind: finetune}",
    ] {
        let net = net_for(Arch::TinyVit, None, method);
        let before: Vec<(String, Tensor)> = handid_model::checkpoint::named_variables(&net.vs)
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect();
        net.load_clip_weights(&file)
            .unwrap_or_else(|e| panic!("{method}: {e:#}"));
        for (name, old) in before {
            let now = &net.vs.variables()[&name];
            match saved.get(&name) {
                // Every CLIP tensor comes from the file...
                Some(w) => assert!(now.equal(w), "{method}: {name} not loaded"),
                // ... and the modules the method adds keep their initialisers.
                None => {
                    assert!(
                        handid_trainer::net::NEW_MODULES
                            .iter()
                            .any(|p| name.starts_with(p)),
                        "{method}: {name} is neither CLIP's nor new"
                    );
                    assert!(now.equal(&old), "{method}: {name} was overwritten");
                }
            }
        }
    }

    // A tensor this CLIP does not have, a missing one, a misshapen one:
    // refused, each named.
    let net = net_for(Arch::TinyVit, None, "{kind: finetune}");
    let write = |name: &str, edit: &dyn Fn(&mut Named)| {
        let mut tensors: Vec<(String, Tensor)> = saved
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        edit(&mut tensors);
        let path = dir.path().join(name);
        Tensor::write_safetensors(&tensors, &path).unwrap();
        path
    };
    let extra = write("extra.safetensors", &|t| {
        t.push((
            "visual.extra_head.weight".into(),
            Tensor::zeros([2], tch::kind::FLOAT_CPU),
        ))
    });
    let err = format!("{:#}", net.load_clip_weights(&extra).unwrap_err());
    assert!(
        err.contains("visual.extra_head.weight") && err.contains("does not have"),
        "{err}"
    );
    let missing = write("missing.safetensors", &|t| {
        t.retain(|(n, _)| n != "ln_final.weight")
    });
    let err = format!("{:#}", net.load_clip_weights(&missing).unwrap_err());
    assert!(err.contains("ln_final.weight") && err.contains("lacks"), "{err}");
    let other = clip_file(dir.path(), Arch::TinyResnet);
    let err = format!("{:#}", net.load_clip_weights(&other).unwrap_err());
    assert!(err.contains("lacks") && err.contains("does not have"), "{err}");

    // OpenAI's archives also carry three model constants, which are not weights.
    let with_constants = write("constants.safetensors", &|t| {
        for key in ["input_resolution", "context_length", "vocab_size"] {
            t.push((key.into(), Tensor::from(77i64)));
        }
    });
    net.load_clip_weights(&with_constants).unwrap();
}

#[test]
fn a_last_stride_one_resnet_resizes_the_pool_grid_of_openai_weights() {
    let dir = tempfile::tempdir().unwrap();
    // OpenAI's layout: the pool's grid for stride 32 (2 x 2 at 64 px).
    let file = clip_file(dir.path(), Arch::TinyResnet);
    let net = net_for(Arch::TinyResnet, Some(1), "{kind: clip_reid}");
    let pool = "visual.attnpool.positional_embedding";
    assert_eq!(net.vs.variables()[pool].size(), [17, 128]);
    net.load_clip_weights(&file).unwrap();
    let saved: std::collections::BTreeMap<String, Tensor> =
        Tensor::read_safetensors(&file).unwrap().into_iter().collect();
    let expected = handid_model::vit::resize_positional_embedding(&saved[pool], 4).unwrap();
    assert!(net.vs.variables()[pool].equal(&expected));
    let mut cfg = ClipVisionConfig::tiny_resnet();
    cfg.backbone = Backbone::ModifiedResnet {
        layers: [1, 1, 1, 1],
        last_stride: 1,
    };
    assert_eq!(cfg.architecture(), "resnet-w4-l1-1-1-1-r64-s1");
}
