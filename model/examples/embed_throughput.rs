//! Embedder throughput benchmark: random-weight CLIP image encoder, random
//! pixels, images per second at each batch size. Prints one line per batch
//! size; `scripts/bench/embed_speed.sh` runs it beside open_clip and prints
//! the ratio.
//!
//! ```text
//! cargo run --release -p handid-model --example embed_throughput -- \
//!     --arch vit_b16 --device cpu --precision f32 --batches 1,8 --seconds 20
//! ```

use std::time::{Duration, Instant};

use handid_model::{ClipVisionConfig, Embedder, Precision, create_random_checkpoint, parse_device};
use tch::{Kind, Tensor};

struct Args {
    arch: String,
    device: String,
    precision: Precision,
    batches: Vec<i64>,
    seconds: f64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        arch: "vit_b16".into(),
        device: "cpu".into(),
        precision: Precision::F32,
        batches: vec![1, 8],
        seconds: 20.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--arch" => args.arch = value,
            "--device" => args.device = value,
            "--precision" => {
                args.precision = serde_yaml::from_str(&value).map_err(|e| format!("--precision: {e}"))?
            }
            "--batches" => {
                args.batches = value
                    .split(',')
                    .map(|b| b.parse().map_err(|_| format!("bad batch size {b:?}")))
                    .collect::<Result<_, _>>()?
            }
            "--seconds" => args.seconds = value.parse().map_err(|_| format!("bad --seconds {value:?}"))?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(args)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let config = match args.arch.as_str() {
        "vit_b16" => ClipVisionConfig::vit_b16(),
        "rn50" => ClipVisionConfig::rn50(),
        "tiny_vit" => ClipVisionConfig::tiny_vit(),
        other => return Err(format!("unknown --arch {other}").into()),
    };
    let device = parse_device(&args.device)?;
    let dir = tempfile::tempdir()?;
    let manifest = create_random_checkpoint(dir.path(), &config, 0)?;
    let embedder = Embedder::load_with_precision(dir.path(), device, args.precision)?;
    let (h, w) = manifest.preprocess.input_size();
    println!(
        "# handid embedder: arch={} device={} precision={:?} threads={} input={h}x{w}",
        args.arch,
        args.device,
        args.precision,
        tch::get_num_threads()
    );
    for &batch in &args.batches {
        let pixels = Tensor::randn(
            [batch, 3, i64::from(h), i64::from(w)],
            (Kind::Float, tch::Device::Cpu),
        );
        // Warm-up: first calls allocate and pick kernels.
        for _ in 0..2 {
            let _ = embedder.embed_batch(&pixels)?;
        }
        let budget = Duration::from_secs_f64(args.seconds);
        let start = Instant::now();
        let mut images = 0i64;
        while start.elapsed() < budget || images == 0 {
            // embed_batch returns CPU tensors, so each call includes the copy back.
            let _ = embedder.embed_batch(&pixels)?;
            images += batch;
        }
        let rate = images as f64 / start.elapsed().as_secs_f64();
        println!("rust batch={batch} images_per_s={rate:.3}");
    }
    Ok(())
}
