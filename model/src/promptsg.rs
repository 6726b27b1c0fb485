//! PromptSG (Yang, Wu, Wu, Lin, Gu, Wang, "A Pedestrian is Worth One Prompt:
//! Towards Language Guidance Person Re-Identification", CVPR 2024), adapted
//! to hands.
//!
//! PromptSG lets language guide the visual feature (sec. 4): an inversion
//! network turns the global image feature into a pseudo-word `S*` (sec. 4.1,
//! after Pic2Word / textual inversion), the composed prompt "A photo of a
//! `S*` person" goes through the frozen text encoder, and a multimodal
//! interaction module lets that text feature attend over the image's patch
//! tokens (sec. 4.2, eq. 7) to give the language-guided visual feature that
//! the re-id losses train (eqs. 8-10; the image-text contrastive pair of
//! eqs. 4-6 is in the trainer). At inference the prompt without the
//! pseudo-word ("A photo of a person") replaces the composed one, so one
//! text pass serves every image (sec. 4.3). Our prompt names the hand aspect
//! instead of "person": "A photo of a {} dorsal right hand".
//!
//! What the paper specifies (sec. 5.1) and what it leaves open (our choice):
//! - Inversion network: "a three-layered MLP of 512-dimensional hidden
//!   state", with "a Batch Normalization layer placed after the last state";
//!   ReLU between the layers is ours (the paper names no activation).
//! - Keys/values of the cross-attention (the paper: "the patch-wise
//!   embedding of the visual encoder"): the patch tokens projected into the
//!   joint space by the image tower's own projection (ViT: `visual.proj`;
//!   ResNet: the attention pool's value path), see
//!   [`crate::ImageEncoder::forward_feature_and_tokens`]. This is the map CLIP
//!   pre-training aligned with text features, so the text query meets keys
//!   in its own space from the first step; a fresh linear layer would start
//!   unaligned and add `width x embed_dim` untrained weights.
//! - "Two transformer blocks following the cross-attention layer" (sec. 4.2,
//!   Table 5): over one query token self-attention would be the identity,
//!   so the blocks run over the sequence [cross-attention output ; patch
//!   tokens] and the first token is the output, after a final LayerNorm.
//!   Blocks are CLIP's pre-norm residual attention blocks; the
//!   cross-attention is pre-norm too, with a residual on the text query;
//!   the head count is a setting (the paper gives none).

use std::borrow::Borrow;

use tch::nn;
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::prompt::{PLACEHOLDER, tokenize_with_slots};
use crate::text::TextTransformer;
use crate::tokenizer::Tokenizer;
use crate::transformer::{LayerNorm, ResidualAttentionBlock, TransformerConfig};

/// The default composed-prompt template: `{}` is the pseudo-word, `{aspect}` the hand aspect.
pub const DEFAULT_TEMPLATE: &str = "A photo of a {} {aspect} hand";

/// PromptSG's inversion network: image feature -> pseudo-word embedding.
/// A three-layer MLP (`fc1`, `fc2`, `fc3`, ReLU between them) whose output
/// goes through a BatchNorm (`bn`), as the paper specifies.
#[derive(Debug)]
pub struct InversionNetwork {
    fc1: nn::Linear,
    fc2: nn::Linear,
    fc3: nn::Linear,
    bn: nn::BatchNorm,
}

impl InversionNetwork {
    /// `embed_dim` image features -> `word_width` word embeddings (the text
    /// tower's width) through `hidden`-wide layers (the paper: 512).
    pub fn new<'a>(p: impl Borrow<nn::Path<'a>>, embed_dim: i64, hidden: i64, word_width: i64) -> Self {
        let p = p.borrow();
        let linear = Default::default();
        Self {
            fc1: nn::linear(p / "fc1", embed_dim, hidden, linear),
            fc2: nn::linear(p / "fc2", hidden, hidden, linear),
            fc3: nn::linear(p / "fc3", hidden, word_width, linear),
            bn: nn::batch_norm1d(p / "bn", word_width, Default::default()),
        }
    }

    /// `[B, embed_dim]` -> `[B, word_width]`; `train` selects batch statistics for the BatchNorm.
    pub fn forward_t(&self, image_feature: &Tensor, train: bool) -> Tensor {
        image_feature
            .apply(&self.fc1)
            .relu()
            .apply(&self.fc2)
            .relu()
            .apply(&self.fc3)
            .apply_t(&self.bn, train)
    }
}

