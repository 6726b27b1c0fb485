//! The rows and records the store takes and returns, and the `models`
//! table's records.

use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use super::{Store, StoreResult, to_u32};
use crate::index::NewRow;

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

/// A role a model holds; a model holding neither is retired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The serving model.
    Active,
    /// The model of a migration in progress.
    Staged,
}

impl Role {
    /// The `models.role` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Active => "active",
            Role::Staged => "staged",
        }
    }
}

/// A model the database records in a role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedModel {
    /// Its id.
    pub model_id: String,
    /// The checkpoint folder it was last loaded from (`None` for a model
    /// recorded before the folder was).
    pub path: Option<String>,
}

/// A model that was active once and has been replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetiredModel {
    /// Its id and last folder.
    pub model: RecordedModel,
    /// Its embedding space.
    pub embedding_space: String,
    /// When it stopped being the active model.
    pub active_until: DateTime<Utc>,
}

/// The models the database records as active and staged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelRoles {
    /// The serving model.
    pub active: Option<RecordedModel>,
    /// The model of a migration in progress.
    pub staged: Option<RecordedModel>,
}

/// What [`Store::cancel_staged`] did with the cancelled model's templates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelledStaging {
    /// Templates of the cancelled model deleted.
    pub templates_deleted: u32,
    /// Templates of the cancelled model kept.
    pub templates_kept: u32,
    /// Subjects whose kept templates are their only ones: no template the
    /// active model compares.
    pub subjects_without_active: u32,
    /// Whether the cancelled model is RollbackModel's target (its templates
    /// all kept).
    pub rollback_target: bool,
}

/// What [`Store::claim_active`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The model is recorded as active; the model it replaced, if any, is
    /// retired.
    Active {
        /// The retired model.
        retired: Option<String>,
    },
    /// Another model is recorded as active: nothing changed.
    Disagrees(RecordedModel),
}

/// What [`Store::roll_back_to`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rollback {
    /// The model is recorded as active again; the model it replaced is
    /// retired.
    Recorded,
    /// Subjects lack a template the model compares, in these galleries:
    /// nothing changed.
    Uncovered(Vec<Coverage>),
    /// The caller expected another model to be active than this one (a
    /// rollback or another change took effect since it looked): nothing
    /// changed.
    NotActive(Option<String>),
}

/// What [`Store::promote_staged`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Promotion {
    /// The staged model is recorded as active; the one it replaced is
    /// retired.
    Recorded,
    /// The model is no longer staged (another replica cancelled or
    /// promoted it): nothing changed.
    NotStaged,
    /// Full coverage was required and subjects lack a template of the
    /// staged model's spaces, in these galleries: nothing changed.
    Uncovered(Vec<Coverage>),
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
    /// Optional idempotency key, scoped by `caller` and the gallery.
    pub idempotency_key: Option<&'a str>,
    /// The digest of the images ([`super::images_sha256`]) a retry must
    /// carry again.
    pub images_sha256: &'a str,
    /// Who enrols (key id or certificate grant): the key's scope, and the
    /// creator recorded when this creates the gallery.
    pub caller: &'a str,
    /// How many galleries `caller` may have created; creating one more
    /// is refused ([`super::StoreError::GalleryQuota`]).
    pub max_galleries: u32,
    /// How many templates of the enrolling model the subject may hold; an
    /// enrolment that would take it past that is refused
    /// ([`super::StoreError::TemplateQuota`]), nothing stored.
    pub max_templates: u32,
    /// During a model migration: the same images embedded by the staged
    /// model, stored in the same transaction (after the active model's, so
    /// a replay finds the active model's templates first).
    pub staged: Option<StagedEmbeddings<'a>>,
    /// With a side-information model configured (`model.side_info`): its
    /// feature of each image, stored beside every template of that image
    /// (the active model's and the staged model's) in the same transaction.
    pub side: Option<SideFeatures<'a>>,
}

