//! Storing an enrolment, and replaying an idempotent retry.

use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use super::{
    AuditEntry, CreatedTemplate, Enrolled, NewEnrollment, SideFeatures, Store, StoreError, StoreResult,
    embedding_bytes, to_u32,
};

impl Store {
    /// Stores an enrolment in one transaction and returns once it is
    /// committed. With an idempotency key, a retry (even a concurrent one)
    /// returns the first call's result: the key's unique constraint decides
    /// which call is first, not a read-then-write check. Keys are scoped by
    /// caller and gallery; a retry must name the same subject and carry the
    /// same images (their digest), or it is refused.
    ///
    /// `audit` is appended in the same transaction: the enrolment and its
    /// record commit together (a replay appends nothing here).
    ///
    /// Refused ([`StoreError::ModelChanged`], nothing stored) when the model
    /// the database records as active compares none of the templates it
    /// would store: the active model changed (a rollback, a promotion, on
    /// any replica) after the images were embedded, and the subject would be
    /// stored where no search finds it. The active model's row stays share
    /// locked until commit, so a role change waits for this enrolment and
    /// then sees its templates ([`Store::roll_back_to`]).
    pub async fn enroll(&self, new: &NewEnrollment<'_>, audit: &AuditEntry<'_>) -> StoreResult<Enrolled> {
        if let Some(key) = new.idempotency_key
            && let Some(first) = self.find_replay(&new.replay_of(key)).await?
        {
            return Ok(first);
        }
        let mut tx = self.pool.begin().await?;
        create_gallery(&mut tx, new).await?;
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
        let enrollment = match new.idempotency_key {
            Some(key) => {
                // Blocks while another transaction holds the same key; once
                // that one commits, no row comes back and its result is
                // replayed.
                let claimed: Option<i64> = sqlx::query_scalar(
                    "INSERT INTO enrollments (caller, gallery_id, idempotency_key, subject, content_sha256)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT ON CONSTRAINT enrollments_scope_key DO NOTHING RETURNING id",
                )
                .bind(new.caller)
                .bind(new.gallery_id)
                .bind(key)
                .bind(subject)
                .bind(new.images_sha256)
                .fetch_optional(&mut *tx)
                .await?;
                if claimed.is_none() {
                    tx.rollback().await?;
                    return self
                        .find_replay(&new.replay_of(key))
                        .await?
                        .ok_or_else(|| StoreError::Conflict("enrollments_scope_key".to_owned()));
                }
                claimed
            }
            None => None,
        };
        // The active model's row is locked before the staged one's, in the
        // order a promotion updates them, so the two cannot deadlock.
        let serving = lock_serving(&mut tx).await?;
        let staged = match new.staged {
            Some(staged) if in_use(&mut tx, staged.model_id).await? => Some(staged),
            _ => None,
        };
        if let Some(serving) = serving {
            // After a promotion the staged embeddings are the active model's.
            let compared = serving.compares(&mut tx, new.model_id).await?
                || match staged {
                    Some(staged) => serving.compares(&mut tx, staged.model_id).await?,
                    None => false,
                };
            if !compared {
                tx.rollback().await?;
                return Err(StoreError::ModelChanged {
                    model_id: new.model_id.to_owned(),
                    active: serving.model_id,
                });
            }
        }
        let templates =
            insert_templates(&mut tx, subject, enrollment, new, new.model_id, new.embeddings).await?;
        let staged_templates = match staged {
            Some(staged) => {
                insert_templates(
                    &mut tx,
                    subject,
                    enrollment,
                    new,
                    staged.model_id,
                    staged.embeddings,
                )
                .await?
            }
            None => Vec::new(),
        };
        if let Some(side) = new.side {
            insert_side_features(&mut tx, &templates, side).await?;
            insert_side_features(&mut tx, &staged_templates, side).await?;
        }
        let template_count = count_templates(&mut tx, subject, new.model_id).await?;
        // Counted with this enrolment's rows, in its transaction: two
        // enrolments of one subject at once (on any replicas) cannot both
        // pass, as the subject's row, updated above, serialises them.
        if template_count > new.max_templates {
            tx.rollback().await?;
            return Err(StoreError::TemplateQuota {
                subject: new.subject_id.to_owned(),
                held: template_count.saturating_sub(u32::try_from(new.embeddings.len()).unwrap_or(u32::MAX)),
                max: new.max_templates,
            });
        }
        super::audit::insert(&mut *tx, audit).await?;
        tx.commit().await?;
        Ok(Enrolled {
            templates,
            template_count,
            replayed: false,
            model_id: new.model_id.to_owned(),
            staged_templates,
        })
    }

