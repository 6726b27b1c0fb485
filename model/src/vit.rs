//! CLIP's image transformer.

use std::borrow::Borrow;

use tch::nn;
use tch::{Kind, Tensor};

#[cfg(doc)]
use crate::config::Backbone;
use crate::config::ClipVisionConfig;
use crate::error::{Error, Result};
use crate::transformer::{LayerNorm, Transformer, TransformerConfig, normal};

/// What the image transformer produces for a batch.
#[derive(Debug)]
pub struct VitOutput {
    /// `ln_post(class token) @ proj`: `[batch, output_dim]`, CLIP's image feature.
    pub pooled: Tensor,
    /// `ln_post(class token)` before the projection: `[batch, width]`.
    pub cls: Tensor,
    /// `ln_post` of the patch tokens (open_clip `output_tokens`): `[batch, grid_h * grid_w, width]`.
    pub tokens: Tensor,
    /// The class token entering the last block, without `ln_post`:
    /// `[batch, width]` (CLIP-ReID's `img_feature_last`, layer 11 of ViT-B/16).
    pub penultimate: Tensor,
}

/// `VisionTransformer` of OpenAI CLIP `model.py`.
#[derive(Debug)]
pub struct VisionTransformer {
    conv1: nn::Conv2D,
    class_embedding: Tensor,
    positional_embedding: Tensor,
    ln_pre: LayerNorm,
    transformer: Transformer,
    ln_post: LayerNorm,
    proj: Tensor,
    patch_size: i64,
    grid: i64,
}

impl VisionTransformer {
    /// Creates the encoder under `p` (normally `root / "visual"`).
    /// `patch_size` and `layers` come from the config's [`Backbone::Vit`].
    pub fn new<'a>(
        p: impl Borrow<nn::Path<'a>>,
        cfg: &ClipVisionConfig,
        patch_size: i64,
        layers: i64,
    ) -> Self {
        let p = p.borrow();
        let (width, heads, image_size, output_dim) = (cfg.width, cfg.heads, cfg.image_size, cfg.output_dim);
        let scale = (width as f64).powf(-0.5);
        let grid = image_size / patch_size;
        let conv = nn::ConvConfig {
            stride: patch_size,
            bias: false,
            ..Default::default()
        };
        Self {
            conv1: nn::conv2d(p / "conv1", 3, width, patch_size, conv),
            class_embedding: p.var("class_embedding", &[width], normal(scale)),
            positional_embedding: p.var("positional_embedding", &[grid * grid + 1, width], normal(scale)),
            ln_pre: LayerNorm::new(p / "ln_pre", width),
            transformer: Transformer::new(p / "transformer", &TransformerConfig { width, layers, heads }),
            ln_post: LayerNorm::new(p / "ln_post", width),
            proj: p.var("proj", &[width, output_dim], normal(scale)),
            patch_size,
            grid,
        }
    }

    /// `[batch, 3, H, W]` -> pooled, class and patch features. `H` and `W`
    /// must be multiples of the patch size; when the grid differs from the
    /// one the positional embedding was trained for, it is interpolated.
    pub fn forward(&self, x: &Tensor) -> Result<VitOutput> {
        let size = x.size();
        let [batch, 3, height, width] = size[..] else {
            return Err(Error::InvalidInput(format!(
                "expected [batch, 3, H, W] pixels, got {size:?}"
            )));
        };
        if height % self.patch_size != 0 || width % self.patch_size != 0 || height == 0 || width == 0 {
            return Err(Error::InvalidInput(format!(
                "input {height}x{width} is not a positive multiple of the patch size {}",
                self.patch_size
            )));
        }
        let kind = self.class_embedding.kind();
        let (grid_h, grid_w) = (height / self.patch_size, width / self.patch_size);
        // [batch, width, grid_h, grid_w] -> [batch, grid_h * grid_w, width]
        let patches = x.to_kind(kind).apply(&self.conv1).flatten(2, 3).transpose(1, 2);
        let channels = patches.size()[2];
        // [batch, 1 + grid_h * grid_w, width]
        let cls = self
            .class_embedding
            .view([1, 1, channels])
            .expand([batch, 1, channels], true);
        let x = Tensor::cat(&[cls, patches], 1)
            + resample_positional_embedding(&self.positional_embedding, self.grid, grid_h, grid_w);
        let (x, penultimate) = self
            .transformer
            .forward_with_penultimate(&x.apply(&self.ln_pre), false);
        let x = x.apply(&self.ln_post);
        let cls = x.select(1, 0); // [batch, width]
        Ok(VitOutput {
            pooled: cls.matmul(&self.proj),
            tokens: x.narrow(1, 1, grid_h * grid_w),
            cls,
            penultimate: penultimate.select(1, 0),
        })
    }
}