/// The side-information model's features of an enrolment's images.
#[derive(Debug, Clone, Copy)]
pub struct SideFeatures<'a> {
    /// The side-information model.
    pub model_id: &'a str,
    /// One feature per image, in image order.
    pub features: &'a [Vec<f32>],
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
#[derive(Debug, Clone)]
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

impl<'r> sqlx::FromRow<'r, PgRow> for TemplateRow {
    fn from_row(row: &'r PgRow) -> sqlx::Result<Self> {
        Ok(TemplateRow {
            gallery_id: row.try_get("gallery_id")?,
            subject_id: row.try_get("subject_id")?,
            seq: row.try_get("seq")?,
            embedding: decode_embedding(row)?,
        })
    }
}

/// The `embedding` column of `row`.
pub(super) fn decode_embedding(row: &PgRow) -> sqlx::Result<Vec<f32>> {
    let bytes: &[u8] = row.try_get("embedding")?;
    embedding_from_bytes(bytes).map_err(|source| sqlx::Error::ColumnDecode {
        index: "embedding".to_owned(),
        source: source.into(),
    })
}

/// A vector as the `templates.embedding` column holds it: each value's
/// float4 binary form (big-endian, as PostgreSQL sends a `real`), one after
/// another.
pub fn embedding_bytes(embedding: &[f32]) -> Vec<u8> {
    embedding.iter().flat_map(|value| value.to_be_bytes()).collect()
}

/// The vector `embedding_bytes` wrote.
pub fn embedding_from_bytes(bytes: &[u8]) -> Result<Vec<f32>, String> {
    let (values, rest) = bytes.as_chunks::<4>();
    if !rest.is_empty() {
        return Err(format!(
            "{} bytes is not a whole number of float4 values",
            bytes.len()
        ));
    }
    Ok(values.iter().map(|value| f32::from_be_bytes(*value)).collect())
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

/// How far a replica is behind the change feed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lag {
    /// Changes committed after the last one it applied.
    pub pending: u64,
    /// How long ago the oldest of them was committed (zero when none).
    pub oldest: std::time::Duration,
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
    /// API key id or certificate grant (`anonymous` with auth off;
    /// `unauthenticated` for a call refused before anyone was recognised).
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
    /// What an Admin call attempted and how it ended (reloads and
    /// promotions: path, from and to model, mode, reason when refused).
    pub detail: Option<&'a serde_json::Value>,
}

impl Store {
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

    /// The models the database records as active and staged.
    pub async fn model_roles(&self) -> StoreResult<ModelRoles> {
        let rows: Vec<(String, String, Option<String>)> =
            sqlx::query_as("SELECT role, model_id, path FROM models WHERE role IN ('active', 'staged')")
                .fetch_all(&self.pool)
                .await?;
        let mut roles = ModelRoles::default();
        for (role, model_id, path) in rows {
            let recorded = Some(RecordedModel { model_id, path });
            match role.as_str() {
                "active" => roles.active = recorded,
                _ => roles.staged = recorded,
            }
        }
        Ok(roles)
    }

    /// Records that `model_id`, loaded from `path`, is now the model of
    /// `role` (active or staged): the model that held the role before is
    /// retired, in the same transaction (at most one of each, a unique
    /// index says so). The row keeps the count and the time of the last
    /// load. Returns the retired model's id.
    pub async fn assign_role(&self, model_id: &str, role: Role, path: &str) -> StoreResult<Option<String>> {
        let mut tx = self.pool.begin().await?;
        lock_roles(&mut tx).await?;
        let retired = assign(&mut tx, model_id, role, path).await?;
        tx.commit().await?;
        Ok(retired)
    }

