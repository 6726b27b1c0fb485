//! Shared by the integration tests: a real server on 127.0.0.1:0 over a
//! fresh `#[sqlx::test]` database, a tiny random checkpoint, synthetic JPEG
//! photos, and a capture of every log line the server writes.

#![allow(dead_code)] // each test binary uses its own part of this module

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use handid_model::transform::{TemplateTransform, TransformManifest};
use handid_model::{ClipVisionConfig, Embedder, Manifest, OperatingPoint, create_random_checkpoint};
use handid_proto::v1 as pb;
use handid_proto::v1::admin_client::AdminClient;
use handid_proto::v1::hand_id_client::HandIdClient;
use handid_server::Settings;
use sqlx::postgres::PgConnectOptions;
use tch::Device;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// Every log line written by the server in this test binary.
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the capturing subscriber once per test binary, at debug level
/// so the check covers the most verbose output.
pub fn capture_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug,h2=info,hyper=info,tower=info,sqlx=debug")
            .with_writer(|| Capture)
            .with_ansi(false)
            .try_init();
    });
}

/// A copy of the logs captured so far.
pub fn logs() -> Vec<u8> {
    LOGS.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// A tiny random checkpoint with calibrated-looking thresholds, so the
/// default FMR 1e-3 rule and target FMRs resolve.
pub fn checkpoint() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    checkpoint_in(dir.path(), 11, None);
    dir
}

/// Writes a tiny random checkpoint of `seed` into `dir` with the thresholds
/// of [`checkpoint`]; its embedding space is its own model id, or `space`
/// (a checkpoint declaring itself of another model's space).
pub fn checkpoint_in(dir: &Path, seed: i64, space: Option<&str>) -> Manifest {
    let mut manifest =
        create_random_checkpoint(dir, &ClipVisionConfig::tiny_vit(), seed).expect("checkpoint");
    manifest.thresholds = vec![
        OperatingPoint {
            fmr: 1e-2,
            threshold: 0.5,
        },
        OperatingPoint {
            fmr: 1e-3,
            threshold: 0.8,
        },
        OperatingPoint {
            fmr: 1e-4,
            threshold: 0.95,
        },
    ];
    if let Some(space) = space {
        manifest.embedding_space = space.to_owned();
    }
    manifest.write(dir).expect("rewrite manifest");
    manifest
}

/// The URL of the test's own database.
pub fn database_url(options: &PgConnectOptions) -> String {
    format!(
        "postgres://{}@{}:{}/{}",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("postgres")
    )
}

/// Settings for a test server: small limits, fast health probes.
pub fn settings(options: &PgConnectOptions, checkpoint: &Path) -> Settings {
    let mut s = Settings::default();
    s.database.url = database_url(options);
    s.database.max_connections = 4;
    s.database.acquire_timeout_ms = 1_000;
    // One superuser for everything in tests; the two roles are tested in
    // insider.rs.
    s.database.migrate_on_start = true;
    s.model.path = checkpoint.to_owned();
    s.server.health_check_interval_ms = 200;
    s.batch.max_wait_ms = 2;
    s.limits.max_message_bytes = 8 << 20;
    s.limits.max_image_bytes = 1 << 20;
    s.limits.max_pixels = 1_000_000;
    s.limits.max_images_per_request = 4;
    s.limits.max_top_k = 10;
    // Access control is tested in access.rs; the other tests call without keys.
    s.auth.enabled = false;
    s
}

/// A server running in this process.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), handid_server::ServeError>>,
}

