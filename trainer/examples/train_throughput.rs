//! Training throughput of the stage-2 recipe (BNNeck + ArcFace, cross-entropy
//! with label smoothing, batch-hard triplet, center loss with its own SGD,
//! SupCon; Adam) on random-weight CLIP and random pixels: one optimizer step
//! per batch, forward + backward + update, as `engine::train` does it.
//! Prints `rust batch=B images_per_s=X` per batch size and the peak resident
//! memory, for `scripts/bench/train_speed.sh` to compare with the same loop
//! in PyTorch (`scripts/bench/torch_train_step.py`).
//!
//! cargo run --release -p handid-trainer --example train_throughput -- --arch vit_b16 --batches 2,8

use std::time::Instant;

use anyhow::Context;
use handid_trainer::config::{Arch, TrainConfig};
use handid_trainer::engine::ImageTrainer;
use handid_trainer::net::ReidNet;
use tch::{Device, Kind, Tensor};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_owned())
}

/// Peak resident memory of this process (VmHWM), MiB.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let arch = arg("--arch", "vit_b16");
    let device = handid_model::parse_device(&arg("--device", "cpu"))?;
    let seconds: f64 = arg("--seconds", "30").parse()?;
    let batches: Vec<i64> = arg("--batches", "2,8")
        .split(',')
        .map(|b| b.parse().context("--batches"))
        .collect::<anyhow::Result<_>>()?;
    let config = TrainConfig::from_yaml(&format!(
        "
name: bench
model: {{arch: {arch}}}
data: {{manifest: unused}}
method:
  kind: finetune
  epochs: 1
  head: {{classifier: arcface}}
  losses: {{id: {{}}, triplet: {{margin: 0.3}}, center: {{}}, sup_con: {{weight: 0.5}}}}
  optim: {{lr: 5.0e-6, schedule: {{kind: constant}}}}
"
    ))?;
    let stage = config.method.stage2().context("a training stage")?;
    let size = match config.model.arch {
        Arch::TinyVit => 32,
        Arch::TinyResnet => 64,
        _ => 224,
    };
    let classes = 100;
    let net = ReidNet::build(&config, classes, device)?;
    let mut trainer = ImageTrainer::new(&net, stage, None, None, classes, 0)?;
    println!(
        "# handid stage-2 train step, {arch} at {size}x{size}, {device:?}, {} threads",
        tch::get_num_threads()
    );
    for &batch in &batches {
        // P x K with K = 2: batch / 2 persons.
        let labels = Tensor::arange(batch, (Kind::Int64, device)).divide_scalar_mode(2, "floor");
        let pixels = Tensor::randn([batch, 3, size, size], (Kind::Float, device));
        let mut step = || -> anyhow::Result<()> {
            trainer.batch(&pixels, &labels, 0, true)?;
            if device != Device::Cpu {
                tch::Cuda::synchronize(0);
            }
            Ok(())
        };
        step()?; // warm-up
        let first = Instant::now();
        step()?;
        let one_step = first.elapsed().as_secs_f64();
        let start = Instant::now();
        let mut steps = 0u64;
        let mut best = f64::INFINITY;
        while steps < 2 || start.elapsed().as_secs_f64() < seconds {
            let t = Instant::now();
            step()?;
            best = best.min(t.elapsed().as_secs_f64());
            steps += 1;
        }
        let elapsed = start.elapsed().as_secs_f64();
        println!(
            "rust batch={batch} images_per_s={:.3} step_s={:.3} best_step_s={best:.3} first_step_s={one_step:.3} peak_rss_mib={:.0}",
            (steps as f64 * batch as f64) / elapsed,
            elapsed / steps as f64,
            peak_rss_mib()
        );
    }
    Ok(())
}
