//! `handid-trainer init`: a serving checkpoint with random weights, the
//! untrained baseline of every comparison (and what tests and the demo start
//! from where no pretrained CLIP can be had); with `--clip-for CONFIG`, a
//! whole random CLIP in OpenAI's key names, a stand-in for `ViT-B-16.pt`
//! that `train --clip-weights` loads.

use std::path::PathBuf;

use anyhow::Context;
use handid_model::{ClipVisionConfig, create_random_checkpoint};

/// The architectures `init` knows by name.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Arch {
    /// CLIP ViT-B/16 (224x224, 512-d).
    VitB16,
    /// CLIP RN50 (224x224, 1024-d).
    Rn50,
    /// A tiny ViT for tests and CPU demos.
    TinyVit,
    /// A tiny ModifiedResNet for tests.
    TinyResnet,
}

/// Arguments of `init`.
#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Architecture preset.
    #[arg(long, value_enum, default_value = "tiny-vit")]
    pub arch: Arch,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// The serving checkpoint folder to write (with `--clip-for`: the
    /// safetensors file).
    #[arg(long)]
    pub out: PathBuf,
    /// Write a whole CLIP (both towers and `logit_scale`, OpenAI key names)
    /// with the towers of this training config's `model` section instead
    /// (`--arch` is then unused).
    #[arg(long)]
    pub clip_for: Option<PathBuf>,
}

/// Writes the checkpoint and prints its model id.
pub fn run(args: &InitArgs) -> anyhow::Result<()> {
    if let Some(config) = &args.clip_for {
        return write_clip(&crate::config::TrainConfig::read(config)?, args.seed, &args.out);
    }
    let config = match args.arch {
        Arch::VitB16 => ClipVisionConfig::vit_b16(),
        Arch::Rn50 => ClipVisionConfig::rn50(),
        Arch::TinyVit => ClipVisionConfig::tiny_vit(),
        Arch::TinyResnet => ClipVisionConfig::tiny_resnet(),
    };
    let manifest = create_random_checkpoint(&args.out, &config, args.seed)
        .with_context(|| format!("writing a random checkpoint to {}", args.out.display()))?;
    println!(
        "random {} ({}-d embeddings, seed {}) written to {} as model {}",
        manifest.architecture,
        manifest.embedding_dim,
        args.seed,
        args.out.display(),
        manifest.model_id
    );
    Ok(())
}

/// A random CLIP with `config`'s towers, saved with OpenAI's keys.
fn write_clip(config: &crate::config::TrainConfig, seed: i64, out: &std::path::Path) -> anyhow::Result<()> {
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    tch::manual_seed(seed);
    handid_model::Clip::new(
        vs.root(),
        &handid_model::ClipConfig {
            vision: config.model.vision(),
            text: config.model.text(),
        },
    )?;
    let tensors = handid_model::checkpoint::named_variables(&vs);
    tch::Tensor::write_safetensors(&tensors, out).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "random CLIP ({}, {} tensors, seed {seed}) written to {}",
        config.model.vision().architecture(),
        tensors.len(),
        out.display()
    );
    Ok(())
}