impl VisionTransformer {
    /// Patch tokens `[batch, n, width]` (`VitOutput::tokens`) -> `[batch, n,
    /// output_dim]` through `proj`, the projection CLIP applies to the class
    /// token, so patches land in the joint image-text space.
    pub fn project_tokens(&self, tokens: &Tensor) -> Tensor {
        tokens.matmul(&self.proj.to_kind(tokens.kind()))
    }
}

/// A CLIP positional embedding `[1 + grid * grid, width]` (a leading class or
/// mean token, then a square grid) laid out for a `grid_h` x `grid_w` grid:
/// the grid part is resampled bicubically (align_corners false, in f32) when
/// the sizes differ; the leading token is kept.
pub(crate) fn resample_positional_embedding(pos: &Tensor, grid: i64, grid_h: i64, grid_w: i64) -> Tensor {
    if (grid_h, grid_w) == (grid, grid) {
        return pos.shallow_clone();
    }
    let width = pos.size()[1];
    let kind = pos.kind();
    // [grid * grid, width] -> [1, width, grid, grid]
    let square = pos
        .narrow(0, 1, grid * grid)
        .to_kind(Kind::Float)
        .view([1, grid, grid, width])
        .permute([0, 3, 1, 2]);
    // [1, width, grid_h, grid_w] -> [grid_h * grid_w, width]
    let resized = square
        .upsample_bicubic2d([grid_h, grid_w], false, None, None)
        .permute([0, 2, 3, 1])
        .reshape([grid_h * grid_w, width])
        .to_kind(kind);
    Tensor::cat(&[pos.narrow(0, 0, 1), resized], 0)
}

