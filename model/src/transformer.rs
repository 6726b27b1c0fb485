//! The transformer shared by CLIP's image (ViT) and text towers.
//!
//! Inputs are batch-first (`[batch, tokens, width]`); OpenAI's code permutes
//! to sequence-first for `nn.MultiheadAttention`, which changes nothing in
//! the arithmetic. Random initialisation follows `CLIP.initialize_parameters`.

use std::borrow::Borrow;

use tch::nn::{self, Init, Module};
use tch::{Kind, Tensor};

/// The shape of a stack of residual attention blocks (OpenAI CLIP `model.py`
/// `Transformer(width, layers, heads)`): one struct, so no call site can swap
/// two of the numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransformerConfig {
    /// Token width.
    pub width: i64,
    /// Residual attention blocks.
    pub layers: i64,
    /// Attention heads per block.
    pub heads: i64,
}

/// `LayerNorm` of OpenAI CLIP `model.py`: computed in fp32 whatever the input
/// dtype, so half-precision inference keeps the statistics exact.
#[derive(Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    width: i64,
}

impl LayerNorm {
    /// Creates `weight` (ones) and `bias` (zeros) under `p`.
    pub fn new<'a>(p: impl Borrow<nn::Path<'a>>, width: i64) -> Self {
        let p = p.borrow();
        Self {
            weight: p.var("weight", &[width], Init::Const(1.0)),
            bias: p.var("bias", &[width], Init::Const(0.0)),
            width,
        }
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        x.to_kind(Kind::Float)
            .layer_norm(
                [self.width],
                Some(self.weight.to_kind(Kind::Float)),
                Some(self.bias.to_kind(Kind::Float)),
                1e-5,
                true,
            )
            .to_kind(kind)
    }
}

/// `torch.nn.MultiheadAttention` as CLIP uses it: packed `in_proj_weight`
/// `[3 * width, width]` / `in_proj_bias`, and `out_proj`.
#[derive(Debug)]
pub struct MultiheadAttention {
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj: nn::Linear,
    heads: i64,
}

impl MultiheadAttention {
    /// Creates the attention of one block of `cfg` (the depth scales the
    /// init of `out_proj`).
    pub fn new<'a>(p: impl Borrow<nn::Path<'a>>, cfg: &TransformerConfig) -> Self {
        let p = p.borrow();
        let TransformerConfig { width, layers, heads } = *cfg;
        let attn_std = (width as f64).powf(-0.5);
        let proj_std = attn_std * ((2 * layers) as f64).powf(-0.5);
        Self {
            in_proj_weight: p.var("in_proj_weight", &[3 * width, width], normal(attn_std)),
            in_proj_bias: p.var("in_proj_bias", &[3 * width], Init::Const(0.0)),
            out_proj: nn::linear(p / "out_proj", width, width, linear_config(proj_std)),
            heads,
        }
    }

    /// `[batch, tokens, width]` -> `[batch, tokens, width]`; `causal` masks
    /// every token's view of later tokens (the text tower).
    pub fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        let (batch, tokens, width) = x.size3().unwrap_or((0, 0, 0));
        let head_dim = width / self.heads;
        // [3, batch, heads, tokens, head_dim]
        let qkv = x
            .linear(&self.in_proj_weight, Some(&self.in_proj_bias))
            .view([batch, tokens, 3, self.heads, head_dim])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        // [batch, heads, tokens, head_dim], softmax(q k^T / sqrt(head_dim)) v
        let out = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, causal, None, false);
        out.transpose(1, 2)
            .reshape([batch, tokens, width])
            .apply(&self.out_proj)
    }
}

/// The `mlp` of OpenAI CLIP `model.py` `ResidualAttentionBlock`:
/// `c_fc` (4x width), QuickGELU, `c_proj`.
#[derive(Debug)]
pub struct Mlp {
    c_fc: nn::Linear,
    c_proj: nn::Linear,
}

