//! CLIP-ReID's prompt learner and PromptSG's modules on tiny towers.

use handid_model::promptsg::DEFAULT_TEMPLATE;
use handid_model::{
    ClipTextConfig, ClipVisionConfig, ComposedPrompt, Feature, IdPromptLearner, ImageEncoder,
    InteractionModule, InversionNetwork, TextTransformer, Tokenizer,
};
use tch::{Device, Kind, Tensor, nn};

const CONTEXT: i64 = 77;

fn tokenizer() -> Tokenizer {
    Tokenizer::from_env().expect("HANDID_BPE_VOCAB (source scripts/env.sh)")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

/// Every PromptSG piece on one store.
struct Model {
    vs: nn::VarStore,
    text: TextTransformer,
    image: ImageEncoder,
    learner: IdPromptLearner,
    inversion: InversionNetwork,
    prompt: ComposedPrompt,
    interaction: InteractionModule,
}

fn model(vision: ClipVisionConfig) -> Model {
    tch::manual_seed(0);
    let tokenizer = tokenizer();
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let text_cfg = ClipTextConfig::tiny();
    let text = TextTransformer::new(&root, &text_cfg);
    let image = ImageEncoder::new(&root / "visual", &vision).expect("image tower");
    let learner = IdPromptLearner::new(
        &root / "prompt_learner",
        &text,
        &tokenizer,
        3,
        4,
        "A photo of a {} hand.",
    )
    .expect("prompt learner");
    let inversion = InversionNetwork::new(&root / "inversion", text_cfg.output_dim, 64, text_cfg.width);
    let prompt = ComposedPrompt::new(&tokenizer, DEFAULT_TEMPLATE, "dorsal right", CONTEXT).expect("prompt");
    let interaction =
        InteractionModule::new(&root / "interaction", text_cfg.output_dim, 2, 2).expect("interaction");
    Model {
        vs,
        text,
        image,
        learner,
        inversion,
        prompt,
        interaction,
    }
}

impl Model {
    /// Pixels -> (image feature, language-guided feature).
    fn forward(&self, pixels: &Tensor) -> (Tensor, Tensor) {
        let (feature, tokens) = self
            .image
            .forward_feature_and_tokens(pixels, Feature::Projected)
            .expect("image tower");
        let pseudo = self.inversion.forward_t(&feature, true);
        let text_feature = self.prompt.forward(&self.text, &pseudo).expect("composed prompt");
        let guided = self
            .interaction
            .forward(&text_feature, &tokens)
            .expect("interaction");
        (feature, guided)
    }
}

#[test]
fn a_loss_on_the_interaction_output_trains_the_inversion_network_and_the_prompts() {
    let m = model(ClipVisionConfig::tiny_vit());
    let pixels = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu));
    let labels = Tensor::from_slice(&[0i64, 1, 2, 1]);
    let (_, guided) = m.forward(&pixels);
    assert_eq!(guided.size(), [4, 16]);
    // CLIP-ReID's image-to-text cross-entropy of the guided feature
    // against every identity's prompt.
    let all = Tensor::arange(3, (Kind::Int64, Device::Cpu));
    let prompts = m.learner.text_features(&m.text, &all).expect("prompt features");
    let logits = guided.matmul(&prompts.tr());
    let loss = logits.cross_entropy_for_logits(&labels);
    loss.backward();
    let vars = m.vs.variables();
    for name in [
        "inversion.fc1.weight",
        "inversion.fc3.weight",
        "prompt_learner.cls_ctx",
        "interaction.cross_attn.q_proj.weight",
        "interaction.blocks.1.attn.in_proj_weight",
        "visual.proj",
    ] {
        let grad = vars[name].grad();
        assert!(grad.defined(), "{name} has no gradient");
        assert!(
            grad.abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "{name}: zero gradient"
        );
    }
    // Every identity is in the softmax, so every context row gets a gradient.
    let ctx_grad = vars["prompt_learner.cls_ctx"].grad();
    assert_eq!(ctx_grad.size(), [3, 4, 32]);
    for class in 0..3 {
        assert!(
            ctx_grad.get(class).abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "class {class}"
        );
    }
}