    /// RollbackModel's record: makes `model_id`, loaded from `path`, the
    /// active model again (as [`Store::assign_role`]), provided every
    /// subject has a template of `spaces` (the spaces it compares);
    /// otherwise changes nothing and returns the galleries lacking.
    ///
    /// The check and the role change are one transaction, after the active
    /// model's row is locked: an enrolment (on any replica) that locked it
    /// first ([`Store::enroll`]) has committed by then and the check sees
    /// its templates, and one that comes later waits for the change and is
    /// refused unless `model_id` compares its templates. No subject enrolled
    /// with only templates of the model replaced is left behind.
    ///
    /// With `expected_active`, the rollback is made only while that model is
    /// the active one: a retry of a rollback whose answer was lost finds
    /// the model it went back to active and changes nothing, instead of
    /// rolling forward again.
    pub async fn roll_back_to(
        &self,
        model_id: &str,
        path: &str,
        spaces: &[String],
        expected_active: Option<&str>,
    ) -> StoreResult<Rollback> {
        let mut tx = self.pool.begin().await?;
        lock_roles(&mut tx).await?;
        let active = lock_active(&mut tx).await?;
        if let Some(expected) = expected_active
            && active.as_deref() != Some(expected)
        {
            return Ok(Rollback::NotActive(active));
        }
        // A statement of its own, begun once the lock is held: its snapshot
        // holds every enrolment that held the row before.
        let lacking = lacking_in(&mut tx, spaces).await?;
        if !lacking.is_empty() {
            return Ok(Rollback::Uncovered(lacking));
        }
        assign(&mut tx, model_id, Role::Active, path).await?;
        tx.commit().await?;
        Ok(Rollback::Recorded)
    }

    /// Makes the staged model `model_id`, loaded from `path`, the active
    /// one (retiring the active one), provided the database still records
    /// it as staged, and with `require_coverage` (the staged model's
    /// spaces), provided every subject has a template of them.
    ///
    /// As for a rollback ([`Store::roll_back_to`]), the coverage is checked
    /// in the transaction that records the promotion, after the active
    /// model's row is locked: an enrolment of the active model alone (on a
    /// replica that has not yet followed the staging) that locked it first
    /// is seen by the check, and one that comes later waits and is refused
    /// unless the promoted model compares its templates ([`Store::enroll`]).
    pub async fn promote_staged(
        &self,
        model_id: &str,
        path: &str,
        require_coverage: Option<&[String]>,
    ) -> StoreResult<Promotion> {
        let mut tx = self.pool.begin().await?;
        lock_roles(&mut tx).await?;
        lock_active(&mut tx).await?;
        let staged: Option<String> = sqlx::query_scalar("SELECT model_id FROM models WHERE role = 'staged'")
            .fetch_optional(&mut *tx)
            .await?;
        if staged.as_deref() != Some(model_id) {
            return Ok(Promotion::NotStaged);
        }
        if let Some(spaces) = require_coverage {
            // A statement of its own, begun once the lock is held.
            let lacking = lacking_in(&mut tx, spaces).await?;
            if !lacking.is_empty() {
                return Ok(Promotion::Uncovered(lacking));
            }
        }
        assign(&mut tx, model_id, Role::Active, path).await?;
        tx.commit().await?;
        Ok(Promotion::Recorded)
    }

    /// At start: makes `model_id` (the model of `model.path`, loaded from
    /// `path`) the active model when none is recorded, when it is the one
    /// recorded, or when `adopt` says to replace the recorded one; otherwise
    /// changes nothing and returns the recorded model. One decision at a
    /// time across replicas.
    pub async fn claim_active(&self, model_id: &str, path: &str, adopt: bool) -> StoreResult<Claim> {
        let mut tx = self.pool.begin().await?;
        lock_roles(&mut tx).await?;
        let recorded: Option<(String, Option<String>)> =
            sqlx::query_as("SELECT model_id, path FROM models WHERE role = 'active'")
                .fetch_optional(&mut *tx)
                .await?;
        if let Some((recorded_id, recorded_path)) = recorded
            && recorded_id != model_id
            && !adopt
        {
            return Ok(Claim::Disagrees(RecordedModel {
                model_id: recorded_id,
                path: recorded_path,
            }));
        }
        let retired = assign(&mut tx, model_id, Role::Active, path).await?;
        tx.commit().await?;
        Ok(Claim::Active { retired })
    }

