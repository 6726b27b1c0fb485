//! Gallery index benchmark: Identify's exact search (scores, best per
//! subject, top-k) over N synthetic templates.
//!
//! Per gallery size it prints, one line each:
//! - `handid` / `handid-half`: one probe at a time, latency p50/p99 and the
//!   effective read rate (bytes of rows scanned per second), in f32 and from
//!   the half-precision copies (whose answers are checked equal to f32's);
//! - `handid-callers`: `--callers` threads calling `Gallery::search` at once
//!   (Identify's path, batching concurrent probes) against one caller,
//!   queries per second and the ratio;
//! - `copy`: the machine's memory copy rate with the same threads, for scale.
//!
//! With `--export DIR` it writes the vectors as `.npy` so
//! `scripts/bench/faiss_search.py` times FAISS `IndexFlatIP` on the very same
//! data; `scripts/bench/index_speed.sh` runs both in alternated rounds.
//!
//! ```text
//! cargo run --release -p handid-server --example index_bench -- --sizes 100000,1000000
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use handid_server::index::{Gallery, GalleryIndex, NewRow, Query, SearchOptions};
use tch::{Device, Kind, Tensor};

/// One search's hits as (subject, score bits), compared exactly.
type Answer = Vec<(String, u32)>;

/// Templates per `append` call while filling the index.
const APPEND_BLOCK: usize = 10_000;

struct Args {
    sizes: Vec<usize>,
    dim: usize,
    queries: usize,
    k: usize,
    export: Option<PathBuf>,
    device: Device,
    half: bool,
    callers: usize,
    threads: usize,
}