    /// The first result of the Enroll that used the replay's key (in its
    /// caller's and gallery's scope), if there was one; the same key with
    /// another subject, other images or another number of images is
    /// refused.
    pub async fn find_replay(&self, replay: &Replay<'_>) -> StoreResult<Option<Enrolled>> {
        let mut tx = self.pool.begin().await?;
        let Some(row) = sqlx::query(
            "SELECT e.id, e.content_sha256, s.id AS subject, s.subject_id FROM enrollments e
             JOIN subjects s ON s.id = e.subject
             WHERE e.caller = $1 AND e.gallery_id = $2 AND e.idempotency_key = $3",
        )
        .bind(replay.caller)
        .bind(replay.gallery_id)
        .bind(replay.key)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(None);
        };
        let enrollment: i64 = row.try_get("id")?;
        let digest: Option<String> = row.try_get("content_sha256")?;
        let subject: i64 = row.try_get("subject")?;
        let subject_id: String = row.try_get("subject_id")?;
        let rows = sqlx::query(
            "SELECT template_id, seq, model_id FROM templates WHERE enrollment = $1 ORDER BY seq",
        )
        .bind(enrollment)
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
        let same_images = digest.as_deref().is_none_or(|d| d == replay.images_sha256);
        if subject_id != replay.subject_id || !same_images || templates.len() != replay.images {
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
}

/// What identifies an idempotent enrolment, and what its retry must match.
#[derive(Debug, Clone, Copy)]
pub struct Replay<'a> {
    /// The key's scope: the caller (key id or certificate grant)...
    pub caller: &'a str,
    /// ... and the gallery.
    pub gallery_id: &'a str,
    /// The key.
    pub key: &'a str,
    /// The subject the retry names.
    pub subject_id: &'a str,
    /// How many images it carries...
    pub images: usize,
    /// ... and their digest ([`images_sha256`]).
    pub images_sha256: &'a str,
}

impl<'a> NewEnrollment<'a> {
    fn replay_of(&self, key: &'a str) -> Replay<'a> {
        Replay {
            caller: self.caller,
            gallery_id: self.gallery_id,
            key,
            subject_id: self.subject_id,
            images: self.embeddings.len(),
            images_sha256: self.images_sha256,
        }
    }
}

/// The digest that tells a retry from another enrolment: SHA-256 over each
/// image's length (8 bytes, little-endian) and bytes, in order, in hex. No
/// image can be recovered from it.
pub fn images_sha256(images: &[Vec<u8>]) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for image in images {
        hasher.update((image.len() as u64).to_le_bytes());
        hasher.update(image);
    }
    hex::encode(hasher.finalize())
}

/// Creates the enrolment's gallery unless it exists, within its caller's
/// quota: the count and the insert are serialised per caller by an
/// advisory lock held until commit, so concurrent creations cannot both
/// pass the count.
async fn create_gallery(tx: &mut Transaction<'_, Postgres>, new: &NewEnrollment<'_>) -> StoreResult<()> {
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM galleries WHERE gallery_id = $1")
        .bind(new.gallery_id)
        .fetch_optional(&mut **tx)
        .await?;
    if exists.is_some() {
        return Ok(());
    }
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('handid.galleries.' || $1, 0))")
        .bind(new.caller)
        .execute(&mut **tx)
        .await?;
    let created: i64 = sqlx::query_scalar("SELECT count(*) FROM galleries WHERE created_by = $1")
        .bind(new.caller)
        .fetch_one(&mut **tx)
        .await?;
    if created >= i64::from(new.max_galleries) {
        return Err(StoreError::GalleryQuota {
            caller: new.caller.to_owned(),
            max: new.max_galleries,
        });
    }
    sqlx::query("INSERT INTO galleries (gallery_id, created_by) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(new.gallery_id)
        .bind(new.caller)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Times [`lock_serving`] looks for the active model's row again after a
/// role change moved it.
const SERVING_ATTEMPTS: u32 = 3;

/// The model the database records as active, and the spaces it compares.
#[derive(Debug)]
struct Serving {
    model_id: String,
    /// Its embedding space and those its manifest declares compatible
    /// (`compatible_spaces`): [`crate::reload::spaces`], as recorded.
    spaces: Vec<String>,
    dim: i32,
}

impl Serving {
    /// Whether this model compares the templates of `model_id`: of one of
    /// its spaces and of its width (as the engine's slots decide which
    /// templates they index). An unrecorded model is let through: its
    /// templates' insert fails on the foreign key, a server fault rather
    /// than this refusal.
    async fn compares(&self, tx: &mut Transaction<'_, Postgres>, model_id: &str) -> StoreResult<bool> {
        // Every Enroll asks this: the usual answer, its own model, costs
        // no query.
        if model_id == self.model_id {
            return Ok(true);
        }
        let recorded: Option<(String, i32)> =
            sqlx::query_as("SELECT embedding_space, embedding_dim FROM models WHERE model_id = $1")
                .bind(model_id)
                .fetch_optional(&mut **tx)
                .await?;
        Ok(recorded.is_none_or(|(space, dim)| dim == self.dim && self.spaces.contains(&space)))
    }
}

/// The active model, its row share locked until commit: a role change
/// (which updates that row) waits for this transaction, and one that
/// committed first is seen. `None` when no model is recorded as active (a
/// database no server has started on): nothing to check against.
///
/// A role change committed while this statement waited for the row leaves
/// that row no longer active, and the statement returns nothing (Postgres
/// checks a locked row's new version against the condition, and the newly
/// active row is not in the statement's snapshot); the next statement's
/// snapshot finds it.
async fn lock_serving(tx: &mut Transaction<'_, Postgres>) -> StoreResult<Option<Serving>> {
    for _ in 0..SERVING_ATTEMPTS {
        let row: Option<(String, String, i32, Vec<String>)> = sqlx::query_as(
            "SELECT model_id, embedding_space, embedding_dim,
                    ARRAY(SELECT jsonb_array_elements_text(
                        COALESCE(manifest -> 'compatible_spaces', '[]'::jsonb)))
             FROM models WHERE role = 'active' FOR SHARE",
        )
        .fetch_optional(&mut **tx)
        .await?;
        if let Some((model_id, space, dim, compatible)) = row {
            return Ok(Some(Serving {
                model_id,
                spaces: std::iter::once(space).chain(compatible).collect(),
                dim,
            }));
        }
        let any: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM models WHERE role = 'active')")
            .fetch_one(&mut **tx)
            .await?;
        if !any {
            return Ok(None);
        }
    }
    // Role changes faster than this enrolment can look: let it retry.
    Err(StoreError::Conflict("models_one_per_role".to_owned()))
}

