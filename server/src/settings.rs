//! Server settings: one YAML file, `HANDID__SECTION__KEY` environment
//! overrides, defaults in Rust, validated once at start.
//!
//! Loading goes YAML text -> `serde_yaml::Value` -> environment overrides
//! merged into that value -> typed [`Settings`]. Deserialising only once,
//! after the merge, means an override is checked exactly like a key of the
//! file: an unknown section or key is refused, and every error names the key
//! (`batch.max_wait_ms: invalid type ...`) thanks to `serde_path_to_error`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};

/// Prefix of the environment overrides: `HANDID__BATCH__MAX_WAIT_MS=5`.
pub const ENV_PREFIX: &str = "HANDID__";

/// A setting that cannot be read or makes no sense.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The file cannot be read.
    #[error("cannot read settings file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The YAML is not well formed.
    #[error("settings file is not valid YAML: {0}")]
    Yaml(#[source] serde_yaml::Error),
    /// A key is unknown or its value has the wrong type.
    #[error("setting {key}: {message}")]
    Key {
        /// The dotted key, e.g. `batch.max_wait_ms`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

/// All settings of the server.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Where the gRPC server listens and how it sheds load.
    pub server: ServerSettings,
    /// The PostgreSQL store.
    pub database: DatabaseSettings,
    /// The serving checkpoint.
    pub model: ModelSettings,
    /// Gathering requests into forward passes.
    pub batch: BatchSettings,
    /// How galleries are held in memory and searched.
    pub search: SearchSettings,
    /// Limits on what one request may ask for.
    pub limits: LimitSettings,
    /// Following other replicas' writes to the same database.
    pub replication: ReplicationSettings,
    /// API keys and their scopes.
    pub auth: AuthSettings,
    /// TLS and mutual TLS of the listeners.
    pub tls: TlsSettings,
    /// The HTTP/JSON gateway (off unless `http.listen` is set).
    pub http: HttpSettings,
    /// OpenTelemetry export and log format.
    pub telemetry: TelemetrySettings,
    /// The file these settings were read from ([`Settings::load`]): what
    /// ReloadSettings and SIGHUP read again. Not a setting.
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

/// The gRPC listener and its middleware.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Address the `serve` command binds (tests bind their own port 0).
    pub listen: SocketAddr,
    /// Requests handled at once across all connections; more are refused
    /// with RESOURCE_EXHAUSTED instead of queueing without bound.
    pub max_concurrent_requests: usize,
    /// A request running longer than this is cancelled (DEADLINE_EXCEEDED).
    /// Writes already committing finish regardless.
    pub request_timeout_ms: u64,
    /// The same for the Admin service, whose reloads load a checkpoint and
    /// every gallery's templates (a reload past it still completes).
    pub admin_timeout_ms: u64,
    /// How often the health check probes the database.
    pub health_check_interval_ms: u64,
    /// Calls per second one caller (API key, certificate grant, or peer
    /// address when auth is off) may make on average; 0 turns the limit
    /// off.
    pub rate_limit_per_second: f64,
    /// Calls one caller may make in a burst above that rate.
    pub rate_limit_burst: u32,
    /// Calls of one caller in flight at once; one more is refused with
    /// RESOURCE_EXHAUSTED.
    pub max_concurrent_per_caller: usize,
    /// Serve plain text on an address other than loopback. Off: such a
    /// listener needs `tls.cert_file`, or the server refuses to start
    /// (keys and images would cross the network in clear). On only where
    /// something else protects the traffic (a service mesh's mTLS).
    pub allow_plaintext: bool,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            max_concurrent_requests: 256,
            request_timeout_ms: 30_000,
            admin_timeout_ms: 600_000,
            health_check_interval_ms: 1_000,
            rate_limit_per_second: 100.0,
            rate_limit_burst: 200,
            max_concurrent_per_caller: 64,
            allow_plaintext: false,
        }
    }
}

/// PostgreSQL connection pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// `postgres://user@host:port/db`.
    pub url: String,
    /// Connections in the pool.
    pub max_connections: u32,
    /// How long a call waits for a connection before answering UNAVAILABLE.
    /// Short, so an unreachable database fails calls fast instead of piling
    /// them up.
    pub acquire_timeout_ms: u64,
    /// Apply the migrations at start. Off by default: migrations run as the
    /// schema's owner (`handid-server migrate`), while `serve` connects as
    /// a role that may not change the schema and only checks that it is
    /// the one this release needs. On suits a single-role development
    /// database.
    pub migrate_on_start: bool,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: "postgres://handid@127.0.0.1:5432/handid".to_owned(),
            max_connections: 16,
            acquire_timeout_ms: 2_000,
            migrate_on_start: false,
        }
    }
}

