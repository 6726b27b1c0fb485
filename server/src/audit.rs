//! Every call leaves an audit row, refusals included.
//!
//! The core writes the rows of the calls it handles, with what only it
//! knows (gallery, subject, model, top score; a write's row in the write's
//! own transaction) and marks the call's [`CallRecord`] as audited. A call
//! that ends before it gets there (refused by access control, the rate or
//! concurrency limits, the request timeout, request validation, a body that
//! is not protobuf; or cancelled by its client) is audited here: the
//! outermost layer ([`AuditLayer`]) gives every call a [`CallRecord`], and
//! when the last holder of a record lets go of it (the layer once the answer
//! is out, or a write detached from a cancelled call once it ends) and the
//! core has not audited the call, the record sends its row: who (the key id
//! or certificate grant access control found, else `unauthenticated`), the
//! peer, the method as an action, and the status (`CANCELLED` when the
//! client went away before an answer).
//!
//! Those rows go through a bounded queue ([`QUEUE`] rows) to one writer
//! task, so a flood of refused calls costs the database one insert at a
//! time and never the memory of an unbounded queue. When the queue is full
//! a row is dropped and counted (the `handid.audit.dropped` metric; a
//! warning at the first drop and each power of two after it): under such a
//! flood the log keeps a sample, and the metric says how many rows are
//! missing. Health checks and reflection carry no data and are not audited.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tonic::Status;
use tower::{Layer, Service};

use crate::auth::{Access, access_of, peer_addr};
use crate::index::lock;
use crate::layers::method_name;
use crate::store::{AuditEntry, Store};
use crate::telemetry::metrics;

/// Rows waiting for the writer at most (a row is a few hundred bytes).
pub const QUEUE: usize = 4096;

/// Refusals left unrecorded ([`CallRecord::leave_unrecorded`]) since start.
static UNRECORDED: AtomicU64 = AtomicU64::new(0);

/// What is known of one call for its audit row; shared by the layers, the
/// handler and the core through the request's extensions and the
/// [`crate::engine::Caller`]. Dropped unaudited, it sends its row.
#[derive(Debug, Default)]
pub struct CallRecord {
    audited: AtomicBool,
    actor: Mutex<Option<String>>,
    outcome: Mutex<Option<String>>,
    /// Where the row goes; `None` for callers inside the process (a
    /// signal's reload, tests), which the core audits.
    fallback: Option<Fallback>,
}

/// The row a [`CallRecord`] sends when the core did not audit its call.
#[derive(Debug)]
struct Fallback {
    sink: AuditSink,
    peer: Option<String>,
    action: &'static str,
}

impl CallRecord {
    fn with_fallback(fallback: Option<Fallback>) -> Self {
        Self {
            audited: AtomicBool::new(false),
            actor: Mutex::new(None),
            outcome: Mutex::new(None),
            fallback,
        }
    }

    /// The core wrote this call's row.
    pub fn mark_audited(&self) {
        self.audited.store(true, Ordering::SeqCst);
    }

    /// Closes the record without a row: a refusal past its peer's budget
    /// (the protection stack's access control), counted in
    /// `handid.audit.unrecorded` and logged at every power of two instead.
    pub fn leave_unrecorded(&self) {
        self.audited.store(true, Ordering::SeqCst);
        metrics().audit_unrecorded();
        let n = UNRECORDED.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(
                unrecorded = n,
                "refused calls past their address's budget are not audited one by one (handid.audit.unrecorded)"
            );
        }
    }

    /// Who calls, when access control knew (even if it then refused).
    pub fn actor(&self) -> Option<String> {
        lock(&self.actor).clone()
    }

    /// Access control knows who calls (even if it then refuses).
    pub fn set_actor(&self, actor: &str) {
        *lock(&self.actor) = Some(actor.to_owned());
    }

    fn set_outcome(&self, outcome: String) {
        *lock(&self.outcome) = Some(outcome);
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        let Some(fallback) = self.fallback.take() else {
            return;
        };
        if self.audited.load(Ordering::SeqCst) {
            return;
        }
        let take = |m: &mut Mutex<Option<String>>| m.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        fallback.sink.send(Row {
            actor: take(&mut self.actor).unwrap_or_else(|| "unauthenticated".to_owned()),
            peer: fallback.peer,
            action: fallback.action,
            outcome: take(&mut self.outcome).unwrap_or_else(|| "CANCELLED".to_owned()),
        });
    }
}

