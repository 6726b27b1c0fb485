//! The append-only audit log. A write's row is inserted in the write's own
//! transaction ([`insert`], used by enrolment and erasure), so a change
//! and its record commit or vanish together; other rows stand alone
//! ([`Store::audit`]).

use super::{AuditEntry, Store, StoreResult};

impl Store {
    /// Appends one audit row on its own.
    pub async fn audit(&self, entry: &AuditEntry<'_>) -> StoreResult<()> {
        insert(&self.pool, entry).await
    }
}

/// Appends one audit row with `executor` (a transaction or the pool).
pub(super) async fn insert<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    entry: &AuditEntry<'_>,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO audit_log (actor, action, gallery_id, subject_id, model_id, outcome, top_score, peer, detail)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, COALESCE($9::jsonb, '{}'::jsonb))",
    )
    .bind(entry.actor)
    .bind(entry.action)
    .bind(entry.gallery_id)
    .bind(entry.subject_id)
    .bind(entry.model_id)
    .bind(entry.outcome)
    .bind(entry.top_score)
    .bind(entry.peer.map(|p| p.get(..p.len().min(128)).unwrap_or(p)))
    .bind(entry.detail.map(ToString::to_string))
    .execute(executor)
    .await?;
    Ok(())
}
