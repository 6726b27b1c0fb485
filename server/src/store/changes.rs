//! The change feed, and the template reads that build or rebuild an index.

use std::collections::HashMap;
use std::time::Duration;

use futures::{Stream, TryStreamExt};
use sqlx::Row;
use sqlx::postgres::PgRow;

use super::{Change, Lag, Store, StoreError, StoreResult, TemplateRow, decode_embedding};

impl Store {
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

    /// Hands `each` every template of a model of `spaces` and width `dim`
    /// (what one model's indexes hold), read in one snapshot and in no
    /// particular order, as the rows arrive. Unordered because sorting them
    /// cost PostgreSQL an external sort of every vector (10 s of a 1M
    /// template load); without a join because looking up each row's subject
    /// cost another 3 s: subject ids are read first, into a map.
    pub async fn each_template_in_spaces<E: From<StoreError>>(
        &self,
        spaces: &[String],
        dim: usize,
        mut each: impl FnMut(TemplateRow) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        let subjects: HashMap<i64, String> =
            sqlx::query_as::<_, (i64, String)>("SELECT id, subject_id FROM subjects")
                .fetch(&mut *tx)
                .try_collect()
                .await
                .map_err(StoreError::from)?;
        let mut rows = sqlx::query(
            "SELECT t.gallery_id, t.subject, t.seq, t.embedding
             FROM templates t JOIN models m ON m.model_id = t.model_id
             WHERE m.embedding_space = ANY($1) AND t.dimension = $2",
        )
        .bind(spaces)
        .bind(i32::try_from(dim).unwrap_or(i32::MAX))
        .fetch(&mut *tx);
        while let Some(row) = rows.try_next().await.map_err(StoreError::from)? {
            each(loaded_template(&row, &subjects).map_err(StoreError::from)?)?;
        }
        drop(rows);
        tx.commit().await.map_err(StoreError::from)?;
        Ok(())
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

    /// PostgreSQL's estimate of the number of templates (all models; 0
    /// before the table was first analysed), for progress reports.
    pub async fn estimated_templates(&self) -> StoreResult<u64> {
        let rows: f32 =
            sqlx::query_scalar("SELECT reltuples FROM pg_class WHERE oid = 'templates'::regclass")
                .fetch_one(&self.pool)
                .await?;
        Ok(rows.max(0.0) as u64)
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

    /// How far a replica that applied every change up to `applied` is
    /// behind: changes after it, and the age of the oldest of them.
    pub async fn lag(&self, applied: i64) -> StoreResult<Lag> {
        let (last, oldest): (Option<i64>, Option<f64>) = sqlx::query_as(
            "SELECT (SELECT max(seq) FROM changes),
                    (SELECT extract(epoch FROM now() - at)::float8 FROM changes
                     WHERE seq > $1 ORDER BY seq LIMIT 1)",
        )
        .bind(applied)
        .fetch_one(&self.pool)
        .await?;
        Ok(Lag {
            pending: u64::try_from(last.unwrap_or(0).saturating_sub(applied)).unwrap_or(0),
            oldest: Duration::from_secs_f64(oldest.unwrap_or(0.0).max(0.0)),
        })
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
}

/// A row of [`Store::each_template_in_spaces`], its subject named.
fn loaded_template(row: &PgRow, subjects: &HashMap<i64, String>) -> sqlx::Result<TemplateRow> {
    let subject: i64 = row.try_get("subject")?;
    // The snapshot holds the subject of each of its templates.
    let subject_id = subjects.get(&subject).ok_or_else(|| {
        sqlx::Error::Protocol(format!("a template of subject row {subject}, which is missing"))
    })?;
    Ok(TemplateRow {
        gallery_id: row.try_get("gallery_id")?,
        subject_id: subject_id.clone(),
        seq: row.try_get("seq")?,
        embedding: decode_embedding(row)?,
    })
}
