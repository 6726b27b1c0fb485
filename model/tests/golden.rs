//! Our CLIP against the Python reference: open_clip 3.3.0 on torch 2.11.0.
//!
//! Every fixture under tests/fixtures/ comes from
//! scripts/fixtures/make_clip_fixtures.py (random weights in OpenAI key
//! naming, inputs, and open_clip's outputs); rerun it to regenerate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use handid_model::checkpoint::load_strict;
use handid_model::tokenizer::CONTEXT_LENGTH;
use handid_model::tokenizer::ftfy::fix_text;
use handid_model::vit::VisionTransformer;
use handid_model::{
    Clip, ClipConfig, ClipTextConfig, ClipVisionConfig, ImageEncoder, TextTransformer, Tokenizer,
};
use tch::{Device, Tensor, nn};

const TOLERANCE: f64 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The fixture's model weights, and its `input.*` / `expected.*` tensors by name.
fn read_fixture(name: &str) -> (Vec<(String, Tensor)>, BTreeMap<String, Tensor>) {
    let all = Tensor::read_safetensors(fixture(name)).expect("fixture (run make_clip_fixtures.py)");
    let (io, weights): (Vec<_>, Vec<_>) = all
        .into_iter()
        .partition(|(k, _)| k.starts_with("input.") || k.starts_with("expected."));
    (weights, io.into_iter().collect())
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

#[test]
fn vit_matches_open_clip_pooled_features_and_patch_tokens() {
    let (weights, io) = read_fixture("tiny_vit.safetensors");
    let vs = nn::VarStore::new(Device::Cpu);
    // make_clip_fixtures.py TINY_VIT: layers 2, width 32, head_width 16 (2 heads), patch 8, image 32; embed 16.
    let vit = VisionTransformer::new(vs.root() / "visual", &ClipVisionConfig::tiny_vit(), 8, 2);
    load_strict(&vs, weights).expect("fixture weights fit our ViT exactly");
    let out = tch::no_grad(|| vit.forward(&io["input.pixels"])).expect("forward");
    let pooled = max_abs_diff(&out.pooled, &io["expected.pooled"]);
    let tokens = max_abs_diff(&out.tokens, &io["expected.tokens"]);
    eprintln!("ViT: pooled max abs diff {pooled:e}, patch tokens {tokens:e}");
    assert!(pooled <= TOLERANCE, "pooled differs by {pooled}");
    assert!(tokens <= TOLERANCE, "patch tokens differ by {tokens}");
}

#[test]
fn modified_resnet_matches_open_clip() {
    let (weights, io) = read_fixture("tiny_resnet.safetensors");
    let vs = nn::VarStore::new(Device::Cpu);
    // make_clip_fixtures.py TINY_RESNET: layers (1,1,1,1), width 2, head_width 32 (2 * 32 / 32 = 2 heads),
    // image 64; embed 16. Width 2 keeps the fixture small (the attention pool is 32 * width wide).
    let cfg = ClipVisionConfig {
        backbone: handid_model::Backbone::ModifiedResnet {
            layers: [1, 1, 1, 1],
            last_stride: 2,
        },
        width: 2,
        heads: 2,
        image_size: 64,
        output_dim: 16,
    };
    let encoder = ImageEncoder::new(vs.root() / "visual", &cfg).expect("config");
    load_strict(&vs, weights).expect("fixture weights fit our ResNet exactly");
    let pooled =
        tch::no_grad(|| encoder.forward_feature(&io["input.pixels"], handid_model::Feature::Projected))
            .expect("forward");
    let diff = max_abs_diff(&pooled, &io["expected.pooled"]);
    eprintln!("ModifiedResNet: pooled max abs diff {diff:e}");
    assert!(diff <= TOLERANCE, "pooled differs by {diff}");
}

#[test]
fn text_transformer_matches_open_clip() {
    let (mut weights, io) = read_fixture("tiny_text.safetensors");
    // logit_scale belongs to the whole model, not the text tower.
    weights.retain(|(k, _)| k != "logit_scale");
    let vs = nn::VarStore::new(Device::Cpu);
    // make_clip_fixtures.py TINY_TEXT: context 16, vocab 64, width 32, heads 2, layers 2; embed 16.
    let cfg = ClipTextConfig {
        context_length: 16,
        vocab_size: 64,
        width: 32,
        heads: 2,
        layers: 2,
        output_dim: 16,
    };
    let text = TextTransformer::new(vs.root(), &cfg);
    load_strict(&vs, weights).expect("fixture weights fit our text tower exactly");
    let features = tch::no_grad(|| text.forward(&io["input.ids"])).expect("forward");
    let diff = max_abs_diff(&features, &io["expected.features"]);
    eprintln!("text: features max abs diff {diff:e}");
    assert!(diff <= TOLERANCE, "text features differ by {diff}");
}

/// `name<TAB>d0,d1,...` lines of a key listing.
fn listing(name: &str) -> BTreeMap<String, Vec<i64>> {
    std::fs::read_to_string(fixture(name))
        .expect("listing")
        .lines()
        .map(|line| {
            let (key, shape) = line.split_once('\t').expect("tab");
            let dims = shape
                .split(',')
                .filter(|d| !d.is_empty())
                .map(|d| d.parse().expect("dim"))
                .collect();
            (key.to_owned(), dims)
        })
        .collect()
}

fn our_keys(cfg: &ClipConfig) -> BTreeMap<String, Vec<i64>> {
    let vs = nn::VarStore::new(Device::Cpu);
    Clip::new(vs.root(), cfg).expect("model");
    vs.variables().into_iter().map(|(k, v)| (k, v.size())).collect()
}

#[test]
fn full_size_models_have_exactly_open_clips_keys_and_shapes() {
    let vit = listing("openai_keys_vit_b16.tsv");
    assert_eq!(vit.len(), 302);
    assert_eq!(our_keys(&ClipConfig::vit_b16()), vit);

    // BatchNorm's `num_batches_tracked` is a training counter that inference
    // never reads; it is the one key we do not create (import drops it).
    let (counters, rn50): (BTreeMap<_, _>, BTreeMap<_, _>) = listing("openai_keys_rn50.tsv")
        .into_iter()
        .partition(|(k, _)| k.ends_with(".num_batches_tracked"));
    // 3 stem + 16 blocks x 3 + 4 downsample BatchNorms
    assert_eq!(counters.len(), 55);
    assert_eq!(our_keys(&ClipConfig::rn50()), rn50);
}

/// Every string of tokenizer.jsonl: a thousand random ones (scripts,
/// emoji, punctuation, numbers, long text) and two hundred that ftfy
/// repairs. Both the ftfy step and the ids must match exactly.
#[test]
fn tokenizer_matches_open_clip_on_every_fixture_string() {
    let tokenizer = Tokenizer::from_env().expect("HANDID_BPE_VOCAB");
    let text = std::fs::read_to_string(fixture("tokenizer.jsonl")).expect("tokenizer.jsonl");
    let (mut checked, mut fixed_by_ftfy) = (0, 0);
    let mut mismatches = Vec::new();
    for line in text.lines() {
        let (input, mut want, want_fixed): (String, Vec<i64>, String) =
            serde_json::from_str(line).expect("json line");
        want.resize(CONTEXT_LENGTH, 0);
        let fixed = fix_text(&input);
        if fixed != want_fixed || tokenizer.tokenize(&input, CONTEXT_LENGTH) != want {
            mismatches.push(format!(
                "{input:?}: ftfy gives {fixed:?}, open_clip's {want_fixed:?}"
            ));
        }
        checked += 1;
        fixed_by_ftfy += usize::from(want_fixed != input);
    }
    eprintln!(
        "tokenizer: {} of {checked} strings identical to open_clip ({fixed_by_ftfy} changed by ftfy)",
        checked - mismatches.len()
    );
    assert!(
        mismatches.is_empty(),
        "{} differ:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    assert!(checked >= 1200, "{checked} strings");
    assert!(fixed_by_ftfy >= 200, "{fixed_by_ftfy} strings that ftfy changes");
}

/// Full-size ViT-B/16 and RN50 image towers against open_clip on random,
/// perturbed weights. The data is hundreds of MB, so it is not committed:
/// `scripts/fixtures/make_fullsize_parity.py DIR` writes it, then
/// `HANDID_FULLSIZE_FIXTURES=DIR cargo test -p handid-model --release --test golden -- --ignored full_size`.
#[test]
#[ignore = "needs HANDID_FULLSIZE_FIXTURES (scripts/fixtures/make_fullsize_parity.py)"]
fn full_size_towers_match_open_clip() {
    let dir = PathBuf::from(std::env::var("HANDID_FULLSIZE_FIXTURES").expect("HANDID_FULLSIZE_FIXTURES"));
    for (name, cfg) in [
        ("vit_b16", ClipVisionConfig::vit_b16()),
        ("rn50", ClipVisionConfig::rn50()),
    ] {
        let all = Tensor::read_safetensors(dir.join(format!("{name}.safetensors"))).expect("parity data");
        let (io, weights): (Vec<_>, Vec<_>) = all
            .into_iter()
            .partition(|(k, _)| k.starts_with("input.") || k.starts_with("expected."));
        let io: BTreeMap<String, Tensor> = io.into_iter().collect();
        let vs = nn::VarStore::new(Device::Cpu);
        let encoder = ImageEncoder::new(vs.root() / "visual", &cfg).expect("config");
        load_strict(&vs, weights).expect("open_clip's weights fit exactly");
        let pooled =
            tch::no_grad(|| encoder.forward_feature(&io["input.pixels"], handid_model::Feature::Projected))
                .expect("forward");
        let diff = max_abs_diff(&pooled, &io["expected.pooled"]);
        eprintln!("{name}: full-size pooled max abs diff {diff:e}");
        assert!(diff <= TOLERANCE, "{name} differs by {diff}");
    }
}
