//! Service benchmark over real gRPC on 127.0.0.1, against a real PostgreSQL
//! (`DATABASE_URL`; `scripts/with-postgres.sh` provides one):
//!
//! 1. Embed throughput with concurrent clients vs the in-process pipeline
//!    (decode + preprocess + `Embedder::embed_batch`) at its best batch size,
//!    in alternated rounds: the overhead ratio of the service, median.
//! 2. Enrol rate with durable commits (each call acknowledged after COMMIT).
//! 3. Identify latency p50/p99 through the service on the enrolled gallery.
//! 4. With `--scale 10000,100000,1000000`: Identify latency p50/p99 on
//!    galleries of that many synthetic 512-d templates, bulk-loaded into
//!    PostgreSQL and read into the index at server start, with a tiny 512-d
//!    model so the search, not the forward pass, is timed. The server is
//!    started `--starts` times (default 3) on each gallery: the time from
//!    start to SERVING, median and each (the server's own log line with its
//!    load time goes to stderr).
//!
//! Photos are the real 11k Hands sample (`../shared/data/11k-hands-sample`).
//!
//! ```text
//! scripts/with-postgres.sh cargo run --release -p handid-server --example grpc_bench -- \
//!     --arch tiny_vit --clients 16 --seconds 15
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use handid_model::{ClipVisionConfig, DecodeLimits, Embedder, create_random_checkpoint, decode};
use handid_proto::v1::{self as pb, hand_id_client::HandIdClient};
use handid_server::Settings;
use tch::{Device, Tensor};

mod common;

use common::{Error, sample_photos, vision_config};

/// Alternated rounds of the in-process and the gRPC embedding.
const ROUNDS: usize = 3;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let (mut arch, mut clients, mut seconds) = ("tiny_vit".to_owned(), 16usize, 15.0f64);
    let mut scale: Vec<u64> = Vec::new();
    let mut starts = 3usize;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--arch" => arch = value,
            "--clients" => clients = value.parse()?,
            "--seconds" => seconds = value.parse()?,
            "--scale" => scale = value.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--starts" => starts = value.parse::<usize>()?.max(1),
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    let config = vision_config(&arch)?;
    let database_url = std::env::var("DATABASE_URL").map_err(|_| "DATABASE_URL is not set")?;
    let photos = Arc::new(sample_photos(64)?);
    if !scale.is_empty() {
        return identify_at_scale(&database_url, &scale, starts, &photos).await;
    }
    let dir = tempfile::tempdir()?;
    let manifest = create_random_checkpoint(dir.path(), &config, 3)?;
    let budget = Duration::from_secs_f64(seconds);
    println!(
        "# arch={arch} clients={clients} seconds={seconds} threads={}",
        tch::get_num_threads()
    );

    // 1a. In-process: the same work the service does, without gRPC or
    // queues, at each batch size; the best is the baseline.
    let embedder = Embedder::load(dir.path(), Device::Cpu)?;
    let in_process = |batch: usize, budget: Duration| -> Result<f64, Error> {
        let start = Instant::now();
        let mut images = 0usize;
        while start.elapsed() < budget || images == 0 {
            let pixels: Vec<Tensor> = (0..batch)
                .map(|i| {
                    let image = decode(&photos[(images + i) % photos.len()], &DecodeLimits::default())?;
                    manifest.preprocess.apply(&image)
                })
                .collect::<Result<_, _>>()?;
            let _ = embedder.embed_batch(&Tensor::stack(&pixels, 0))?;
            images += batch;
        }
        Ok(images as f64 / start.elapsed().as_secs_f64())
    };
    let mut best = (0usize, 0.0f64);
    for batch in [1usize, 2, 4, 8, 16, 32] {
        let rate = in_process(batch, budget / 4)?;
        println!("in-process batch={batch} images_per_s={rate:.2}");
        if rate > best.1 {
            best = (batch, rate);
        }
    }

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
    // was (allocator, kernels for each batch shape). Then rounds of the
    // in-process pipeline at its best batch and of gRPC, alternated (the
    // machine's speed drifts): the ratio of each round, and their median.
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
    let mut ratios = Vec::new();
    for round in 1..=ROUNDS {
        let local = in_process(best.0, budget / 2)?;
        let rate = run_clients(clients, budget / 2, embed_call.clone()).await?;
        println!(
            "round {round}: in-process batch={} images_per_s={local:.2}; grpc embed clients={clients} images_per_s={rate:.2}; ratio {:.3}",
            best.0,
            local / rate
        );
        ratios.push(local / rate);
    }
    drop(embedder);
    let each: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
    ratios.sort_by(f64::total_cmp);
    println!(
        "embed overhead ratio (in-process best batch {} / gRPC) = {:.3} (median of {ROUNDS} rounds: {})",
        best.0,
        ratios[ROUNDS / 2],
        each.join(" ")
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
    Ok(HandIdClient::new(connect_channel(url).await?))
}