#[test]
fn the_interaction_output_depends_on_both_the_text_and_the_patches() {
    let m = model(ClipVisionConfig::tiny_vit());
    let text_a = Tensor::randn([2, 16], (Kind::Float, Device::Cpu));
    let text_b = Tensor::randn([2, 16], (Kind::Float, Device::Cpu));
    let patches = Tensor::randn([2, 16, 16], (Kind::Float, Device::Cpu));
    let other_patches = Tensor::randn([2, 16, 16], (Kind::Float, Device::Cpu));
    let out = m.interaction.forward(&text_a, &patches).expect("forward");
    assert_eq!(out.size(), [2, 16]);
    let same = m.interaction.forward(&text_a, &patches).expect("forward");
    assert_eq!(max_diff(&out, &same), 0.0);
    assert!(max_diff(&out, &m.interaction.forward(&text_b, &patches).expect("forward")) > 1e-3);
    assert!(
        max_diff(
            &out,
            &m.interaction.forward(&text_a, &other_patches).expect("forward")
        ) > 1e-3
    );
    // Different prompts (two aspects) give different guided features of the same image.
    let tokenizer = tokenizer();
    let pseudo = Tensor::randn([2, 32], (Kind::Float, Device::Cpu)) * 0.02;
    let left = ComposedPrompt::new(&tokenizer, DEFAULT_TEMPLATE, "palmar left", CONTEXT).expect("prompt");
    let f_right = m.prompt.forward(&m.text, &pseudo).expect("right");
    let f_left = left.forward(&m.text, &pseudo).expect("left");
    assert!(max_diff(&f_right, &f_left) > 1e-4);
    let guided_right = m.interaction.forward(&f_right, &patches).expect("forward");
    let guided_left = m.interaction.forward(&f_left, &patches).expect("forward");
    assert!(max_diff(&guided_right, &guided_left) > 1e-4);
    // Mismatched shapes are errors, not panics.
    assert!(
        m.interaction
            .forward(&text_a, &Tensor::randn([3, 16, 16], (Kind::Float, Device::Cpu)))
            .is_err()
    );
    assert!(
        m.interaction
            .forward(&Tensor::randn([2, 8], (Kind::Float, Device::Cpu)), &patches)
            .is_err()
    );
}

#[test]
fn prompt_learner_features_are_per_identity() {
    let m = model(ClipVisionConfig::tiny_vit());
    let labels = Tensor::from_slice(&[0i64, 1, 0, 2]);
    let (embeddings, eot) = m.learner.forward(&labels);
    assert_eq!(embeddings.size(), [4, CONTEXT, 32]);
    // "a photo of a X X X X hand ." : start, 4 words, 4 context words, 2 more, end at 11.
    assert_eq!(Vec::<i64>::try_from(&eot).expect("eot"), [11; 4]);
    let features = m.learner.text_features(&m.text, &labels).expect("features");
    assert_eq!(features.size(), [4, 16]);
    assert_eq!(max_diff(&features.get(0), &features.get(2)), 0.0);
    assert!(max_diff(&features.get(0), &features.get(1)) > 1e-4);
    assert!(max_diff(&features.get(1), &features.get(3)) > 1e-4);
    assert!(
        m.learner
            .text_features(&m.text, &Tensor::from_slice(&[3i64]))
            .is_err()
    );
    assert!(
        m.learner
            .text_features(&m.text, &Tensor::from_slice(&[-1i64]))
            .is_err()
    );
}