/// The composed prompt of PromptSG, tokenised once.
#[derive(Debug)]
pub struct ComposedPrompt {
    /// `[1, context_length]` with a dummy id at the pseudo-word's place.
    ids: Tensor,
    /// `[1, context_length]` of the prompt without the pseudo-word.
    simplified_ids: Tensor,
    slot: i64,
    eot: i64,
    text: String,
}

impl ComposedPrompt {
    /// `template` holds `{}` (the pseudo-word) once and may hold `{aspect}`,
    /// replaced by `aspect` (e.g. "dorsal right").
    pub fn new(tokenizer: &Tokenizer, template: &str, aspect: &str, context_length: i64) -> Result<Self> {
        let text = template.replace("{aspect}", aspect);
        let tokens = tokenize_with_slots(tokenizer, &text, 1, context_length)?;
        // "A photo of a {} dorsal right hand" -> "A photo of a dorsal right hand"
        let simplified = text.replacen(PLACEHOLDER, " ", 1);
        let simplified_ids = tokenizer.tokenize(&simplified, context_length as usize);
        Ok(Self {
            ids: Tensor::from_slice(&tokens.ids).view([1, context_length]),
            simplified_ids: Tensor::from_slice(&simplified_ids).view([1, context_length]),
            slot: tokens.slot,
            eot: tokens.eot,
            text,
        })
    }

    /// The template with the aspect filled in, `{}` still marking the pseudo-word.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Index of the pseudo-word's token.
    pub fn slot(&self) -> i64 {
        self.slot
    }

    /// Pseudo-words `[B, width]` -> text features `[B, output_dim]`: each
    /// pseudo-word is put in the prompt's word embeddings at its place, and
    /// the sentence goes through `text` (gradients reach the pseudo-words).
    pub fn forward(&self, text: &TextTransformer, pseudo: &Tensor) -> Result<Tensor> {
        let size = pseudo.size();
        let width = text.width();
        let [batch, w] = size[..] else {
            return Err(Error::InvalidInput(format!(
                "expected [batch, {width}] pseudo-word embeddings, got {size:?}"
            )));
        };
        if w != width || batch == 0 {
            return Err(Error::InvalidInput(format!(
                "expected [batch, {width}] pseudo-word embeddings, got {size:?}"
            )));
        }
        let device = pseudo.device();
        let tokens = self.ids.size()[1];
        // [1, tokens, width] -> [batch, tokens, width]
        let words = text
            .embed_tokens(&self.ids.to_device(device))
            .to_kind(pseudo.kind())
            .expand([batch, tokens, width], false);
        let embeddings = Tensor::cat(
            &[
                words.narrow(1, 0, self.slot),
                pseudo.unsqueeze(1),
                words.narrow(1, self.slot + 1, tokens - self.slot - 1),
            ],
            1,
        );
        let eot = Tensor::full([batch], self.eot, (Kind::Int64, device));
        text.forward_embeddings(&embeddings, &eot)
    }

    /// The feature `[1, output_dim]` of the prompt without the pseudo-word,
    /// PromptSG's inference prompt. It depends on the text tower
    /// only, so compute it once per aspect and keep it (no gradient).
    pub fn simplified(&self, text: &TextTransformer) -> Result<Tensor> {
        let device = text.token_embedding_weight().device();
        tch::no_grad(|| text.forward(&self.simplified_ids.to_device(device)))
    }
}

/// Multi-head cross-attention: queries from one sequence, keys and values from another.
#[derive(Debug)]
struct CrossAttention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    out_proj: nn::Linear,
    heads: i64,
}

impl CrossAttention {
    fn new(p: &nn::Path, width: i64, heads: i64) -> Self {
        let linear = |name: &str| nn::linear(p / name, width, width, Default::default());
        Self {
            q_proj: linear("q_proj"),
            k_proj: linear("k_proj"),
            v_proj: linear("v_proj"),
            out_proj: linear("out_proj"),
            heads,
        }
    }

    /// `[B, Nq, D]` queries, `[B, Nk, D]` keys/values -> `[B, Nq, D]`.
    fn forward(&self, query: &Tensor, context: &Tensor) -> Tensor {
        let (batch, nq, width) = query.size3().unwrap_or((0, 0, 0));
        let nk = context.size()[1];
        let head_dim = width / self.heads;
        let split = |t: Tensor, n: i64| t.view([batch, n, self.heads, head_dim]).transpose(1, 2);
        let q = split(query.apply(&self.q_proj), nq);
        let k = split(context.apply(&self.k_proj), nk);
        let v = split(context.apply(&self.v_proj), nk);
        // [B, heads, Nq, head_dim] -> [B, Nq, D]
        Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false)
            .transpose(1, 2)
            .reshape([batch, nq, width])
            .apply(&self.out_proj)
    }
}

