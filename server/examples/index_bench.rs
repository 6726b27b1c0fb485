//! Gallery index benchmark: Identify's exact search (matrix product + best
//! per subject + top-k) over N synthetic 512-d templates, latency p50/p99 per
//! probe. With `--export DIR` it also writes the vectors as `.npy` so
//! `scripts/bench/faiss_search.py` times FAISS `IndexFlatIP` on the very same
//! data; `scripts/bench/index_speed.sh` runs both and prints the ratio.
//!
//! ```text
//! cargo run --release -p handid-server --example index_bench -- --sizes 10000,100000,1000000
//! ```

use std::path::PathBuf;
use std::time::Instant;

use handid_server::index::{GalleryIndex, MAX_CHUNK_ROWS, NewRow};
use tch::{Device, Kind, Tensor};

/// Templates per `append` call while filling the index.
const APPEND_BLOCK: usize = 10_000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut sizes = vec![10_000usize, 100_000, 1_000_000];
    let (mut dim, mut queries, mut k, mut export) = (512usize, 200usize, 10usize, None::<PathBuf>);
    let mut device = Device::Cpu;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--sizes" => sizes = value.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--dim" => dim = value.parse()?,
            "--queries" => queries = value.parse()?,
            "--k" => k = value.parse()?,
            "--export" => export = Some(PathBuf::from(value)),
            "--device" => device = handid_model::parse_device(&value)?,
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    println!(
        "# handid gallery index: dim={dim} k={k} queries={queries} threads={}",
        tch::get_num_threads()
    );
    for &n in &sizes {
        tch::manual_seed(n as i64);
        // Unit vectors, like real embeddings; one template per subject.
        let unit = |rows: usize| {
            let t = Tensor::randn([rows as i64, dim as i64], (Kind::Float, Device::Cpu));
            let norms = t.norm_scalaropt_dim(2, [1], true);
            t / norms
        };
        let (gallery, probes) = (unit(n), unit(queries));
        if let Some(dir) = &export {
            std::fs::create_dir_all(dir)?;
            gallery.write_npy(dir.join(format!("gallery_{n}.npy")))?;
            probes.write_npy(dir.join(format!("queries_{n}.npy")))?;
        }
        let flat: Vec<f32> = Vec::try_from(gallery.flatten(0, 1))?;
        let names: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
        let mut index = GalleryIndex::new(dim, device, MAX_CHUNK_ROWS);
        let start = Instant::now();
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
        let append_s = start.elapsed().as_secs_f64();
        let probes: Vec<f32> = Vec::try_from(probes.flatten(0, 1))?;
        for probe in probes.chunks(dim).take(2) {
            index.search(probe, k)?; // warm-up
        }
        let mut latencies = Vec::with_capacity(queries);
        for probe in probes.chunks(dim) {
            let t = Instant::now();
            let hits = index.search(probe, k)?;
            latencies.push(t.elapsed().as_secs_f64() * 1e3);
            if hits.len() != k.min(n) {
                return Err(format!("search returned {} hits, expected {}", hits.len(), k.min(n)).into());
            }
        }
        latencies.sort_by(f64::total_cmp);
        let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
        println!(
            "handid n={n} p50_ms={:.3} p99_ms={:.3} mean_ms={:.3} append_s={append_s:.2}",
            pct(0.5),
            pct(0.99),
            latencies.iter().sum::<f64>() / latencies.len() as f64
        );
    }
    Ok(())
}
