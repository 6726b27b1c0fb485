//! CLIP's text encoder.
//!
//! In OpenAI's checkpoints the text tower has no prefix of its own: its keys
//! (`token_embedding.weight`, `positional_embedding`, `transformer.*`,
//! `ln_final.*`, `text_projection`) sit at the root, so this module is built
//! from the root path.

use std::borrow::Borrow;

use serde::{Deserialize, Serialize};
use tch::nn;
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::transformer::{LayerNorm, Transformer, TransformerConfig, normal};

/// Configuration of CLIP's text transformer (OpenAI CLIP `model.py` names).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipTextConfig {
    /// Maximum tokens per text, start and end included (77).
    pub context_length: i64,
    /// Token vocabulary size (49408).
    pub vocab_size: i64,
    /// Transformer width.
    pub width: i64,
    /// Attention heads.
    pub heads: i64,
    /// Residual attention blocks.
    pub layers: i64,
    /// Dimension of the joint image-text space (`text_projection` columns).
    pub output_dim: i64,
}

impl ClipTextConfig {
    /// OpenAI CLIP ViT-B/16's text tower (also RN101's).
    pub fn vit_b16() -> Self {
        Self::openai(512, 512)
    }

    /// OpenAI CLIP RN50's text tower.
    pub fn rn50() -> Self {
        Self::openai(512, 1024)
    }

    fn openai(width: i64, output_dim: i64) -> Self {
        Self {
            context_length: 77,
            vocab_size: 49408,
            width,
            heads: width / 64,
            layers: 12,
            output_dim,
        }
    }

    /// A two-block, 32-wide text tower over the full vocabulary, for tests.
    pub fn tiny() -> Self {
        Self {
            context_length: 77,
            vocab_size: 49408,
            width: 32,
            heads: 2,
            layers: 2,
            output_dim: 16,
        }
    }
}

/// The text tower of OpenAI CLIP `model.py` (`CLIP.encode_text`).
#[derive(Debug)]
pub struct TextTransformer {
    token_embedding: nn::Embedding,
    positional_embedding: Tensor,
    transformer: Transformer,
    ln_final: LayerNorm,
    text_projection: Tensor,
    context_length: i64,
}