/// One row of a call the core did not audit.
#[derive(Debug)]
struct Row {
    actor: String,
    peer: Option<String>,
    action: &'static str,
    outcome: String,
}

/// Where [`CallRecord`]s send their rows; [`AuditSink::start`] spawns the
/// writer.
#[derive(Debug, Clone)]
pub struct AuditSink {
    rows: mpsc::Sender<Row>,
    dropped: Arc<AtomicU64>,
}

/// The writer task of an [`AuditSink`]; [`AuditWriter::finish`] writes out
/// the queue and stops it.
#[derive(Debug)]
pub struct AuditWriter {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl AuditWriter {
    /// Stops taking rows, writes those queued (for at most `limit`), ends.
    pub async fn finish(self, limit: Duration) {
        let _ = self.stop.send(());
        if tokio::time::timeout(limit, self.task).await.is_err() {
            tracing::warn!("audit rows of refused calls still queued at shutdown were not written");
        }
    }
}

impl AuditSink {
    /// Spawns the writer task.
    pub fn start(store: Store) -> (Self, AuditWriter) {
        let (sink, mut queue) = Self::with_capacity(QUEUE);
        let (stop, mut stopping) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    row = queue.recv() => match row {
                        Some(row) => write(&store, row).await,
                        None => return,
                    },
                    _ = &mut stopping => break,
                }
            }
            // Rows already queued are still written; no more come.
            queue.close();
            while let Some(row) = queue.recv().await {
                write(&store, row).await;
            }
        });
        (sink, AuditWriter { stop, task })
    }

    fn with_capacity(capacity: usize) -> (Self, mpsc::Receiver<Row>) {
        let (rows, queue) = mpsc::channel::<Row>(capacity);
        (
            Self {
                rows,
                dropped: Arc::default(),
            },
            queue,
        )
    }

    /// Rows dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn send(&self, row: Row) {
        match self.rows.try_send(row) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(row)) => {
                metrics().audit_dropped();
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(
                        dropped = n,
                        action = row.action,
                        outcome = %row.outcome,
                        "audit queue full: rows of refused calls are being dropped (handid.audit.dropped)"
                    );
                }
            }
            Err(mpsc::error::TrySendError::Closed(row)) => {
                tracing::warn!(action = row.action, outcome = %row.outcome, "audit row after shutdown not written");
            }
        }
    }
}

/// Writes one row; a failure is logged (the database is often why the call
/// was refused).
async fn write(store: &Store, row: Row) {
    let written = store
        .audit(&AuditEntry {
            actor: &row.actor,
            peer: row.peer.as_deref(),
            action: row.action,
            gallery_id: None,
            subject_id: None,
            model_id: None,
            outcome: &row.outcome,
            top_score: None,
            detail: None,
        })
        .await;
    if let Err(error) = written {
        tracing::warn!(%error, action = row.action, "audit row of a refused call not written");
    }
}

/// The action a method is audited as (the core's names).
pub fn action_of(path: &str) -> &'static str {
    match method_name(path) {
        "handid.v1.HandId/Enroll" => "enroll",
        "handid.v1.HandId/Identify" => "identify",
        "handid.v1.HandId/Verify" => "verify",
        "handid.v1.HandId/Embed" => "embed",
        "handid.v1.HandId/DeleteSubject" => "delete_subject",
        "handid.v1.HandId/DeleteGallery" => "delete_gallery",
        "handid.v1.HandId/GetSubject" => "get_subject",
        "handid.v1.HandId/ListSubjects" => "list_subjects",
        "handid.v1.Admin/GetModel" => "get_model",
        "handid.v1.Admin/ReloadModel" => "reload",
        "handid.v1.Admin/PromoteModel" => "promote",
        "handid.v1.Admin/RollbackModel" => "rollback",
        "handid.v1.Admin/CancelMigration" => "cancel_migration",
        "handid.v1.Admin/ReloadSettings" => "reload_settings",
        _ => "unknown",
    }
}

/// The gRPC name of a status code (`INVALID_ARGUMENT`), as the audit log
/// records outcomes; tonic's `Debug` spells it `InvalidArgument`.
pub fn code_name(code: tonic::Code) -> String {
    let mut name = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

/// The outermost layer: a [`CallRecord`] for every call, and a row for
/// each the core did not audit.
#[derive(Debug, Clone)]
pub struct AuditLayer {
    sink: AuditSink,
}

impl AuditLayer {
    /// Rows go to `sink`.
    pub fn new(sink: AuditSink) -> Self {
        Self { sink }
    }
}

impl<S> Layer<S> for AuditLayer {
    type Service = Audited<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Audited {
            inner,
            sink: self.sink.clone(),
        }
    }
}

