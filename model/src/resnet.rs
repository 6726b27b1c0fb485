//! CLIP's modified ResNet image encoder (RN50, RN101, RN50x4, ...).
//!
//! BatchNorm runs with its running statistics, except in the `*_t` forward
//! passes with `train = true`, which use batch statistics and update the
//! running ones (`model.train()` in PyTorch), as CLIP-ReID fine-tunes RN50.

use std::borrow::Borrow;

use tch::Tensor;
use tch::nn;

use crate::config::ClipVisionConfig;
use crate::error::{Error, Result};
use crate::transformer::normal;
use crate::vit::resample_positional_embedding;

fn conv(p: nn::Path, c_in: i64, c_out: i64, kernel: i64, stride: i64) -> nn::Conv2D {
    let config = nn::ConvConfig {
        stride,
        padding: kernel / 2,
        bias: false,
        ..Default::default()
    };
    nn::conv2d(p, c_in, c_out, kernel, config)
}

fn batch_norm(p: nn::Path, dim: i64) -> nn::BatchNorm {
    nn::batch_norm2d(p, dim, Default::default())
}

/// `AvgPool2d(k)` (stride k, no padding), CLIP's anti-aliased downsampling.
fn avg_pool(x: &Tensor, k: i64) -> Tensor {
    x.avg_pool2d([k, k], [k, k], [0, 0], false, true, None)
}

/// `Bottleneck` of OpenAI CLIP `model.py`: 1x1, 3x3, avgpool when strided, 1x1 (x4).
#[derive(Debug)]
pub struct Bottleneck {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    conv2: nn::Conv2D,
    bn2: nn::BatchNorm,
    conv3: nn::Conv2D,
    bn3: nn::BatchNorm,
    /// `downsample.0` (1x1 conv) and `downsample.1` (BatchNorm), after an avgpool.
    downsample: Option<(nn::Conv2D, nn::BatchNorm)>,
    stride: i64,
}

impl Bottleneck {
    /// Output channels are `4 * planes`.
    pub fn new<'a>(p: impl Borrow<nn::Path<'a>>, inplanes: i64, planes: i64, stride: i64) -> Self {
        let p = p.borrow();
        let out = planes * 4;
        let downsample = (stride > 1 || inplanes != out).then(|| {
            let d = p / "downsample";
            (conv(&d / "0", inplanes, out, 1, 1), batch_norm(&d / "1", out))
        });
        Self {
            conv1: conv(p / "conv1", inplanes, planes, 1, 1),
            bn1: batch_norm(p / "bn1", planes),
            conv2: conv(p / "conv2", planes, planes, 3, 1),
            bn2: batch_norm(p / "bn2", planes),
            conv3: conv(p / "conv3", planes, out, 1, 1),
            bn3: batch_norm(p / "bn3", out),
            downsample,
            stride,
        }
    }

    /// `[batch, inplanes, H, W]` -> `[batch, 4 * planes, H / stride, W / stride]`;
    /// `train` selects batch statistics for the BatchNorms.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let out = x.apply(&self.conv1).apply_t(&self.bn1, train).relu();
        let mut out = out.apply(&self.conv2).apply_t(&self.bn2, train).relu();
        if self.stride > 1 {
            out = avg_pool(&out, self.stride);
        }
        let out = out.apply(&self.conv3).apply_t(&self.bn3, train);
        let identity = match &self.downsample {
            Some((conv, bn)) => {
                let pooled = if self.stride > 1 {
                    avg_pool(x, self.stride)
                } else {
                    x.shallow_clone()
                };
                pooled.apply(conv).apply_t(bn, train)
            }
            None => x.shallow_clone(),
        };
        (out + identity).relu()
    }
}

/// `AttentionPool2d` of OpenAI CLIP `model.py`: QKV attention of the mean
/// token over the feature map, replacing the global average pool.
#[derive(Debug)]
pub struct AttentionPool2d {
    positional_embedding: Tensor,
    k_proj: nn::Linear,
    q_proj: nn::Linear,
    v_proj: nn::Linear,
    c_proj: nn::Linear,
    heads: i64,
    grid: i64,
}

