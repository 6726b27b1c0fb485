//! CLIP-ReID's identity prompt learner (Li et al., "CLIP-ReID: Exploiting
//! Vision-Language Model for Image Re-Identification without Concrete Text
//! Labels", AAAI 2023, Sec. 3 "Method", the learnable text tokens of the
//! first training stage).
//!
//! Each identity `y` gets its own text "A photo of a [X]_1 ... [X]_M hand.",
//! where the `M` (`n_ctx`, paper: 4) word embeddings `[X]` are learnable and
//! identity-specific, while the rest of the sentence comes from the frozen
//! text tower's token embedding. The paper's template ends in "person."; ours
//! names a hand. Following the reference code, the context vectors start
//! from N(0, 0.02^2) (`nn.init.normal_(cls_vectors, std=0.02)` in
//! `model/make_model_clipreid.py`). The paper trains them in stage 1 with the
//! image-to-text and text-to-image contrastive losses, both towers
//! frozen.
//!
//! The fixed words are looked up in the text tower's embedding table at each
//! forward (detached: no gradient reaches the table), rather than copied at
//! construction as the reference's `token_prefix` buffer is, so weights
//! loaded into the store after construction are seen.

use std::borrow::Borrow;

use tch::{Kind, Tensor, nn};

use crate::error::{Error, Result};
use crate::text::TextTransformer;
use crate::tokenizer::Tokenizer;
use crate::transformer::normal;

/// The placeholder a template marks the learnable (or pseudo) words with.
pub const PLACEHOLDER: &str = "{}";

/// A template tokenised around its placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlottedTokens {
    /// `<start_of_text>`, prefix ids, `slots` zero ids, suffix ids, `<end_of_text>`, zero padding.
    pub ids: Vec<i64>,
    /// Index of the first slot.
    pub slot: i64,
    /// Index of `<end_of_text>`.
    pub eot: i64,
}

/// Tokenises `template`, which must hold exactly one [`PLACEHOLDER`], with
/// `slots` token positions in its place. CLIP's BPE works word by word, so
/// tokenising the text before and after the placeholder separately gives
/// the ids of the whole sentence.
pub(crate) fn tokenize_with_slots(
    tokenizer: &Tokenizer,
    template: &str,
    slots: i64,
    context_length: i64,
) -> Result<SlottedTokens> {
    let parts: Vec<&str> = template.split(PLACEHOLDER).collect();
    let [prefix, suffix] = parts[..] else {
        return Err(Error::InvalidInput(format!(
            "prompt template {template:?} must contain exactly one {PLACEHOLDER:?}"
        )));
    };
    let (prefix, suffix) = (tokenizer.encode(prefix), tokenizer.encode(suffix));
    let slot = 1 + prefix.len() as i64;
    let eot = slot + slots + suffix.len() as i64;
    if slots < 1 || eot >= context_length {
        return Err(Error::InvalidInput(format!(
            "prompt template {template:?} with {slots} placeholder tokens needs {} tokens, \
             the text tower holds {context_length}",
            eot + 1
        )));
    }
    let mut ids = vec![tokenizer.sot_id()];
    ids.extend(prefix);
    ids.extend(std::iter::repeat_n(0, slots as usize));
    ids.extend(suffix);
    ids.push(tokenizer.eot_id());
    ids.resize(context_length as usize, 0);
    Ok(SlottedTokens { ids, slot, eot })
}

/// CLIP-ReID's `PromptLearner`: one learnable context of `n_ctx` words per identity.
#[derive(Debug)]
pub struct IdPromptLearner {
    /// `[classes, n_ctx, width]`, the learnable words; stored as `cls_ctx`, the reference's key.
    ctx: Tensor,
    /// Shares storage with the text tower's token embedding table.
    table: Tensor,
    /// `[slot]` ids before the context, start token included.
    prefix_ids: Tensor,
    /// `[context_length - slot - n_ctx]` ids after it, end token included.
    suffix_ids: Tensor,
    eot: i64,
    classes: i64,
}

impl IdPromptLearner {
    /// Creates `cls_ctx` under `p` for `classes` identities and `n_ctx` words
    /// each; `template` marks their place with `{}` (for example
    /// `"A photo of a {} hand."`).
    pub fn new<'a>(
        p: impl Borrow<nn::Path<'a>>,
        text: &TextTransformer,
        tokenizer: &Tokenizer,
        classes: i64,
        n_ctx: i64,
        template: &str,
    ) -> Result<Self> {
        if classes < 1 || n_ctx < 1 {
            return Err(Error::InvalidInput(format!(
                "a prompt learner needs at least one class and one context word (got {classes} and {n_ctx})"
            )));
        }
        let tokens = tokenize_with_slots(tokenizer, template, n_ctx, text.context_length())?;
        let table = text.token_embedding_weight().shallow_clone();
        let device = table.device();
        let after = tokens.slot + n_ctx;
        let ids = Tensor::from_slice(&tokens.ids).to_device(device);
        Ok(Self {
            ctx: p
                .borrow()
                .var("cls_ctx", &[classes, n_ctx, text.width()], normal(0.02)),
            prefix_ids: ids.narrow(0, 0, tokens.slot),
            suffix_ids: ids.narrow(0, after, text.context_length() - after),
            table,
            eot: tokens.eot,
            classes,
        })
    }

    /// Number of identities.
    pub fn classes(&self) -> i64 {
        self.classes
    }

    /// The learnable context `[classes, n_ctx, width]`.
    pub fn ctx(&self) -> &Tensor {
        &self.ctx
    }

    /// Labels `[B]` (each in `0..classes`; others make tch panic, see
    /// [`IdPromptLearner::text_features`] for a checked entry) -> word
    /// embeddings `[B, context_length, width]` and end-of-text positions `[B]`.
    pub fn forward(&self, labels: &Tensor) -> (Tensor, Tensor) {
        let batch = labels.size().first().copied().unwrap_or(0);
        let table = self.table.detach();
        let width = table.size()[1];
        let fixed = |ids: &Tensor| {
            let n = ids.size()[0];
            table
                .index_select(0, ids)
                .to_kind(self.ctx.kind())
                .view([1, n, width])
                .expand([batch, n, width], false)
        };
        // [B, slot | n_ctx | rest, width]
        let ctx = self.ctx.index_select(0, &labels.to_device(self.ctx.device()));
        let embeddings = Tensor::cat(&[fixed(&self.prefix_ids), ctx, fixed(&self.suffix_ids)], 1);
        let eot = Tensor::full([batch], self.eot, (Kind::Int64, self.ctx.device()));
        (embeddings, eot)
    }

    /// Text features `[B, output_dim]` of the labels' prompts through `text`
    /// (the same tower the learner was built from).
    pub fn text_features(&self, text: &TextTransformer, labels: &Tensor) -> Result<Tensor> {
        if labels.dim() != 1 || labels.kind() != Kind::Int64 {
            return Err(Error::InvalidInput(format!(
                "expected [batch] i64 labels, got {:?} {:?}",
                labels.size(),
                labels.kind()
            )));
        }
        if labels.numel() > 0 {
            let (lo, hi) = (labels.min().int64_value(&[]), labels.max().int64_value(&[]));
            if lo < 0 || hi >= self.classes {
                return Err(Error::InvalidInput(format!(
                    "labels span {lo}..={hi}, the prompt learner has classes 0..{}",
                    self.classes
                )));
            }
        }
        let (embeddings, eot) = self.forward(labels);
        text.forward_embeddings(&embeddings, &eot)
    }
}