/// See [`AuditLayer`].
#[derive(Debug, Clone)]
pub struct Audited<S> {
    inner: S,
    sink: AuditSink,
}

impl<S, B, R> Service<http::Request<B>> for Audited<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        let record = Arc::new(CallRecord::with_fallback((access_of(path) != Access::Open).then(
            || Fallback {
                sink: self.sink.clone(),
                peer: peer_addr(request.extensions()).map(|a| a.to_string()),
                action: action_of(path),
            },
        )));
        request.extensions_mut().insert(Arc::clone(&record));
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let call = inner.call(request);
        Box::pin(async move {
            let response = call.await;
            if let Ok(response) = &response {
                // A trailers-only answer carries its status in the headers;
                // an answer with a body succeeded.
                record.set_outcome(match Status::from_header_map(response.headers()) {
                    Some(status) if status.code() != tonic::Code::Ok => code_name(status.code()),
                    _ => "ok".to_owned(),
                });
            }
            // Dropping the record here (or later, where a detached write
            // still holds it) sends its row unless the core audited the call.
            drop(record);
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(n: usize) -> Row {
        Row {
            actor: format!("caller-{n}"),
            peer: None,
            action: "identify",
            outcome: "UNAUTHENTICATED".to_owned(),
        }
    }

    #[tokio::test]
    async fn a_flood_of_rows_is_dropped_and_counted_beyond_the_queue() {
        let (sink, mut queue) = AuditSink::with_capacity(8);
        for n in 0..100 {
            sink.send(row(n));
        }
        // The queue holds its capacity, no more; the rest are counted.
        assert_eq!(sink.dropped(), 92);
        let mut kept = Vec::new();
        while let Ok(row) = queue.try_recv() {
            kept.push(row.actor);
        }
        assert_eq!(kept, (0..8).map(|n| format!("caller-{n}")).collect::<Vec<_>>());
        // Room again: rows are taken again.
        sink.send(row(100));
        assert_eq!(queue.try_recv().expect("queued").actor, "caller-100");
        assert_eq!(sink.dropped(), 92);
    }

    #[tokio::test]
    async fn a_record_sends_its_row_once_unless_the_core_audited_it() {
        let (sink, mut queue) = AuditSink::with_capacity(8);
        let record = |sink: &AuditSink| {
            CallRecord::with_fallback(Some(Fallback {
                sink: sink.clone(),
                peer: Some("10.0.0.7:5000".to_owned()),
                action: "enroll",
            }))
        };
        // Refused after access control named the caller.
        let refused = record(&sink);
        refused.set_actor("desk-3");
        refused.set_outcome("PERMISSION_DENIED".to_owned());
        drop(refused);
        let row = queue.try_recv().expect("a row");
        assert_eq!(
            (row.actor.as_str(), row.action, row.outcome.as_str()),
            ("desk-3", "enroll", "PERMISSION_DENIED")
        );
        assert_eq!(row.peer.as_deref(), Some("10.0.0.7:5000"));
        // Never answered (the client went away), nobody named.
        drop(record(&sink));
        let row = queue.try_recv().expect("a row");
        assert_eq!(
            (row.actor.as_str(), row.outcome.as_str()),
            ("unauthenticated", "CANCELLED")
        );
        // The core wrote the row: nothing more.
        let handled = record(&sink);
        handled.mark_audited();
        drop(handled);
        // In-process callers have no fallback.
        drop(CallRecord::default());
        assert!(queue.try_recv().is_err());
    }

    #[test]
    fn audit_outcomes_use_grpc_code_names() {
        assert_eq!(code_name(tonic::Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(tonic::Code::NotFound), "NOT_FOUND");
        assert_eq!(code_name(tonic::Code::Unavailable), "UNAVAILABLE");
    }

    #[test]
    fn actions_follow_the_core_and_unknown_paths_are_unknown() {
        assert_eq!(action_of("/handid.v1.Admin/ReloadModel"), "reload");
        assert_eq!(action_of("/handid.v1.Admin/CancelMigration"), "cancel_migration");
        assert_eq!(action_of("/handid.v1.HandId/DeleteSubject"), "delete_subject");
        assert_eq!(action_of("/handid.v1.HandId/Nope"), "unknown");
    }
}
