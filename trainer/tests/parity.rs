//! Step parity with the reference implementations: the official CLIP-ReID
//! code (Syliz517/CLIP-ReID at eb1898b, stage 1 and stage 2, ViT and
//! ResNet) and a PyTorch PromptSG written from the paper's equations ran
//! three optimizer steps on a tiny CLIP from a fixed batch; here the trainer
//! runs the same three steps from the same weights and compares every loss
//! term and every trained parameter (and BatchNorm statistic) after them.
//!
//! Fixtures: `tests/fixtures/parity/*.safetensors`, written by
//! `scripts/fixtures/parity/make_clipreid_parity.py` and
//! `make_promptsg_parity.py` (see that folder's README). No weight is stored:
//! both sides draw every initial tensor from [`init`], a pure function of
//! the tensor's name (`scripts/fixtures/parity/parity_init.py`).

// A panic in a test is a failure with a location.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use handid_trainer::config::TrainConfig;
use handid_trainer::engine::{ImageTrainer, PromptTrainer, TermValue};
use handid_trainer::net::ReidNet;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// The tolerance of the issue: fp32 on the CPU, after three steps.
const TOLERANCE: f64 = 1e-5;

/// `parity_init.py` in Rust: the initial value of every tensor by name.
mod init {
    use tch::Tensor;

    fn fnv1a64(name: &str) -> u64 {
        name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    }

