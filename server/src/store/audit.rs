//! The append-only audit log. A write's row is inserted in the write's own
//! transaction ([`insert`], used by enrolment and erasure), so a change
//! and its record commit or vanish together; other rows stand alone
//! ([`Store::audit`]).
//!
//! Standalone rows are group-committed: one task writes every row queued
//! while its previous INSERT was running in one INSERT, one commit, and
//! answers each call once its row is durable. A call is still answered
//! only after its row is written; under load the calls share commits
//! instead of each waiting for its own (with 8 concurrent Embed callers on
//! the tiny model, the per-call commit cost the service a quarter of its
//! throughput). If a grouped INSERT fails, each of its rows is written
//! again on its own, so one bad row fails only its own call.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use super::{AuditEntry, Store, StoreResult};

/// Rows one grouped INSERT takes at most.
const MAX_GROUP: usize = 512;
/// Rows waiting for the writer at most; callers past it wait their turn.
const QUEUE: usize = 4096;

impl Store {
    /// Appends one audit row on its own, acknowledged once committed.
    pub async fn audit(&self, entry: &AuditEntry<'_>) -> StoreResult<()> {
        let writer = self.audit.get_or_init(|| AuditWriter::start(self.pool.clone()));
        let (done, answer) = oneshot::channel();
        let queued = writer
            .rows
            .send(Queued {
                row: AuditRow::from(entry),
                done,
            })
            .await;
        match queued {
            Ok(()) => match answer.await {
                Ok(written) => written,
                // The writer's runtime is gone (a test's, shutting down).
                Err(_) => insert(&self.pool, entry).await,
            },
            Err(_) => insert(&self.pool, entry).await,
        }
    }

    /// Grouped INSERTs the audit writer has run (tests: concurrent rows
    /// share them).
    pub fn audit_groups(&self) -> u64 {
        self.audit
            .get()
            .map_or(0, |writer| writer.groups.load(Ordering::Relaxed))
    }
}

/// The queue of the task that writes standalone audit rows; the task ends
/// when the last [`Store`] clone holding it is dropped.
#[derive(Debug)]
pub(super) struct AuditWriter {
    rows: mpsc::Sender<Queued>,
    groups: Arc<AtomicU64>,
}

/// Lazily started (on the first standalone row, inside a runtime).
pub(super) type LazyAuditWriter = Arc<OnceLock<AuditWriter>>;

#[derive(Debug)]
struct Queued {
    row: AuditRow,
    done: oneshot::Sender<StoreResult<()>>,
}

/// An [`AuditEntry`] owned, to cross to the writer task.
#[derive(Debug)]
struct AuditRow {
    actor: String,
    peer: Option<String>,
    action: String,
    gallery_id: Option<String>,
    subject_id: Option<String>,
    model_id: Option<String>,
    outcome: String,
    top_score: Option<f32>,
    detail: Option<serde_json::Value>,
}

impl From<&AuditEntry<'_>> for AuditRow {
    fn from(entry: &AuditEntry<'_>) -> Self {
        AuditRow {
            actor: entry.actor.to_owned(),
            peer: entry.peer.map(str::to_owned),
            action: entry.action.to_owned(),
            gallery_id: entry.gallery_id.map(str::to_owned),
            subject_id: entry.subject_id.map(str::to_owned),
            model_id: entry.model_id.map(str::to_owned),
            outcome: entry.outcome.to_owned(),
            top_score: entry.top_score,
            detail: entry.detail.cloned(),
        }
    }
}

impl AuditRow {
    fn entry(&self) -> AuditEntry<'_> {
        AuditEntry {
            actor: &self.actor,
            peer: self.peer.as_deref(),
            action: &self.action,
            gallery_id: self.gallery_id.as_deref(),
            subject_id: self.subject_id.as_deref(),
            model_id: self.model_id.as_deref(),
            outcome: &self.outcome,
            top_score: self.top_score,
            detail: self.detail.as_ref(),
        }
    }
}

impl AuditWriter {
    fn start(pool: PgPool) -> Self {
        let (rows, mut queue) = mpsc::channel::<Queued>(QUEUE);
        let groups = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&groups);
        tokio::spawn(async move {
            let mut group = Vec::with_capacity(MAX_GROUP);
            while queue.recv_many(&mut group, MAX_GROUP).await > 0 {
                counter.fetch_add(1, Ordering::Relaxed);
                let entries: Vec<AuditEntry<'_>> = group.iter().map(|q| q.row.entry()).collect();
                if insert_group(&pool, &entries).await.is_ok() {
                    drop(entries);
                    for queued in group.drain(..) {
                        let _ = queued.done.send(Ok(()));
                    }
                } else {
                    // Each row alone: only a bad row's call fails.
                    let written = futures::future::join_all(entries.iter().map(|e| insert(&pool, e))).await;
                    drop(entries);
                    for (queued, written) in group.drain(..).zip(written) {
                        let _ = queued.done.send(written);
                    }
                }
            }
        });
        AuditWriter { rows, groups }
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
    .bind(entry.peer.map(clip_peer))
    .bind(entry.detail.map(ToString::to_string))
    .execute(executor)
    .await?;
    Ok(())
}

/// Appends `entries` in one statement, in order.
async fn insert_group(pool: &PgPool, entries: &[AuditEntry<'_>]) -> StoreResult<()> {
    let column = |f: fn(&AuditEntry<'_>) -> Option<String>| entries.iter().map(f).collect::<Vec<_>>();
    sqlx::query(
        "INSERT INTO audit_log (actor, action, gallery_id, subject_id, model_id, outcome, top_score, peer, detail)
         SELECT actor, action, gallery_id, subject_id, model_id, outcome, top_score, peer,
                COALESCE(detail::jsonb, '{}'::jsonb)
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::real[],
                     $8::text[], $9::text[])
              WITH ORDINALITY AS r (actor, action, gallery_id, subject_id, model_id, outcome, top_score, peer,
                                    detail, n)
         ORDER BY n",
    )
    .bind(column(|e| Some(e.actor.to_owned())))
    .bind(column(|e| Some(e.action.to_owned())))
    .bind(column(|e| e.gallery_id.map(str::to_owned)))
    .bind(column(|e| e.subject_id.map(str::to_owned)))
    .bind(column(|e| e.model_id.map(str::to_owned)))
    .bind(column(|e| Some(e.outcome.to_owned())))
    .bind(entries.iter().map(|e| e.top_score).collect::<Vec<_>>())
    .bind(column(|e| e.peer.map(|p| clip_peer(p).to_owned())))
    .bind(column(|e| e.detail.map(ToString::to_string)))
    .execute(pool)
    .await?;
    Ok(())
}

/// The peer address as the schema holds it: at most 128 bytes, cut at a
/// character boundary.
fn clip_peer(peer: &str) -> &str {
    let mut end = peer.len().min(128);
    while !peer.is_char_boundary(end) {
        end -= 1;
    }
    &peer[..end]
}
