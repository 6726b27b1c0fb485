//! The change feed, and the template reads that build or rebuild an index.

use std::time::Duration;

use futures::{Stream, TryStreamExt};

use super::{Change, Lag, Store, StoreError, StoreResult, TemplateRow};

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