    fn splitmix64(x: u64) -> u64 {
        let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// `(center, scale)` of the tensor `name` (scale 0: a constant).
    fn rule(name: &str, shape: &[i64]) -> (f64, f64) {
        let ends = |s: &str| name.ends_with(s);
        if name == "logit_scale" {
            return ((1.0f64 / 0.07).ln(), 0.0);
        }
        if ends("num_batches_tracked") {
            return (0.0, 0.0);
        }
        if ends("running_var") {
            return (1.0, 0.2);
        }
        if ends("running_mean") {
            return (0.0, 0.1);
        }
        if shape.len() == 1 && ends("weight") {
            return (1.0, 0.1);
        }
        if shape.len() == 1 && ends("bias") {
            return (0.0, 0.05);
        }
        if ends("positional_embedding") || ends("class_embedding") {
            return (0.0, 0.1);
        }
        if ends("token_embedding.weight") {
            return (0.0, 0.05);
        }
        if ends("cls_ctx") {
            return (0.0, 0.05);
        }
        if name.starts_with("input.") {
            return (0.0, 1.0);
        }
        if name == "visual.proj" || name == "text_projection" {
            return (0.0, (shape[0] as f64).powf(-0.5));
        }
        let numel: i64 = shape.iter().product();
        let fan_in = if shape.first().is_some_and(|&d| d > 0) {
            numel / shape[0]
        } else {
            1
        };
        if shape.len() == 4 {
            // Convolutions: He's variance (see parity_init.py).
            return (0.0, (6.0 / fan_in as f64).sqrt());
        }
        (0.0, (fan_in as f64).powf(-0.5))
    }

    /// The f32 tensor `name` of `shape`.
    pub fn tensor(name: &str, shape: &[i64]) -> Tensor {
        let (center, scale) = rule(name, shape);
        let seed = fnv1a64(name);
        let numel: i64 = shape.iter().product();
        let values: Vec<f32> = (0..numel as u64)
            .map(|i| {
                if scale == 0.0 {
                    return center as f32;
                }
                let u = (splitmix64(seed.wrapping_add(i)) >> 40) as f64 / (1u64 << 24) as f64;
                (center + scale * (2.0 * u - 1.0)) as f32
            })
            .collect();
        Tensor::from_slice(&values).view(shape)
    }
}

/// A fixture: its tensors by name and its `meta` JSON.
struct Fixture {
    name: String,
    tensors: BTreeMap<String, Tensor>,
    meta: Value,
}

impl Fixture {
    fn read(name: &str) -> Self {
        let path: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/parity")
            .join(format!("{name}.safetensors"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
        let meta = serde_json::from_str(header["__metadata__"]["meta"].as_str().unwrap()).unwrap();
        let tensors = Tensor::read_safetensors(&path).unwrap().into_iter().collect();
        Self {
            name: name.to_owned(),
            tensors,
            meta,
        }
    }

    fn get(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("{}: no tensor {name}", self.name))
    }

    fn scalar(&self, name: &str) -> f64 {
        self.get(name).double_value(&[])
    }

    fn labels(&self) -> Tensor {
        self.get("labels").to_kind(Kind::Int64)
    }

    /// Every generated tensor whose checksum the fixture recorded is
    /// generated here with the same sum: both sides start from the same weights.
    fn check_init(&self) {
        for (name, sum) in self.meta["init_checksums"].as_object().unwrap() {
            let shape: Vec<i64> = sum["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_i64().unwrap())
                .collect();
            let ours = init::tensor(name, &shape).to_kind(Kind::Double).sum(Kind::Double);
            let theirs = sum["fsum"].as_f64().unwrap();
            assert!(
                (ours.double_value(&[]) - theirs).abs() <= 1e-9 * theirs.abs().max(1.0),
                "{}: {name} sums to {} here, {theirs} in the reference",
                self.name,
                ours.double_value(&[])
            );
        }
    }

    fn images(&self, shape: &[i64]) -> Tensor {
        init::tensor("input.images", shape)
    }
}

/// The net `yaml` describes, every variable set to its [`init`] value.
fn net(yaml: &str, classes: i64) -> (TrainConfig, ReidNet) {
    let config = TrainConfig::from_yaml(yaml).unwrap();
    let net = ReidNet::build(&config, classes, Device::Cpu).unwrap();
    tch::no_grad(|| {
        for (name, var) in net.vs.variables() {
            var.shallow_clone().copy_(&init::tensor(&name, &var.size()));
        }
    });
    net.refresh_simplified_text().unwrap();
    (config, net)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    if a.numel() == 0 {
        return 0.0;
    }
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// Compares one step's loss terms with `step{k}.loss.*`; `rename` maps our
/// term names to the fixture's.
fn check_losses(fixture: &Fixture, step: usize, ours: &[TermValue], rename: &[(&str, &str)]) {
    let mut seen = 0;
    for term in ours {
        let name = rename
            .iter()
            .find(|(o, _)| *o == term.name)
            .map_or(term.name.as_str(), |(_, t)| *t);
        let theirs = fixture.scalar(&format!("step{step}.loss.{name}"));
        assert!(
            (term.value - theirs).abs() <= TOLERANCE,
            "{} step {step}: {} is {} here, {theirs} in the reference",
            fixture.name,
            term.name,
            term.value
        );
        seen += 1;
    }
    let total: f64 = ours.iter().map(|t| t.weighted).sum();
    let theirs = fixture.scalar(&format!("step{step}.loss.total"));
    assert!(
        (total - theirs).abs() <= TOLERANCE,
        "{} step {step}: the total is {total} here, {theirs} in the reference",
        fixture.name
    );
    let expected = fixture
        .tensors
        .keys()
        .filter(|k| k.starts_with(&format!("step{step}.loss.")) && !k.ends_with(".total"))
        .count();
    assert_eq!(seen, expected, "{} step {step}: loss terms", fixture.name);
}

/// Every `final.*` tensor equals the net's variable of that name within
/// [`TOLERANCE`], every one moved from its initial value by much more than
/// that, and the trained variables are exactly the reference's.
///
/// Elements the fixture marks ill-conditioned (`flat.*`: where the
/// reference's own f32 and f64 runs disagree beyond a tenth of the
/// tolerance) have a true gradient of zero, by an invariance of the model
/// (an attention's key bias, a bias before a train-mode BatchNorm...): their
/// rounding-noise gradients make Adam move them by up to its learning rate
/// either way in any implementation. They are held to that bound instead:
/// both sides moved them by at most `drift` (three steps of the largest rate).
fn check_params(fixture: &Fixture, net: &ReidNet, drift: f64) {
    let vars = net.vs.variables();
    let mut worst = (0.0f64, String::new());
    let mut checked = 0;
    let mut masked = 0i64;
    for (key, theirs) in &fixture.tensors {
        let Some(name) = key.strip_prefix("final.") else {
            continue;
        };
        let ours = vars
            .get(name)
            .unwrap_or_else(|| panic!("{}: the net has no {name}", fixture.name));
        assert_eq!(ours.size(), theirs.size(), "{}: {name}", fixture.name);
        let init = init::tensor(name, &theirs.size());
        let (ours, theirs, init) = match fixture.tensors.get(&format!("flat.{name}")) {
            Some(flat) => {
                let flat = flat.to_kind(Kind::Bool);
                masked += flat.sum(Kind::Int64).int64_value(&[]);
                // Adam bounds what a parameter's noise can do; a BatchNorm
                // statistic follows its (drifting) input instead.
                let statistic = name.ends_with("running_mean") || name.ends_with("running_var");
                for (side, t) in [("here", ours), ("in the reference", theirs)] {
                    let moved = max_abs_diff(&t.masked_select(&flat), &init.masked_select(&flat));
                    assert!(
                        statistic || moved <= drift,
                        "{}: the ill-conditioned elements of {name} moved {moved} {side}, more than Adam's {drift}",
                        fixture.name
                    );
                }
                let keep = flat.logical_not();
                (
                    ours.masked_select(&keep),
                    theirs.masked_select(&keep),
                    init.masked_select(&keep),
                )
            }
            None => (ours.shallow_clone(), theirs.shallow_clone(), init),
        };
        let diff = max_abs_diff(&ours, &theirs);
        if diff > worst.0 {
            worst = (diff, name.to_owned());
        }
        let moved = max_abs_diff(&theirs, &init);
        assert!(
            theirs.numel() == 0 || moved > 10.0 * TOLERANCE,
            "{}: {name} moved only {moved} in three steps: the comparison would prove nothing",
            fixture.name
        );
        checked += 1;
    }
    assert!(
        worst.0 <= TOLERANCE,
        "{}: {} differs by {} after three steps",
        fixture.name,
        worst.1,
        worst.0
    );
    let trained: Vec<&String> = vars
        .iter()
        .filter(|(_, v)| v.requires_grad())
        .map(|(n, _)| n)
        .filter(|n| !fixture.tensors.contains_key(&format!("final.{n}")))
        .collect();
    assert!(
        trained.is_empty(),
        "{}: trained here but not in the reference: {trained:?}",
        fixture.name
    );
    eprintln!(
        "{}: {checked} tensors ({masked} ill-conditioned elements held to {drift:.1e}), largest difference {:.2e} ({})",
        fixture.name, worst.0, worst.1
    );
}

const VIT_TOWERS: &str = "
  vision: {backbone: {kind: vit, patch_size: 16, layers: 12}, width: 32, heads: 2, image_size: 32, output_dim: 16}
  text: {context_length: 77, vocab_size: 49408, width: 32, heads: 2, layers: 1, output_dim: 16}";
const RN_TOWERS: &str = "
  vision: {backbone: {kind: modified_resnet, layers: [1, 1, 1, 1], last_stride: 1}, width: 4, heads: 2, image_size: 64, output_dim: 16}
  text: {context_length: 77, vocab_size: 49408, width: 32, heads: 2, layers: 1, output_dim: 16}";

/// CLIP-ReID's config for the fixture: its yml's recipe, the fixture's
/// learning rate, CLIP-ReID's prompt ("... person.").
fn clip_reid_yaml(fixture: &Fixture, towers: &str) -> String {
    let s2 = &fixture.meta["stage2"];
    let (lr2, wd2, id_weight) = if s2.is_object() {
        (
            s2["optimizer"]["base_lr"].as_f64().unwrap(),
            s2["optimizer"]["weight_decay"].as_f64().unwrap(),
            s2["loss_weights"]["id"].as_f64().unwrap(),
        )
    } else {
        (5e-6, 1e-4, 0.25)
    };
    let sched = &s2["scheduler"];
    let (factor, milestones) = if sched.is_object() {
        (
            sched["warmup_factor"].as_f64().unwrap(),
            sched["milestones"].to_string(),
        )
    } else {
        (0.1, "[30, 50]".to_owned())
    };
    let s1 = &fixture.meta["stage1"];
    let (epochs1, batch1) = if s1.is_object() {
        (
            s1["scheduler"]["t_initial"].as_u64().unwrap(),
            s1["ims_per_batch"].as_u64().unwrap(),
        )
    } else {
        (120, 64)
    };
    format!(
        "
name: parity
data: {{manifest: unused}}
model:
  arch: vit_b16{towers}
  feature: clip_reid
method:
  kind: clip_reid
  stage1:
    template: 'A photo of a {{}} person.'
    batch_size: {batch1}
    epochs: {epochs1}
    optim:
      schedule: {{kind: cosine, warmup_steps: 5, warmup_factor: {wf}, total_steps: {epochs1}, min_factor: {mf}}}
  stage2:
    losses:
      id: {{weight: {id_weight}}}
      triplet: {{features: [penultimate, backbone, projected]}}
      i2t: {{}}
    optim:
      lr: {lr2}
      weight_decay: {wd2}
      bias_weight_decay: {wd2}
      schedule: {{kind: step, warmup_steps: 10, warmup_factor: {factor}, milestones: {milestones}, gamma: 0.1}}
",
        wf = 1e-5 / 3.5e-4,
        mf = 1e-6 / 3.5e-4,
    )
}

fn clip_reid_stage1(name: &str, towers: &str, image: [i64; 2]) {
    let fixture = Fixture::read(name);
    fixture.check_init();
    let labels = fixture.labels();
    let classes = fixture.meta["num_classes"].as_i64().unwrap();
    let (config, net) = net(&clip_reid_yaml(&fixture, towers), classes);
    let n = labels.size()[0];
    let images = fixture.images(&[n, 3, image[0], image[1]]);
    let features = net.projected_features(&images).unwrap();
    let cached = max_abs_diff(&features, fixture.get("cache.image_features"));
    assert!(
        cached <= TOLERANCE,
        "{name}: cached image features differ by {cached}"
    );
    let handid_trainer::config::Method::ClipReid { stage1, .. } = &config.method else {
        panic!()
    };
    let mut trainer = PromptTrainer::new(&net, stage1, features, labels).unwrap();
    let batches: Vec<Vec<i64>> = serde_json::from_value(fixture.meta["stage1"]["batches"].clone()).unwrap();
    assert_eq!(batches.len(), 3, "three steps, the last batch partial");
    for (k, batch) in batches.iter().enumerate() {
        let terms = trainer.batch(batch, 0).unwrap();
        check_losses(&fixture, k + 1, &terms, &[]);
        let lr = stage1.optim.lr * trainer.lr_factor(0);
        assert!((lr - fixture.scalar(&format!("step{}.lr.weight", k + 1))).abs() < 1e-12);
    }
    drop(trainer);
    check_params(&fixture, &net, 3.0 * 3.0 * stage1.optim.lr);
}

fn clip_reid_stage2(name: &str, towers: &str, image: [i64; 2]) {
    let fixture = Fixture::read(name);
    fixture.check_init();
    let labels = fixture.labels();
    let classes = fixture.meta["num_classes"].as_i64().unwrap();
    let (config, net) = net(&clip_reid_yaml(&fixture, towers), classes);
    let images = fixture.images(&[labels.size()[0], 3, image[0], image[1]]);
    let all = Tensor::arange(classes, (Kind::Int64, Device::Cpu));
    let learner = net.prompt_learner.as_ref().unwrap();
    let text = tch::no_grad(|| learner.text_features(&net.clip.text, &all)).unwrap();
    let diff = max_abs_diff(&text, fixture.get("step1.text"));
    assert!(
        diff <= TOLERANCE,
        "{name}: stage-1 text features differ by {diff}"
    );
    let stage = config.method.stage2().unwrap();
    let mut trainer = ImageTrainer::new(&net, stage, Some(text), None, classes, config.seed).unwrap();
    for epoch in 0..3u64 {
        let terms = trainer.batch(&images, &labels, epoch, true).unwrap();
        check_losses(&fixture, epoch as usize + 1, &terms, &[]);
        let factor = trainer.lr_factor(epoch);
        let lr = |key: &str| fixture.scalar(&format!("step{}.lr.{key}", epoch + 1));
        assert!(
            (stage.optim.lr * factor - lr("weight")).abs() < 1e-12,
            "epoch {epoch}"
        );
        assert!(
            (stage.optim.lr * 2.0 * factor - lr("bias")).abs() < 1e-12,
            "epoch {epoch}"
        );
    }
    check_params(&fixture, &net, 3.0 * 3.0 * 2.0 * stage.optim.lr);
}

#[test]
fn clip_reid_vit_stage1_matches_the_official_code() {
    clip_reid_stage1("clipreid_vit_stage1", VIT_TOWERS, [32, 32]);
}

#[test]
fn clip_reid_resnet_stage1_matches_the_official_code() {
    clip_reid_stage1("clipreid_rn_stage1", RN_TOWERS, [64, 64]);
}

#[test]
fn clip_reid_vit_stage2_matches_the_official_code() {
    clip_reid_stage2("clipreid_vit_stage2", VIT_TOWERS, [32, 32]);
}

#[test]
fn clip_reid_resnet_stage2_matches_the_official_code() {
    clip_reid_stage2("clipreid_rn_stage2", RN_TOWERS, [64, 64]);
}

#[test]
fn promptsg_matches_the_papers_equations() {
    let fixture = Fixture::read("promptsg_vit");
    fixture.check_init();
    let m = &fixture.meta;
    let opt = &m["optimizer"];
    let yaml = format!(
        "
name: parity
data: {{manifest: unused}}
model:
  arch: vit_b16
  vision: {{backbone: {{kind: vit, patch_size: 16, layers: 3}}, width: 32, heads: 2, image_size: 32, output_dim: 16}}
  text: {{context_length: 77, vocab_size: 49408, width: 32, heads: 2, layers: 1, output_dim: 16}}
method:
  kind: prompt_sg
  prompt: {{heads: {heads}, blocks: {blocks}, inversion_hidden: {hidden}}}
  train:
    optim:
      lr: {lr}
      head_lr: {head_lr}
      weight_decay: {wd}
      schedule: {{kind: constant}}
",
        heads = m["promptsg"]["interaction_heads"],
        blocks = m["promptsg"]["interaction_blocks"],
        hidden = m["promptsg"]["inversion_hidden"],
        lr = opt["lr_visual"],
        head_lr = opt["lr_new"],
        wd = opt["weight_decay"],
    );
    let classes = m["classes"].as_i64().unwrap();
    let (config, net) = net(&yaml, classes);
    let sg = net.promptsg.as_ref().unwrap();
    assert_eq!(
        sg.composed.slot(),
        m["slot"].as_i64().unwrap(),
        "the pseudo-word's place"
    );
    let labels = fixture.labels();
    let images = fixture.images(&[labels.size()[0], 3, 32, 32]);
    let stage = config.method.stage2().unwrap();
    let mut trainer = ImageTrainer::new(&net, stage, None, None, classes, config.seed).unwrap();
    let rename = [("image_text_i2t", "i2t"), ("image_text_t2i", "t2i")];
    for epoch in 0..3u64 {
        let terms = trainer.batch(&images, &labels, epoch, true).unwrap();
        check_losses(&fixture, epoch as usize + 1, &terms, &rename);
    }
    let largest_lr = stage.optim.head_lr.unwrap_or(stage.optim.lr).max(stage.optim.lr);
    check_params(&fixture, &net, 3.0 * 3.0 * largest_lr);
    // Inference: the simplified prompt's feature and the fused embedding it queries.
    net.refresh_simplified_text().unwrap();
    let simplified = sg.head.simplified_text.shallow_clone();
    let diff = max_abs_diff(
        &simplified.view([-1]),
        &fixture.get("eval.simplified_text").view([-1]),
    );
    assert!(
        diff <= TOLERANCE,
        "the simplified prompt's feature differs by {diff}"
    );
    let (_, tokens) = net
        .clip
        .visual
        .forward_feature_and_tokens(&images, handid_model::Feature::Projected)
        .unwrap();
    let fused = tch::no_grad(|| sg.head.forward(&tokens)).unwrap();
    let mut theirs = fixture.get("eval.fused_simplified").shallow_clone();
    let mut fused = fused;
    if let Some(flat) = fixture.tensors.get("flat.eval.fused_simplified") {
        // Every row adds the partly ill-conditioned `interaction.ln_post.bias`.
        let keep = flat.to_kind(Kind::Bool).logical_not();
        (fused, theirs) = (fused.masked_select(&keep), theirs.masked_select(&keep));
    }
    let diff = max_abs_diff(&fused, &theirs);
    assert!(diff <= TOLERANCE, "the served fused feature differs by {diff}");
}
