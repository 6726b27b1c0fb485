//! Templates derived from another model's templates: what
//! `handid-server upgrade-templates` reads and writes (the `derived_from`
//! column, migration `derived_templates`).

use sqlx::Row;
use uuid::Uuid;

use super::{Store, StoreError, StoreResult, decode_embedding, embedding_bytes};

/// A model as the database records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRow {
    /// Its id.
    pub model_id: String,
    /// Its embedding space.
    pub embedding_space: String,
    /// Its embedding width.
    pub embedding_dim: usize,
    /// `active`, `staged` or `retired`.
    pub role: String,
}

/// A template of the old model still to be mapped.
#[derive(Debug, Clone)]
pub struct SourceTemplate {
    /// Its id (the derived row's `derived_from`).
    pub template_id: Uuid,
    /// Its enrolment order (the walk's cursor).
    pub seq: i64,
    /// Its embedding.
    pub embedding: Vec<f32>,
    /// The side-information model's feature of its image, when one was
    /// asked for and is stored.
    pub side: Option<Vec<f32>>,
}

impl Store {
    /// The model `model_id`, when the database records it.
    pub async fn model_row(&self, model_id: &str) -> StoreResult<Option<ModelRow>> {
        let row: Option<(String, String, i32, String)> = sqlx::query_as(
            "SELECT model_id, embedding_space, embedding_dim, role FROM models WHERE model_id = $1",
        )
        .bind(model_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(model_id, embedding_space, dim, role)| ModelRow {
            model_id,
            embedding_space,
            embedding_dim: usize::try_from(dim).unwrap_or(0),
            role,
        }))
    }

    /// Templates of `from` with no template of `to` derived from them yet.
    pub async fn count_underived(&self, from: &str, to: &str) -> StoreResult<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM templates t
             WHERE t.model_id = $1 AND NOT EXISTS (
                 SELECT 1 FROM templates d WHERE d.derived_from = t.template_id AND d.model_id = $2)",
        )
        .bind(from)
        .bind(to)
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Templates of `from` with no template of `to` derived from them yet
    /// and no feature of side-information model `side_model` stored beside
    /// them (enrolled before the server had it): a transform that needs it
    /// cannot map them.
    pub async fn count_underived_without_side(
        &self,
        from: &str,
        to: &str,
        side_model: &str,
    ) -> StoreResult<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM templates t
             WHERE t.model_id = $1 AND NOT EXISTS (
                 SELECT 1 FROM templates d WHERE d.derived_from = t.template_id AND d.model_id = $2)
               AND NOT EXISTS (
                 SELECT 1 FROM template_side_info s WHERE s.template_id = t.template_id AND s.side_model = $3)",
        )
        .bind(from)
        .bind(to)
        .bind(side_model)
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Templates of `from` enrolled after `after` (in enrolment order), at
    /// most `limit`, with no template of `to` derived from them yet; each
    /// with its feature of side-information model `side_model` when one is
    /// named and stored.
    pub async fn underived_templates(
        &self,
        from: &str,
        to: &str,
        side_model: Option<&str>,
        after: i64,
        limit: usize,
    ) -> StoreResult<Vec<SourceTemplate>> {
        let rows = sqlx::query(
            "SELECT t.template_id, t.seq, t.embedding, s.feature FROM templates t
             LEFT JOIN template_side_info s ON s.template_id = t.template_id AND s.side_model = $5
             WHERE t.model_id = $1 AND t.seq > $3 AND NOT EXISTS (
                 SELECT 1 FROM templates d WHERE d.derived_from = t.template_id AND d.model_id = $2)
             ORDER BY t.seq LIMIT $4",
        )
        .bind(from)
        .bind(to)
        .bind(after)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(side_model)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(SourceTemplate {
                    template_id: row.try_get("template_id")?,
                    seq: row.try_get("seq")?,
                    embedding: decode_embedding(row)?,
                    side: row.try_get("feature")?,
                })
            })
            .collect::<sqlx::Result<_>>()
            .map_err(Into::into)
    }

    /// Stores one template of model `to` per `(source, embedding)`, in one
    /// statement (one transaction): each takes its source's subject and
    /// gallery, and a copy of its source's side-information features. A source deleted meanwhile, or already derived (another run),
    /// is skipped. Returns the templates inserted. The insert trigger
    /// records one change per subject, so every replica re-reads them.
    /// Refused ([`StoreError::ModelRetired`]) once `to` is retired (its
    /// migration cancelled meanwhile), under a share lock on its row that
    /// the cancellation waits for.
    pub async fn insert_derived(&self, to: &str, derived: &[(Uuid, Vec<f32>)]) -> StoreResult<u64> {
        let sources: Vec<Uuid> = derived.iter().map(|(source, _)| *source).collect();
        let ids: Vec<Uuid> = derived.iter().map(|_| Uuid::new_v4()).collect();
        let embeddings: Vec<Vec<u8>> = derived.iter().map(|(_, e)| embedding_bytes(e)).collect();
        let dims: Vec<i32> = derived
            .iter()
            .map(|(_, e)| i32::try_from(e.len()).unwrap_or(i32::MAX))
            .collect();
        let mut tx = self.pool.begin().await?;
        let role: Option<String> =
            sqlx::query_scalar("SELECT role FROM models WHERE model_id = $1 FOR SHARE")
                .bind(to)
                .fetch_optional(&mut *tx)
                .await?;
        if !matches!(role.as_deref(), Some("staged" | "active")) {
            return Err(StoreError::ModelRetired(to.to_owned()));
        }
        let inserted = sqlx::query(
            "INSERT INTO templates (template_id, subject, gallery_id, model_id, dimension, embedding, derived_from)
             SELECT d.id, t.subject, t.gallery_id, $1, d.dimension, d.embedding, t.template_id
             FROM unnest($2::uuid[], $3::uuid[], $4::int4[], $5::bytea[]) AS d (source, id, dimension, embedding)
             JOIN templates t ON t.template_id = d.source
             ORDER BY t.seq
             ON CONFLICT (derived_from, model_id) WHERE derived_from IS NOT NULL DO NOTHING",
        )
        .bind(to)
        .bind(&sources)
        .bind(&ids)
        .bind(&dims)
        .bind(&embeddings)
        .execute(&mut *tx)
        .await?;
        // A side-information feature describes the image: the derived
        // template keeps its source's, for the next upgrade.
        sqlx::query(
            "INSERT INTO template_side_info (template_id, side_model, dimension, feature)
             SELECT d.id, s.side_model, s.dimension, s.feature
             FROM unnest($1::uuid[], $2::uuid[]) AS d (source, id)
             JOIN template_side_info s ON s.template_id = d.source
             JOIN templates t ON t.template_id = d.id",
        )
        .bind(&sources)
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(inserted.rows_affected())
    }
}
