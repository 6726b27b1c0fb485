//! `handid-trainer synth`: writes a synthetic identity-labelled dataset.

use std::path::PathBuf;

use anyhow::Context;
use handid_eval::data::synthetic::{self, Layout, SynthOptions};

use super::splits::DatasetLayout;

/// Arguments of `synth`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Layout to write.
    #[arg(long, value_enum, default_value = "folder")]
    pub layout: DatasetLayout,
    /// Number of persons.
    #[arg(long, default_value_t = 100)]
    pub persons: usize,
    /// Images per person.
    #[arg(long, default_value_t = 8)]
    pub images_per_person: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 64)]
    pub size: u32,
    /// Seed of everything generated.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Runs the command.
pub fn run(args: Args) -> anyhow::Result<()> {
    let layout = match args.layout {
        DatasetLayout::Hands11k => Layout::Hands11k,
        DatasetLayout::Folder => Layout::Folder,
    };
    let options = SynthOptions {
        persons: args.persons,
        images_per_person: args.images_per_person,
        size: args.size,
        seed: args.seed,
        layout,
    };
    let written = synthetic::generate(&args.out, &options)
        .with_context(|| format!("writing synthetic data to {}", args.out.display()))?;
    println!(
        "wrote {written} images of {} persons to {}",
        args.persons,
        args.out.display()
    );
    Ok(())
}