    /// The model that was active last before the active one (the most
    /// recently replaced), which RollbackModel makes active again.
    pub async fn previous_active(&self) -> StoreResult<Option<RetiredModel>> {
        let row: Option<(String, String, Option<String>, DateTime<Utc>)> = sqlx::query_as(
            "SELECT model_id, embedding_space, path, active_until FROM models
             WHERE role = 'retired' AND active_until IS NOT NULL
             ORDER BY active_until DESC, model_id LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(
            row.map(|(model_id, embedding_space, path, active_until)| RetiredModel {
                model: RecordedModel { model_id, path },
                embedding_space,
                active_until,
            }),
        )
    }

    /// Ends the migration to `model_id`, in one transaction: it is retired
    /// (every replica follows, a restart does not stage it again) and its
    /// templates are deleted, except those of subjects holding no template
    /// of another model of `active_spaces` (their only templates), those a
    /// template was derived from (the derived one would go with them), and
    /// all of them when `model_id` is the rollback target. `None` when the
    /// database does not record `model_id` as staged (another replica
    /// changed the models): nothing changed.
    ///
    /// The staged row is locked before anything is deleted: an enrolment
    /// (or a template upgrade) that checks the role under a share lock
    /// either commits first, its templates then deleted here, or sees the
    /// model retired and stores none ([`Store::enroll`]).
    pub async fn cancel_staged(
        &self,
        model_id: &str,
        active_spaces: &[String],
    ) -> StoreResult<Option<CancelledStaging>> {
        let mut tx = self.pool.begin().await?;
        lock_roles(&mut tx).await?;
        let staged: Option<String> =
            sqlx::query_scalar("SELECT model_id FROM models WHERE role = 'staged' FOR UPDATE")
                .fetch_optional(&mut *tx)
                .await?;
        if staged.as_deref() != Some(model_id) {
            return Ok(None);
        }
        sqlx::query("UPDATE models SET role = 'retired' WHERE model_id = $1")
            .bind(model_id)
            .execute(&mut *tx)
            .await?;
        // The model RollbackModel goes back to, now that this one is
        // retired (`previous_active`).
        let target: Option<String> = sqlx::query_scalar(
            "SELECT model_id FROM models WHERE role = 'retired' AND active_until IS NOT NULL
             ORDER BY active_until DESC, model_id LIMIT 1",
        )
        .fetch_optional(&mut *tx)
        .await?;
        let rollback_target = target.as_deref() == Some(model_id);
        // Whether the subject of `t` holds a template the active model
        // compares, other than the cancelled model's.
        const COVERED: &str = "EXISTS (
            SELECT 1 FROM templates a JOIN models m ON m.model_id = a.model_id
            WHERE a.subject = t.subject AND a.model_id <> $1 AND m.embedding_space = ANY($2))";
        let templates_deleted = if rollback_target {
            0
        } else {
            sqlx::query(&format!(
                "DELETE FROM templates t WHERE t.model_id = $1 AND {COVERED}
                   AND NOT EXISTS (SELECT 1 FROM templates d WHERE d.derived_from = t.template_id)"
            ))
            .bind(model_id)
            .bind(active_spaces)
            .execute(&mut *tx)
            .await?
            .rows_affected()
        };
        let (kept, uncovered): (i64, i64) = sqlx::query_as(&format!(
            "SELECT count(*), count(DISTINCT t.subject) FILTER (WHERE NOT {COVERED})
             FROM templates t WHERE t.model_id = $1"
        ))
        .bind(model_id)
        .bind(active_spaces)
        .fetch_one(&mut *tx)
        .await?;
        // The other replicas drop their staged model (delivered at commit).
        sqlx::query("SELECT pg_notify($1, 'models')")
            .bind(crate::replication::CHANNEL)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(CancelledStaging {
            templates_deleted: u32::try_from(templates_deleted).unwrap_or(u32::MAX),
            templates_kept: to_u32(kept),
            subjects_without_active: to_u32(uncovered),
            rollback_target,
        }))
    }

    /// Retires `model_id` (a staged model that is not restored).
    pub async fn retire_model(&self, model_id: &str) -> StoreResult<()> {
        sqlx::query("UPDATE models SET role = 'retired' WHERE model_id = $1")
            .bind(model_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Per gallery: its subjects, and those with a template of a model of
    /// `spaces` (a staged model's enrolment coverage).
    pub async fn coverage(&self, spaces: &[String]) -> StoreResult<Vec<Coverage>> {
        coverage_in(&mut *self.pool.acquire().await?, spaces).await
    }
}

/// [`Store::coverage`], on `conn` (within its transaction, if any).
/// The galleries where some subject has no template of `spaces`.
async fn lacking_in(conn: &mut sqlx::PgConnection, spaces: &[String]) -> StoreResult<Vec<Coverage>> {
    Ok(coverage_in(conn, spaces)
        .await?
        .into_iter()
        .filter(|c| c.covered < c.subjects)
        .collect())
}

async fn coverage_in(conn: &mut sqlx::PgConnection, spaces: &[String]) -> StoreResult<Vec<Coverage>> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT g.gallery_id, count(s.id),
                    count(s.id) FILTER (WHERE EXISTS (
                        SELECT 1 FROM templates t JOIN models m ON m.model_id = t.model_id
                        WHERE t.subject = s.id AND m.embedding_space = ANY($1)))
             FROM galleries g LEFT JOIN subjects s ON s.gallery_id = g.gallery_id
             GROUP BY g.gallery_id ORDER BY g.gallery_id",
    )
    .bind(spaces)
    .fetch_all(conn)
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

