//! handid-server: the handid.v1 gRPC service.
//!
//! # Layout
//! - `lib.rs`: migrations, embedded so the binary applies them at start.

/// The SQL migrations of `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");