/// The serving checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSettings {
    /// Checkpoint folder (`model.safetensors` + `handid.yaml`).
    pub path: PathBuf,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Serve the model of `path` even when the database records another
    /// one as active: it becomes the active model and the recorded one is
    /// retired. Off, such a start is refused (the serving model is the
    /// database's, so a promotion survives a restart).
    pub adopt: bool,
    /// A side-information model (a serving checkpoint folder) whose feature
    /// of every enrolled image is stored beside its templates, for a future
    /// upgrade by a template transformation fitted with it
    /// (`fit-transform --side-info`, `upgrade-templates`). Fixed for the
    /// server's life; hot reloads do not change it. None: nothing stored.
    pub side_info: Option<PathBuf>,
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            path: PathBuf::from("checkpoints/serving"),
            device: "cpu".to_owned(),
            adopt: false,
            side_info: None,
        }
    }
}

/// Dynamic batching of forward passes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchSettings {
    /// Images in one forward pass at most.
    pub max_batch_size: usize,
    /// How long the first image of a batch waits, at most, for images of
    /// other calls still being decoded (a lone call does not wait).
    pub max_wait_ms: u64,
    /// Let the first image wait the whole `max_wait_ms` even when no other
    /// image is on its way: fuller batches under bursty load on a GPU, at
    /// the cost of that wait on every lone call.
    pub wait_when_idle: bool,
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self {
            max_batch_size: 32,
            max_wait_ms: 5,
            wait_when_idle: false,
        }
    }
}

/// The exact search of galleries (Identify and Verify).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SearchSettings {
    /// Keep a half-precision copy of every template (1.5x the memory) and
    /// scan that: about half the memory traffic per search, with the same
    /// results as the f32 search (candidates within the proven rounding
    /// bound are rescored in f32). CPU only; ignored on a GPU.
    pub half_precision: bool,
    /// Threads one search uses at most; 0: one per core. CPU only.
    pub threads: usize,
}

impl SearchSettings {
    /// The index's options for these settings.
    pub fn options(&self) -> crate::index::SearchOptions {
        let defaults = crate::index::SearchOptions::default();
        crate::index::SearchOptions {
            half_precision: self.half_precision,
            threads: if self.threads == 0 {
                defaults.threads
            } else {
                self.threads
            },
            ..defaults
        }
    }
}

/// Limits on one request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    /// Largest gRPC message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Largest encoded image, in bytes.
    pub max_image_bytes: usize,
    /// Largest decoded image, in pixels (width x height).
    pub max_pixels: u64,
    /// Longest side of an image, in pixels.
    pub max_image_side: u32,
    /// Most elongated image accepted: longer side / shorter side (8 = 8:1).
    pub max_aspect_ratio: u32,
    /// Shortest side of an image, in pixels: below it there is no hand to see.
    pub min_image_side: u32,
    /// Images decoded at once across all calls; 0 = one per CPU core.
    pub decode_concurrency: usize,
    /// Pixels being decoded at once across all calls (each image counts
    /// its width x height until its decode ends); at least `max_pixels`.
    pub decode_pixel_budget: u64,
    /// Images in one Enroll (and one Embed) at most.
    pub max_images_per_request: usize,
    /// Largest `top_k` of Identify.
    pub max_top_k: u32,
    /// Galleries one caller (API key, certificate grant; everyone together
    /// with auth off) may have created and not deleted. Enroll creates a
    /// gallery on first use; beyond this it is RESOURCE_EXHAUSTED.
    pub max_galleries_per_caller: u32,
    /// Templates of one model a subject may hold (every Enroll adds one per
    /// image); beyond this Enroll is RESOURCE_EXHAUSTED. Bounds what one
    /// subject costs the index, GetSubject and ListSubjects.
    pub max_templates_per_subject: u32,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            max_message_bytes: 64 * 1024 * 1024,
            max_image_bytes: 16 * 1024 * 1024,
            max_pixels: 40_000_000,
            max_image_side: 16_384,
            max_aspect_ratio: 8,
            min_image_side: 64,
            decode_concurrency: 0,
            decode_pixel_budget: 120_000_000,
            max_images_per_request: 16,
            max_top_k: 100,
            max_galleries_per_caller: 1_000,
            max_templates_per_subject: 100,
        }
    }
}