impl AttentionPool2d {
    /// `spacial_dim` is the side of the feature map at the native resolution.
    pub fn new<'a>(
        p: impl Borrow<nn::Path<'a>>,
        spacial_dim: i64,
        embed_dim: i64,
        heads: i64,
        output_dim: i64,
    ) -> Self {
        let p = p.borrow();
        let std = (embed_dim as f64).powf(-0.5);
        let linear = |name: &str, out: i64| {
            let config = nn::LinearConfig {
                ws_init: normal(std),
                bs_init: Some(nn::Init::Const(0.0)),
                bias: true,
            };
            nn::linear(p / name, embed_dim, out, config)
        };
        Self {
            positional_embedding: p.var(
                "positional_embedding",
                &[spacial_dim * spacial_dim + 1, embed_dim],
                normal(std),
            ),
            k_proj: linear("k_proj", embed_dim),
            q_proj: linear("q_proj", embed_dim),
            v_proj: linear("v_proj", embed_dim),
            c_proj: linear("c_proj", output_dim),
            heads,
            grid: spacial_dim,
        }
    }

    /// `[batch, embed_dim, H, W]` -> `[batch, output_dim]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let (batch, channels, grid_h, grid_w) = (size[0], size[1], size[2], size[3]);
        // [batch, H * W, C], then the mean token in front: [batch, 1 + H * W, C]
        let x = x.flatten(2, 3).transpose(1, 2);
        let x = Tensor::cat(&[x.mean_dim(1, true, x.kind()), x], 1);
        let pos = resample_positional_embedding(&self.positional_embedding, self.grid, grid_h, grid_w);
        let kind = x.kind();
        let x = x + pos.to_kind(kind);
        let head_dim = channels / self.heads;
        let tokens = x.size()[1];
        let split = |t: Tensor, n: i64| t.view([batch, n, self.heads, head_dim]).transpose(1, 2);
        // Only the mean token's output is kept (`x[0]` in the reference), so
        // only its query is computed: [batch, heads, 1, head_dim].
        let q = split(x.narrow(1, 0, 1).apply(&self.q_proj), 1);
        let k = split(x.apply(&self.k_proj), tokens);
        let v = split(x.apply(&self.v_proj), tokens);
        let out = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false);
        out.transpose(1, 2).reshape([batch, channels]).apply(&self.c_proj)
    }
}

/// What a training forward pass of a [`ModifiedResNet`] gives.
#[derive(Debug)]
pub struct ResNetOutput {
    /// The attention pool's output `[batch, output_dim]`, CLIP's image feature.
    pub pooled: Tensor,
    /// The average-pooled final map `[batch, 32 * width]` (CLIP-ReID's
    /// `img_feature` of RN50).
    pub avg: Tensor,
    /// The average-pooled output of `layer3` `[batch, 16 * width]`
    /// (CLIP-ReID's `img_feature_last`).
    pub penultimate: Tensor,
    /// The final map as tokens `[batch, n, 32 * width]`.
    pub tokens: Tensor,
}

/// `ModifiedResNet` of OpenAI CLIP `model.py`: a 3-conv stem with an
/// avgpool, anti-aliased strided Bottlenecks, and an attention pool.
#[derive(Debug)]
pub struct ModifiedResNet {
    stem: Vec<(nn::Conv2D, nn::BatchNorm)>,
    layers: Vec<Vec<Bottleneck>>,
    attnpool: AttentionPool2d,
    total_stride: i64,
}

