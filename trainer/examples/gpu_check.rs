//! The GPU host check of `scripts/bench/gpu_check.sh` (issue #13, item 7),
//! one subcommand per part; every part also runs on the CPU (`--device cpu`)
//! for a smoke test:
//!
//! - `parity --model DIR --device cuda [--batch 8]`: the serving code path
//!   (`Embedder::embed_images`: preprocessing, forward, L2 normalisation) on
//!   the device vs on the CPU in f32, for the device in f32 and in f16; prints
//!   the max abs difference of the embeddings and PASS/FAIL (limits 1e-4 and
//!   2e-2).
//! - `train-steps --device cuda [--batch 16] [--steps 3]`: optimizer steps of
//!   each method on random-weight ViT-B/16 at `optim.precision: amp` (f32 on
//!   the CPU, where amp is refused): `finetune` (BNNeck + ArcFace, ID +
//!   triplet + center + SupCon), `clip_reid` (`configs/clip_reid_vitb16.yaml`:
//!   a stage-1 step, then stage-2 steps) and `prompt_sg`
//!   (`configs/prompt_sg_vitb16.yaml`), through `ImageTrainer` /
//!   `PromptTrainer` as `engine::train` drives them. Prints every loss term,
//!   whether all are finite, the loss scale, whether the weights moved and
//!   each step's time.
//! - `identify --server URL [--gallery 16] [--probes 64]`: a running
//!   `handid-server` over gRPC: enrols one synthetic hand per subject into a
//!   fresh gallery, identifies each enrolled image (its own subject must come
//!   first, score >= 0.999) and another view of each person, prints the
//!   latencies, deletes the gallery.
//!
//! Lines starting with `RESULT ` are what the script's summary collects.
//!
//! ```text
//! cargo run --release -p handid-trainer --example gpu_check -- parity --model CKPT --device cpu --batch 2
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use handid_eval::data::synthetic::{self, SynthOptions};
use handid_model::{Embedder, Precision, parse_device};
use handid_proto::v1::decision_rule::Rule;
use handid_proto::v1::hand_id_client::HandIdClient;
use handid_proto::v1::{DecisionRule, DeleteGalleryRequest, EnrollRequest, IdentifyRequest, Image};
use handid_trainer::config::{Method, TrainConfig};
use handid_trainer::engine::{ImageTrainer, PromptTrainer, TermValue};
use handid_trainer::net::ReidNet;
use image::RgbImage;
use tch::{Device, Kind, Tensor};

/// `--name value` pairs after the subcommand.
struct Flags(HashMap<String, String>);