impl Mlp {
    /// Creates `c_fc` and `c_proj` under `p` for one block of `cfg`.
    pub fn new<'a>(p: impl Borrow<nn::Path<'a>>, cfg: &TransformerConfig) -> Self {
        let p = p.borrow();
        let TransformerConfig { width, layers, .. } = *cfg;
        let fc_std = ((2 * width) as f64).powf(-0.5);
        let proj_std = (width as f64).powf(-0.5) * ((2 * layers) as f64).powf(-0.5);
        Self {
            c_fc: nn::linear(p / "c_fc", width, 4 * width, linear_config(fc_std)),
            c_proj: nn::linear(p / "c_proj", 4 * width, width, linear_config(proj_std)),
        }
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = x.apply(&self.c_fc);
        // QuickGELU, the activation OpenAI's checkpoints were trained with.
        (&h * (&h * 1.702).sigmoid()).apply(&self.c_proj)
    }
}

/// `ResidualAttentionBlock` of OpenAI CLIP `model.py` (pre-norm).
#[derive(Debug)]
pub struct ResidualAttentionBlock {
    ln_1: LayerNorm,
    attn: MultiheadAttention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl ResidualAttentionBlock {
    /// Creates `ln_1`, `attn`, `ln_2` and `mlp` under `p` for one block of `cfg`.
    pub fn new<'a>(p: impl Borrow<nn::Path<'a>>, cfg: &TransformerConfig) -> Self {
        let p = p.borrow();
        Self {
            ln_1: LayerNorm::new(p / "ln_1", cfg.width),
            attn: MultiheadAttention::new(p / "attn", cfg),
            ln_2: LayerNorm::new(p / "ln_2", cfg.width),
            mlp: Mlp::new(p / "mlp", cfg),
        }
    }

    /// `[batch, tokens, width]` -> `[batch, tokens, width]`.
    pub fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        let x = x + self.attn.forward(&x.apply(&self.ln_1), causal);
        &x + x.apply(&self.ln_2).apply(&self.mlp)
    }
}

/// `Transformer` of OpenAI CLIP `model.py`: `resblocks.{i}`.
#[derive(Debug)]
pub struct Transformer {
    resblocks: Vec<ResidualAttentionBlock>,
}

impl Transformer {
    /// Creates `cfg.layers` blocks under `p / "resblocks"`.
    pub fn new<'a>(p: impl Borrow<nn::Path<'a>>, cfg: &TransformerConfig) -> Self {
        let blocks = p.borrow() / "resblocks";
        Self {
            resblocks: (0..cfg.layers)
                .map(|i| ResidualAttentionBlock::new(&blocks / i, cfg))
                .collect(),
        }
    }

    /// `[batch, tokens, width]` -> `[batch, tokens, width]`.
    pub fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        self.resblocks
            .iter()
            .fold(x.shallow_clone(), |x, block| block.forward(&x, causal))
    }

    /// Like [`Transformer::forward`], also returning the input of the last
    /// block (the output of all blocks but the last; the input itself when
    /// there is only one block): CLIP-ReID's `x11` of a 12-block ViT.
    pub fn forward_with_penultimate(&self, x: &Tensor, causal: bool) -> (Tensor, Tensor) {
        let mut penultimate = x.shallow_clone();
        let mut x = x.shallow_clone();
        for (i, block) in self.resblocks.iter().enumerate() {
            if i + 1 == self.resblocks.len() {
                penultimate = x.shallow_clone();
            }
            x = block.forward(&x, causal);
        }
        (x, penultimate)
    }
}

/// `N(0, std^2)`, CLIP's initialiser for every weight matrix.
pub(crate) fn normal(std: f64) -> Init {
    Init::Randn {
        mean: 0.0,
        stdev: std,
    }
}

fn linear_config(std: f64) -> nn::LinearConfig {
    nn::LinearConfig {
        ws_init: normal(std),
        bs_init: Some(Init::Const(0.0)),
        bias: true,
    }
}
