//! Reading and erasing subjects and galleries.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::{AuditEntry, Erased, Store, StoreError, StoreResult, SubjectRecord, TemplateMeta, to_u32};

impl Store {
    /// Erases a subject and its templates, and appends `audit` in the same
    /// transaction; returns the number of templates.
    pub async fn delete_subject(
        &self,
        gallery_id: &str,
        subject_id: &str,
        audit: &AuditEntry<'_>,
    ) -> StoreResult<u32> {
        let mut tx = self.pool.begin().await?;
        let subject: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM subjects WHERE gallery_id = $1 AND subject_id = $2 FOR UPDATE",
        )
        .bind(gallery_id)
        .bind(subject_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(subject) = subject else {
            return Err(self.missing(&mut tx, gallery_id, subject_id).await);
        };
        let templates: i64 = sqlx::query_scalar("SELECT count(*) FROM templates WHERE subject = $1")
            .bind(subject)
            .fetch_one(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM subjects WHERE id = $1")
            .bind(subject)
            .execute(&mut *tx)
            .await?;
        super::audit::insert(&mut *tx, audit).await?;
        tx.commit().await?;
        Ok(to_u32(templates))
    }

    /// Erases a gallery, its subjects and templates, and appends `audit` in
    /// the same transaction.
    pub async fn delete_gallery(&self, gallery_id: &str, audit: &AuditEntry<'_>) -> StoreResult<Erased> {
        let mut tx = self.pool.begin().await?;
        let found: Option<String> =
            sqlx::query_scalar("SELECT gallery_id FROM galleries WHERE gallery_id = $1 FOR UPDATE")
                .bind(gallery_id)
                .fetch_optional(&mut *tx)
                .await?;
        if found.is_none() {
            return Err(StoreError::GalleryNotFound(gallery_id.to_owned()));
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
        super::audit::insert(&mut *tx, audit).await?;
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
    async fn missing(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        gallery_id: &str,
        subject_id: &str,
    ) -> StoreError {
        let gallery: Result<Option<i32>, sqlx::Error> =
            sqlx::query_scalar("SELECT 1 FROM galleries WHERE gallery_id = $1")
                .bind(gallery_id)
                .fetch_optional(&mut **tx)
                .await;
        match gallery {
            Ok(Some(_)) => StoreError::SubjectNotFound {
                gallery: gallery_id.to_owned(),
                subject: subject_id.to_owned(),
            },
            Ok(None) => StoreError::GalleryNotFound(gallery_id.to_owned()),
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
            return Err(self.missing(&mut tx, gallery_id, subject_id).await);
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
            return Err(StoreError::GalleryNotFound(gallery_id.to_owned()));
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
}

async fn templates_of(
    tx: &mut Transaction<'_, Postgres>,
    subjects: &[i64],
) -> StoreResult<HashMap<i64, Vec<TemplateMeta>>> {
    let rows: Vec<(i64, Uuid, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT subject, template_id, model_id, created_at FROM templates
         WHERE subject = ANY($1) ORDER BY seq",
    )
    .bind(subjects)
    .fetch_all(&mut **tx)
    .await?;
    let mut by_subject = HashMap::<i64, Vec<TemplateMeta>>::new();
    for (subject, template_id, model_id, created_at) in rows {
        by_subject.entry(subject).or_default().push(TemplateMeta {
            template_id,
            model_id,
            created_at,
        });
    }
    Ok(by_subject)
}