impl Flags {
    fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut map = HashMap::new();
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let name = flag
                .strip_prefix("--")
                .with_context(|| format!("expected --flag, got {flag:?}"))?;
            let value = it.next().with_context(|| format!("{flag} needs a value"))?;
            map.insert(name.to_owned(), value.clone());
        }
        Ok(Self(map))
    }

    fn get(&self, name: &str, default: &str) -> String {
        self.0.get(name).cloned().unwrap_or_else(|| default.to_owned())
    }

    fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> anyhow::Result<T> {
        match self.0.get(name) {
            Some(v) => v.parse().map_err(|_| anyhow::anyhow!("bad --{name} {v:?}")),
            None => Ok(default),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (command, rest) = args
        .split_first()
        .context("usage: gpu_check parity|train-steps|identify [--flag value ...]")?;
    let flags = Flags::parse(rest)?;
    match command.as_str() {
        "parity" => parity(&flags),
        "train-steps" => train_steps(&flags),
        "identify" => identify(&flags),
        other => bail!("unknown subcommand {other:?} (parity, train-steps, identify)"),
    }
}

/// Synthetic hand photos: `persons` persons, view `view` of each.
fn hands(persons: usize, view: usize) -> Vec<RgbImage> {
    let options = SynthOptions {
        persons,
        images_per_person: view + 1,
        size: 128,
        seed: 13,
        ..SynthOptions::default()
    };
    (0..persons)
        .map(|p| synthetic::image(&options, p, view))
        .collect()
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

// ---------------------------------------------------------------- parity

fn parity(flags: &Flags) -> anyhow::Result<()> {
    let model = PathBuf::from(flags.get("model", ""));
    ensure!(!model.as_os_str().is_empty(), "parity needs --model DIR");
    // Before any other CUDA query (device.rs).
    let device = parse_device(&flags.get("device", "cuda"))?;
    let batch: usize = flags.num("batch", 8)?;
    let images = hands(batch, 0);
    let cpu = Embedder::load(&model, Device::Cpu)?;
    let reference = cpu.embed_images(&images)?;
    drop(cpu);
    println!(
        "# parity: {} ({}), {batch} synthetic hands, reference: CPU f32",
        model.display(),
        reference.size()[1]
    );
    let mut all_ok = true;
    for (precision, name, limit) in [(Precision::F32, "fp32", 1e-4), (Precision::F16, "fp16", 2e-2)] {
        let start = Instant::now();
        let embedder = Embedder::load_with_precision(&model, device, precision)?;
        let loaded = start.elapsed().as_secs_f64();
        // Twice: the second call runs with the kernels already chosen, and
        // both must agree with the reference.
        let mut worst = 0.0f64;
        let mut finite = true;
        for _ in 0..2 {
            let out = embedder.embed_images(&images)?;
            finite &= out.isfinite().all().int64_value(&[]) == 1;
            worst = worst.max(max_abs_diff(&out, &reference));
        }
        let ok = finite && worst <= limit;
        all_ok &= ok;
        println!(
            "RESULT parity_{name} device={device:?} max_abs_diff={worst:.3e} limit={limit:.0e} finite={finite} load_s={loaded:.1} {}",
            verdict(ok)
        );
    }
    ensure!(all_ok, "embedding parity failed");
    Ok(())
}

// ---------------------------------------------------------------- training steps

/// The finetune recipe of `examples/train_throughput.rs`: BNNeck + ArcFace,
/// ID + triplet + center + SupCon, Adam.
const FINETUNE: &str = "
name: gpu_check_finetune
model: {arch: vit_b16}
data: {manifest: unused}
method:
  kind: finetune
  epochs: 1
  head: {classifier: arcface}
  losses: {id: {}, triplet: {margin: 0.3}, center: {}, sup_con: {weight: 0.5}}
  optim: {lr: 5.0e-6, schedule: {kind: constant}}
";

/// A recipe with `device` and, on a GPU, `precision: amp` in the optim of
/// its image-training stage.
fn recipe(text: &str, device: &str, amp: bool) -> anyhow::Result<TrainConfig> {
    let mut value: serde_yaml::Value = serde_yaml::from_str(text)?;
    let map = value.as_mapping_mut().context("a recipe is a mapping")?;
    map.insert("device".into(), device.into());
    if amp {
        let method = map.get_mut("method").context("method")?;
        let kind = method
            .get("kind")
            .and_then(serde_yaml::Value::as_str)
            .context("method.kind")?
            .to_owned();
        let stage = match kind.as_str() {
            "finetune" => method,
            "clip_reid" => method.get_mut("stage2").context("method.stage2")?,
            "prompt_sg" => method.get_mut("train").context("method.train")?,
            other => bail!("no image-training stage in {other}"),
        };
        let stage = stage.as_mapping_mut().context("the stage is a mapping")?;
        let optim = stage
            .entry("optim".into())
            .or_insert_with(|| serde_yaml::Mapping::new().into());
        optim
            .as_mapping_mut()
            .context("optim is a mapping")?
            .insert("precision".into(), "amp".into());
    }
    TrainConfig::from_yaml(&serde_yaml::to_string(&value)?)
}

/// `P x K` synthetic hands (`K` views of `P` persons) preprocessed as
/// `config` says, and their labels, on `device`.
fn hand_batch(
    config: &TrainConfig,
    persons: usize,
    views: usize,
    device: Device,
) -> anyhow::Result<(Tensor, Tensor)> {
    let preprocess = config.model.preprocess();
    let options = SynthOptions {
        persons,
        images_per_person: views,
        size: 128,
        seed: 7,
        ..SynthOptions::default()
    };
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for p in 0..persons {
        for v in 0..views {
            pixels.push(preprocess.apply(&synthetic::image(&options, p, v))?);
            labels.push(p as i64);
        }
    }
    Ok((
        Tensor::stack(&pixels, 0).to_device(device),
        Tensor::from_slice(&labels).to_device(device),
    ))
}

/// Copies of the trainable variables, to see whether a step moved them.
fn trainable(net: &ReidNet) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = net
        .vs
        .variables()
        .into_iter()
        .filter(|(_, v)| v.requires_grad())
        .map(|(n, v)| (n, v.detach().copy()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

fn moved(net: &ReidNet, before: &[(String, Tensor)]) -> f64 {
    let now = net.vs.variables();
    before
        .iter()
        .filter_map(|(n, t)| now.get(n).map(|v| max_abs_diff(&v.detach(), t)))
        .fold(0.0, f64::max)
}

fn terms_line(terms: &[TermValue]) -> (String, bool, f64) {
    let finite = terms
        .iter()
        .all(|t| t.value.is_finite() && t.weighted.is_finite());
    let total: f64 = terms.iter().map(|t| t.weighted).sum();
    let list = terms
        .iter()
        .map(|t| format!("{}={:.5}", t.name, t.value))
        .collect::<Vec<_>>()
        .join(" ");
    (list, finite, total)
}

/// Runs `steps` image-training steps and reports them as `label`.
fn image_steps(
    label: &str,
    trainer: &mut ImageTrainer<'_>,
    net: &ReidNet,
    pixels: &Tensor,
    labels: &Tensor,
    steps: usize,
    device: Device,
) -> anyhow::Result<bool> {
    let before = trainable(net);
    let mut finite_all = true;
    let mut times = Vec::new();
    let (mut applied, mut skipped) = (0usize, 0usize);
    // With amp, the loss scaler may skip the first updates (overflowed
    // gradients halve the scale, as torch's GradScaler): keep stepping, up
    // to 8 more, until one update is applied.
    let mut step = 0;
    while step < steps || (applied == 0 && step < steps + 8) {
        step += 1;
        let scale = trainer.scaler.scale;
        sync(device);
        let start = Instant::now();
        let terms = trainer.batch(pixels, labels, 0, true)?;
        sync(device);
        let seconds = start.elapsed().as_secs_f64();
        times.push(seconds);
        let (list, finite, total) = terms_line(&terms);
        finite_all &= finite;
        let overflowed = trainer.scaler.scale < scale;
        if overflowed {
            skipped += 1;
        } else {
            applied += 1;
        }
        println!(
            "  {label} step {step}: {list} total={total:.5} finite={finite} loss_scale={scale}{} step_s={seconds:.3}",
            if overflowed {
                " (gradients overflowed: update skipped, scale halved)"
            } else {
                ""
            }
        );
    }
    let moved = moved(net, &before);
    let steady = median(&times[1.min(times.len() - 1)..]);
    let ok = finite_all && applied > 0 && moved > 0.0;
    println!(
        "RESULT train_{label} finite={finite_all} updates={applied} skipped={skipped} weights_moved={moved:.3e} first_step_s={:.3} step_s={steady:.3} {}",
        times[0],
        verdict(ok)
    );
    Ok(ok)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn train_steps(flags: &Flags) -> anyhow::Result<()> {
    let device_name = flags.get("device", "cuda");
    let device = parse_device(&device_name)?;
    let batch: usize = flags.num("batch", 16)?;
    let views: usize = flags.num("views", 4)?;
    let steps: usize = flags.num::<usize>("steps", 3)?.max(1);
    let configs = PathBuf::from(flags.get("configs", "configs"));
    let methods = flags.get("methods", "finetune,clip_reid,prompt_sg");
    ensure!(
        batch >= 2 * views && batch.is_multiple_of(views),
        "--batch must be a multiple of --views ({views}) with at least two persons"
    );
    let persons = batch / views;
    let classes = persons as i64;
    let amp = device != Device::Cpu;
    println!(
        "# training steps: ViT-B/16 random weights, batch {batch} ({persons} persons x {views} views, 224x224), {} on {device:?}, {} threads",
        if amp {
            "optim.precision amp"
        } else {
            "f32 (amp is CUDA-only)"
        },
        tch::get_num_threads()
    );
    let mut all_ok = true;
    for method in methods.split(',') {
        let text = match method {
            "finetune" => FINETUNE.to_owned(),
            "clip_reid" | "prompt_sg" => {
                let file = configs.join(format!("{method}_vitb16.yaml"));
                std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?
            }
            other => bail!("unknown method {other:?}"),
        };
        let config = recipe(&text, &device_name, amp)?;
        let start = Instant::now();
        let net = ReidNet::build(&config, classes, device)?;
        net.refresh_simplified_text()?;
        sync(device);
        println!(
            "{method} ({}): net built in {:.1}s",
            config.name,
            start.elapsed().as_secs_f64()
        );
        let (pixels, labels) = hand_batch(&config, persons, views, device)?;
        let stage = config.method.stage2().context("an image-training stage")?;
        let text = if let Method::ClipReid { stage1, .. } = &config.method {
            // Stage 1 as engine::train runs it: the projected features cached
            // in inference mode (f32), then a prompt step (PromptTrainer has
            // no amp path: stage 1 is f32 in every run).
            let features = net.projected_features(&pixels)?.to_kind(Kind::Float);
            let mut prompts = PromptTrainer::new(&net, stage1, features, labels.shallow_clone())?;
            let ctx_before = net
                .prompt_learner
                .as_ref()
                .context("the prompt learner")?
                .ctx()
                .detach()
                .copy();
            let indices: Vec<i64> = (0..batch as i64).collect();
            let mut times = Vec::new();
            let mut finite_all = true;
            for step in 1..=steps {
                sync(device);
                let t = Instant::now();
                let terms = prompts.batch(&indices, 0)?;
                sync(device);
                times.push(t.elapsed().as_secs_f64());
                let (list, finite, total) = terms_line(&terms);
                finite_all &= finite;
                println!(
                    "  clip_reid_stage1 step {step}: {list} total={total:.5} finite={finite} (f32) step_s={:.3}",
                    times[step - 1]
                );
            }
            drop(prompts);
            let learner = net.prompt_learner.as_ref().context("the prompt learner")?;
            let moved = max_abs_diff(&learner.ctx().detach(), &ctx_before);
            let ok = finite_all && moved > 0.0;
            all_ok &= ok;
            println!(
                "RESULT train_clip_reid_stage1 finite={finite_all} updates={steps} weights_moved={moved:.3e} first_step_s={:.3} step_s={:.3} {}",
                times[0],
                median(&times[1.min(times.len() - 1)..]),
                verdict(ok)
            );
            let all = Tensor::arange(classes, (Kind::Int64, device));
            Some(tch::no_grad(|| learner.text_features(&net.clip.text, &all))?.to_kind(Kind::Float))
        } else {
            None
        };
        let label = if text.is_some() {
            "clip_reid_stage2".to_owned()
        } else {
            method.to_owned()
        };
        let mut trainer = ImageTrainer::new(
            &net,
            stage,
            text,
            config.model.unfreeze_last_blocks,
            classes,
            config.seed,
        )?;
        all_ok &= image_steps(&label, &mut trainer, &net, &pixels, &labels, steps, device)?;
    }
    ensure!(all_ok, "a training step failed its checks");
    Ok(())
}

// ---------------------------------------------------------------- identify

fn png(image: &RgbImage) -> anyhow::Result<Vec<u8>> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    image.write_to(&mut bytes, image::ImageFormat::Png)?;
    Ok(bytes.into_inner())
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn identify(flags: &Flags) -> anyhow::Result<()> {
    let server = flags.get("server", "http://127.0.0.1:50051");
    let gallery_size: usize = flags.num("gallery", 16)?;
    let probes: usize = flags.num("probes", 64)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(identify_async(&server, gallery_size, probes))
}

async fn identify_async(server: &str, gallery_size: usize, probes: usize) -> anyhow::Result<()> {
    let mut client = HandIdClient::connect(server.to_owned())
        .await
        .with_context(|| format!("connecting to {server}"))?;
    let gallery = format!("gpu-check-{}", std::process::id());
    let enrolled = hands(gallery_size, 0)
        .iter()
        .map(png)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let other_views = hands(gallery_size, 1)
        .iter()
        .map(png)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let start = Instant::now();
    let mut model_id = String::new();
    for (i, data) in enrolled.iter().enumerate() {
        let response = client
            .enroll(EnrollRequest {
                gallery_id: gallery.clone(),
                subject_id: format!("person-{i}"),
                images: vec![Image { data: data.clone() }],
                idempotency_key: String::new(),
            })
            .await
            .context("Enroll")?
            .into_inner();
        model_id = response.model_id;
    }
    let enrol_s = start.elapsed().as_secs_f64();
    println!(
        "# identify: {server}, model {}, gallery {gallery} of {gallery_size} subjects enrolled in {enrol_s:.2}s",
        model_id.get(..12).unwrap_or(&model_id)
    );
    let result = identify_probes(&mut client, &gallery, &enrolled, &other_views, probes).await;
    let deleted = client
        .delete_gallery(DeleteGalleryRequest {
            gallery_id: gallery.clone(),
        })
        .await
        .map(|r| r.into_inner().subjects_deleted);
    println!("  gallery deleted: {deleted:?}");
    result
}

async fn identify_probes(
    client: &mut HandIdClient<tonic::transport::Channel>,
    gallery: &str,
    enrolled: &[Vec<u8>],
    other_views: &[Vec<u8>],
    probes: usize,
) -> anyhow::Result<()> {
    let n = enrolled.len();
    let mut latencies = Vec::new();
    let (mut self_first, mut self_scores_ok, mut view_first) = (0usize, 0usize, 0usize);
    let mut worst_self = f32::INFINITY;
    // The highest score of another subject for an enrolled image: how far
    // random weights keep different hands apart.
    let mut best_other = f32::NEG_INFINITY;
    let mut gallery_sizes_ok = true;
    for k in 0..probes.max(2 * n) {
        // First every enrolled image, then every other view, then repeats.
        let (person, same_image) = (k % n, (k / n).is_multiple_of(2));
        let data = if same_image {
            &enrolled[person]
        } else {
            &other_views[person]
        };
        let start = Instant::now();
        let response = client
            .identify(IdentifyRequest {
                gallery_id: gallery.to_owned(),
                image: Some(Image { data: data.clone() }),
                top_k: n as u32,
                rule: Some(DecisionRule {
                    rule: Some(Rule::Threshold(0.5)),
                }),
            })
            .await
            .context("Identify")?
            .into_inner();
        latencies.push(start.elapsed().as_secs_f64() * 1e3);
        gallery_sizes_ok &= response.gallery_size as usize == n;
        let subject = format!("person-{person}");
        let first = response
            .candidates
            .first()
            .is_some_and(|c| c.subject_id == subject);
        if k < 2 * n {
            if same_image {
                let own = response
                    .candidates
                    .iter()
                    .find(|c| c.subject_id == subject)
                    .map_or(f32::NEG_INFINITY, |c| c.score);
                worst_self = worst_self.min(own);
                best_other = response
                    .candidates
                    .iter()
                    .filter(|c| c.subject_id != subject)
                    .map(|c| c.score)
                    .fold(best_other, f32::max);
                self_scores_ok += usize::from(own >= 0.999);
                self_first += usize::from(first);
            } else {
                view_first += usize::from(first);
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    let ok = gallery_sizes_ok && self_scores_ok == n && self_first == n;
    println!(
        "  enrolled images as probes: own subject first {self_first}/{n}, own score >= 0.999 {self_scores_ok}/{n} (lowest {worst_self:.5}; best other subject {best_other:.5})"
    );
    println!(
        "  other views as probes (random weights: informative only): own subject first {view_first}/{n}"
    );
    println!(
        "RESULT identify calls={} p50_ms={:.2} p99_ms={:.2} gallery_size_ok={gallery_sizes_ok} {}",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        verdict(ok)
    );
    ensure!(ok, "Identify did not find the enrolled images");
    Ok(())
}