impl TextTransformer {
    /// Creates the tower under `p`, normally the root path.
    pub fn new<'a>(p: impl Borrow<nn::Path<'a>>, cfg: &ClipTextConfig) -> Self {
        let p = p.borrow();
        let embedding = nn::EmbeddingConfig {
            ws_init: normal(0.02),
            ..Default::default()
        };
        Self {
            token_embedding: nn::embedding(p / "token_embedding", cfg.vocab_size, cfg.width, embedding),
            positional_embedding: p.var(
                "positional_embedding",
                &[cfg.context_length, cfg.width],
                normal(0.01),
            ),
            transformer: Transformer::new(
                p / "transformer",
                &TransformerConfig {
                    width: cfg.width,
                    layers: cfg.layers,
                    heads: cfg.heads,
                },
            ),
            ln_final: LayerNorm::new(p / "ln_final", cfg.width),
            text_projection: p.var(
                "text_projection",
                &[cfg.width, cfg.output_dim],
                normal((cfg.width as f64).powf(-0.5)),
            ),
            context_length: cfg.context_length,
        }
    }

    /// Maximum tokens per text (77 for OpenAI's towers).
    pub fn context_length(&self) -> i64 {
        self.context_length
    }

    /// Width of the word embeddings and the transformer.
    pub fn width(&self) -> i64 {
        self.positional_embedding.size()[1]
    }

    /// Width of the text features (the joint space).
    pub fn output_dim(&self) -> i64 {
        self.text_projection.size()[1]
    }

    /// The token embedding table `[vocab_size, width]` (the variable itself:
    /// loading weights into the store later updates what this returns).
    pub fn token_embedding_weight(&self) -> &Tensor {
        &self.token_embedding.ws
    }

    /// The word embeddings of token ids: `[batch, tokens]` i64 -> `[batch, tokens, width]`.
    /// Prompt learning (CoOp, PromptSG) edits these before [`TextTransformer::forward_embeddings`].
    pub fn embed_tokens(&self, ids: &Tensor) -> Tensor {
        ids.apply(&self.token_embedding)
    }

    /// Token ids `[batch, tokens]` (from the tokenizer: the end-of-text token
    /// has the largest id) -> text features `[batch, output_dim]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        if ids.dim() != 2 || ids.kind() != Kind::Int64 {
            return Err(Error::InvalidInput(format!(
                "expected [batch, tokens] i64 token ids, got {:?} {:?}",
                ids.size(),
                ids.kind()
            )));
        }
        // CLIP pools at the end-of-text token, the largest id of each row.
        let eot = ids.argmax(-1, false);
        self.forward_embeddings(&self.embed_tokens(ids), &eot)
    }

    /// Word embeddings `[batch, tokens, width]` and each row's end-of-text
    /// position `[batch]` -> text features `[batch, output_dim]`.
    pub fn forward_embeddings(&self, embeddings: &Tensor, eot: &Tensor) -> Result<Tensor> {
        let size = embeddings.size();
        let [batch, tokens, _] = size[..] else {
            return Err(Error::InvalidInput(format!(
                "expected [batch, tokens, width] word embeddings, got {size:?}"
            )));
        };
        if tokens > self.context_length || tokens == 0 {
            return Err(Error::InvalidInput(format!(
                "{tokens} tokens, but the context holds 1 to {}",
                self.context_length
            )));
        }
        if eot.size() != [batch] {
            return Err(Error::InvalidInput(format!(
                "expected {batch} end-of-text positions, got shape {:?}",
                eot.size()
            )));
        }
        let x = embeddings
            + self
                .positional_embedding
                .narrow(0, 0, tokens)
                .to_kind(embeddings.kind());
        // [batch, tokens, width], each token attending to itself and earlier ones.
        let x = self.transformer.forward(&x, true).apply(&self.ln_final);
        let rows = Tensor::arange(batch, (Kind::Int64, x.device()));
        // [batch, width] at the end-of-text token -> [batch, output_dim]
        let pooled = x.index(&[Some(rows), Some(eot.to_kind(Kind::Int64).to_device(x.device()))]);
        Ok(pooled.matmul(&self.text_projection.to_kind(pooled.kind())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn features_come_from_the_end_token_and_ignore_what_follows() {
        let vs = nn::VarStore::new(Device::Cpu);
        let text = TextTransformer::new(vs.root(), &ClipTextConfig::tiny());
        let ids =
            Tensor::from_slice(&[49406i64, 320, 1125, 49407, 0, 0, 49406, 2463, 49407, 0, 0, 0]).view([2, 6]);
        let features = text.forward(&ids).expect("forward");
        assert_eq!(features.size(), [2, 16]);
        // Tokens after the end token cannot reach it through the causal mask.
        let padded =
            Tensor::from_slice(&[49406i64, 320, 1125, 49407, 7, 8, 49406, 2463, 49407, 9, 9, 9]).view([2, 6]);
        let again = text.forward(&padded).expect("forward");
        assert!((&features - &again).abs().max().double_value(&[]) < 1e-5);
        // The word-embedding entry computes the same thing.
        let eot = Tensor::from_slice(&[3i64, 2]);
        let via_embeddings = text
            .forward_embeddings(&text.embed_tokens(&ids), &eot)
            .expect("embeddings");
        assert!((&features - &via_embeddings).abs().max().double_value(&[]) < 1e-6);
        assert!(
            text.forward(&Tensor::zeros([2, 78], (Kind::Int64, Device::Cpu)))
                .is_err()
        );
        assert!(
            text.forward(&Tensor::zeros([2, 6], (Kind::Float, Device::Cpu)))
                .is_err()
        );
    }
}
