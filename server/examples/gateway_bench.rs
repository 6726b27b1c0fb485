//! Identify latency through the HTTP/JSON gateway against the same call
//! over gRPC, on one server in this process (real PostgreSQL from
//! `DATABASE_URL`; `scripts/with-postgres.sh` provides one), one caller at a
//! time, each client on one kept-alive connection, with an API key.
//!
//! A gallery of the 11k Hands sample's photos is enrolled first; then rounds
//! alternate gRPC and HTTP (the machine's speed drifts), `--calls` calls each,
//! the probes cycling through the photos. Each round prints both p50s and
//! their ratio; the summary is the median ratio. Request bodies are built
//! once per photo on both sides (the client's own encoding is not the
//! service's overhead); responses are decoded on both sides.
//!
//! ```text
//! scripts/with-postgres.sh cargo run --release -p handid-server --example gateway_bench -- \
//!     --arch tiny_vit --rounds 5 --calls 300
//! ```

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use handid_model::create_random_checkpoint;
use handid_proto::v1::{self as pb, hand_id_client::HandIdClient};
use handid_server::Settings;
use handid_server::settings::{ApiKeySettings, Scope};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

mod common;

use common::{Error, sample_photos, vision_config};

const KEY: &str = "hid_bench_key";

#[tokio::main]
async fn main() -> Result<(), Error> {
    let (mut arch, mut rounds, mut calls, mut people) = ("tiny_vit".to_owned(), 5usize, 300usize, 100usize);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--arch" => arch = value,
            "--rounds" => rounds = value.parse::<usize>()?.max(1),
            "--calls" => calls = value.parse::<usize>()?.max(10),
            "--people" => people = value.parse::<usize>()?.max(1),
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    let config = vision_config(&arch)?;
    let photos = sample_photos(people)?;
    let dir = tempfile::tempdir()?;
    create_random_checkpoint(dir.path(), &config, 3)?;

    let mut settings = Settings::default();
    settings.database.url = std::env::var("DATABASE_URL").map_err(|_| "DATABASE_URL is not set")?;
    settings.database.migrate_on_start = true;
    settings.model.path = dir.path().to_owned();
    settings.auth.keys = vec![ApiKeySettings {
        id: "bench".to_owned(),
        sha256: handid_server::auth::hash_key(KEY),
        scopes: vec![Scope::Enroll, Scope::Identify],
        galleries: Vec::new(),
    }];
    settings.server.rate_limit_per_second = 0.0;
    let grpc_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let grpc_url = format!("http://{}", grpc_listener.local_addr()?);
    let http_addr = http_listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (_reloads, never) = tokio::sync::mpsc::channel(1);
    let server = tokio::spawn(handid_server::run_with_listeners(
        grpc_listener,
        Some(http_listener),
        settings,
        async {
            let _ = stopped.await;
        },
        never,
    ));

    let mut grpc = HandIdClient::new(connect(&grpc_url).await?);
    for (i, photo) in photos.iter().enumerate() {
        grpc.enroll(keyed(pb::EnrollRequest {
            gallery_id: "bench".to_owned(),
            subject_id: format!("p{i:04}"),
            images: vec![pb::Image { data: photo.clone() }],
            idempotency_key: String::new(),
        }))
        .await?;
    }
    println!(
        "# arch={arch} gallery={} subjects, one caller, {rounds} rounds of {calls} calls per transport, threads={}",
        photos.len(),
        tch::get_num_threads()
    );

    let identify = |photo: &[u8]| pb::IdentifyRequest {
        gallery_id: "bench".to_owned(),
        image: Some(pb::Image { data: photo.to_vec() }),
        top_k: 10,
        rule: Some(pb::DecisionRule {
            rule: Some(pb::decision_rule::Rule::Threshold(0.5)),
        }),
    };
    let grpc_requests: Vec<pb::IdentifyRequest> = photos.iter().map(|p| identify(p)).collect();
    let http_bodies: Vec<Bytes> = photos
        .iter()
        .map(|p| {
            let body = serde_json::json!({
                "image": { "data": base64::engine::general_purpose::STANDARD.encode(p) },
                "topK": 10,
                "rule": { "threshold": 0.5 },
            });
            Bytes::from(body.to_string())
        })
        .collect();
    let mut http = Http::connect(http_addr).await?;

    // Warm-up: both paths, unmeasured.
    for i in 0..20 {
        grpc.identify(keyed(grpc_requests[i % photos.len()].clone()))
            .await?;
        http.identify(&http_bodies[i % photos.len()]).await?;
    }
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let mut grpc_ms = Vec::with_capacity(calls);
        for i in 0..calls {
            let request = keyed(grpc_requests[(round * 7 + i) % photos.len()].clone());
            let t = Instant::now();
            let answer = grpc.identify(request).await?.into_inner();
            grpc_ms.push(t.elapsed().as_secs_f64() * 1e3);
            assert!(!answer.candidates.is_empty());
        }
        let mut http_ms = Vec::with_capacity(calls);
        for i in 0..calls {
            let body = &http_bodies[(round * 7 + i) % photos.len()];
            let t = Instant::now();
            let answer = http.identify(body).await?;
            http_ms.push(t.elapsed().as_secs_f64() * 1e3);
            assert!(answer["candidates"].as_array().is_some_and(|c| !c.is_empty()));
        }
        let (g50, g99) = (percentile(&mut grpc_ms, 0.5), percentile(&mut grpc_ms, 0.99));
        let (h50, h99) = (percentile(&mut http_ms, 0.5), percentile(&mut http_ms, 0.99));
        println!(
            "round {round}: grpc p50_ms={g50:.3} p99_ms={g99:.3}; http p50_ms={h50:.3} p99_ms={h99:.3}; p50 ratio {:.3}",
            h50 / g50
        );
        ratios.push(h50 / g50);
    }
    let each: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
    ratios.sort_by(f64::total_cmp);
    println!(
        "identify p50 ratio (HTTP gateway / gRPC) = {:.3} (median of {rounds} rounds: {})",
        ratios[rounds / 2],
        each.join(" ")
    );
    let _ = stop.send(());
    server.await??;
    Ok(())
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    values[((values.len() as f64 - 1.0) * p).round() as usize]
}

/// `message` with the bench's API key.
fn keyed<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let bearer = format!("Bearer {KEY}").parse().expect("ASCII");
    request.metadata_mut().insert("authorization", bearer);
    request
}

/// An HTTP/1.1 client on one kept-alive connection.
struct Http {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: String,
}

impl Http {
    async fn connect(addr: SocketAddr) -> Result<Self, Error> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Self {
            sender,
            host: addr.to_string(),
        })
    }

    async fn identify(&mut self, body: &Bytes) -> Result<serde_json::Value, Error> {
        let request = http::Request::post("/v1/galleries/bench:identify")
            .header("host", &self.host)
            .header("authorization", format!("Bearer {KEY}"))
            .header("content-type", "application/json")
            .body(Full::new(body.clone()))?;
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            return Err(format!("{status}: {}", String::from_utf8_lossy(&bytes)).into());
        }
        Ok(serde_json::from_slice(&bytes)?)
    }
}

/// A channel to `url`, once the server there accepts connections and is
/// serving.
async fn connect(url: &str) -> Result<tonic::transport::Channel, Error> {
    for _ in 0..600 {
        if let Ok(channel) = tonic::transport::Channel::from_shared(url.to_owned())?
            .connect()
            .await
        {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
            let serving = health
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .is_ok_and(|r| {
                    r.into_inner().status
                        == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
                });
            if serving {
                return Ok(channel);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("server at {url} never said SERVING").into())
}