/// Several replicas on one database: each follows the others' enrolments
/// and deletions through LISTEN/NOTIFY and a numbered change table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationSettings {
    /// Follow the change feed (off only for a replica that is alone on its
    /// database and wants to save the listener connection).
    pub enabled: bool,
    /// How often the change table is read even without a notification: the
    /// bound on how late a change whose notification was lost (listener
    /// connection dropped, database restarted) is applied.
    pub poll_interval_ms: u64,
    /// Health says NOT_SERVING while the oldest change this replica has not
    /// applied is older than this (a lagging replica would still match a
    /// subject deleted elsewhere); 0 turns the check off.
    pub max_lag_ms: u64,
}

impl Default for ReplicationSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            poll_interval_ms: 5_000,
            max_lag_ms: 30_000,
        }
    }
}

/// What a key (or a client certificate) may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Identify, Verify, GetSubject, ListSubjects.
    Identify,
    /// Embed: raw embeddings, comparable offline with anything; a scope of
    /// its own, refused to keys limited to galleries.
    Embed,
    /// Enroll, DeleteSubject, DeleteGallery.
    Enroll,
    /// The Admin service.
    Admin,
}

impl Scope {
    /// The scope's name as written in settings and error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Identify => "identify",
            Scope::Embed => "embed",
            Scope::Enroll => "enroll",
            Scope::Admin => "admin",
        }
    }
}

/// Access control.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// When false every call is allowed without a key (local development
    /// and tests only); it must be switched off explicitly.
    pub enabled: bool,
    /// The API keys, stored as hashes (`handid-server keygen` makes them).
    pub keys: Vec<ApiKeySettings>,
    /// Grants of mutual-TLS clients, by certificate subject or san.
    pub certificates: Vec<CertificateGrant>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            keys: Vec::new(),
            certificates: Vec::new(),
        }
    }
}

/// One API key. The key itself is never stored, only its SHA-256.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeySettings {
    /// The name the audit log records for calls made with this key.
    pub id: String,
    /// Lower-case hex SHA-256 of the key.
    pub sha256: String,
    /// What the key may call.
    pub scopes: Vec<Scope>,
    /// When not empty, the only galleries the key may touch.
    #[serde(default)]
    pub galleries: Vec<String>,
}

/// What a mutual-TLS client may call when it comes without an API key. It
/// is recognised by its certificate's subject, parsed and compared
/// attribute by attribute (RFC 4514 text: `CN=enrolment-desk,O=Example`; the
/// order of the attributes does not matter, their values must be equal), or
/// by one subject alternative name (`dns:door-7.example`,
/// `uri:spiffe://site/door-7`, `email:desk@example.org`). Exactly one of the
/// two.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateGrant {
    /// The certificate's subject (the audit log records this text).
    #[serde(default)]
    pub subject: Option<String>,
    /// A subject alternative name of the certificate.
    #[serde(default)]
    pub san: Option<String>,
    /// What it may call.
    pub scopes: Vec<Scope>,
    /// When not empty, the only galleries it may touch.
    #[serde(default)]
    pub galleries: Vec<String>,
}

impl CertificateGrant {
    /// The caller id of this grant: its subject or san text, as written.
    pub fn id(&self) -> String {
        self.subject
            .clone()
            .or_else(|| self.san.clone())
            .unwrap_or_default()
    }
}

/// The HTTP/JSON gateway: the same calls as REST resources, over the same
/// protection stack (keys, limits, audit) as gRPC.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Where the gateway listens; `None` (the default) turns it off. It
    /// speaks TLS (with `tls.*`, mutual TLS included) like the gRPC
    /// listener, under the same plain-text rule.
    pub listen: Option<SocketAddr>,
}

/// TLS of the gRPC listener and the HTTP gateway; off unless both files
/// are named.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    /// PEM certificate chain of the server.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the server.
    pub key_file: Option<PathBuf>,
    /// PEM CA certificates; when set, clients must present a certificate
    /// signed by one of them (mutual TLS) and its subject is the caller id.
    pub client_ca_file: Option<PathBuf>,
}

/// Traces, metrics and logs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// OTLP/gRPC collector (`http://otel-collector:4317`); traces and metrics
    /// are exported only when this is set.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` resource attribute.
    pub service_name: String,
    /// How often metrics are pushed, in milliseconds.
    pub metrics_interval_ms: u64,
    /// Log lines as JSON objects instead of text.
    pub json_logs: bool,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "handid-server".to_owned(),
            metrics_interval_ms: 10_000,
            json_logs: false,
        }
    }
}