impl TestServer {
    /// Starts `handid_server::run` on 127.0.0.1:0.
    pub async fn start(settings: Settings) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::start_on(listener, settings)
    }

    /// Starts `handid_server::run` on `listener`; `addr` is its loopback
    /// address (a listener on 0.0.0.0 answers there too).
    pub fn start_on(listener: tokio::net::TcpListener, settings: Settings) -> Self {
        capture_logs();
        let port = listener.local_addr().expect("addr").port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(handid_server::run(listener, settings, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    /// Starts `handid_server::run_with_listeners` on 127.0.0.1:0 with the
    /// HTTP gateway on another free port: the server and the gateway's
    /// address.
    pub async fn start_with_gateway(settings: Settings) -> (Self, SocketAddr) {
        capture_logs();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let http = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind http");
        let addr = listener.local_addr().expect("addr");
        let http_addr = http.local_addr().expect("http addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (_, never) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(handid_server::run_with_listeners(
            listener,
            Some(http),
            settings,
            async {
                let _ = stopped.await;
            },
            never,
        ));
        let server = Self {
            addr,
            stop: Some(stop),
            task,
        };
        (server, http_addr)
    }

    /// A connected client (retries while the server is still starting).
    pub async fn client(&self) -> HandIdClient<Channel> {
        let url = format!("http://{}", self.addr);
        for _ in 0..200 {
            if let Ok(client) = HandIdClient::connect(url.clone()).await {
                return client.max_decoding_message_size(16 << 20);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server at {url} never accepted a connection");
    }

    /// A connected Admin client.
    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::connect(format!("http://{}", self.addr))
            .await
            .expect("admin client")
    }

    /// Graceful shutdown; returns `run`'s result.
    pub async fn stop(mut self) -> Result<(), handid_server::ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.expect("server task")
    }
}

/// Synthetic hand "photos": `count` identities with `photos` JPEGs each.
/// Generated rather than read from the 11k Hands sample so the tests run on
/// any machine; each identity has its own pattern, each photo of it a
/// different shift and noise, and every image is a real baseline JPEG.
pub fn people(count: usize, photos: usize) -> Vec<(String, Vec<Vec<u8>>)> {
    (0..count)
        .map(|person| {
            (
                format!("{person:04}"),
                (0..photos).map(|i| photo(person, i)).collect(),
            )
        })
        .collect()
}

pub fn photo(person: usize, index: usize) -> Vec<u8> {
    let (p, i) = (person as f32, index as f32);
    let image = image::RgbImage::from_fn(96, 80, |x, y| {
        let (x, y) = (x as f32, y as f32);
        let wave = ((x + 1.7 * i) * (0.05 + 0.011 * p)).sin() * (y * (0.04 + 0.007 * p) + p).cos();
        let noise = ((x * 31.0 + y * 17.0 + i * 101.0 + p * 7.0) % 23.0) - 11.0;
        let channel = |base: f32, gain: f32| (base + gain * wave + noise).clamp(0.0, 255.0) as u8;
        image::Rgb([
            channel(128.0, 100.0),
            channel(90.0 + 9.0 * p, 60.0),
            channel(160.0, -70.0),
        ])
    });
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
        .encode_image(&image)
        .expect("encode jpeg");
    jpeg
}

/// The offline reference: the same checkpoint, decode + preprocess + one
/// forward pass per image, as the server does with a batch size of 1.
pub fn offline_embedding(embedder: &Embedder, bytes: &[u8]) -> Vec<f32> {
    let image = handid_model::decode(bytes, &handid_model::DecodeLimits::default()).expect("decode");
    let pixels = embedder.manifest().preprocess.apply(&image).expect("preprocess");
    let out = embedder.embed_batch(&pixels.unsqueeze(0)).expect("embed");
    Vec::<f32>::try_from(&out.get(0)).expect("to vec")
}

/// Windows of a payload's bytes to look for in dumps and logs: raw, as hex
/// and as Rust's `{:?}` of a byte slice. 24 bytes taken from the middle of
/// a JPEG are entropy-coded data: they occur nowhere else by chance.
pub fn fingerprints(payload: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let len = payload.len();
    for start in [len / 4, len / 2, 3 * len / 4] {
        let window = &payload[start..(start + 24).min(len)];
        out.push(window.to_vec());
        out.push(
            window
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
                .into_bytes(),
        );
        out.push(
            format!("{:?}", &window[..8])
                .trim_end_matches(']')
                .as_bytes()
                .to_vec(),
        );
    }
    out
}

/// Whether `haystack` contains `needle`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// `pg_dump` of the test's database (PG_BIN is exported by
/// scripts/with-postgres.sh).
pub fn pg_dump(options: &PgConnectOptions) -> Vec<u8> {
    let bin = std::env::var("PG_BIN").expect("PG_BIN: run through scripts/with-postgres.sh");
    let out = std::process::Command::new(Path::new(&bin).join("pg_dump"))
        .args(["--no-owner", "--dbname", &database_url(options)])
        .output()
        .expect("run pg_dump");
    assert!(
        out.status.success(),
        "pg_dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Polls gRPC health until `handid.v1.HandId` reports `want` (10 s at most).
pub async fn wait_for_health(server: &TestServer, want: ServingStatus) {
    let mut health = HealthClient::new(
        Channel::from_shared(format!("http://{}", server.addr))
            .expect("url")
            .connect()
            .await
            .expect("health channel"),
    );
    for _ in 0..100 {
        let status = health
            .check(HealthCheckRequest {
                service: "handid.v1.HandId".to_owned(),
            })
            .await
            .map(|r| r.into_inner().status);
        if status.is_ok_and(|s| s == want as i32) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("health never became {want:?}");
}

/// The subjects Identify on `client` ranks for `probe` (gallery absent:
/// none).
pub async fn candidates(client: &mut HandIdClient<Channel>, gallery: &str, probe: &[u8]) -> Vec<String> {
    match client
        .identify(pb::IdentifyRequest {
            gallery_id: gallery.to_owned(),
            image: Some(pb::Image { data: probe.to_vec() }),
            top_k: 10,
            rule: None,
        })
        .await
    {
        Ok(r) => r
            .into_inner()
            .candidates
            .into_iter()
            .map(|c| c.subject_id)
            .collect(),
        Err(status) if status.code() == tonic::Code::NotFound => Vec::new(),
        Err(status) => panic!("identify failed: {status:?}"),
    }
}

/// Resident memory of this process (the server and its clients), from /proc.
pub fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line")
}

/// A codec that sends and receives message bodies as they are: how a test
/// sends bytes that are not a valid protobuf message.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

/// One unary call of `path` with `body` as its raw message; the status
/// code and message it gets.
pub async fn raw_call(channel: Channel, path: &'static str, body: Vec<u8>) -> (tonic::Code, String) {
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Err(e) = grpc.ready().await {
        return (tonic::Code::Unavailable, e.to_string());
    }
    let path = http::uri::PathAndQuery::from_static(path);
    match grpc.unary(tonic::Request::new(body), path, RawCodec).await {
        Ok(_) => (tonic::Code::Ok, String::new()),
        Err(status) => (status.code(), status.message().to_owned()),
    }
}

/// An Enroll of `images` for `subject` in `gallery`, without idempotency key.
pub fn enroll(gallery: &str, subject: &str, images: &[Vec<u8>]) -> pb::EnrollRequest {
    pb::EnrollRequest {
        gallery_id: gallery.to_owned(),
        subject_id: subject.to_owned(),
        images: images.iter().map(|d| pb::Image { data: d.clone() }).collect(),
        idempotency_key: String::new(),
    }
}

/// An Identify of `probe` in `gallery`: top 5, the model's default rule.
pub fn identify(gallery: &str, probe: &[u8]) -> pb::IdentifyRequest {
    pb::IdentifyRequest {
        gallery_id: gallery.to_owned(),
        image: Some(pb::Image { data: probe.to_vec() }),
        top_k: 5,
        rule: None,
    }
}

/// A ReloadModel of the folder `path` in `mode`.
pub fn reload(path: &Path, mode: pb::ReloadMode) -> pb::ReloadModelRequest {
    pb::ReloadModelRequest {
        path: path.display().to_string(),
        mode: mode as i32,
    }
}

/// A free local port (bound, then released for a child process to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The real `handid-server serve --config FILE` in a child process (killed
/// on drop), with a channel to it once it accepts connections.
pub struct Binary {
    /// The process.
    pub child: tokio::process::Child,
    /// Its pid, for `kill`.
    pub pid: String,
    /// Connected to its port.
    pub channel: Channel,
}

impl Binary {
    /// Starts the binary on `config`, listening on `port`.
    pub async fn serve(config: &Path, port: u16) -> Self {
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_handid-server"))
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .expect("spawn handid-server");
        let pid = child.id().expect("pid").to_string();
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}")).expect("endpoint");
        for _ in 0..300 {
            if let Ok(channel) = endpoint.connect().await {
                return Self { child, pid, channel };
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the binary never accepted a connection on port {port}");
    }

    /// Sends `signal` (`-HUP`, `-TERM`) to the process.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([signal, &self.pid])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} {}", self.pid);
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("child status").is_none()
    }

    /// SIGTERM, then the exit status must be success within 20 s.
    pub async fn terminate(mut self) {
        self.signal("-TERM");
        let exit = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("the server stopped on SIGTERM")
            .expect("exit status");
        assert!(exit.success(), "{exit:?}");
    }
}

/// The models replica `server` serves: (active, staged).
pub async fn models_of(server: &TestServer) -> (String, Option<String>) {
    let mut admin = server.admin().await;
    let report = admin
        .get_model(pb::GetModelRequest {})
        .await
        .expect("get model")
        .into_inner();
    (
        report.active.expect("active").model_id,
        report.staged.map(|m| m.model_id),
    )
}

/// Polls `server` until it serves `want`; how long that took.
pub async fn until_models(server: &TestServer, want: (&str, Option<&str>)) -> Duration {
    let started = Instant::now();
    loop {
        let (active, staged) = models_of(server).await;
        if (active.as_str(), staged.as_deref()) == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the replica serves ({active}, {staged:?}), not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// GetModel of `admin`.
pub async fn report(admin: &mut AdminClient<Channel>) -> pb::GetModelResponse {
    admin
        .get_model(pb::GetModelRequest {})
        .await
        .expect("get model")
        .into_inner()
}

/// A transform from `old` to `new` with libtorch's default (random)
/// initialisation: only the rows it writes matter here.
pub fn transform(old: &Manifest, new: &Manifest) -> TemplateTransform {
    TemplateTransform::new(
        TransformManifest {
            from_model: old.model_id.clone(),
            from_space: old.embedding_space.clone(),
            to_model: new.model_id.clone(),
            to_space: new.embedding_space.clone(),
            from_dim: old.embedding_dim,
            to_dim: new.embedding_dim,
            arch: handid_model::TransformArch::Mlp,
            inner_dim: 16,
            side_info: None,
            provenance: vec![("fitted".to_owned(), "no: a test's random transform".to_owned())],
        },
        Device::Cpu,
    )
}

/// [`transform`] as one affine map (`fit-transform --arch linear`), its
/// weights libtorch's default (random) initialisation.
pub fn linear_transform(old: &Manifest, new: &Manifest) -> TemplateTransform {
    let mut manifest = transform(old, new).manifest().clone();
    manifest.arch = handid_model::TransformArch::Linear;
    manifest.inner_dim = 0;
    TemplateTransform::new(manifest, Device::Cpu)
}
