//! handid-server: the handid.v1 gRPC service.
//!
//! # Layout
//! - [`settings`]: the YAML settings with `HANDID__SECTION__KEY` overrides.
//! - [`store`]: PostgreSQL (sqlx): galleries, subjects, templates, audit log.
//! - [`index`]: the in-memory gallery matrices that Identify searches.
//! - [`MIGRATOR`]: the migrations, embedded so the binary applies them at start.

pub mod index;
pub mod settings;
pub mod store;

/// The SQL migrations of `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");
