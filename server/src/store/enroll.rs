//! Storing an enrolment, and replaying an idempotent retry.

use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use super::{AuditEntry, CreatedTemplate, Enrolled, NewEnrollment, Store, StoreError, StoreResult, to_u32};

impl Store {
    /// Stores an enrolment in one transaction and returns once it is
    /// committed. With an idempotency key, a retry (even a concurrent one)
    /// returns the first call's result: the key's primary key decides which
    /// call is first, not a read-then-write check.
    /// `audit` is appended in the same transaction: the enrolment and its
    /// record commit together (a replay appends nothing here).
    pub async fn enroll(&self, new: &NewEnrollment<'_>, audit: &AuditEntry<'_>) -> StoreResult<Enrolled> {
        if let Some(key) = new.idempotency_key
            && let Some(first) = self
                .find_replay(key, new.gallery_id, new.subject_id, new.embeddings.len())
                .await?
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
        .bind(new.creator)
        .execute(&mut **tx)
        .await?;
    let created: i64 = sqlx::query_scalar("SELECT count(*) FROM galleries WHERE created_by = $1")
        .bind(new.creator)
        .fetch_one(&mut **tx)
        .await?;
    if created >= i64::from(new.max_galleries) {
        return Err(StoreError::GalleryQuota {
            caller: new.creator.to_owned(),
            max: new.max_galleries,
        });
    }
    sqlx::query("INSERT INTO galleries (gallery_id, created_by) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(new.gallery_id)
        .bind(new.creator)
        .execute(&mut **tx)
        .await?;
    Ok(())
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
