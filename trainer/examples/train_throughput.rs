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
use handid_trainer::engine::{Optimizer, OptimizerKind, ParamGroup, loss_terms, sorted_vars};
use handid_trainer::losses::CenterLoss;
use handid_trainer::net::{ReidNet, seeded};
use tch::{Device, Kind, Tensor, nn};

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
  optim: {{lr: 5.0e-6}}
"
    ))?;
    let handid_trainer::config::Method::Finetune(stage) = &config.method else {
        unreachable!()
    };
    let size = match config.model.arch {
        Arch::TinyVit => 32,
        Arch::TinyResnet => 64,
        _ => 224,
    };
    let classes = 100;
    let net = seeded(0, || {
        ReidNet::new(&config.model, Some(&stage.head), classes, device)
    })?;
    net.set_trainable(None);
    let mut optimizer = Optimizer::new(stage.optim.optimizer.clone(), net.param_groups(&stage.optim))?;
    let center_vs = nn::VarStore::new(device);
    let dim = handid_model::ImageEncoder::feature_dim(&config.model.vision(), config.model.feature)?;
    let center = CenterLoss::new(center_vs.root(), classes, dim);
    let mut center_opt = Optimizer::new(
        OptimizerKind::Sgd {
            momentum: 0.0,
            nesterov: false,
        },
        vec![ParamGroup {
            name: "center".into(),
            lr: 0.5,
            weight_decay: 0.0,
            params: sorted_vars(&center_vs),
        }],
    )?;
    println!(
        "# handid stage-2 train step, {arch} at {size}x{size}, {device:?}, {} threads",
        tch::get_num_threads()
    );
    for &batch in &batches {
        // P x K with K = 2: batch / 2 persons.
        let labels = Tensor::arange(batch, (Kind::Int64, device)).divide_scalar_mode(2, "floor");
        let pixels = Tensor::randn([batch, 3, size, size], (Kind::Float, device));
        let mut step = || -> anyhow::Result<()> {
            optimizer.zero_grad();
            center_opt.zero_grad();
            let out = net.forward(&pixels, Some(&labels), true)?;
            let terms = loss_terms(&net, &out, &labels, &stage.losses, Some(&center), None, 0)?;
            let total = terms
                .into_iter()
                .map(|(_, t)| t)
                .reduce(|a, b| a + b)
                .unwrap_or_default();
            total.backward();
            optimizer.step(1.0);
            center_opt.scale_grads(1.0 / 0.0005);
            center_opt.step(1.0);
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