/// Serialises role changes (reloads, promotions, starts of every replica):
/// the first writer of an empty table and a concurrent swap cannot both win.
/// The active model's id, its row locked for update until commit: the
/// enrolments that share-lock it ([`Store::enroll`]) have committed, and
/// later ones wait for this transaction.
async fn lock_active(tx: &mut sqlx::PgConnection) -> StoreResult<Option<String>> {
    Ok(
        sqlx::query_scalar("SELECT model_id FROM models WHERE role = 'active' FOR UPDATE")
            .fetch_optional(tx)
            .await?,
    )
}

async fn lock_roles(tx: &mut sqlx::PgConnection) -> StoreResult<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(7460373270431950002)")
        .execute(tx)
        .await?;
    Ok(())
}

/// Retires the holder of `role` unless it is `model_id`, then gives
/// `model_id` the role and its path; returns the retired model.
async fn assign(
    tx: &mut sqlx::PgConnection,
    model_id: &str,
    role: Role,
    path: &str,
) -> StoreResult<Option<String>> {
    // Retire first: the unique index allows one holder per role at every
    // statement's end.
    let retired: Option<String> = sqlx::query_scalar(
        "UPDATE models SET role = 'retired',
             active_until = CASE WHEN role = 'active' THEN now() ELSE active_until END
         WHERE role = $1 AND model_id <> $2 RETURNING model_id",
    )
    .bind(role.as_str())
    .bind(model_id)
    .fetch_optional(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE models SET role = $2, path = $3, load_count = load_count + 1, last_loaded_at = now(),
             active_until = CASE WHEN $2 = 'active' THEN NULL ELSE active_until END
         WHERE model_id = $1",
    )
    .bind(model_id)
    .bind(role.as_str())
    .bind(path)
    .execute(&mut *tx)
    .await?;
    // The other replicas follow (delivered at commit).
    sqlx::query("SELECT pg_notify($1, 'models')")
        .bind(crate::replication::CHANNEL)
        .execute(&mut *tx)
        .await?;
    Ok(retired)
}
