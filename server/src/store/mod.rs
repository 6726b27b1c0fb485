//! The PostgreSQL store: galleries, subjects, templates (embeddings tagged
//! with their model id), model records and the audit log.
//!
//! Nothing here ever sees an image: callers hand in embeddings. Database
//! errors are classified into [`StoreError`] here, by SQLSTATE class and
//! constraint name, so no database text has to travel further up.
//!
//! # Layout
//! - this file: the pool, and [`StoreError`]: database errors classified.
//! - [`records`]: the rows and records the store takes and returns; model
//!   records and a staged model's coverage.
//! - `enroll`: storing an enrolment, replaying an idempotent retry.
//! - `subjects`: reading and erasing subjects and galleries.
//! - `changes`: the change feed, and the template reads that rebuild an
//!   index from it.
//! - `derive`: templates mapped from another model's (the template upgrade).
//! - `audit`: the append-only audit log.

mod audit;
mod changes;
mod derive;
mod enroll;
pub mod records;
mod subjects;

use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::settings::DatabaseSettings;

pub use derive::{ModelRow, SourceTemplate};
pub use enroll::{Replay, images_sha256};
pub use records::*;

/// What can go wrong in the store, already sorted by who must act.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached (or is shutting down); retry later.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// No such gallery.
    #[error("gallery {0:?} not found")]
    GalleryNotFound(String),
    /// No such subject in the gallery.
    #[error("subject {subject:?} not found in gallery {gallery:?}")]
    SubjectNotFound {
        /// The gallery.
        gallery: String,
        /// The subject.
        subject: String,
    },
    /// The idempotency key was used (by this caller, in this gallery) for
    /// another subject or other images.
    #[error("idempotency key already used for a different enrolment")]
    IdempotencyKeyReused,
    /// Creating the gallery would exceed its caller's gallery quota.
    #[error("{caller:?} has created {max} galleries, its limit")]
    GalleryQuota {
        /// The caller.
        caller: String,
        /// The quota.
        max: u32,
    },
    /// The enrolment would take the subject past its template quota.
    #[error("subject {subject:?} holds {held} templates of the model; {max} is its limit")]
    TemplateQuota {
        /// The subject.
        subject: String,
        /// Its templates of the enrolling model before this enrolment.
        held: u32,
        /// The quota.
        max: u32,
    },
    /// A concurrent change won (e.g. the gallery was deleted during an
    /// enrolment, or a deadlock was broken by rolling this transaction
    /// back); named by the constraint or condition that caught it.
    #[error("concurrent modification caught by {0}")]
    Conflict(String),
    /// Embeddings of a model whose templates the model the database records
    /// as active cannot compare (another space or width): the active model
    /// changed while the images were embedded. Nothing was stored.
    #[error("model {active} is active and cannot compare the templates of model {model_id}")]
    ModelChanged {
        /// The model that made the embeddings.
        model_id: String,
        /// The active model.
        active: String,
    },
    /// Templates of a model that is retired now (its migration cancelled
    /// while they were written).
    #[error("model {0} is retired (its migration was cancelled)")]
    ModelRetired(String),
    /// The database lacks a migration this release needs.
    #[error(
        "the database schema lacks migration {missing} ({description}): run `handid-server migrate` as \
         the schema's owner, or set database.migrate_on_start on a single-role database"
    )]
    SchemaBehind {
        /// The first missing migration.
        missing: i64,
        /// What it does.
        description: String,
    },
    /// An applied migration differs from the one this release embeds.
    #[error("migration {version} applied to the database differs from this release's")]
    SchemaModified {
        /// The migration.
        version: i64,
    },
    /// Any other database failure: a server fault.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e),
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                // Class 08: connection exception; 57P01-03: admin shutdown,
                // crash shutdown, cannot connect now (server restarting).
                if code.starts_with("08") || matches!(code.as_ref(), "57P01" | "57P02" | "57P03") {
                    return StoreError::Unavailable(e);
                }
                // The transaction lost to a concurrent one (40P01 deadlock
                // detected, 40001 serialization failure, 55P03 lock not
                // available) and was rolled back whole: the caller may retry.
                if let Some(reason) = match code.as_ref() {
                    "40P01" => Some("deadlock_detected"),
                    "40001" => Some("serialization_failure"),
                    "55P03" => Some("lock_not_available"),
                    _ => None,
                } {
                    return StoreError::Conflict(reason.to_owned());
                }
                match db.constraint() {
                    Some("enrollments_scope_key") => StoreError::IdempotencyKeyReused,
                    // A row we reference vanished under us (a concurrent
                    // DeleteGallery / DeleteSubject): the caller may retry.
                    Some(
                        name @ ("subjects_gallery_id_fkey"
                        | "templates_gallery_id_fkey"
                        | "templates_subject_fkey"
                        | "templates_enrollment_fkey"
                        | "templates_derived_from_fkey"
                        | "enrollments_subject_fkey"),
                    ) => StoreError::Conflict(name.to_owned()),
                    _ => StoreError::Database(e),
                }
            }
            _ => StoreError::Database(e),
        }
    }
}

/// Result alias of the store.
pub type StoreResult<T> = Result<T, StoreError>;

/// Handle on the database (cheap to clone: a pool, and the queue of the
/// audit writer).
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    audit: audit::LazyAuditWriter,
}

impl Store {
    /// Connects the pool, then applies the migrations
    /// (`database.migrate_on_start`) or checks that they all are applied.
    ///
    /// The pool tests each connection before handing it out, so a connection
    /// broken while the database was down is dropped and replaced rather than
    /// failing a call after the database is back.
    pub async fn connect(settings: &DatabaseSettings) -> StoreResult<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
            .test_before_acquire(true)
            .connect(&settings.url)
            .await?;
        let store = Self::from_pool(pool);
        if settings.migrate_on_start {
            crate::MIGRATOR
                .run(&store.pool)
                .await
                .map_err(|e| StoreError::Database(e.into()))?;
        } else {
            store.check_schema().await?;
        }
        Ok(store)
    }

    /// Whether every migration this binary embeds has been applied, as it
    /// is embedded (a migration edited after it ran is refused too).
    pub async fn check_schema(&self) -> StoreResult<()> {
        let applied: Vec<(i64, Vec<u8>)> = match sqlx::query_as(
            "SELECT version, checksum FROM _sqlx_migrations WHERE success ORDER BY version",
        )
        .fetch_all(&self.pool)
        .await
        {
            Ok(rows) => rows,
            // 42P01 undefined_table: never migrated.
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P01") => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        for migration in crate::MIGRATOR
            .iter()
            .filter(|m| !m.migration_type.is_down_migration())
        {
            match applied.iter().find(|(version, _)| *version == migration.version) {
                None => {
                    return Err(StoreError::SchemaBehind {
                        missing: migration.version,
                        description: migration.description.to_string(),
                    });
                }
                Some((_, checksum)) if checksum.as_slice() != &*migration.checksum => {
                    return Err(StoreError::SchemaModified {
                        version: migration.version,
                    });
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Wraps an existing pool (tests; migrations already applied).
    pub fn from_pool(pool: PgPool) -> Self {
        Self {
            pool,
            audit: audit::LazyAuditWriter::default(),
        }
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// The pool (the replication listener detaches a connection of it).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// Counts from `count(*)` are never negative; saturate rather than wrap.
fn to_u32(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}
