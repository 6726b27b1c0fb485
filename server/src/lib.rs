//! handid-server: the handid.v1 gRPC service.
//!
//! # Layout
//! - [`server`]: [`run`]: start-up, TLS, health, reflection, graceful shutdown.
//! - [`layers`]: the protection middleware stack (timeout, access control,
//!   rate limit, concurrency limit with load shedding).
//! - [`health`]: SERVING only while the database answers, the models run
//!   and replication keeps up.
//! - [`audit`]: the audit rows of calls the core never saw (refusals).
//! - [`auth`]: API keys, scopes, client certificates: who calls, and may they.
//! - [`live`]: the settings applied while running (keys, on ReloadSettings
//!   and SIGHUP).
//! - [`telemetry`]: logs, OpenTelemetry traces and metrics over OTLP.
//! - [`service`]: the thin gRPC handlers (protobuf <-> domain types).
//! - [`gateway`]: the HTTP/JSON gateway: REST resources in front of the
//!   same services and protection stack; its OpenAPI document.
//! - [`validate`]: every check of a request that needs neither the
//!   database nor the model: protobuf to the core's validated calls.
//! - [`engine`]: the core: Enroll, Identify, Verify, ... and the audit log.
//! - [`error`]: [`ServiceError`] and its one conversion to `tonic::Status`.
//! - [`faults`]: test-only fault injection (feature `fault-injection`).
//! - `fuzzing`: the fuzz targets' harnesses (`fuzz/`), hidden from the API.
//! - [`decode`]: untrusted image bytes to model input, judged from the
//!   header first, under decode slots and a pixel budget, cancellable.
//! - [`batcher`]: dynamic batching of forward passes on their own thread.
//! - [`index`]: the in-memory gallery matrices that Identify searches.
//! - [`reload`]: loading and checking a checkpoint for a hot reload.
//! - [`replication`]: following the database's change feed, so several
//!   replicas serve the same galleries.
//! - [`store`]: PostgreSQL (sqlx): galleries, subjects, templates, audit log.
//! - [`upgrade`]: `upgrade-templates`: stored templates mapped into a new
//!   model's space by a template transformation, resumable.
//! - [`settings`]: the YAML settings with `HANDID__SECTION__KEY` overrides.
//! - [`MIGRATOR`]: the migrations, embedded so the binary applies them at start.

pub mod audit;
pub mod auth;
pub mod batcher;
pub mod decode;
pub mod engine;
pub mod error;
pub mod faults;
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub mod health;
pub mod index;
pub mod layers;
pub mod live;
pub mod reload;
pub mod replication;
pub mod server;
pub mod service;
pub mod settings;
pub mod store;
pub mod telemetry;
pub mod upgrade;
pub mod validate;

pub use error::ServiceError;
pub use server::{ServeError, run, run_with_listeners, run_with_reloads};
pub use settings::Settings;

/// The SQL migrations of `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");