/// A channel to `url`, once the server there accepts connections.
async fn connect_channel(url: &str) -> Result<tonic::transport::Channel, Error> {
    for _ in 0..600 {
        if let Ok(channel) = tonic::transport::Channel::from_shared(url.to_owned())?
            .connect()
            .await
        {
            return Ok(channel);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("server at {url} never accepted a connection").into())
}

/// Identify latency on bulk-loaded galleries of `sizes` templates each.
async fn identify_at_scale(
    database_url: &str,
    sizes: &[u64],
    starts: usize,
    photos: &[Vec<u8>],
) -> Result<(), Error> {
    // The server's report of each index load.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("handid_server::engine=info"))
        .with_writer(std::io::stderr)
        .init();
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
        sqlx::query("TRUNCATE galleries CASCADE").execute(&pool).await?;
        sqlx::query("INSERT INTO galleries (gallery_id) VALUES ('scale')")
            .execute(&pool)
            .await?;
        sqlx::query("INSERT INTO subjects (gallery_id, subject_id) SELECT 'scale', 's' || g FROM generate_series(1, $1) g")
            .bind(n as i64)
            .execute(&pool)
            .await?;
        // 4,096 random vectors made inside PostgreSQL (the correlated
        // subquery is evaluated per row), shared round robin: the search
        // cost does not depend on the values.
        sqlx::query(
            "INSERT INTO templates (template_id, subject, gallery_id, model_id, dimension, embedding)
             SELECT gen_random_uuid(), s.id, 'scale', $1, 512, v.embedding
             FROM subjects s JOIN (
                 SELECT i, (SELECT string_agg(float4send((random() - 0.5)::real), ''::bytea)
                            FROM generate_series(1, 512) WHERE i >= 0) AS embedding
                 FROM generate_series(0, 4095) i
             ) v ON v.i = s.id % 4096
             WHERE s.gallery_id = 'scale'",
        )
        .bind(&manifest.model_id)
        .execute(&pool)
        .await?;
        // As a database in service would be: no autovacuum of the fresh
        // rows competing with the load and the searches.
        sqlx::query("VACUUM ANALYZE templates").execute(&pool).await?;
        let loaded_db = started.elapsed().as_secs_f64();
        let mut loads = Vec::new();
        for _ in 1..starts {
            let (_, seconds, stop, server) = start_serving(&settings).await?;
            loads.push(seconds);
            let _ = stop.send(());
            server.await??;
        }
        let (url, index_load, stop, server) = start_serving(&settings).await?;
        loads.push(index_load);
        let mut client = connect(&url).await?;
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
        let each: Vec<String> = loads.iter().map(|s| format!("{s:.1}")).collect();
        loads.sort_by(f64::total_cmp);
        println!(
            "grpc identify n={n} p50_ms={:.2} p99_ms={:.2} (bulk insert {loaded_db:.1} s; server start to SERVING: median {:.1} s, each {})",
            pct(0.5),
            pct(0.99),
            loads[loads.len() / 2],
            each.join(" ")
        );
        let _ = stop.send(());
        server.await??;
    }
    sqlx::query("TRUNCATE galleries CASCADE").execute(&pool).await?;
    Ok(())
}

/// Starts the server and waits until it reports SERVING (its indexes
/// loaded): its address, the seconds that took, and its stop handles.
async fn start_serving(
    settings: &Settings,
) -> Result<
    (
        String,
        f64,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(), handid_server::ServeError>>,
    ),
    Error,
> {
    let started = Instant::now();
    let (url, stop, server) = start(settings.clone()).await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(connect_channel(&url).await?);
    while health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|r| {
            r.into_inner().status != tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        })
        .unwrap_or(true)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((url, started.elapsed().as_secs_f64(), stop, server))
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
