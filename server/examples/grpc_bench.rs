//! Service benchmark over real gRPC on 127.0.0.1, against a real PostgreSQL
//! (`DATABASE_URL`; `scripts/with-postgres.sh` provides one):
//!
//! 1. Embed throughput with concurrent clients vs the in-process pipeline
//!    (decode + preprocess + `Embedder::embed_batch`) at its best batch size:
//!    the overhead ratio of the service (target <= 1.10).
//! 2. Enrol rate with durable commits (each call acknowledged after COMMIT).
//! 3. Identify latency p50/p99 through the service on the enrolled gallery.
//! 4. With `--scale 10000,100000,1000000`: Identify latency p50/p99 on
//!    galleries of that many synthetic 512-d templates, bulk-loaded into
//!    PostgreSQL and read into the index at server start (load time printed),
//!    with a tiny 512-d model so the search, not the forward pass, is timed.
//!
//! Photos are the real 11k Hands sample (`../shared/data/11k-hands-sample`).
//!
//! ```text
//! scripts/with-postgres.sh cargo run --release -p handid-server --example grpc_bench -- \
//!     --arch tiny_vit --clients 16 --seconds 15
//! ```

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use handid_model::{ClipVisionConfig, DecodeLimits, Embedder, create_random_checkpoint, decode};
use handid_proto::v1::{self as pb, hand_id_client::HandIdClient};
use handid_server::Settings;
use tch::{Device, Tensor};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let (mut arch, mut clients, mut seconds) = ("tiny_vit".to_owned(), 16usize, 15.0f64);
    let mut scale: Vec<u64> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--arch" => arch = value,
            "--clients" => clients = value.parse()?,
            "--seconds" => seconds = value.parse()?,
            "--scale" => scale = value.split(',').map(str::parse).collect::<Result<_, _>>()?,
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    let config = match arch.as_str() {
        "tiny_vit" => ClipVisionConfig::tiny_vit(),
        "vit_b16" => ClipVisionConfig::vit_b16(),
        "rn50" => ClipVisionConfig::rn50(),
        other => return Err(format!("unknown --arch {other}").into()),
    };
    let database_url = std::env::var("DATABASE_URL").map_err(|_| "DATABASE_URL is not set")?;
    let photos = Arc::new(sample_photos(64)?);
    if !scale.is_empty() {
        return identify_at_scale(&database_url, &scale, &photos).await;
    }
    let dir = tempfile::tempdir()?;
    let manifest = create_random_checkpoint(dir.path(), &config, 3)?;
    let budget = Duration::from_secs_f64(seconds);
    println!(
        "# arch={arch} clients={clients} seconds={seconds} threads={}",
        tch::get_num_threads()
    );

    // 1a. In-process: the same work the service does, without gRPC or queues.
    let embedder = Embedder::load(dir.path(), Device::Cpu)?;
    let mut best = (0usize, 0.0f64);
    for batch in [1usize, 2, 4, 8, 16, 32] {
        let start = Instant::now();
        let mut images = 0usize;
        while start.elapsed() < budget / 4 || images == 0 {
            let pixels: Vec<Tensor> = (0..batch)
                .map(|i| {
                    let image = decode(&photos[(images + i) % photos.len()], &DecodeLimits::default())?;
                    manifest.preprocess.apply(&image)
                })
                .collect::<Result<_, _>>()?;
            let _ = embedder.embed_batch(&Tensor::stack(&pixels, 0))?;
            images += batch;
        }
        let rate = images as f64 / start.elapsed().as_secs_f64();
        println!("in-process batch={batch} images_per_s={rate:.2}");
        if rate > best.1 {
            best = (batch, rate);
        }
    }
    drop(embedder);

    // The real server, in this process, on a free port.
    let mut settings = Settings::default();
    settings.database.url = database_url;
    settings.database.migrate_on_start = true;
    settings.model.path = dir.path().to_owned();
    // A local benchmark without API keys.
    settings.auth.enabled = false;
    // One bulk client: the per-caller rate limit is for door readers.
    settings.server.rate_limit_per_second = 0.0;
    settings.batch.max_batch_size = best.0.max(8);
    let (url, stop, server) = start(settings).await?;
    let client = connect(&url).await?;

    // 1b. Embed through gRPC, one image per call, `clients` callers at once;
    // a first unmeasured round warms the server up as the in-process loop
    // was (allocator, kernels for each batch shape).
    let (shared_client, shared_photos) = (client.clone(), Arc::clone(&photos));
    let embed_call = move |c: usize, i: usize| {
        let mut client = shared_client.clone();
        let photos = Arc::clone(&shared_photos);
        async move {
            let data = photos[(c * 7 + i) % photos.len()].clone();
            client
                .embed(pb::EmbedRequest {
                    images: vec![pb::Image { data }],
                })
                .await?;
            Ok(())
        }
    };
    run_clients(clients, budget / 4, embed_call.clone()).await?;
    let rate = run_clients(clients, budget, embed_call).await?;
    println!("grpc embed clients={clients} images_per_s={rate:.2}");
    println!(
        "embed overhead ratio (in-process best batch {} / gRPC) = {:.3}",
        best.0,
        best.1 / rate
    );

    // 2. Enrol: one new subject per call, acknowledged after its commit.
    let (shared_client, shared_photos) = (client.clone(), Arc::clone(&photos));
    let rate = run_clients(clients, budget, move |c, i| {
        let mut client = shared_client.clone();
        let photos = Arc::clone(&shared_photos);
        async move {
            let data = photos[(c * 13 + i) % photos.len()].clone();
            client
                .enroll(pb::EnrollRequest {
                    gallery_id: "bench".to_owned(),
                    subject_id: format!("c{c}-s{i}"),
                    images: vec![pb::Image { data }],
                    idempotency_key: String::new(),
                })
                .await?;
            Ok(())
        }
    })
    .await?;
    println!("grpc enroll clients={clients} templates_per_s={rate:.2}");

    // 3. Identify latency, one caller, on the gallery just enrolled.
    let mut client = client.clone();
    let mut latencies = Vec::new();
    let start = Instant::now();
    while start.elapsed() < budget / 2 || latencies.len() < 10 {
        let data = photos[latencies.len() % photos.len()].clone();
        let t = Instant::now();
        let answer = client
            .identify(pb::IdentifyRequest {
                gallery_id: "bench".to_owned(),
                image: Some(pb::Image { data }),
                top_k: 10,
                // Random weights carry no calibrated thresholds.
                rule: Some(pb::DecisionRule {
                    rule: Some(pb::decision_rule::Rule::Threshold(0.5)),
                }),
            })
            .await?
            .into_inner();
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
        if latencies.len() == 1 {
            println!("# identify gallery_size={}", answer.gallery_size);
        }
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    println!("grpc identify p50_ms={:.2} p99_ms={:.2}", pct(0.5), pct(0.99));

    let _ = stop.send(());
    server.await??;
    Ok(())
}

