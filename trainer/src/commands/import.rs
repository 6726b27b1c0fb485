//! `handid-trainer import`: real CLIP weights to a serving checkpoint.

use std::path::PathBuf;

use anyhow::Context;
use handid_model::import::{OPENAI_HEAD_WIDTH, import_checkpoint};

/// Arguments of `import`.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// OpenAI TorchScript archive (`ViT-B-16.pt`), OpenAI/open_clip state dict
    /// or Hugging Face `CLIPModel` weights, as safetensors.
    #[arg(long)]
    pub from: PathBuf,
    /// The serving checkpoint folder to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Width of an attention head (64 for every OpenAI model).
    #[arg(long, default_value_t = OPENAI_HEAD_WIDTH)]
    pub head_width: i64,
}

/// Imports, then prints the architecture and model id.
pub fn run(args: &ImportArgs) -> anyhow::Result<()> {
    let manifest = import_checkpoint(&args.from, &args.out, args.head_width)
        .with_context(|| format!("importing {} into {}", args.from.display(), args.out.display()))?;
    println!(
        "imported {} ({}, {}-d embeddings) as model {}",
        args.from.display(),
        manifest.architecture,
        manifest.embedding_dim,
        manifest.model_id
    );
    Ok(())
}