fn parse() -> Result<Args, Box<dyn std::error::Error>> {
    let mut a = Args {
        sizes: vec![10_000, 100_000, 1_000_000],
        dim: 512,
        queries: 100,
        k: 10,
        export: None,
        device: Device::Cpu,
        half: true,
        callers: 16,
        threads: SearchOptions::default().threads,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--sizes" => a.sizes = value.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--dim" => a.dim = value.parse()?,
            "--queries" => a.queries = value.parse()?,
            "--k" => a.k = value.parse()?,
            "--export" => a.export = Some(PathBuf::from(value)),
            "--device" => a.device = handid_model::parse_device(&value)?,
            "--half" => a.half = value.parse()?,
            "--callers" => a.callers = value.parse()?,
            "--threads" => a.threads = value.parse()?,
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    Ok(a)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = parse()?;
    println!(
        "# handid gallery index: dim={} k={} queries={} threads={} kernel={}",
        a.dim,
        a.k,
        a.queries,
        a.threads,
        handid_server::index::Kernel::detect().name()
    );
    let copy = copy_rate(a.threads);
    println!("copy threads={} read_gbs={copy:.1}", a.threads);
    for &n in &a.sizes {
        tch::manual_seed(n as i64);
        // Unit vectors, like real embeddings; one template per subject.
        let unit = |rows: usize| {
            let t = Tensor::randn([rows as i64, a.dim as i64], (Kind::Float, Device::Cpu));
            let norms = t.norm_scalaropt_dim(2, [1], true);
            t / norms
        };
        let (gallery, probes) = (unit(n), unit(a.queries));
        if let Some(dir) = &a.export {
            std::fs::create_dir_all(dir)?;
            gallery.write_npy(dir.join(format!("gallery_{n}.npy")))?;
            probes.write_npy(dir.join(format!("queries_{n}.npy")))?;
        }
        let flat: Vec<f32> = Vec::try_from(gallery.flatten(0, 1))?;
        drop(gallery);
        let probes: Vec<f32> = Vec::try_from(probes.flatten(0, 1))?;
        let probes: Vec<&[f32]> = probes.chunks(a.dim).collect();
        let bytes = (n * a.dim * 4) as f64;
        let f32_index = build(&flat, n, a.dim, a.device, false, a.threads)?;
        let want = single(&f32_index, "handid", &probes, a.k, bytes, n)?;
        if a.device != Device::Cpu {
            // The device's answers against the host's exact search: the same
            // subjects, scores within float rounding (the summation orders
            // differ).
            let host = build(&flat, n, a.dim, Device::Cpu, false, a.threads)?;
            let mut agree = 0;
            for (probe, got) in probes.iter().zip(&want) {
                let hits = host.search(probe, a.k)?;
                let same = hits.len() == got.len()
                    && hits.iter().zip(got).all(|(h, (subject, bits))| {
                        h.subject_id == *subject && (h.score - f32::from_bits(*bits)).abs() <= 1e-5
                    });
                agree += usize::from(same);
            }
            println!(
                "RESULT search_device_vs_host n={n} probes={} agree={agree}",
                probes.len()
            );
            if agree != probes.len() {
                return Err(format!("{} device answers differ from the host's", probes.len() - agree).into());
            }
        }
        if a.half && a.device == Device::Cpu {
            let half_index = build(&flat, n, a.dim, a.device, true, a.threads)?;
            let got = single(&half_index, "handid-half", &probes, a.k, bytes / 2.0, n)?;
            if got != want {
                return Err("half-precision answers differ from f32's".into());
            }
        }
        if a.callers > 1 {
            // The batch alone: `callers` probes in one pass.
            let queries: Vec<Query<'_>> = probes
                .iter()
                .cycle()
                .take(a.callers)
                .map(|&probe| Query { probe, k: a.k })
                .collect();
            let mut times = Vec::new();
            for _ in 0..5 {
                let t = Instant::now();
                f32_index.search_many(&queries)?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            times.sort_by(f64::total_cmp);
            println!(
                "handid-batch n={n} probes={} p50_ms={:.3}",
                a.callers,
                percentile(&times, 0.5)
            );
            let gallery = Arc::new(Gallery::from(f32_index));
            let (one, _) = callers(&gallery, 1, 16, &probes, a.k)?;
            let (many, batch) = callers(&gallery, a.callers, 40, &probes, a.k)?;
            println!(
                "handid-callers n={n} callers={} qps_one={one:.1} qps_many={many:.1} mean_batch={batch:.1} ratio={:.2}",
                a.callers,
                many / one
            );
            println!(
                "RESULT search device={:?} n={n} callers={} qps_one={one:.1} qps_many={many:.1} ratio={:.2}",
                a.device,
                a.callers,
                many / one
            );
        }
    }
    Ok(())
}

fn build(
    flat: &[f32],
    n: usize,
    dim: usize,
    device: Device,
    half: bool,
    threads: usize,
) -> Result<GalleryIndex, Box<dyn std::error::Error>> {
    let names: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
    let options = SearchOptions {
        half_precision: half,
        threads,
        ..SearchOptions::default()
    };
    let mut index = GalleryIndex::new(dim, device, options);
    for (block, rows) in flat.chunks(APPEND_BLOCK * dim).enumerate() {
        let new: Vec<NewRow<'_>> = rows
            .chunks(dim)
            .enumerate()
            .map(|(i, embedding)| {
                let row = block * APPEND_BLOCK + i;
                NewRow {
                    subject_id: &names[row],
                    seq: row as i64,
                    embedding,
                }
            })
            .collect();
        index.append(&new)?;
    }
    Ok(index)
}

/// One probe at a time: prints latencies, returns every answer.
fn single(
    index: &GalleryIndex,
    label: &str,
    probes: &[&[f32]],
    k: usize,
    bytes: f64,
    n: usize,
) -> Result<Vec<Answer>, Box<dyn std::error::Error>> {
    for probe in probes.iter().take(2) {
        index.search(probe, k)?; // warm-up
    }
    let mut latencies = Vec::with_capacity(probes.len());
    let mut answers = Vec::with_capacity(probes.len());
    for probe in probes {
        let t = Instant::now();
        let hits = index.search(probe, k)?;
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
        if hits.len() != k.min(n) {
            return Err(format!("search returned {} hits, expected {}", hits.len(), k.min(n)).into());
        }
        answers.push(
            hits.into_iter()
                .map(|h| (h.subject_id, h.score.to_bits()))
                .collect(),
        );
    }
    latencies.sort_by(f64::total_cmp);
    let p50 = percentile(&latencies, 0.5);
    println!(
        "{label} n={n} p50_ms={p50:.3} p99_ms={:.3} mean_ms={:.3} read_gbs={:.1}",
        percentile(&latencies, 0.99),
        latencies.iter().sum::<f64>() / latencies.len() as f64,
        bytes / (p50 / 1e3) / 1e9
    );
    Ok(answers)
}

/// `count` threads calling `Gallery::search` `rounds` times each (probes
/// from each caller's own offset); queries per second and the mean size of
/// the batches searched.
fn callers(
    gallery: &Arc<Gallery>,
    count: usize,
    rounds: usize,
    probes: &[&[f32]],
    k: usize,
) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let batches = std::sync::Mutex::new(Vec::new());
    let batches = &batches;
    let start = Instant::now();
    let failures: usize = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..count)
            .map(|c| {
                let gallery = Arc::clone(gallery);
                scope.spawn(move || {
                    (0..rounds)
                        .filter(|r| {
                            let probe = probes[(c * 7 + r) % probes.len()].to_vec();
                            match gallery.search(probe, k) {
                                Ok((_, batch)) => {
                                    if batch > 0 {
                                        batches.lock().unwrap_or_else(|e| e.into_inner()).push(batch);
                                    }
                                    false
                                }
                                Err(_) => true,
                            }
                        })
                        .count()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(1)).sum()
    });
    if failures > 0 {
        return Err(format!("{failures} concurrent searches failed").into());
    }
    let qps = (count * rounds) as f64 / start.elapsed().as_secs_f64();
    let batches = batches.lock().unwrap_or_else(|e| e.into_inner());
    Ok((
        qps,
        batches.iter().sum::<usize>() as f64 / batches.len().max(1) as f64,
    ))
}

/// Bytes read per second by `threads` threads each copying its share of a
/// 1 GiB buffer (the best of three).
fn copy_rate(threads: usize) -> f64 {
    let len = (1usize << 30) / 4;
    let source = vec![1.0f32; len];
    let mut target = vec![0.0f32; len];
    let share = len.div_ceil(threads.max(1));
    (0..3)
        .map(|_| {
            let start = Instant::now();
            std::thread::scope(|scope| {
                for (s, t) in source.chunks(share).zip(target.chunks_mut(share)) {
                    scope.spawn(move || t.copy_from_slice(s));
                }
            });
            (len * 4) as f64 / start.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}