/// Whether `model_id` is still staged (or was promoted meanwhile), under a
/// share lock on its row held until commit: a migration cancelled on
/// another replica before this one followed gets no more templates (the
/// cancellation locks the row before it deletes them, so it waits for this
/// enrolment, or this one sees the model retired).
async fn in_use(tx: &mut Transaction<'_, Postgres>, model_id: &str) -> StoreResult<bool> {
    let role: Option<String> = sqlx::query_scalar("SELECT role FROM models WHERE model_id = $1 FOR SHARE")
        .bind(model_id)
        .fetch_optional(&mut **tx)
        .await?;
    Ok(matches!(role.as_deref(), Some("staged" | "active")))
}

/// Inserts one template per embedding of `model_id` for an enrolment.
async fn insert_templates(
    tx: &mut Transaction<'_, Postgres>,
    subject: i64,
    enrollment: Option<i64>,
    new: &NewEnrollment<'_>,
    model_id: &str,
    embeddings: &[Vec<f32>],
) -> StoreResult<Vec<CreatedTemplate>> {
    let mut templates = Vec::with_capacity(embeddings.len());
    for embedding in embeddings {
        let template_id = Uuid::new_v4();
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO templates
               (template_id, subject, gallery_id, model_id, dimension, embedding, enrollment)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING seq",
        )
        .bind(template_id)
        .bind(subject)
        .bind(new.gallery_id)
        .bind(model_id)
        .bind(i32::try_from(embedding.len()).unwrap_or(i32::MAX))
        .bind(embedding_bytes(embedding))
        .bind(enrollment)
        .fetch_one(&mut **tx)
        .await?;
        templates.push(CreatedTemplate { template_id, seq });
    }
    Ok(templates)
}

/// Stores `side`'s feature of each image beside that image's template
/// (`templates` in image order; none when the staged model's were not
/// stored).
async fn insert_side_features(
    tx: &mut Transaction<'_, Postgres>,
    templates: &[CreatedTemplate],
    side: SideFeatures<'_>,
) -> StoreResult<()> {
    if templates.is_empty() {
        return Ok(());
    }
    if templates.len() != side.features.len() {
        return Err(StoreError::Database(sqlx::Error::Protocol(format!(
            "{} side-information features for {} templates",
            side.features.len(),
            templates.len()
        ))));
    }
    for (template, feature) in templates.iter().zip(side.features) {
        sqlx::query(
            "INSERT INTO template_side_info (template_id, side_model, dimension, feature)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(template.template_id)
        .bind(side.model_id)
        .bind(i32::try_from(feature.len()).unwrap_or(i32::MAX))
        .bind(feature.as_slice())
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
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