#[test]
fn words_sit_exactly_where_the_placeholders_are() {
    let m = model(ClipVisionConfig::tiny_vit());
    let tokenizer = tokenizer();
    let word = tokenizer.encode("person");
    assert_eq!(word.len(), 1, "'person' is one BPE token");
    let sentence =
        |text: &str| Tensor::from_slice(&tokenizer.tokenize(text, CONTEXT as usize)).view([1, CONTEXT]);
    // The composed prompt with a real word's embedding as the pseudo-word is that sentence.
    let pseudo = m
        .text
        .embed_tokens(&Tensor::from_slice(&word).view([1, 1]))
        .view([1, 32]);
    let composed = m.prompt.forward(&m.text, &pseudo).expect("composed");
    let want = m
        .text
        .forward(&sentence("A photo of a person dorsal right hand"))
        .expect("text");
    assert!(
        max_diff(&composed, &want) < 1e-5,
        "{}",
        max_diff(&composed, &want)
    );
    let simplified = m.prompt.simplified(&m.text).expect("simplified");
    let want = m
        .text
        .forward(&sentence("A photo of a dorsal right hand"))
        .expect("text");
    assert!(max_diff(&simplified, &want) < 1e-5);
    assert!(max_diff(&simplified, &composed) > 1e-4);
    // The learner's context set to four real words is the sentence with them.
    let words = tokenizer.encode("young woman left palm");
    assert_eq!(words.len(), 4);
    let embedded = m
        .text
        .embed_tokens(&Tensor::from_slice(&words).view([1, 4]))
        .view([4, 32]);
    tch::no_grad(|| m.learner.ctx().get(1).copy_(&embedded));
    let features = m
        .learner
        .text_features(&m.text, &Tensor::from_slice(&[1i64]))
        .expect("features");
    let want = m
        .text
        .forward(&sentence("A photo of a young woman left palm hand."))
        .expect("text");
    assert!(
        max_diff(&features, &want) < 1e-5,
        "{}",
        max_diff(&features, &want)
    );
}

#[test]
fn shapes_for_both_backbones() {
    for (vision, side, patches) in [
        (ClipVisionConfig::tiny_vit(), 32, 16),
        (ClipVisionConfig::tiny_resnet(), 64, 4),
    ] {
        let m = model(vision);
        let pixels = Tensor::randn([3, 3, side, side], (Kind::Float, Device::Cpu));
        let (feature, tokens) = m
            .image
            .forward_feature_and_tokens(&pixels, Feature::Projected)
            .expect("tokens");
        assert_eq!(feature.size(), [3, 16]);
        assert_eq!(tokens.size(), [3, patches, 16]);
        // The pooled feature is unchanged by asking for tokens.
        let pooled = m
            .image
            .forward_feature(&pixels, Feature::Projected)
            .expect("pooled");
        assert!(max_diff(&pooled, &feature) < 1e-6);
        let pseudo = m.inversion.forward_t(&feature, false);
        assert_eq!(pseudo.size(), [3, 32]);
        let (_, guided) = m.forward(&pixels);
        assert_eq!(guided.size(), [3, 16]);
        assert_eq!(m.prompt.simplified(&m.text).expect("simplified").size(), [1, 16]);
    }
    let vs = nn::VarStore::new(Device::Cpu);
    let ImageEncoder::ModifiedResnet(resnet) =
        ImageEncoder::new(vs.root() / "visual", &ClipVisionConfig::tiny_resnet()).expect("resnet")
    else {
        panic!("tiny_resnet is a ResNet");
    };
    let pixels = Tensor::randn([2, 3, 64, 96], (Kind::Float, Device::Cpu));
    // Width 4: the last stage has 32 * 4 channels on a 2 x 3 map.
    assert_eq!(
        resnet.forward_tokens(&pixels).expect("tokens").size(),
        [2, 6, 128]
    );
}

#[test]
fn bad_templates_are_refused() {
    let tokenizer = tokenizer();
    for template in ["A photo of a hand", "A {} photo of a {} hand"] {
        assert!(
            ComposedPrompt::new(&tokenizer, template, "dorsal right", CONTEXT).is_err(),
            "{template}"
        );
    }
    let long = format!("{} {{}}", "word ".repeat(80));
    assert!(ComposedPrompt::new(&tokenizer, &long, "dorsal right", CONTEXT).is_err());
    let vs = nn::VarStore::new(Device::Cpu);
    let text = TextTransformer::new(vs.root(), &ClipTextConfig::tiny());
    assert!(IdPromptLearner::new(vs.root() / "p", &text, &tokenizer, 3, 4, "no placeholder").is_err());
    assert!(IdPromptLearner::new(vs.root() / "q", &text, &tokenizer, 0, 4, "a {} hand").is_err());
}