/// PromptSG's multimodal interaction module: the text feature
/// queries the patch tokens, then self-attention blocks refine the result.
#[derive(Debug)]
pub struct InteractionModule {
    ln_query: LayerNorm,
    ln_tokens: LayerNorm,
    cross: CrossAttention,
    blocks: Vec<ResidualAttentionBlock>,
    ln_post: LayerNorm,
    width: i64,
}

impl InteractionModule {
    /// `embed_dim`-wide (the joint space), `heads` heads, `blocks` self-attention blocks (paper: 2).
    pub fn new<'a>(p: impl Borrow<nn::Path<'a>>, embed_dim: i64, heads: i64, blocks: i64) -> Result<Self> {
        if embed_dim < 1 || heads < 1 || embed_dim % heads != 0 || blocks < 0 {
            return Err(Error::InvalidInput(format!(
                "interaction module: width {embed_dim} must be a positive multiple of heads {heads}, \
                 blocks ({blocks}) at least 0"
            )));
        }
        let p = p.borrow();
        let stack = p / "blocks";
        Ok(Self {
            ln_query: LayerNorm::new(p / "ln_query", embed_dim),
            ln_tokens: LayerNorm::new(p / "ln_tokens", embed_dim),
            cross: CrossAttention::new(&(p / "cross_attn"), embed_dim, heads),
            blocks: (0..blocks)
                .map(|i| {
                    ResidualAttentionBlock::new(
                        &stack / i,
                        &TransformerConfig {
                            width: embed_dim,
                            layers: blocks,
                            heads,
                        },
                    )
                })
                .collect(),
            ln_post: LayerNorm::new(p / "ln_post", embed_dim),
            width: embed_dim,
        })
    }

    /// Text features `[B, D]` and patch tokens `[B, N, D]` (in the joint
    /// space) -> the language-guided visual feature `[B, D]`.
    pub fn forward(&self, text_feature: &Tensor, patch_tokens: &Tensor) -> Result<Tensor> {
        let (ts, ps) = (text_feature.size(), patch_tokens.size());
        let d = self.width;
        let ok = ts.len() == 2 && ps.len() == 3 && ts[1] == d && ps[2] == d && ps[0] == ts[0] && ps[1] > 0;
        if !ok {
            return Err(Error::InvalidInput(format!(
                "interaction module expects [B, {d}] text features and [B, N, {d}] patch tokens, \
                 got {ts:?} and {ps:?}"
            )));
        }
        let kind = patch_tokens.kind();
        // [B, 1, D]: the text feature, the query
        let query = text_feature.to_kind(kind).unsqueeze(1);
        let tokens = patch_tokens.apply(&self.ln_tokens);
        let attended = &query + self.cross.forward(&query.apply(&self.ln_query), &tokens);
        // [B, 1 + N, D] through the self-attention blocks; the first token is the output.
        let mut x = Tensor::cat(&[attended, patch_tokens.shallow_clone()], 1);
        for block in &self.blocks {
            x = block.forward(&x, false);
        }
        Ok(x.select(1, 0).apply(&self.ln_post))
    }
}

/// What serving needs of PromptSG: the interaction module and the cached
/// feature of the simplified prompt, its query for every image. Variables
/// under `p` (conventionally `root / "promptsg"`): `interaction.*` and
/// `simplified_text` `[1, embed_dim]` (not trained).
#[derive(Debug)]
pub struct PromptSgHead {
    /// The interaction module.
    pub interaction: InteractionModule,
    /// `[1, embed_dim]`: [`ComposedPrompt::simplified`] of the training text tower.
    pub simplified_text: Tensor,
}

impl PromptSgHead {
    /// Creates the variables under `p`.
    pub fn new<'a>(p: impl Borrow<nn::Path<'a>>, embed_dim: i64, heads: i64, blocks: i64) -> Result<Self> {
        let p = p.borrow();
        Ok(Self {
            interaction: InteractionModule::new(p / "interaction", embed_dim, heads, blocks)?,
            simplified_text: p.zeros_no_train("simplified_text", &[1, embed_dim]),
        })
    }

    /// Projected patch tokens `[B, N, D]` -> the language-guided feature `[B, D]`
    /// with the simplified prompt as the query.
    pub fn forward(&self, patch_tokens: &Tensor) -> Result<Tensor> {
        let batch = patch_tokens.size().first().copied().unwrap_or(0);
        let d = self.simplified_text.size()[1];
        let query = self.simplified_text.expand([batch, d], false);
        self.interaction.forward(&query, patch_tokens)
    }
}
