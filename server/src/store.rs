//! The PostgreSQL store: galleries, subjects, templates (embeddings tagged
//! with their model id), model records and the audit log.
//!
//! Nothing here ever sees an image: callers hand in embeddings. Database
//! errors are classified into [`StoreError`] here, by SQLSTATE class and
//! constraint name, so no database text has to travel further up.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::{Stream, TryStreamExt};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use crate::index::NewRow;
use crate::settings::DatabaseSettings;

/// What can go wrong in the store, already sorted by who must act.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached (or is shutting down); retry later.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// No such gallery.
    #[error("unknown gallery")]
    GalleryNotFound,
    /// No such subject in the gallery.
    #[error("unknown subject")]
    SubjectNotFound,
    /// The idempotency key was used for another gallery, subject or number
    /// of images.
    #[error("idempotency key already used for a different enrolment")]
    IdempotencyKeyReused,
    /// A concurrent change won (e.g. the gallery was deleted during an
    /// enrolment); named by the constraint that caught it.
    #[error("concurrent modification caught by {0}")]
    Conflict(String),
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
                match db.constraint() {
                    Some("enrollments_pkey") => StoreError::IdempotencyKeyReused,
                    // A row we reference vanished under us (a concurrent
                    // DeleteGallery / DeleteSubject): the caller may retry.
                    Some(
                        name @ ("subjects_gallery_id_fkey"
                        | "templates_gallery_id_fkey"
                        | "templates_subject_fkey"
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

/// A model as recorded in the `models` table.
#[derive(Debug, Clone)]
pub struct ModelRecord {
    /// Hash of the weights.
    pub model_id: String,
    /// Embedding space id.
    pub embedding_space: String,
    /// e.g. `ViT-B/16`.
    pub architecture: String,
    /// Embedding dimension.
    pub embedding_dim: usize,
    /// The manifest as JSON text (no weights, no images).
    pub manifest_json: String,
}

/// An enrolment to store.
#[derive(Debug, Clone)]
pub struct NewEnrollment<'a> {
    /// Gallery id (validated by the caller and again by the schema).
    pub gallery_id: &'a str,
    /// Subject id.
    pub subject_id: &'a str,
    /// The model that produced the embeddings.
    pub model_id: &'a str,
    /// One L2-normalised embedding per image.
    pub embeddings: &'a [Vec<f32>],
    /// Quality estimate per image, in [0, 1].
    pub qualities: &'a [f32],
    /// Optional idempotency key.
    pub idempotency_key: Option<&'a str>,
    /// During a model migration: the same images embedded by the staged
    /// model, stored in the same transaction (after the active model's, so
    /// a replay finds the active model's templates first).
    pub staged: Option<StagedEmbeddings<'a>>,
}

/// The staged model's embeddings of an enrolment.
#[derive(Debug, Clone, Copy)]
pub struct StagedEmbeddings<'a> {
    /// The staged model.
    pub model_id: &'a str,
    /// One embedding per image, in image order.
    pub embeddings: &'a [Vec<f32>],
}

/// A template as created by an enrolment.
#[derive(Debug, Clone, PartialEq)]
pub struct CreatedTemplate {
    /// Its id.
    pub template_id: Uuid,
    /// Its enrolment order.
    pub seq: i64,
}

/// The committed outcome of an Enroll.
#[derive(Debug, Clone)]
pub struct Enrolled {
    /// Templates created by the (first) call, in image order.
    pub templates: Vec<CreatedTemplate>,
    /// Templates the subject now has for the model.
    pub template_count: u32,
    /// Whether this replays an earlier call with the same key.
    pub replayed: bool,
    /// The model of the stored templates (on a replay: the first call's).
    pub model_id: String,
    /// Templates created for the staged model, in image order (empty
    /// outside a migration and on a replay).
    pub staged_templates: Vec<CreatedTemplate>,
}

/// Template metadata, never the vector.
#[derive(Debug, Clone)]
pub struct TemplateMeta {
    /// Its id.
    pub template_id: Uuid,
    /// The model that produced it.
    pub model_id: String,
    /// Quality in [0, 1].
    pub quality: f32,
    /// When it was stored.
    pub created_at: DateTime<Utc>,
}

/// A subject and its templates' metadata.
#[derive(Debug, Clone)]
pub struct SubjectRecord {
    /// Subject id.
    pub subject_id: String,
    /// When it was first enrolled.
    pub created_at: DateTime<Utc>,
    /// Templates in enrolment order.
    pub templates: Vec<TemplateMeta>,
}

/// One stored template with its vector, for loading the index.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TemplateRow {
    /// Gallery id.
    pub gallery_id: String,
    /// Subject id.
    pub subject_id: String,
    /// Enrolment order.
    pub seq: i64,
    /// The embedding.
    pub embedding: Vec<f32>,
}