impl Settings {
    /// Reads `path` (when given), applies the `HANDID__*` variables of the
    /// process environment and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Self, SettingsError> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
                path: path.to_owned(),
                source,
            })?,
            None => String::new(),
        };
        let mut settings = Self::from_yaml_and_env(&text, std::env::vars())?;
        settings.file = path.map(Path::to_owned);
        Ok(settings)
    }

    /// Parses YAML text, applies the `HANDID__SECTION__KEY` pairs among
    /// `env` and validates. Separate from [`Settings::load`] so tests need
    /// not touch the process environment.
    pub fn from_yaml_and_env(
        yaml: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingsError> {
        let mut root = match serde_yaml::from_str::<Value>(yaml).map_err(SettingsError::Yaml)? {
            // An empty file means "all defaults".
            Value::Null => Value::Mapping(Mapping::new()),
            value => value,
        };
        for (name, value) in env {
            if let Some(path) = name.strip_prefix(ENV_PREFIX) {
                apply_override(&mut root, &name, path, &value)?;
            }
        }
        let settings: Settings = serde_path_to_error::deserialize(root).map_err(|e| SettingsError::Key {
            key: e.path().to_string(),
            message: e.inner().to_string(),
        })?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks the values that types alone cannot.
    pub fn validate(&self) -> Result<(), SettingsError> {
        fn bad(key: &str, message: &str) -> Result<(), SettingsError> {
            Err(SettingsError::Key {
                key: key.to_owned(),
                message: message.to_owned(),
            })
        }
        let s = self;
        if s.server.max_concurrent_requests == 0 {
            return bad("server.max_concurrent_requests", "must be at least 1");
        }
        if s.server.max_concurrent_per_caller == 0 {
            return bad("server.max_concurrent_per_caller", "must be at least 1");
        }
        if !s.server.listen.ip().is_loopback() && s.tls.cert_file.is_none() && !s.server.allow_plaintext {
            return bad(
                "server.listen",
                &format!(
                    "{} is reachable from other hosts and TLS is off: set tls.cert_file and \
                     tls.key_file, or server.allow_plaintext: true where a mesh protects the traffic",
                    s.server.listen
                ),
            );
        }
        if let Some(http) = s.http.listen {
            if !http.ip().is_loopback() && s.tls.cert_file.is_none() && !s.server.allow_plaintext {
                return bad(
                    "http.listen",
                    &format!(
                        "{http} is reachable from other hosts and TLS is off: set tls.cert_file and \
                         tls.key_file, or server.allow_plaintext: true where a mesh protects the traffic"
                    ),
                );
            }
            if http == s.server.listen && http.port() != 0 {
                return bad("http.listen", "must differ from server.listen");
            }
        }
        if s.server.request_timeout_ms == 0 {
            return bad("server.request_timeout_ms", "must be at least 1");
        }
        if s.server.admin_timeout_ms == 0 {
            return bad("server.admin_timeout_ms", "must be at least 1");
        }
        if s.server.health_check_interval_ms == 0 {
            return bad("server.health_check_interval_ms", "must be at least 1");
        }
        if !(s.database.url.starts_with("postgres://") || s.database.url.starts_with("postgresql://")) {
            return bad("database.url", "must be a postgres:// or postgresql:// URL");
        }
        if !(s.server.rate_limit_per_second >= 0.0 && s.server.rate_limit_per_second.is_finite()) {
            return bad(
                "server.rate_limit_per_second",
                "must be a finite number >= 0 (0 is off)",
            );
        }
        if s.server.rate_limit_per_second > 0.0 && s.server.rate_limit_burst == 0 {
            return bad(
                "server.rate_limit_burst",
                "must be at least 1 when the rate limit is on",
            );
        }
        if s.database.max_connections == 0 {
            return bad("database.max_connections", "must be at least 1");
        }
        if s.database.acquire_timeout_ms == 0 {
            return bad("database.acquire_timeout_ms", "must be at least 1");
        }
        if s.model.path.as_os_str().is_empty() {
            return bad("model.path", "must name the checkpoint folder");
        }
        if let Err(e) = validate_device(&s.model.device) {
            return bad("model.device", &e);
        }
        if s.batch.max_batch_size == 0 {
            return bad("batch.max_batch_size", "must be at least 1");
        }
        if s.limits.max_message_bytes == 0 {
            return bad("limits.max_message_bytes", "must be at least 1");
        }
        if s.limits.max_image_bytes == 0 {
            return bad("limits.max_image_bytes", "must be at least 1");
        }
        if s.limits.max_image_bytes > s.limits.max_message_bytes {
            return bad(
                "limits.max_image_bytes",
                "must not exceed limits.max_message_bytes (such an image could never arrive)",
            );
        }
        if s.limits.max_pixels == 0 || s.limits.max_pixels > u64::from(u32::MAX) {
            return bad("limits.max_pixels", "must be 1 to 4294967295");
        }
        if s.limits.max_image_side == 0 {
            return bad("limits.max_image_side", "must be at least 1");
        }
        if s.limits.min_image_side == 0 || s.limits.min_image_side > s.limits.max_image_side {
            return bad(
                "limits.min_image_side",
                "must be at least 1 and at most limits.max_image_side",
            );
        }
        if s.limits.max_aspect_ratio == 0 {
            return bad("limits.max_aspect_ratio", "must be at least 1 (1 = square only)");
        }
        if s.limits.decode_pixel_budget < s.limits.max_pixels {
            return bad(
                "limits.decode_pixel_budget",
                "must be at least limits.max_pixels (or the largest image could never decode)",
            );
        }
        if s.limits.max_images_per_request == 0 {
            return bad("limits.max_images_per_request", "must be at least 1");
        }
        if (s.limits.max_templates_per_subject as usize) < s.limits.max_images_per_request {
            return bad(
                "limits.max_templates_per_subject",
                "must be at least limits.max_images_per_request (one Enroll of a new subject)",
            );
        }
        if s.limits.max_galleries_per_caller == 0 {
            return bad("limits.max_galleries_per_caller", "must be at least 1");
        }
        if s.limits.max_top_k == 0 {
            return bad("limits.max_top_k", "must be at least 1");
        }
        if s.replication.enabled
            && s.replication.max_lag_ms != 0
            && s.replication.max_lag_ms <= s.replication.poll_interval_ms
        {
            return bad(
                "replication.max_lag_ms",
                "must exceed replication.poll_interval_ms (or be 0: no check), or a lost notification \
                 would take the replica out of service",
            );
        }
        if s.replication.poll_interval_ms == 0 {
            return bad("replication.poll_interval_ms", "must be at least 1");
        }
        // Every key id and grant text names one caller: in the audit log, in
        // rate limits and gallery quotas, and in what a reload reports. Two
        // holders with one name would be counted and recorded as one.
        let mut ids = std::collections::HashMap::new();
        // A key is found by its hash; with two entries holding the same
        // hash the later would silently take the key's calls.
        let mut hashes = std::collections::HashMap::new();
        for key in &s.auth.keys {
            if let Err(problem) = crate::auth::check_key_id(&key.id) {
                return bad("auth.keys.id", &problem);
            }
            if ids.insert(key.id.clone(), "key").is_some() {
                return bad(
                    "auth.keys.id",
                    &format!("{:?} is used by two keys: give each key its own id", key.id),
                );
            }
            if key.sha256.len() != 64 || !key.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return bad(
                    "auth.keys.sha256",
                    &format!(
                        "key {:?}: must be 64 hex digits (handid-server keygen prints it)",
                        key.id
                    ),
                );
            }
            if let Some(first) = hashes.insert(key.sha256.to_ascii_lowercase(), key.id.as_str()) {
                return bad(
                    "auth.keys.sha256",
                    &format!(
                        "keys {first:?} and {:?} have the same sha256, so one key would be both \
                         callers: remove one entry, or give one of them a new key (handid-server keygen)",
                        key.id
                    ),
                );
            }
            if key.scopes.is_empty() {
                return bad("auth.keys.scopes", &format!("key {:?} has no scope", key.id));
            }
            if key.scopes.contains(&Scope::Admin) && !key.galleries.is_empty() {
                return bad(
                    "auth.keys.galleries",
                    &format!(
                        "key {:?} has the admin scope and a galleries list, but admin acts on every \
                         gallery (ReloadModel, RollbackModel, CancelMigration ...) and no list limits \
                         it: give admin to a key without galleries",
                        key.id
                    ),
                );
            }
        }
        let mut matches: Vec<(crate::auth::GrantMatch, String)> = Vec::new();
        for grant in &s.auth.certificates {
            let id = grant.id();
            let matched = match crate::auth::check_grant(grant) {
                Ok(matched) => matched,
                Err(problem) => return bad("auth.certificates", &problem.to_string()),
            };
            if let Some((_, first)) = matches.iter().find(|(m, _)| *m == matched) {
                return bad(
                    "auth.certificates",
                    &format!(
                        "grants {first:?} and {id:?} match the same certificates, and only the first \
                         would ever apply: keep one grant"
                    ),
                );
            }
            if let Some(holder) = ids.insert(id.clone(), "certificate grant") {
                return bad(
                    "auth.certificates",
                    &format!(
                        "{id:?} names a certificate grant and a {holder}, which the audit log and the \
                         per-caller limits would take for one caller: rename the key"
                    ),
                );
            }
            matches.push((matched, id.clone()));
            if grant.scopes.is_empty() {
                return bad("auth.certificates", &format!("grant {id:?} has no scope"));
            }
            if grant.scopes.contains(&Scope::Admin) && !grant.galleries.is_empty() {
                return bad(
                    "auth.certificates",
                    &format!(
                        "grant {id:?} has the admin scope and a galleries list, but admin acts on every \
                         gallery (ReloadModel, RollbackModel, CancelMigration ...) and no list limits \
                         it: give admin to a grant without galleries"
                    ),
                );
            }
        }
        if s.tls.cert_file.is_some() != s.tls.key_file.is_some() {
            return bad("tls.cert_file", "tls.cert_file and tls.key_file go together");
        }
        if s.tls.client_ca_file.is_some() && s.tls.cert_file.is_none() {
            return bad(
                "tls.client_ca_file",
                "mutual TLS needs tls.cert_file and tls.key_file",
            );
        }
        if let Some(endpoint) = &s.telemetry.otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return bad("telemetry.otlp_endpoint", "must be an http:// or https:// URL");
        }
        if s.telemetry.metrics_interval_ms == 0 {
            return bad("telemetry.metrics_interval_ms", "must be at least 1");
        }
        Ok(())
    }

    /// The request timeout as a duration.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.server.request_timeout_ms)
    }

    /// The Admin service's timeout as a duration.
    pub fn admin_timeout(&self) -> Duration {
        Duration::from_millis(self.server.admin_timeout_ms)
    }
}