/// Runs `clients` loops of `call(client_index, iteration)` for `budget`;
/// returns completed calls per second.
async fn run_clients<F, Fut>(clients: usize, budget: Duration, call: F) -> Result<f64, Error>
where
    F: Fn(usize, usize) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Result<(), Error>> + Send,
{
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut calls = 0usize;
                while start.elapsed() < budget {
                    call(c, calls).await?;
                    calls += 1;
                }
                Ok::<usize, Error>(calls)
            })
        })
        .collect();
    let mut total = 0usize;
    for task in tasks {
        total += task.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

async fn connect(url: &str) -> Result<HandIdClient<tonic::transport::Channel>, Error> {
    for _ in 0..600 {
        if let Ok(client) = HandIdClient::connect(url.to_owned()).await {
            return Ok(client);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("server at {url} never accepted a connection").into())
}

/// The first `n` JPEGs of the 11k Hands sample.
fn sample_photos(n: usize) -> Result<Vec<Vec<u8>>, Error> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/11k-hands-sample/Hands");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jpg"))
        .collect();
    paths.sort();
    paths.truncate(n);
    paths.into_iter().map(|p| Ok(std::fs::read(p)?)).collect()
}

/// Identify latency on bulk-loaded galleries of `sizes` templates each.
async fn identify_at_scale(database_url: &str, sizes: &[u64], photos: &[Vec<u8>]) -> Result<(), Error> {
    let dir = tempfile::tempdir()?;
    let config = ClipVisionConfig {
        output_dim: 512,
        ..ClipVisionConfig::tiny_vit()
    };
    let manifest = create_random_checkpoint(dir.path(), &config, 5)?;
    let mut settings = Settings::default();
    settings.database.url = database_url.to_owned();
    settings.database.migrate_on_start = true;
    settings.model.path = dir.path().to_owned();
    // A local benchmark without API keys.
    settings.auth.enabled = false;
    // One bulk client: the per-caller rate limit is for door readers.
    settings.server.rate_limit_per_second = 0.0;
    let pool = sqlx::PgPool::connect(database_url).await?;
    // One start registers the model (templates reference it) and migrates.
    let (url, stop, server) = start(settings.clone()).await?;
    drop(connect(&url).await?);
    let _ = stop.send(());
    server.await??;
    println!("# identify at scale: 512-d templates, one per subject, top_k=10, tiny 512-d model");
    for &n in sizes {
        let started = Instant::now();
        sqlx::query("DELETE FROM galleries").execute(&pool).await?;
        sqlx::query("INSERT INTO galleries (gallery_id) VALUES ('scale')")
            .execute(&pool)
            .await?;
        sqlx::query("INSERT INTO subjects (gallery_id, subject_id) SELECT 'scale', 's' || g FROM generate_series(1, $1) g")
            .bind(n as i64)
            .execute(&pool)
            .await?;
        // Random vectors made inside PostgreSQL (the correlated subquery is
        // evaluated per row); the search cost does not depend on the values.
        sqlx::query(
            "INSERT INTO templates (template_id, subject, gallery_id, model_id, dimension, embedding)
             SELECT gen_random_uuid(), s.id, 'scale', $1, 512,
                    (SELECT array_agg(random()::real - 0.5) FROM generate_series(1, 512) WHERE s.id > 0)
             FROM subjects s WHERE s.gallery_id = 'scale'",
        )
        .bind(&manifest.model_id)
        .execute(&pool)
        .await?;
        let loaded_db = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let (url, stop, server) = start(settings.clone()).await?;
        let mut client = connect(&url).await?;
        let mut health = tonic_health::pb::health_client::HealthClient::new(
            tonic::transport::Channel::from_shared(url.clone())?
                .connect()
                .await?,
        );
        while health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|r| {
                r.into_inner().status
                    != tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            })
            .unwrap_or(true)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let index_load = started.elapsed().as_secs_f64();
        let mut latencies = Vec::new();
        for i in 0..202 {
            let data = photos[i % photos.len()].clone();
            let t = Instant::now();
            let answer = client
                .identify(pb::IdentifyRequest {
                    gallery_id: "scale".to_owned(),
                    image: Some(pb::Image { data }),
                    top_k: 10,
                    rule: Some(pb::DecisionRule {
                        rule: Some(pb::decision_rule::Rule::Threshold(0.5)),
                    }),
                })
                .await?
                .into_inner();
            if i >= 2 {
                latencies.push(t.elapsed().as_secs_f64() * 1e3);
            }
            if answer.gallery_size as u64 != n {
                return Err(format!("gallery holds {} subjects, expected {n}", answer.gallery_size).into());
            }
        }
        latencies.sort_by(f64::total_cmp);
        let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
        println!(
            "grpc identify n={n} p50_ms={:.2} p99_ms={:.2} (bulk insert {loaded_db:.1} s, server start + index load {index_load:.1} s)",
            pct(0.5),
            pct(0.99)
        );
        let _ = stop.send(());
        server.await??;
    }
    sqlx::query("DELETE FROM galleries").execute(&pool).await?;
    Ok(())
}

type Running = (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), handid_server::ServeError>>,
);

/// Starts the real server in this process on a free port.
async fn start(settings: Settings) -> Result<Running, Error> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(handid_server::run(listener, settings, async {
        let _ = stopped.await;
    }));
    Ok((url, stop, server))
}