impl TemplateRow {
    /// The row as the gallery index takes it.
    pub fn as_new_row(&self) -> NewRow<'_> {
        NewRow {
            subject_id: &self.subject_id,
            seq: self.seq,
            embedding: &self.embedding,
        }
    }
}

/// What was erased.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Erased {
    /// Subjects deleted.
    pub subjects: u32,
    /// Templates deleted, all models.
    pub templates: u32,
}

/// One row of the `changes` table: what a replica must re-read.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Change {
    /// Its number; changes are applied in this order.
    pub seq: i64,
    /// `subject` (re-read the subject's templates) or `gallery` (deleted).
    pub kind: String,
    /// The gallery.
    pub gallery_id: String,
    /// The subject, for `subject` changes.
    pub subject_id: Option<String>,
}

/// A staged model's enrolment coverage of one gallery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coverage {
    /// The gallery.
    pub gallery_id: String,
    /// Its subjects.
    pub subjects: u32,
    /// Those with at least one template of the staged model's space.
    pub covered: u32,
}

/// One audit-log row: who did what with which outcome. Deliberately has no
/// field for an image or an embedding.
#[derive(Debug, Clone)]
pub struct AuditEntry<'a> {
    /// API key id or client certificate subject (`anonymous` with auth off).
    pub actor: &'a str,
    /// The peer address of the call, as extra.
    pub peer: Option<&'a str>,
    /// `enroll`, `identify`, ...
    pub action: &'a str,
    /// Gallery, when the call named one.
    pub gallery_id: Option<&'a str>,
    /// Subject, when the call named one (or matched one).
    pub subject_id: Option<&'a str>,
    /// Model that served the call.
    pub model_id: Option<&'a str>,
    /// `ok` or the gRPC code name.
    pub outcome: &'a str,
    /// Best score, for Identify / Verify.
    pub top_score: Option<f32>,
}