/// A CLIP positional embedding `[1 + g * g, width]` (a leading class or mean
/// token, then a square grid) resized to a `grid` x `grid` one, as CLIP-ReID
/// resizes pretrained ones once when it loads them (`resize_pos_embed` in its
/// `model/clip/model.py`: bilinear, align_corners false); the leading token
/// is kept. `None` when `pos` is not 1 + a square.
pub fn resize_positional_embedding(pos: &Tensor, grid: i64) -> Option<Tensor> {
    let size = pos.size();
    let [tokens, width] = size[..] else {
        return None;
    };
    let old = ((tokens - 1) as f64).sqrt().round() as i64;
    if old * old + 1 != tokens || old < 1 || grid < 1 {
        return None;
    }
    if old == grid {
        return Some(pos.shallow_clone());
    }
    let kind = pos.kind();
    // [g * g, width] -> [1, width, g, g] -> [1, width, grid, grid] -> [grid * grid, width]
    let resized = pos
        .narrow(0, 1, old * old)
        .to_kind(Kind::Float)
        .view([1, old, old, width])
        .permute([0, 3, 1, 2])
        .upsample_bilinear2d([grid, grid], false, None, None)
        .permute([0, 2, 3, 1])
        .reshape([grid * grid, width])
        .to_kind(kind);
    Some(Tensor::cat(&[pos.narrow(0, 0, 1), resized], 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Backbone;
    use tch::Device;

    #[test]
    fn variables_are_named_and_shaped_as_openai_checkpoint_keys() {
        let mut cfg = ClipVisionConfig::tiny_vit();
        cfg.backbone = Backbone::Vit {
            patch_size: 8,
            layers: 1,
        };
        let vs = nn::VarStore::new(Device::Cpu);
        VisionTransformer::new(vs.root() / "visual", &cfg, 8, 1);
        let mut got: Vec<(String, Vec<i64>)> =
            vs.variables().into_iter().map(|(k, v)| (k, v.size())).collect();
        got.sort();
        let b = "visual.transformer.resblocks.0";
        let mut want: Vec<(String, Vec<i64>)> = vec![
            ("visual.class_embedding".into(), vec![32]),
            ("visual.positional_embedding".into(), vec![17, 32]),
            ("visual.proj".into(), vec![32, 16]),
            ("visual.conv1.weight".into(), vec![32, 3, 8, 8]),
            ("visual.ln_pre.weight".into(), vec![32]),
            ("visual.ln_pre.bias".into(), vec![32]),
            ("visual.ln_post.weight".into(), vec![32]),
            ("visual.ln_post.bias".into(), vec![32]),
            (format!("{b}.attn.in_proj_weight"), vec![96, 32]),
            (format!("{b}.attn.in_proj_bias"), vec![96]),
            (format!("{b}.attn.out_proj.weight"), vec![32, 32]),
            (format!("{b}.attn.out_proj.bias"), vec![32]),
            (format!("{b}.ln_1.weight"), vec![32]),
            (format!("{b}.ln_1.bias"), vec![32]),
            (format!("{b}.mlp.c_fc.weight"), vec![128, 32]),
            (format!("{b}.mlp.c_fc.bias"), vec![128]),
            (format!("{b}.mlp.c_proj.weight"), vec![32, 128]),
            (format!("{b}.mlp.c_proj.bias"), vec![32]),
            (format!("{b}.ln_2.weight"), vec![32]),
            (format!("{b}.ln_2.bias"), vec![32]),
        ];
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn forward_returns_pooled_class_and_patch_tokens() {
        let vs = nn::VarStore::new(Device::Cpu);
        let vit = VisionTransformer::new(vs.root() / "visual", &ClipVisionConfig::tiny_vit(), 8, 2);
        let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let out = vit.forward(&x).expect("forward");
        assert_eq!(out.pooled.size(), [2, 16]);
        assert_eq!(out.cls.size(), [2, 32]);
        assert_eq!(out.tokens.size(), [2, 16, 32]);
        let portrait = vit
            .forward(&Tensor::randn([1, 3, 56, 32], (Kind::Float, Device::Cpu)))
            .expect("portrait");
        assert_eq!(portrait.tokens.size(), [1, 28, 32]);
        assert!(
            vit.forward(&Tensor::randn([1, 3, 30, 32], (Kind::Float, Device::Cpu)))
                .is_err()
        );
    }

    #[test]
    fn positional_embedding_is_kept_at_the_native_grid_and_resampled_otherwise() {
        let vs = nn::VarStore::new(Device::Cpu);
        let vit = VisionTransformer::new(vs.root() / "visual", &ClipVisionConfig::tiny_vit(), 8, 2);
        let native = resample_positional_embedding(&vit.positional_embedding, 4, 4, 4);
        assert_eq!(max_abs(&(&native - &vit.positional_embedding)), 0.0);
        let tall = resample_positional_embedding(&vit.positional_embedding, 4, 8, 4);
        assert_eq!(tall.size(), [33, 32]);
        // The class position is never resampled.
        assert_eq!(max_abs(&(tall.get(0) - vit.positional_embedding.get(0))), 0.0);
        // Doubling the rows of a grid: each new row pair brackets an old row,
        // so the resampled values stay within the old range per channel.
        let old = vit.positional_embedding.narrow(0, 1, 16);
        let new = tall.narrow(0, 1, 32);
        let slack = 0.5 * (old.amax([0], false) - old.amin([0], false));
        assert!(
            bool::try_from(
                new.amax([0], false)
                    .le_tensor(&(old.amax([0], false) + &slack))
                    .all()
            )
            .expect("bool")
        );
    }

    #[test]
    fn resizing_at_load_is_bilinear_and_keeps_the_leading_token() {
        // A 2x2 grid [[0, 1], [2, 3]] (width 1) doubled: bilinear with
        // align_corners false (PyTorch: corners keep their values, the
        // others interpolate with weights 1/4, 3/4).
        let pos = Tensor::from_slice(&[9.0f32, 0.0, 1.0, 2.0, 3.0]).view([5, 1]);
        let big = resize_positional_embedding(&pos, 4).expect("square");
        assert_eq!(big.size(), [17, 1]);
        let v: Vec<f32> = Vec::try_from(big.flatten(0, 1)).expect("values");
        assert_eq!(v[0], 9.0);
        assert_eq!(&v[1..5], &[0.0, 0.25, 0.75, 1.0]);
        assert_eq!(v[16], 3.0);
        assert!(resize_positional_embedding(&Tensor::zeros([4, 1], (Kind::Float, Device::Cpu)), 2).is_none());
    }

    fn max_abs(t: &Tensor) -> f64 {
        t.abs().max().double_value(&[])
    }
}
