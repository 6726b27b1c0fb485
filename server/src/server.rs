//! Start-up, the middleware stack, health, and graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use handid_model::DecodeLimits;
use handid_proto::v1::{admin_server::AdminServer, hand_id_server::HandIdServer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic_health::ServingStatus;

use crate::audit::AuditSink;
use crate::layers::Protection;
use crate::live::{LiveAuth, LiveSettings};

use crate::batcher::Batcher;
use crate::decode::Decoding;
use crate::engine::{ActiveModel, Caller, Engine, LoadError, Pipeline, SideModel};
use crate::health::HealthRules;
use crate::index::Indexes;
use crate::service::{AdminService, HandIdService};
use crate::settings::Settings;
use crate::store::{Claim, ModelRecord, Store, StoreError};

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Invalid settings.
    #[error(transparent)]
    Settings(#[from] crate::settings::SettingsError),
    /// The device or the checkpoint could not be loaded, or the checkpoint
    /// failed its self-test.
    #[error("loading the model from {path}: {source}")]
    Model {
        /// The checkpoint folder.
        path: String,
        /// Why.
        source: crate::reload::ReloadError,
    },
    /// `model.path` holds another model than the one the database records
    /// as active, and `model.adopt` is off.
    #[error("{}", disagreement(.recorded, .recorded_path, .folder, .path))]
    ModelDisagrees {
        /// The recorded active model.
        recorded: String,
        /// Its recorded folder.
        recorded_path: String,
        /// The model of `model.path`.
        folder: String,
        /// `model.path`.
        path: String,
    },
    /// The database could not be prepared (connect, migrate, load).
    #[error("preparing the database: {0}")]
    Store(#[from] StoreError),
    /// The gallery indexes could not be loaded.
    #[error("loading the gallery indexes: {0}")]
    Indexes(#[from] LoadError),
    /// The manifest could not be recorded as JSON.
    #[error("recording the model manifest: {0}")]
    Manifest(#[from] serde_json::Error),
    /// The forward thread could not be started.
    #[error("starting the embedding thread: {0}")]
    Thread(#[source] std::io::Error),
    /// A listener other hosts can reach, without TLS, and plain text not
    /// explicitly allowed.
    #[error(
        "{0} is reachable from other hosts and TLS is off: set tls.cert_file and tls.key_file, \
         or server.allow_plaintext: true where a mesh protects the traffic"
    )]
    Plaintext(std::net::SocketAddr),
    /// The gRPC transport failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A start-up task panicked.
    #[error("start-up task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The reflection service could not be built.
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The HTTP gateway's address could not be bound.
    #[error("binding http.listen {address}: {source}")]
    Bind {
        /// `http.listen`.
        address: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP gateway's TLS could not be set up from the `tls.*` files.
    #[error("TLS of the HTTP gateway: {0}")]
    GatewayTls(String),
    /// A TLS file could not be read.
    #[error("reading {setting} {path}: {source}")]
    TlsFile {
        /// The setting naming it.
        setting: &'static str,
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Loads the model, connects and migrates the database, loads the gallery
/// indexes, then serves on `listener` until `shutdown` completes; in-flight
/// calls are then drained before this returns.
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (_, never) = tokio::sync::mpsc::channel(1);
    run_with_reloads(listener, settings, shutdown, never).await
}

/// [`run`], plus for every message on `reloads` (what `serve` sends on
/// SIGHUP): the settings file's keys applied again (when the settings came
/// from a file), then a hot reload of the active model's checkpoint folder.
/// A refused file keeps the old keys, a refused checkpoint the old model;
/// both are logged and audited with their reason.
pub async fn run_with_reloads(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
    reloads: tokio::sync::mpsc::Receiver<()>,
) -> Result<(), ServeError> {
    let http = match settings.http.listen {
        Some(address) => Some(
            TcpListener::bind(address)
                .await
                .map_err(|source| ServeError::Bind { address, source })?,
        ),
        None => None,
    };
    run_with_listeners(listener, http, settings, shutdown, reloads).await
}

/// [`run_with_reloads`] on listeners bound by the caller: `http`, when
/// given, serves the HTTP/JSON gateway (whatever `http.listen` says).
pub async fn run_with_listeners(
    listener: TcpListener,
    http: Option<TcpListener>,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
    mut reloads: tokio::sync::mpsc::Receiver<()>,
) -> Result<(), ServeError> {
    settings.validate()?;
    if let Ok(local) = listener.local_addr()
        && !local.ip().is_loopback()
        && settings.tls.cert_file.is_none()
        && !settings.server.allow_plaintext
    {
        return Err(ServeError::Plaintext(local));
    }
    let model_error = |source: crate::reload::ReloadError| ServeError::Model {
        path: settings.model.path.display().to_string(),
        source,
    };
    let device = handid_model::parse_device(&settings.model.device).map_err(|e| model_error(e.into()))?;
    let path = settings.model.path.clone();
    // Loading reads and hashes the weights: blocking work. The same checks
    // as a hot reload, self-test included.
    let embedder = tokio::task::spawn_blocking(move || crate::reload::load_checked(&path, device))
        .await?
        .map_err(model_error)?;
    let embedder = Arc::new(embedder);
    if embedder.manifest().thresholds.is_empty() {
        tracing::warn!(
            model_id = %embedder.model_id(),
            path = %settings.model.path.display(),
            "the serving model has no calibrated thresholds: Identify and Verify without an explicit \
             threshold are refused; run handid-trainer calibrate on the checkpoint"
        );
    }
    let store = Store::connect(&settings.database).await?;
    let manifest = embedder.manifest();
    store
        .record_model(&ModelRecord {
            model_id: manifest.model_id.clone(),
            embedding_space: manifest.embedding_space.clone(),
            architecture: manifest.architecture.clone(),
            embedding_dim: manifest.embedding_dim,
            manifest_json: serde_json::to_string(manifest)?,
        })
        .await?;
    // The serving model is the database's: the folder's model serves when
    // it is the recorded active one (or none is recorded yet); another one
    // only when the operator adopts it deliberately.
    let folder = settings.model.path.display().to_string();
    match store
        .claim_active(&manifest.model_id, &folder, settings.model.adopt)
        .await?
    {
        Claim::Active {
            retired: Some(retired),
        } => tracing::warn!(
            adopted = %manifest.model_id,
            %retired,
            path = %folder,
            "model.adopt: the folder's model is now the active model, the previous one is retired"
        ),
        Claim::Active { retired: None } => {}
        Claim::Disagrees(recorded) => {
            return Err(ServeError::ModelDisagrees {
                recorded: recorded.model_id,
                recorded_path: recorded.path.unwrap_or_else(|| "an unrecorded folder".to_owned()),
                folder: manifest.model_id.clone(),
                path: folder,
            });
        }
    }
    let limits = &settings.limits;
    let mut pipeline = Pipeline {
        batch: settings.batch.clone(),
        search: settings.search.options(),
        decoding: Arc::new(Decoding::new(
            DecodeLimits {
                max_bytes: limits.max_image_bytes,
                max_pixels: limits.max_pixels,
                max_side: limits.max_image_side,
                max_aspect_ratio: limits.max_aspect_ratio,
                min_side: limits.min_image_side,
            },
            limits.decode_concurrency,
            limits.decode_pixel_budget,
        )),
        side: None,
    };
    if let Some(path) = &settings.model.side_info {
        let side_path = path.clone();
        let side = tokio::task::spawn_blocking(move || crate::reload::load_checked(&side_path, device))
            .await?
            .map_err(|source| ServeError::Model {
                path: path.display().to_string(),
                source,
            })?;
        let side = Arc::new(side);
        tracing::info!(
            side_model = %side.model_id(),
            path = %path.display(),
            "model.side_info: every enrolled image's side-information is stored beside its templates"
        );
        let batcher = Batcher::start(Arc::clone(&side), &pipeline.batch, Arc::clone(&pipeline.decoding))
            .map_err(ServeError::Thread)?;
        pipeline.side = Some(Arc::new(SideModel {
            model: ActiveModel {
                device: device_name(device),
                path: path.clone(),
                loaded_at: chrono::Utc::now(),
                embedder: side,
            },
            batcher,
        }));
    }
    let batcher = Batcher::start(
        Arc::clone(&embedder),
        &pipeline.batch,
        Arc::clone(&pipeline.decoding),
    )
    .map_err(ServeError::Thread)?;
    let model = ActiveModel {
        device: device_name(device),
        path: settings.model.path.clone(),
        loaded_at: chrono::Utc::now(),
        embedder: Arc::clone(&embedder),
    };
    let indexes = Indexes::new(embedder.dim(), device, pipeline.search.clone());
    let engine = Arc::new(
        Engine::start(
            store.clone(),
            indexes,
            batcher,
            model,
            settings.limits.clone(),
            pipeline,
        )
        .await?,
    );

    // A migration in progress when the server stopped goes on: the staged
    // model is loaded again from its recorded folder.
    if let Some(staged) = store.model_roles().await?.staged {
        match engine.restore_staged(&staged).await {
            Ok(_) => tracing::info!(model_id = %staged.model_id, "staged model restored"),
            Err(e) => tracing::warn!(
                model_id = %staged.model_id,
                reason = %e,
                "the recorded staged model is not restored; stage it again with ReloadModel"
            ),
        }
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    crate::health::set(&health, ServingStatus::NotServing).await;
    let (stop_health, health_stopped) = tokio::sync::watch::channel(false);
    let gateway_stopped = health_stopped.clone();
    let health_task = tokio::spawn(crate::health::watch(
        Arc::clone(&engine),
        health.clone(),
        HealthRules {
            interval: Duration::from_millis(settings.server.health_check_interval_ms),
            max_lag: (settings.replication.enabled && settings.replication.max_lag_ms > 0)
                .then(|| Duration::from_millis(settings.replication.max_lag_ms)),
        },
        health_stopped.clone(),
    ));
    let follower = settings.replication.enabled.then(|| {
        tokio::spawn(crate::replication::supervise(
            Arc::clone(&engine),
            settings.replication.clone(),
            health_stopped,
        ))
    });
    // The keys in force, replaced whole by ReloadSettings and SIGHUP.
    let live = Arc::new(LiveSettings::new(
        &settings,
        Arc::new(LiveAuth::new(&settings.auth)),
    ));
    let reloader = {
        let (engine, live) = (Arc::clone(&engine), Arc::clone(&live));
        tokio::spawn(async move {
            while reloads.recv().await.is_some() {
                // Audited like Admin calls, with the signal as the caller:
                // the settings first (a refused file keeps the old keys and
                // does not stop the model's reload), then the active
                // model's folder.
                let caller = Caller::named("signal:SIGHUP", None);
                if live.has_file() {
                    let _ = engine.reload_settings(&caller, &live).await;
                }
                match engine
                    .reload(&caller, None, crate::reload::ReloadMode::Swap)
                    .await
                {
                    Ok(r) => tracing::info!(model_id = %r.loaded.embedder.model_id(), "SIGHUP reload done"),
                    Err(e) => {
                        tracing::error!(reason = %e, "SIGHUP reload refused; the old model keeps serving")
                    }
                }
            }
        })
    };
    // Reflection v1, and v1alpha for the tools that only speak that one
    // (grpcurl before 1.9, many IDE plugins): the same descriptors.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(handid_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection_builder().build_v1()?;
    let reflection_v1alpha = reflection_builder().build_v1alpha()?;

    {
        // Gallery sizes for the metrics; a weak reference, so the gauge does
        // not keep a stopped server's engine alive.
        let engine = Arc::downgrade(&engine);
        crate::telemetry::metrics()
            .observe_gallery_sizes(move || engine.upgrade().map(|e| e.gallery_sizes()).unwrap_or_default());
    }
    // The last protection layer, per service: the largest message the codec
    // accepts (OUT_OF_RANGE beyond it); the others are in `layers.rs`.
    let max_message = settings.limits.max_message_bytes;
    let engine_for_writes = Arc::clone(&engine);
    let handid = HandIdServer::new(HandIdService::new(Arc::clone(&engine)))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let admin = AdminServer::new(AdminService::with_settings(engine, Arc::clone(&live)))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);

    let (audit_sink, audit_writer) = AuditSink::start(engine_for_writes.store().clone());
    // One protection stack for both listeners: the gateway's calls share
    // the limits' buckets and slots with the gRPC calls.
    let protection = Protection::stack(&settings, Arc::clone(live.auth()), audit_sink);
    let gateway = match http {
        Some(http) => Some(
            start_gateway(
                http,
                &settings,
                GatewayParts {
                    protection: protection.clone(),
                    services: tonic::service::Routes::new(handid.clone())
                        .add_service(admin.clone())
                        .add_service(health_service.clone()),
                    stop: gateway_stopped,
                },
            )
            .await?,
        ),
        None => None,
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls_config(&settings).await? {
        builder = builder.tls_config(tls)?;
    }

    let local = listener.local_addr().ok();
    tracing::info!(address = ?local, "serving");
    let drain = {
        let health = health.clone();
        async move {
            shutdown.await;
            // Tell load balancers first, then stop accepting and drain.
            let _ = stop_health.send(true);
            crate::health::set(&health, ServingStatus::NotServing).await;
            tracing::info!("shutting down: draining in-flight calls");
        }
    };
    let served = builder
        // One span per call, named after its method, so a call's log lines
        // and its trace's child spans hang together. Only the path is
        // recorded: never a payload.
        .trace_fn(|request| {
            // Named after a known method only (`unknown` otherwise), so a
            // client inventing paths cannot invent span names.
            let method = crate::layers::method_name(request.uri().path());
            tracing::info_span!("grpc", otel.name = method, method = %method)
        })
        // Timeout, access control, rate limit, concurrency limit: the
        // protection stack, commented layer by layer in `layers.rs`.
        .layer(protection)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(handid)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming(listener), drain)
        .await;
    // Writes whose calls were cancelled may still be committing: they
    // finish before the server says it has stopped; then the audit rows of
    // the last calls refused or cancelled before the core saw them.
    if let Some(gateway) = gateway {
        let _ = gateway.await;
    }
    engine_for_writes.finish_writes().await;
    audit_writer.finish(Duration::from_secs(5)).await;
    health_task.abort();
    reloader.abort();
    if let Some(follower) = follower {
        follower.abort();
    }
    tracing::info!("server stopped");
    Ok(served?)
}

/// What the HTTP gateway shares with the gRPC listener.
struct GatewayParts {
    protection: crate::layers::ProtectionLayer,
    services: tonic::service::Routes,
    stop: tokio::sync::watch::Receiver<bool>,
}

/// Starts the HTTP/JSON gateway on `listener`: the gRPC services behind
/// the same protection stack, TLS from the same files.
async fn start_gateway(
    listener: TcpListener,
    settings: &Settings,
    parts: GatewayParts,
) -> Result<tokio::task::JoinHandle<()>, ServeError> {
    if let Ok(local) = listener.local_addr()
        && !local.ip().is_loopback()
        && settings.tls.cert_file.is_none()
        && !settings.server.allow_plaintext
    {
        return Err(ServeError::Plaintext(local));
    }
    let tls = match (&settings.tls.cert_file, &settings.tls.key_file) {
        (Some(cert), Some(key)) => {
            let cert = read_tls_file("tls.cert_file", cert).await?;
            let key = read_tls_file("tls.key_file", key).await?;
            let ca = match &settings.tls.client_ca_file {
                Some(ca) => Some(read_tls_file("tls.client_ca_file", ca).await?),
                None => None,
            };
            Some(crate::gateway::tls_acceptor(&cert, &key, ca.as_deref()).map_err(ServeError::GatewayTls)?)
        }
        _ => None,
    };
    let gateway = Arc::new(crate::gateway::Gateway::new(
        &parts.protection,
        tower::util::BoxCloneSyncService::new(parts.services),
        settings.limits.max_message_bytes,
    ));
    Ok(tokio::spawn(crate::gateway::serve(
        listener,
        gateway.router(),
        tls,
        parts.stop,
    )))
}

/// The accepted connections, with Nagle's algorithm off: a response's last
/// small frame leaves at once instead of waiting for the client's delayed
/// ACK (about 40 ms per call on Linux).
fn incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        if let Err(e) = stream.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY on a connection");
        }
        Ok(stream)
    })
}

/// The TLS settings of the listener, when `tls.cert_file` is set.
async fn tls_config(settings: &Settings) -> Result<Option<ServerTlsConfig>, ServeError> {
    let read = read_tls_file;
    let (Some(cert), Some(key)) = (&settings.tls.cert_file, &settings.tls.key_file) else {
        return Ok(None);
    };
    let identity = Identity::from_pem(
        read("tls.cert_file", cert).await?,
        read("tls.key_file", key).await?,
    );
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &settings.tls.client_ca_file {
        // Mutual TLS: a client without a certificate from this CA cannot
        // even complete the handshake.
        config = config.client_ca_root(Certificate::from_pem(read("tls.client_ca_file", ca).await?));
    }
    tracing::info!(mutual = settings.tls.client_ca_file.is_some(), "TLS enabled");
    Ok(Some(config))
}

async fn read_tls_file(setting: &'static str, path: &std::path::Path) -> Result<Vec<u8>, ServeError> {
    tokio::fs::read(path).await.map_err(|source| ServeError::TlsFile {
        setting,
        path: path.display().to_string(),
        source,
    })
}

/// The message of [`ServeError::ModelDisagrees`]: both models, both
/// folders, and the two ways out.
fn disagreement(recorded: &str, recorded_path: &str, folder: &str, path: &str) -> String {
    let serve_recorded = if recorded_path == path {
        format!("put model {recorded} back in {path} to serve the active model")
    } else {
        format!("set model.path to {recorded_path} to serve the active model")
    };
    format!(
        "the database's active model is {recorded} (loaded from {recorded_path}), but model.path \
         {path} holds model {folder}: {serve_recorded}, or adopt the folder's model deliberately \
         with model.adopt: true (serve --adopt-model), which makes {folder} the active model and \
         retires {recorded}"
    )
}

fn device_name(device: tch::Device) -> String {
    match device {
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".to_owned(),
    }
}