/// Handle on the database (cheap to clone: a pool).
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    /// Connects the pool and applies the migrations.
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
        crate::MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| StoreError::Database(e.into()))?;
        Ok(Self { pool })
    }

    /// Wraps an existing pool (tests; migrations already applied).
    pub fn from_pool(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Records a model (first sighting wins; later loads change nothing).
    pub async fn record_model(&self, model: &ModelRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO models (model_id, embedding_space, architecture, embedding_dim, manifest)
             VALUES ($1, $2, $3, $4, $5::jsonb) ON CONFLICT (model_id) DO NOTHING",
        )
        .bind(&model.model_id)
        .bind(&model.embedding_space)
        .bind(&model.architecture)
        .bind(i32::try_from(model.embedding_dim).unwrap_or(i32::MAX))
        .bind(&model.manifest_json)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Stores an enrolment in one transaction and returns once it is
    /// committed. With an idempotency key, a retry (even a concurrent one)
    /// returns the first call's result: the key's primary key decides which
    /// call is first, not a read-then-write check.
    pub async fn enroll(&self, new: &NewEnrollment<'_>) -> StoreResult<Enrolled> {
        if let Some(key) = new.idempotency_key
            && let Some(first) = self
                .find_replay(key, new.gallery_id, new.subject_id, new.embeddings.len())
                .await?
        {
            return Ok(first);
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO galleries (gallery_id) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(new.gallery_id)
            .execute(&mut *tx)
            .await?;
        // DO UPDATE (a no-op) rather than DO NOTHING so the row comes back
        // and stays locked until commit: a concurrent DeleteSubject waits.
        let subject: i64 = sqlx::query_scalar(
            "INSERT INTO subjects (gallery_id, subject_id) VALUES ($1, $2)
             ON CONFLICT ON CONSTRAINT subjects_gallery_subject_key
             DO UPDATE SET subject_id = EXCLUDED.subject_id RETURNING id",
        )
        .bind(new.gallery_id)
        .bind(new.subject_id)
        .fetch_one(&mut *tx)
        .await?;
        if let Some(key) = new.idempotency_key {
            // Blocks while another transaction holds the same key; once that
            // one commits, no row comes back and its result is replayed.
            let claimed: Option<String> = sqlx::query_scalar(
                "INSERT INTO enrollments (idempotency_key, subject) VALUES ($1, $2)
                 ON CONFLICT (idempotency_key) DO NOTHING RETURNING idempotency_key",
            )
            .bind(key)
            .bind(subject)
            .fetch_optional(&mut *tx)
            .await?;
            if claimed.is_none() {
                tx.rollback().await?;
                return self
                    .find_replay(key, new.gallery_id, new.subject_id, new.embeddings.len())
                    .await?
                    .ok_or_else(|| StoreError::Conflict("enrollments_pkey".to_owned()));
            }
        }
        let templates = insert_templates(&mut tx, subject, new, new.model_id, new.embeddings).await?;
        let staged_templates = match new.staged {
            Some(staged) => {
                insert_templates(&mut tx, subject, new, staged.model_id, staged.embeddings).await?
            }
            None => Vec::new(),
        };
        let template_count = count_templates(&mut tx, subject, new.model_id).await?;
        tx.commit().await?;
        Ok(Enrolled {
            templates,
            template_count,
            replayed: false,
            model_id: new.model_id.to_owned(),
            staged_templates,
        })
    }

    /// The first result of the Enroll that used `key`, if there was one; a
    /// key used for another gallery, subject or number of images is refused.
    pub async fn find_replay(
        &self,
        key: &str,
        gallery: &str,
        subject_id_wanted: &str,
        images: usize,
    ) -> StoreResult<Option<Enrolled>> {
        let mut tx = self.pool.begin().await?;
        let Some(row) = sqlx::query(
            "SELECT s.id, s.gallery_id, s.subject_id FROM enrollments e
             JOIN subjects s ON s.id = e.subject WHERE e.idempotency_key = $1",
        )
        .bind(key)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(None);
        };
        let subject: i64 = row.try_get("id")?;
        let gallery_id: String = row.try_get("gallery_id")?;
        let subject_id: String = row.try_get("subject_id")?;
        let rows = sqlx::query(
            "SELECT template_id, seq, model_id FROM templates WHERE idempotency_key = $1 ORDER BY seq",
        )
        .bind(key)
        .fetch_all(&mut *tx)
        .await?;
        // During a migration one call stored templates of two models, the
        // active model's first: the replay answers with those.
        let first_model: Option<String> = rows.first().map(|r| r.try_get("model_id")).transpose()?;
        let mut templates = Vec::with_capacity(rows.len());
        let model_id = first_model.unwrap_or_default();
        for row in rows {
            if row.try_get::<String, _>("model_id")? == model_id {
                templates.push(CreatedTemplate {
                    template_id: row.try_get("template_id")?,
                    seq: row.try_get("seq")?,
                });
            }
        }
        if gallery_id != gallery || subject_id != subject_id_wanted || templates.len() != images {
            return Err(StoreError::IdempotencyKeyReused);
        }
        let template_count = count_templates(&mut tx, subject, &model_id).await?;
        tx.commit().await?;
        Ok(Some(Enrolled {
            templates,
            template_count,
            replayed: true,
            model_id,
            staged_templates: Vec::new(),
        }))
    }

    /// Erases a subject and its templates; returns the number of templates.
    pub async fn delete_subject(&self, gallery_id: &str, subject_id: &str) -> StoreResult<u32> {
        let mut tx = self.pool.begin().await?;
        let subject: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM subjects WHERE gallery_id = $1 AND subject_id = $2 FOR UPDATE",
        )
        .bind(gallery_id)
        .bind(subject_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(subject) = subject else {
            return Err(self.missing(&mut tx, gallery_id).await);
        };
        let templates: i64 = sqlx::query_scalar("SELECT count(*) FROM templates WHERE subject = $1")
            .bind(subject)
            .fetch_one(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM subjects WHERE id = $1")
            .bind(subject)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(to_u32(templates))
    }

    /// Erases a gallery, its subjects and templates.
    pub async fn delete_gallery(&self, gallery_id: &str) -> StoreResult<Erased> {
        let mut tx = self.pool.begin().await?;
        let found: Option<String> =
            sqlx::query_scalar("SELECT gallery_id FROM galleries WHERE gallery_id = $1 FOR UPDATE")
                .bind(gallery_id)
                .fetch_optional(&mut *tx)
                .await?;
        if found.is_none() {
            return Err(StoreError::GalleryNotFound);
        }
        let (subjects, templates): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM subjects WHERE gallery_id = $1),
                    (SELECT count(*) FROM templates WHERE gallery_id = $1)",
        )
        .bind(gallery_id)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM galleries WHERE gallery_id = $1")
            .bind(gallery_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Erased {
            subjects: to_u32(subjects),
            templates: to_u32(templates),
        })
    }

    /// Whether the gallery exists.
    pub async fn gallery_exists(&self, gallery_id: &str) -> StoreResult<bool> {
        Ok(
            sqlx::query_scalar::<_, i32>("SELECT 1 FROM galleries WHERE gallery_id = $1")
                .bind(gallery_id)
                .fetch_optional(&self.pool)
                .await?
                .is_some(),
        )
    }

    /// `GalleryNotFound` or `SubjectNotFound`, whichever explains a missing
    /// subject row.
    async fn missing(&self, tx: &mut Transaction<'_, Postgres>, gallery_id: &str) -> StoreError {
        let gallery: Result<Option<i32>, sqlx::Error> =
            sqlx::query_scalar("SELECT 1 FROM galleries WHERE gallery_id = $1")
                .bind(gallery_id)
                .fetch_optional(&mut **tx)
                .await;
        match gallery {
            Ok(Some(_)) => StoreError::SubjectNotFound,
            Ok(None) => StoreError::GalleryNotFound,
            Err(e) => e.into(),
        }
    }

    /// One subject with its templates' metadata.
    pub async fn get_subject(&self, gallery_id: &str, subject_id: &str) -> StoreResult<SubjectRecord> {
        let mut tx = self.pool.begin().await?;
        let row: Option<(i64, DateTime<Utc>)> =
            sqlx::query_as("SELECT id, created_at FROM subjects WHERE gallery_id = $1 AND subject_id = $2")
                .bind(gallery_id)
                .bind(subject_id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((id, created_at)) = row else {
            return Err(self.missing(&mut tx, gallery_id).await);
        };
        let mut templates = templates_of(&mut tx, &[id]).await?;
        tx.commit().await?;
        Ok(SubjectRecord {
            subject_id: subject_id.to_owned(),
            created_at,
            templates: templates.remove(&id).unwrap_or_default(),
        })
    }

    /// Up to `limit` subjects of a gallery with ids after `after`, by id.
    pub async fn list_subjects(
        &self,
        gallery_id: &str,
        after: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<SubjectRecord>> {
        let mut tx = self.pool.begin().await?;
        let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM galleries WHERE gallery_id = $1")
            .bind(gallery_id)
            .fetch_optional(&mut *tx)
            .await?;
        if found.is_none() {
            return Err(StoreError::GalleryNotFound);
        }
        let subjects: Vec<(i64, String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT id, subject_id, created_at FROM subjects
             WHERE gallery_id = $1 AND ($2::text IS NULL OR subject_id > $2)
             ORDER BY subject_id LIMIT $3",
        )
        .bind(gallery_id)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        let ids: Vec<i64> = subjects.iter().map(|s| s.0).collect();
        let mut templates = templates_of(&mut tx, &ids).await?;
        tx.commit().await?;
        Ok(subjects
            .into_iter()
            .map(|(id, subject_id, created_at)| SubjectRecord {
                subject_id,
                created_at,
                templates: templates.remove(&id).unwrap_or_default(),
            })
            .collect())
    }

    /// Every template of `model_id`, by gallery then enrolment order, as a
    /// stream (the index is loaded without holding the table in memory).
    pub fn templates_of_model<'a>(
        &'a self,
        model_id: &'a str,
    ) -> impl Stream<Item = StoreResult<TemplateRow>> + Send + 'a {
        sqlx::query_as::<_, TemplateRow>(
            "SELECT t.gallery_id, s.subject_id, t.seq, t.embedding
             FROM templates t JOIN subjects s ON s.id = t.subject
             WHERE t.model_id = $1 ORDER BY t.gallery_id, t.seq",
        )
        .bind(model_id)
        .fetch(&self.pool)
        .map_err(StoreError::from)
    }

    /// The pool (the replication listener detaches a connection of it).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Every template of a model of `spaces` and width `dim`, by gallery
    /// then enrolment order, as a stream: what one model's index holds.
    pub fn templates_in_spaces<'a>(
        &'a self,
        spaces: &'a [String],
        dim: usize,
    ) -> impl Stream<Item = StoreResult<TemplateRow>> + Send + 'a {
        sqlx::query_as::<_, TemplateRow>(
            "SELECT t.gallery_id, s.subject_id, t.seq, t.embedding
             FROM templates t JOIN subjects s ON s.id = t.subject JOIN models m ON m.model_id = t.model_id
             WHERE m.embedding_space = ANY($1) AND t.dimension = $2 ORDER BY t.gallery_id, t.seq",
        )
        .bind(spaces)
        .bind(i32::try_from(dim).unwrap_or(i32::MAX))
        .fetch(&self.pool)
        .map_err(StoreError::from)
    }

    /// One subject's templates of a model of `spaces` and width `dim`, in
    /// enrolment order (none when the subject is gone).
    pub async fn subject_templates_in_spaces(
        &self,
        gallery_id: &str,
        subject_id: &str,
        spaces: &[String],
        dim: usize,
    ) -> StoreResult<Vec<TemplateRow>> {
        Ok(sqlx::query_as::<_, TemplateRow>(
            "SELECT t.gallery_id, s.subject_id, t.seq, t.embedding
             FROM templates t JOIN subjects s ON s.id = t.subject JOIN models m ON m.model_id = t.model_id
             WHERE t.gallery_id = $1 AND s.subject_id = $2 AND m.embedding_space = ANY($3)
               AND t.dimension = $4
             ORDER BY t.seq",
        )
        .bind(gallery_id)
        .bind(subject_id)
        .bind(spaces)
        .bind(i32::try_from(dim).unwrap_or(i32::MAX))
        .fetch_all(&self.pool)
        .await?)
    }

    /// The number of the latest change (0 before the first).
    pub async fn last_change(&self) -> StoreResult<i64> {
        Ok(
            sqlx::query_scalar::<_, Option<i64>>("SELECT max(seq) FROM changes")
                .fetch_one(&self.pool)
                .await?
                .unwrap_or(0),
        )
    }

    /// Up to `limit` changes numbered after `after`, in order.
    pub async fn changes_after(&self, after: i64, limit: u32) -> StoreResult<Vec<Change>> {
        Ok(sqlx::query_as::<_, Change>(
            "SELECT seq, kind, gallery_id, subject_id FROM changes WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    /// Per gallery: its subjects, and those with a template of a model of
    /// `spaces` (a staged model's enrolment coverage).
    pub async fn coverage(&self, spaces: &[String]) -> StoreResult<Vec<Coverage>> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT g.gallery_id, count(s.id),
                    count(s.id) FILTER (WHERE EXISTS (
                        SELECT 1 FROM templates t JOIN models m ON m.model_id = t.model_id
                        WHERE t.subject = s.id AND m.embedding_space = ANY($1)))
             FROM galleries g LEFT JOIN subjects s ON s.gallery_id = g.gallery_id
             GROUP BY g.gallery_id ORDER BY g.gallery_id",
        )
        .bind(spaces)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(gallery_id, subjects, covered)| Coverage {
                gallery_id,
                subjects: to_u32(subjects),
                covered: to_u32(covered),
            })
            .collect())
    }

    /// Records that `model_id` was (re)loaded into `role` (`active`,
    /// `staged`) or retired: the `models` row keeps the count and the time
    /// of the last load.
    pub async fn mark_model(&self, model_id: &str, role: &str) -> StoreResult<()> {
        let bump = i64::from(role != "retired");
        sqlx::query(
            "UPDATE models SET role = $2, load_count = load_count + $3,
                    last_loaded_at = CASE WHEN $3 = 1 THEN now() ELSE last_loaded_at END
             WHERE model_id = $1",
        )
        .bind(model_id)
        .bind(role)
        .bind(bump)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Appends one audit row.
    pub async fn audit(&self, entry: &AuditEntry<'_>) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO audit_log (actor, action, gallery_id, subject_id, model_id, outcome, top_score, peer)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(entry.actor)
        .bind(entry.action)
        .bind(entry.gallery_id)
        .bind(entry.subject_id)
        .bind(entry.model_id)
        .bind(entry.outcome)
        .bind(entry.top_score)
        .bind(entry.peer.map(|p| p.get(..p.len().min(128)).unwrap_or(p)))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// Inserts one template per embedding of `model_id` for an enrolment.
async fn insert_templates(
    tx: &mut Transaction<'_, Postgres>,
    subject: i64,
    new: &NewEnrollment<'_>,
    model_id: &str,
    embeddings: &[Vec<f32>],
) -> StoreResult<Vec<CreatedTemplate>> {
    let mut templates = Vec::with_capacity(embeddings.len());
    for (embedding, quality) in embeddings.iter().zip(new.qualities) {
        let template_id = Uuid::new_v4();
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO templates
               (template_id, subject, gallery_id, model_id, dimension, embedding, quality, idempotency_key)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING seq",
        )
        .bind(template_id)
        .bind(subject)
        .bind(new.gallery_id)
        .bind(model_id)
        .bind(i32::try_from(embedding.len()).unwrap_or(i32::MAX))
        .bind(embedding)
        .bind(quality)
        .bind(new.idempotency_key)
        .fetch_one(&mut **tx)
        .await?;
        templates.push(CreatedTemplate { template_id, seq });
    }
    Ok(templates)
}

async fn count_templates(
    tx: &mut Transaction<'_, Postgres>,
    subject: i64,
    model_id: &str,
) -> StoreResult<u32> {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM templates WHERE subject = $1 AND model_id = $2")
        .bind(subject)
        .bind(model_id)
        .fetch_one(&mut **tx)
        .await?;
    Ok(to_u32(n))
}

async fn templates_of(
    tx: &mut Transaction<'_, Postgres>,
    subjects: &[i64],
) -> StoreResult<std::collections::HashMap<i64, Vec<TemplateMeta>>> {
    let rows: Vec<(i64, Uuid, String, f32, DateTime<Utc>)> = sqlx::query_as(
        "SELECT subject, template_id, model_id, quality, created_at FROM templates
         WHERE subject = ANY($1) ORDER BY seq",
    )
    .bind(subjects)
    .fetch_all(&mut **tx)
    .await?;
    let mut by_subject = std::collections::HashMap::<i64, Vec<TemplateMeta>>::new();
    for (subject, template_id, model_id, quality, created_at) in rows {
        by_subject.entry(subject).or_default().push(TemplateMeta {
            template_id,
            model_id,
            quality,
            created_at,
        });
    }
    Ok(by_subject)
}

/// Counts from `count(*)` are never negative; saturate rather than wrap.
fn to_u32(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: &str = "model-a";

    async fn store(pool: PgPool) -> Store {
        let store = Store::from_pool(pool);
        store
            .record_model(&ModelRecord {
                model_id: MODEL.to_owned(),
                embedding_space: "space-a".to_owned(),
                architecture: "tiny".to_owned(),
                embedding_dim: 2,
                manifest_json: "{}".to_owned(),
            })
            .await
            .expect("record model");
        store
    }

    fn enrollment<'a>(
        gallery: &'a str,
        subject: &'a str,
        embeddings: &'a [Vec<f32>],
        key: Option<&'a str>,
    ) -> NewEnrollment<'a> {
        NewEnrollment {
            gallery_id: gallery,
            subject_id: subject,
            model_id: MODEL,
            embeddings,
            qualities: &[1.0, 1.0, 1.0, 1.0][..embeddings.len()],
            idempotency_key: key,
            staged: None,
        }
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn enroll_get_list_delete_round_trip(pool: PgPool) {
        let store = store(pool).await;
        let two = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
        let first = store
            .enroll(&enrollment("g1", "bob", &two, None))
            .await
            .expect("enroll");
        assert_eq!(first.templates.len(), 2);
        assert_eq!(first.template_count, 2);
        assert!(first.templates[0].seq < first.templates[1].seq);
        let again = store
            .enroll(&enrollment("g1", "bob", &two[..1], None))
            .await
            .expect("enroll");
        assert_eq!(again.template_count, 3, "templates accumulate per subject");
        store
            .enroll(&enrollment("g1", "alice", &two[..1], None))
            .await
            .expect("enroll");
        store
            .enroll(&enrollment("g2", "bob", &two[..1], None))
            .await
            .expect("enroll");

        let bob = store.get_subject("g1", "bob").await.expect("get");
        let ids: Vec<Uuid> = bob.templates.iter().map(|t| t.template_id).collect();
        assert_eq!(
            ids[..2],
            [first.templates[0].template_id, first.templates[1].template_id]
        );
        assert_eq!(bob.templates.len(), 3);

        let page = store.list_subjects("g1", None, 1).await.expect("list");
        assert_eq!(
            page.iter().map(|s| s.subject_id.as_str()).collect::<Vec<_>>(),
            ["alice"]
        );
        let page = store.list_subjects("g1", Some("alice"), 10).await.expect("list");
        assert_eq!(
            page.iter().map(|s| s.subject_id.as_str()).collect::<Vec<_>>(),
            ["bob"]
        );
        assert_eq!(page[0].templates.len(), 3);

        let rows: Vec<TemplateRow> = store
            .templates_of_model(MODEL)
            .try_collect()
            .await
            .expect("stream");
        assert_eq!(rows.len(), 5);
        assert!(
            rows.windows(2)
                .all(|w| (w[0].gallery_id.as_str(), w[0].seq) < (w[1].gallery_id.as_str(), w[1].seq))
        );

        assert_eq!(store.delete_subject("g1", "bob").await.expect("delete"), 3);
        assert!(matches!(
            store.get_subject("g1", "bob").await,
            Err(StoreError::SubjectNotFound)
        ));
        assert!(matches!(
            store.delete_subject("g1", "bob").await,
            Err(StoreError::SubjectNotFound)
        ));
        assert!(matches!(
            store.delete_subject("nope", "bob").await,
            Err(StoreError::GalleryNotFound)
        ));
        assert!(matches!(
            store.list_subjects("nope", None, 5).await,
            Err(StoreError::GalleryNotFound)
        ));

        let erased = store.delete_gallery("g1").await.expect("delete gallery");
        assert_eq!(
            erased,
            Erased {
                subjects: 1,
                templates: 1
            }
        );
        assert!(!store.gallery_exists("g1").await.expect("exists"));
        assert!(store.gallery_exists("g2").await.expect("exists"));
        assert!(matches!(
            store.delete_gallery("g1").await,
            Err(StoreError::GalleryNotFound)
        ));
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn a_retried_enroll_returns_the_first_result(pool: PgPool) {
        let store = store(pool).await;
        let two = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
        let first = store
            .enroll(&enrollment("g", "s", &two, Some("k1")))
            .await
            .expect("enroll");
        let retry = store
            .enroll(&enrollment("g", "s", &two, Some("k1")))
            .await
            .expect("retry");
        assert!(!first.replayed);
        assert!(retry.replayed);
        assert_eq!(retry.templates, first.templates);
        assert_eq!(retry.template_count, 2, "the retry added nothing");
        for other in [
            enrollment("g", "someone-else", &two, Some("k1")),
            enrollment("other", "s", &two, Some("k1")),
            enrollment("g", "s", &two[..1], Some("k1")),
        ] {
            assert!(matches!(
                store.enroll(&other).await,
                Err(StoreError::IdempotencyKeyReused)
            ));
        }
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn a_migration_enrolment_stores_both_models_and_replays_the_active_ones(pool: PgPool) {
        let store = store(pool.clone()).await;
        store
            .record_model(&ModelRecord {
                model_id: "model-b".to_owned(),
                embedding_space: "space-b".to_owned(),
                architecture: "tiny".to_owned(),
                embedding_dim: 3,
                manifest_json: "{}".to_owned(),
            })
            .await
            .expect("record model b");
        let active = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
        let staged = vec![vec![1.0, 0.0, 0.0], vec![0.0, 0.0, 1.0]];
        let mut new = enrollment("g", "s", &active, Some("k"));
        new.staged = Some(StagedEmbeddings {
            model_id: "model-b",
            embeddings: &staged,
        });
        let first = store.enroll(&new).await.expect("dual enrolment");
        assert_eq!((first.templates.len(), first.staged_templates.len()), (2, 2));
        assert_eq!(first.template_count, 2, "counted for the active model");
        let retry = store.enroll(&new).await.expect("replay");
        assert!(retry.replayed);
        assert_eq!(retry.templates, first.templates);
        assert_eq!(retry.model_id, MODEL);
        let coverage = store.coverage(&["space-b".to_owned()]).await.expect("coverage");
        assert_eq!(
            coverage,
            [Coverage {
                gallery_id: "g".to_owned(),
                subjects: 1,
                covered: 1
            }]
        );
        // One change per subject and statement, numbered in order.
        let changes = store.changes_after(0, 10).await.expect("changes");
        assert_eq!(changes.len(), 4, "two template inserts per model: {changes:?}");
        assert!(changes.windows(2).all(|w| w[0].seq < w[1].seq));
        assert!(changes.iter().all(|c| c.subject_id.as_deref() == Some("s")));
        assert_eq!(store.last_change().await.expect("last"), changes[3].seq);
        store.delete_gallery("g").await.expect("delete");
        let mut kinds: Vec<String> = store
            .changes_after(changes[3].seq, 10)
            .await
            .expect("changes")
            .into_iter()
            .map(|c| c.kind)
            .collect();
        // The gallery's own row and its cascade to the subjects (in either
        // order, applying both leaves the index empty).
        kinds.sort();
        assert_eq!(kinds, ["gallery", "subject"]);
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn concurrent_retries_store_once(pool: PgPool) {
        let store = store(pool).await;
        let one = vec![vec![0.6, 0.8]];
        let calls = (0..8).map(|_| {
            let store = store.clone();
            let one = one.clone();
            tokio::spawn(async move { store.enroll(&enrollment("g", "s", &one, Some("same-key"))).await })
        });
        let results: Vec<Enrolled> = futures::future::join_all(calls)
            .await
            .into_iter()
            .map(|r| r.expect("task").expect("enroll"))
            .collect();
        assert_eq!(
            results.iter().filter(|r| !r.replayed).count(),
            1,
            "exactly one call stored"
        );
        assert!(results.iter().all(|r| r.templates == results[0].templates));
        let subject = store.get_subject("g", "s").await.expect("get");
        assert_eq!(subject.templates.len(), 1);
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn an_unknown_model_is_a_server_fault_not_a_conflict(pool: PgPool) {
        let store = Store::from_pool(pool);
        let one = vec![vec![1.0, 0.0]];
        let err = store
            .enroll(&enrollment("g", "s", &one, None))
            .await
            .expect_err("no model row");
        assert!(matches!(err, StoreError::Database(_)), "{err:?}");
        // The failed transaction left nothing behind.
        assert!(!store.gallery_exists("g").await.expect("exists"));
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn audit_rows_are_written(pool: PgPool) {
        let store = store(pool.clone()).await;
        store
            .audit(&AuditEntry {
                actor: "anonymous",
                peer: Some("127.0.0.1:1"),
                action: "identify",
                gallery_id: Some("g"),
                subject_id: None,
                model_id: Some(MODEL),
                outcome: "ok",
                top_score: Some(0.5),
            })
            .await
            .expect("audit");
        let (action, score): (String, Option<f32>) =
            sqlx::query_as("SELECT action, top_score FROM audit_log")
                .fetch_one(&pool)
                .await
                .expect("row");
        assert_eq!((action.as_str(), score), ("identify", Some(0.5)));
    }

    #[tokio::test]
    async fn an_unreachable_database_is_unavailable() {
        // Port 9 (discard) on loopback: nothing listens; connect fails fast.
        let pool = PgPoolOptions::new()
            .acquire_timeout(Duration::from_millis(500))
            .connect_lazy("postgres://handid@127.0.0.1:9/handid")
            .expect("lazy pool");
        let err = Store::from_pool(pool).ping().await.expect_err("nothing listens");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    }
}