/// Syntax check only: whether CUDA is present is the model loader's
/// business, at start, with its own explanation.
fn validate_device(spec: &str) -> Result<(), String> {
    match spec {
        "cpu" | "cuda" => Ok(()),
        _ => match spec.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(_)) => Ok(()),
            _ => Err(format!("{spec:?} is not \"cpu\", \"cuda\" or \"cuda:N\"")),
        },
    }
}

/// Sets `SECTION.KEY` (lower-cased) in `root` to `value`, parsed as a YAML
/// scalar so `HANDID__BATCH__MAX_WAIT_MS=5` becomes a number.
fn apply_override(root: &mut Value, name: &str, path: &str, value: &str) -> Result<(), SettingsError> {
    let parts: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
    let [section, key] = parts.as_slice() else {
        return Err(SettingsError::Key {
            key: name.to_owned(),
            message: "environment overrides are named HANDID__SECTION__KEY".to_owned(),
        });
    };
    let parsed = serde_yaml::from_str::<Value>(value).unwrap_or_else(|_| Value::String(value.to_owned()));
    let not_a_section = || SettingsError::Key {
        key: section.clone(),
        message: "is not a section (a mapping of keys)".to_owned(),
    };
    let Value::Mapping(top) = root else {
        return Err(SettingsError::Key {
            key: "(root)".to_owned(),
            message: "the settings file must be a mapping of sections".to_owned(),
        });
    };
    let entry = top
        .entry(Value::String(section.clone()))
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    let Value::Mapping(section_map) = entry else {
        return Err(not_a_section());
    };
    section_map.insert(Value::String(key.clone()), parsed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn key_of(err: SettingsError) -> String {
        match err {
            SettingsError::Key { key, .. } => key,
            other => panic!("expected a key error, got {other}"),
        }
    }

    #[test]
    fn empty_file_gives_the_defaults() {
        let s = Settings::from_yaml_and_env("", env(&[])).expect("defaults are valid");
        assert_eq!(s.batch.max_batch_size, BatchSettings::default().max_batch_size);
        assert_eq!(s.limits.max_top_k, 100);
    }

    #[test]
    fn the_committed_example_parses_and_is_valid() {
        let text = include_str!("../../configs/server.yaml");
        let s = Settings::from_yaml_and_env(text, env(&[])).expect("configs/server.yaml is valid");
        assert_eq!(s.model.device, "cpu");
    }

    #[test]
    fn environment_overrides_the_file() {
        let yaml = "batch:\n  max_wait_ms: 2\ndatabase:\n  url: postgres://a@h/db\n";
        let s = Settings::from_yaml_and_env(
            yaml,
            env(&[
                ("HANDID__BATCH__MAX_WAIT_MS", "9"),
                ("HANDID__DATABASE__URL", "postgres://b@h:7/x"),
                ("HANDID__LIMITS__MAX_TOP_K", "7"),
                // Single-underscore variables are the scripts' (HANDID_CACHE), not overrides.
                ("HANDID_CACHE", "/nowhere"),
            ]),
        )
        .expect("valid");
        assert_eq!(s.batch.max_wait_ms, 9);
        assert_eq!(s.database.url, "postgres://b@h:7/x");
        assert_eq!(s.limits.max_top_k, 7);
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let err = Settings::from_yaml_and_env("batch:\n  max_wiat_ms: 3\n", env(&[])).expect_err("typo");
        assert!(err.to_string().contains("max_wiat_ms"), "{err}");
        let err = Settings::from_yaml_and_env("", env(&[("HANDID__MODLE__PATH", "/x")])).expect_err("typo");
        assert!(err.to_string().contains("modle"), "{err}");
    }

    #[test]
    fn wrong_types_name_the_key() {
        let err = Settings::from_yaml_and_env("", env(&[("HANDID__BATCH__MAX_BATCH_SIZE", "many")]))
            .expect_err("not a number");
        assert_eq!(key_of(err), "batch.max_batch_size");
    }

    #[test]
    fn nonsense_values_name_the_key() {
        for (yaml, key) in [
            ("batch:\n  max_batch_size: 0\n", "batch.max_batch_size"),
            ("model:\n  device: gpu\n", "model.device"),
            ("database:\n  url: mysql://x\n", "database.url"),
            ("limits:\n  max_top_k: 0\n", "limits.max_top_k"),
            (
                "limits:\n  max_image_bytes: 100\n  max_message_bytes: 10\n",
                "limits.max_image_bytes",
            ),
            ("server:\n  listen: not-an-address\n", "server.listen"),
            (
                "replication:\n  poll_interval_ms: 0\n",
                "replication.poll_interval_ms",
            ),
            (
                "auth:\n  keys:\n  - id: a\n    sha256: abc\n    scopes: [identify]\n",
                "auth.keys.sha256",
            ),
            ("tls:\n  cert_file: /x.pem\n", "tls.cert_file"),
            (
                "telemetry:\n  otlp_endpoint: collector:4317\n",
                "telemetry.otlp_endpoint",
            ),
        ] {
            let err = Settings::from_yaml_and_env(yaml, env(&[])).expect_err(yaml);
            assert_eq!(key_of(err), key, "{yaml}");
        }
    }

    const HASH_A: &str = "a665a45920422f9d417e4867efdc4fb8a04a1f3fff1fa07e998e86f7f7a27ae3";
    const HASH_B: &str = "b3a8e0e1f9ab1bfe3a36f231f676f78bb30a519d2b21e6c530c0eee8ebb4a5d0";

    /// The refusal of `yaml`: its key and its message.
    fn refusal(yaml: &str) -> (String, String) {
        match Settings::from_yaml_and_env(yaml, env(&[])).expect_err(yaml) {
            SettingsError::Key { key, message } => (key, message),
            other => panic!("expected a key error, got {other}"),
        }
    }

    #[test]
    fn admin_keys_and_grants_cannot_be_limited_to_galleries() {
        let (key, message) = refusal(&format!(
            "auth:\n  keys:\n    - {{id: site-ops, sha256: {HASH_A}, scopes: [identify, admin], \
             galleries: [site-1]}}\n"
        ));
        assert_eq!(key, "auth.keys.galleries");
        assert!(
            message.contains("\"site-ops\"") && message.contains("admin acts on every gallery"),
            "{message}"
        );
        let (key, message) = refusal(
            "auth:\n  certificates:\n    - {san: 'dns:ops.example', scopes: [admin], galleries: [site-1]}\n",
        );
        assert_eq!(key, "auth.certificates");
        assert!(
            message.contains("\"dns:ops.example\"") && message.contains("admin acts on every gallery"),
            "{message}"
        );
        // The same entries without admin, or admin without galleries, are fine.
        Settings::from_yaml_and_env(
            &format!(
                "auth:\n  keys:\n    - {{id: site-desk, sha256: {HASH_A}, scopes: [identify, enroll], \
                 galleries: [site-1]}}\n    - {{id: ops, sha256: {HASH_B}, scopes: [admin]}}\n  \
                 certificates:\n    - {{san: 'dns:ops.example', scopes: [admin]}}\n    \
                 - {{san: 'dns:desk.example', scopes: [enroll], galleries: [site-1]}}\n"
            ),
            env(&[]),
        )
        .expect("admin without galleries, galleries without admin");
    }

    #[test]
    fn two_keys_with_one_hash_or_one_id_are_refused_naming_both() {
        // The same key twice, the second written in upper case (the lookup
        // ignores case): the later entry would take every call.
        let (key, message) = refusal(&format!(
            "auth:\n  keys:\n    - {{id: door, sha256: {HASH_A}, scopes: [identify]}}\n    \
             - {{id: ops, sha256: {}, scopes: [admin]}}\n",
            HASH_A.to_ascii_uppercase()
        ));
        assert_eq!(key, "auth.keys.sha256");
        assert!(
            message.contains("\"door\"") && message.contains("\"ops\"") && message.contains("same sha256"),
            "{message}"
        );
        let (key, message) = refusal(&format!(
            "auth:\n  keys:\n    - {{id: door, sha256: {HASH_A}, scopes: [identify]}}\n    \
             - {{id: door, sha256: {HASH_B}, scopes: [admin]}}\n"
        ));
        assert_eq!(key, "auth.keys.id");
        assert!(message.contains("\"door\" is used by two keys"), "{message}");
    }

    #[test]
    fn key_ids_in_the_file_follow_the_keygen_rule() {
        let long = "k".repeat(129);
        for id in [
            "''",
            "'door 1'",
            "\"door\\nops\"",
            "'d\u{f6}or'",
            "'door/1'",
            long.as_str(),
        ] {
            let (key, message) = refusal(&format!(
                "auth:\n  keys:\n    - {{id: {id}, sha256: {HASH_A}, scopes: [identify]}}\n"
            ));
            assert_eq!(key, "auth.keys.id", "{id}");
            assert!(message.contains("1-128 characters"), "{id}: {message}");
        }
        let longest = "k".repeat(128);
        Settings::from_yaml_and_env(
            &format!(
                "auth:\n  keys:\n    - {{id: '{longest}', sha256: {HASH_A}, scopes: [identify]}}\n    \
                 - {{id: 'ops.site-1:door_7@example', sha256: {HASH_B}, scopes: [identify]}}\n"
            ),
            env(&[]),
        )
        .expect("plain ids");
    }

    #[test]
    fn grant_names_are_one_caller_each_and_fit_the_audit_log() {
        // Two texts of one subject: only the first grant would ever apply.
        let (key, message) = refusal(
            "auth:\n  certificates:\n    - {subject: 'CN=desk,O=Example', scopes: [identify]}\n    \
             - {subject: 'O=Example, CN=desk', scopes: [enroll]}\n",
        );
        assert_eq!(key, "auth.certificates");
        assert!(
            message.contains("\"CN=desk,O=Example\"") && message.contains("\"O=Example, CN=desk\""),
            "{message}"
        );
        // A key id that is also a grant's text: one caller to the audit log.
        let (key, message) = refusal(&format!(
            "auth:\n  keys:\n    - {{id: 'dns:door-7.example', sha256: {HASH_A}, scopes: [identify]}}\n  \
             certificates:\n    - {{san: 'dns:door-7.example', scopes: [identify]}}\n"
        ));
        assert_eq!(key, "auth.certificates");
        assert!(
            message.contains("\"dns:door-7.example\" names a certificate grant and a key"),
            "{message}"
        );
        // A line break would start a new line in the log: refused, while
        // its escape is a value like any other.
        let (key, message) =
            refusal("auth:\n  certificates:\n    - {subject: \"CN=desk\\nO=Evil\", scopes: [identify]}\n");
        assert_eq!(key, "auth.certificates");
        assert!(message.contains("control character"), "{message}");
        Settings::from_yaml_and_env(
            "auth:\n  certificates:\n    - {subject: 'CN=desk\\0Aops', scopes: [identify]}\n",
            env(&[]),
        )
        .expect("an escaped line break");
        let (key, message) = refusal(&format!(
            "auth:\n  certificates:\n    - {{subject: 'CN={}', scopes: [identify]}}\n",
            "d".repeat(1030)
        ));
        assert_eq!(key, "auth.certificates");
        assert!(message.contains("longer than 1024 bytes"), "{message}");
    }
}