impl ModifiedResNet {
    /// `layers` are the Bottleneck counts of `layer1..layer4` and
    /// `last_stride` the stride of `layer4`, from the config's backbone.
    pub fn new<'a>(
        p: impl Borrow<nn::Path<'a>>,
        cfg: &ClipVisionConfig,
        layers: [i64; 4],
        last_stride: i64,
    ) -> Self {
        let p = p.borrow();
        let width = cfg.width;
        let stem = vec![
            (
                conv(p / "conv1", 3, width / 2, 3, 2),
                batch_norm(p / "bn1", width / 2),
            ),
            (
                conv(p / "conv2", width / 2, width / 2, 3, 1),
                batch_norm(p / "bn2", width / 2),
            ),
            (
                conv(p / "conv3", width / 2, width, 3, 1),
                batch_norm(p / "bn3", width),
            ),
        ];
        let mut inplanes = width;
        let mut stages = Vec::new();
        for (i, &blocks) in layers.iter().enumerate() {
            let planes = width << i;
            let stage = p / format!("layer{}", i + 1);
            let stride = match i {
                0 => 1,
                3 => last_stride,
                _ => 2,
            };
            let mut stage_blocks = vec![Bottleneck::new(&stage / 0, inplanes, planes, stride)];
            inplanes = planes * 4;
            stage_blocks.extend((1..blocks).map(|b| Bottleneck::new(&stage / b, inplanes, planes, 1)));
            stages.push(stage_blocks);
        }
        Self {
            stem,
            layers: stages,
            attnpool: AttentionPool2d::new(p / "attnpool", cfg.grid(), width * 32, cfg.heads, cfg.output_dim),
            total_stride: cfg.total_stride(),
        }
    }

    /// `[batch, 3, H, W]` (H, W multiples of the total stride) -> `[batch, output_dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, map) = self.feature_maps(x, false)?;
        Ok(self.attnpool.forward(&map))
    }

    /// The final feature map as tokens, before the attention pool:
    /// `[batch, 3, H, W]` -> `[batch, (H / s) * (W / s), 32 * width]`, `s`
    /// the total stride.
    pub fn forward_tokens(&self, x: &Tensor) -> Result<Tensor> {
        let (_, map) = self.feature_maps(x, false)?;
        Ok(map.flatten(2, 3).transpose(1, 2))
    }

    /// Both the pooled feature `[batch, output_dim]` and the tokens of
    /// [`ModifiedResNet::forward_tokens`], from one pass.
    pub fn forward_pooled_and_tokens(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, map) = self.feature_maps(x, false)?;
        Ok((self.attnpool.forward(&map), map.flatten(2, 3).transpose(1, 2)))
    }

    /// Every feature fine-tuning uses, from one pass; `train` selects batch
    /// statistics for every BatchNorm (and updates the running ones).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<ResNetOutput> {
        let (layer3, map) = self.feature_maps(x, train)?;
        let global_avg = |t: &Tensor| t.mean_dim([2i64, 3].as_slice(), false, t.kind());
        Ok(ResNetOutput {
            pooled: self.attnpool.forward(&map),
            avg: global_avg(&map),
            penultimate: global_avg(&layer3),
            tokens: map.flatten(2, 3).transpose(1, 2),
        })
    }

    /// Feature-map tokens `[batch, n, 32 * width]` -> `[batch, n, output_dim]`
    /// in the joint space, through the attention pool's value and output
    /// projections (`c_proj(v_proj(x))`), the path each position's value
    /// takes to CLIP's image feature (MaskCLIP, Zhou et al., "Extract Free
    /// Dense Labels from CLIP", ECCV 2022). The positional
    /// embedding is not added: it only shapes the pool's attention weights.
    pub fn project_tokens(&self, tokens: &Tensor) -> Tensor {
        tokens.apply(&self.attnpool.v_proj).apply(&self.attnpool.c_proj)
    }

    /// `[batch, 3, H, W]` -> the outputs of `layer3` and `layer4`, the
    /// latter `[batch, 32 * width, H / s, W / s]` (`s` the total stride).
    fn feature_maps(&self, x: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let size = x.size();
        let [_, 3, height, width] = size[..] else {
            return Err(Error::InvalidInput(format!(
                "expected [batch, 3, H, W] pixels, got {size:?}"
            )));
        };
        let s = self.total_stride;
        if height % s != 0 || width % s != 0 || height == 0 || width == 0 {
            return Err(Error::InvalidInput(format!(
                "input {height}x{width} is not a positive multiple of {s}"
            )));
        }
        let kind = self.attnpool.positional_embedding.kind();
        let mut x = x.to_kind(kind);
        for (conv, bn) in &self.stem {
            x = x.apply(conv).apply_t(bn, train).relu();
        }
        let mut x = avg_pool(&x, 2);
        let mut layer3 = x.shallow_clone();
        for (stage, blocks) in self.layers.iter().enumerate() {
            for block in blocks {
                x = block.forward_t(&x, train);
            }
            if stage == 2 {
                layer3 = x.shallow_clone();
            }
        }
        Ok((layer3, x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn tiny_resnet_pools_any_multiple_of_32_to_the_output_dim() {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = ClipVisionConfig::tiny_resnet();
        let model = ModifiedResNet::new(vs.root() / "visual", &cfg, [1, 1, 1, 1], 2);
        for (h, w) in [(64, 64), (96, 64), (32, 32)] {
            let out = model
                .forward(&Tensor::randn([2, 3, h, w], (Kind::Float, Device::Cpu)))
                .expect("forward");
            assert_eq!(out.size(), [2, 16], "{h}x{w}");
        }
        assert!(
            model
                .forward(&Tensor::randn([1, 3, 60, 64], (Kind::Float, Device::Cpu)))
                .is_err()
        );
    }

    #[test]
    fn last_stride_one_keeps_twice_the_grid_and_train_mode_updates_statistics() {
        let vs = nn::VarStore::new(Device::Cpu);
        let mut cfg = ClipVisionConfig::tiny_resnet();
        cfg.backbone = crate::config::Backbone::ModifiedResnet {
            layers: [1, 1, 1, 1],
            last_stride: 1,
        };
        let model = ModifiedResNet::new(vs.root() / "visual", &cfg, [1, 1, 1, 1], 1);
        // 64 px at a total stride of 16: a 4x4 map, 17 pool positions.
        assert_eq!(
            vs.variables()["visual.attnpool.positional_embedding"].size(),
            [17, 128]
        );
        let x = Tensor::randn([3, 3, 64, 64], (Kind::Float, Device::Cpu));
        let mean = vs.variables()["visual.layer4.0.bn3.running_mean"].copy();
        let out = model.forward_t(&x, false).expect("eval");
        assert_eq!(out.tokens.size(), [3, 16, 128]);
        assert_eq!(out.avg.size(), [3, 128]);
        assert_eq!(out.penultimate.size(), [3, 64]);
        assert_eq!(out.pooled.size(), [3, 16]);
        let same = vs.variables()["visual.layer4.0.bn3.running_mean"].copy();
        assert_eq!(f64::try_from((&same - &mean).abs().max()).expect("max"), 0.0);
        let _ = model.forward_t(&x, true).expect("train");
        let moved = vs.variables()["visual.layer4.0.bn3.running_mean"].copy();
        assert!(f64::try_from((&moved - &mean).abs().max()).expect("max") > 0.0);
        assert!(
            model
                .forward_t(&Tensor::randn([1, 3, 40, 64], (Kind::Float, Device::Cpu)), false)
                .is_err()
        );
    }

    #[test]
    fn strided_and_widening_blocks_have_an_avgpool_downsample() {
        let vs = nn::VarStore::new(Device::Cpu);
        ModifiedResNet::new(
            vs.root() / "visual",
            &ClipVisionConfig::tiny_resnet(),
            [2, 1, 1, 1],
            2,
        );
        let vars = vs.variables();
        let has = |k: &str| vars.contains_key(k);
        assert!(
            has("visual.layer1.0.downsample.0.weight") && has("visual.layer1.0.downsample.1.running_var")
        );
        assert!(!has("visual.layer1.1.downsample.0.weight"));
        assert!(has("visual.layer2.0.downsample.0.weight"));
        assert_eq!(vars["visual.attnpool.positional_embedding"].size(), [5, 128]);
        assert_eq!(vars["visual.attnpool.c_proj.weight"].size(), [16, 128]);
        assert_eq!(vars["visual.conv1.weight"].size(), [2, 3, 3, 3]);
    }
}
