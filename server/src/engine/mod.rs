//! The core of the service: what Enroll, Identify, Verify and the rest do,
//! in domain types. It knows nothing of protobuf; `service.rs` converts.
//!
//! Consistency between Postgres and the in-memory index: mutations of one
//! gallery (enrol, delete) are serialised by an async writer lock (one of a
//! fixed set, chosen by the gallery id) held from the database transaction
//! until the index is updated, so the index applies committed changes in
//! commit order. Searches never take that lock.
//!
//! Models: every call takes the active [`Slot`] (model, forward thread,
//! indexes) once, at its start, and uses only that slot: a reload swaps the
//! slot atomically, and calls in flight finish on the one they took, which
//! lives until the last of them drops it. During a migration a second,
//! staged slot receives every enrolment too (both templates in one
//! transaction); Identify and Verify use the active slot only. An
//! enrolment whose images were embedded by a model the serving one cannot
//! compare (a rollback or a promotion in between, here or on another
//! replica) is refused, retryably, rather than stored where no search finds
//! it: checked against this replica's slot and, in the enrolment's
//! transaction, against the model the database records as active.
//!
//! Replicas: each committed change of the database is numbered (the
//! `changes` table); [`Engine::apply_changes`] re-reads the subjects changed
//! since the last applied number into every slot's indexes, which is what
//! makes another replica's enrolments and deletions visible here.
//!
//! # Layout
//! - [`types`]: the domain types calls take and return ([`Id`], [`Caller`],
//!   [`Slot`], results).
//! - `calls`: Enroll, Identify, Verify, Embed, deletions, reads.
//! - `models`: GetModel, reload, staging and promotion.
//! - `changes`: applying the database's change feed to the indexes.
//! - `page_token`: ListSubjects' opaque page tokens.

mod calls;
mod changes;
mod models;
mod page_token;
pub mod types;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use tracing::Instrument;

use crate::audit::code_name;
use crate::batcher::Batcher;
use crate::error::ServiceError;
use crate::index::{IndexError, Indexes, NewRow, lock};
use crate::reload;
use crate::settings::LimitSettings;
use crate::store::{AuditEntry, Store, TemplateRow};

pub use page_token::decode_page_token;
pub use types::*;

/// The FMR whose calibrated threshold decides when a call gives no rule.
pub const DEFAULT_FMR: f64 = 1e-3;
/// Writes in progress at most (a bound never reached: the concurrency
/// limit of the middleware is far lower); shutdown waits for all of them.
const WRITES: usize = 1 << 20;
/// Writer locks: galleries sharing one only wait for each other's writes.
const WRITER_LOCKS: usize = 64;
/// Templates per index append while loading from Postgres.
const LOAD_BATCH: usize = 1024;
/// Templates held back while loading (many galleries, each short of a
/// batch), past which every gallery's are appended.
const LOAD_HELD: usize = 16 * LOAD_BATCH;
/// Changes read per query while catching up.
const CHANGE_BATCH: u32 = 1000;
/// Times a change the index refuses is tried before it is passed over.
const CHANGE_ATTEMPTS: u32 = 3;

type Result<T, E = ServiceError> = std::result::Result<T, E>;

/// The service core.
#[derive(Debug)]
pub struct Engine {
    store: Store,
    active: RwLock<Arc<Slot>>,
    staged: RwLock<Option<Arc<Slot>>>,
    pipeline: Pipeline,
    limits: LimitSettings,
    /// Serialises the changes of one gallery (see the module doc); a fixed
    /// set of locks, a gallery's chosen by a hash of its id, so the set
    /// never grows with the names callers send.
    writers: [tokio::sync::Mutex<()>; WRITER_LOCKS],
    /// One reload or promotion at a time.
    reloading: tokio::sync::Mutex<()>,
    /// One catch-up at a time; changes are applied in order. Also held by
    /// a reload while it catches the new slot up and publishes it.
    applying: tokio::sync::Mutex<()>,
    /// Writers (enrolment, erasure) hold it shared from their commit to
    /// their index update; a reload holds it exclusively to catch its new
    /// slot up and publish it, so no write falls between the two.
    publishing: tokio::sync::RwLock<()>,
    /// One permit per write in progress, detached from its call; shutdown
    /// takes them all, so it waits for every write to finish.
    writes: Arc<tokio::sync::Semaphore>,
    /// The last change applied to the indexes.
    applied: AtomicI64,
    /// The change that failed to apply last, and how many times it has.
    failing: std::sync::Mutex<Option<(i64, u32)>>,
    /// Why this replica cannot serve the models the database records
    /// (another replica changed them and the recorded folder does not load
    /// here); health says NOT_SERVING while it is set.
    unfollowed: std::sync::Mutex<Option<String>>,
}

impl Engine {
    /// Assembles the core and loads every gallery index of the active model
    /// from Postgres. `indexes` must be empty and of the model's width.
    pub async fn start(
        store: Store,
        indexes: Indexes,
        batcher: Batcher,
        model: ActiveModel,
        limits: LimitSettings,
        pipeline: Pipeline,
    ) -> Result<Self, LoadError> {
        // Read before loading: a change committed during the load is applied
        // again afterwards (applying is idempotent), never missed.
        let applied = store.last_change().await?;
        let spaces = reload::spaces(model.embedder.manifest());
        let slot = Slot {
            model,
            batcher,
            indexes: Arc::new(indexes),
            spaces,
        };
        let engine = Self {
            store,
            active: RwLock::new(Arc::new(slot)),
            staged: RwLock::new(None),
            pipeline,
            limits,
            writers: std::array::from_fn(|_| tokio::sync::Mutex::new(())),
            reloading: tokio::sync::Mutex::new(()),
            applying: tokio::sync::Mutex::new(()),
            publishing: tokio::sync::RwLock::new(()),
            writes: Arc::new(tokio::sync::Semaphore::new(WRITES)),
            applied: AtomicI64::new(applied),
            failing: std::sync::Mutex::new(None),
            unfollowed: std::sync::Mutex::new(None),
        };
        engine.load_indexes(&engine.active()).await?;
        Ok(engine)
    }

    /// The limits on what one request may ask for.
    pub fn limits(&self) -> &LimitSettings {
        &self.limits
    }

    /// The store (health checks).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The active slot: a call takes it once and keeps it to the end.
    pub fn active(&self) -> Arc<Slot> {
        Arc::clone(
            &self
                .active
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// The staged slot, during a migration.
    pub fn staged(&self) -> Option<Arc<Slot>> {
        self.staged
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The serving model.
    pub fn model(&self) -> ActiveModel {
        self.active().model.clone()
    }

    /// Templates held in memory per gallery (metrics).
    pub fn gallery_sizes(&self) -> Vec<(String, usize)> {
        self.active().indexes.sizes()
    }

    /// The serving model's id.
    pub fn model_id(&self) -> String {
        self.active().model_id().to_owned()
    }

    /// Whether every loaded model (active, staged during a migration, and
    /// the side-information model every enrolment needs) can run.
    pub fn models_can_run(&self) -> bool {
        self.slots().iter().all(|slot| slot.batcher.runnable())
            && self
                .pipeline
                .side
                .as_ref()
                .is_none_or(|side| side.batcher.runnable())
    }

    /// The last change applied to the indexes.
    pub fn applied_change(&self) -> i64 {
        self.applied.load(Ordering::SeqCst)
    }

    /// The active slot and, during a migration, the staged one.
    fn slots(&self) -> Vec<Arc<Slot>> {
        let mut slots = vec![self.active()];
        slots.extend(self.staged());
        slots
    }

    async fn load_indexes(&self, slot: &Slot) -> Result<(), LoadError> {
        let model_id = slot.model_id().to_owned();
        let started = Instant::now();
        let mut last_report = Instant::now();
        let (mut loaded, mut held) = (0usize, 0usize);
        // Rows arrive in no order: each gallery's are appended in batches.
        let mut pending: HashMap<String, Vec<TemplateRow>> = HashMap::new();
        let dim = slot.model.embedder.dim();
        let expected = self.store.estimated_templates().await.unwrap_or(0);
        tracing::info!(%model_id, spaces = ?slot.spaces, expected, "loading gallery indexes from the database");
        self.store
            .each_template_in_spaces(&slot.spaces, dim, |row| {
                let rows = match pending.get_mut(&row.gallery_id) {
                    Some(rows) => rows,
                    None => pending.entry(row.gallery_id.clone()).or_default(),
                };
                rows.push(row);
                held += 1;
                if rows.len() == LOAD_BATCH {
                    (loaded, held) = (loaded + rows.len(), held - rows.len());
                    append_loaded(&slot.indexes, rows)?;
                }
                if held >= LOAD_HELD {
                    loaded += held;
                    held = 0;
                    for rows in pending.values_mut() {
                        append_loaded(&slot.indexes, rows)?;
                    }
                }
                if last_report.elapsed().as_secs() >= 5 {
                    tracing::info!(templates = loaded, expected, "still loading gallery indexes");
                    last_report = Instant::now();
                }
                Ok::<_, LoadError>(())
            })
            .await?;
        loaded += held;
        for rows in pending.values_mut() {
            append_loaded(&slot.indexes, rows)?;
        }
        let (galleries, templates) = slot.indexes.totals();
        tracing::info!(
            %model_id,
            galleries,
            templates,
            read = loaded,
            seconds = started.elapsed().as_secs_f32(),
            "gallery indexes loaded"
        );
        Ok(())
    }

    fn writer(&self, gallery: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash, Hasher};
        // SipHash with fixed keys: the same lock for a gallery every time.
        let mut hasher = std::hash::DefaultHasher::new();
        gallery.hash(&mut hasher);
        &self.writers[(hasher.finish() % WRITER_LOCKS as u64) as usize]
    }

    /// Runs `write` (a commit, its index update and its audit row) on its
    /// own task: it runs to completion even when the call that started it
    /// is cancelled or passes its deadline, so a client that gave up finds
    /// the write either wholly done or not done at all.
    async fn detach<T: Send + 'static>(
        &self,
        write: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let permit = Arc::clone(&self.writes)
            .acquire_owned()
            .await
            .map_err(|_| ServiceError::ShuttingDown)?;
        let task = tokio::spawn(
            async move {
                let _permit = permit;
                write.await
            }
            .in_current_span(),
        );
        task.await
            .map_err(|e| ServiceError::Internal(format!("write task: {e}")))?
    }

    /// Waits for every detached write to finish and refuses new ones (the
    /// last step of a graceful shutdown).
    pub async fn finish_writes(&self) {
        if let Ok(all) = self.writes.acquire_many(WRITES as u32).await {
            all.forget();
        }
        self.writes.close();
    }

    /// Writes the audit row of a call. A successful call whose audit row
    /// cannot be written fails (UNAVAILABLE): an identification system must
    /// not answer what it cannot account for. A failed call's row is best
    /// effort, since the database is often why it failed.
    async fn audited<T>(
        &self,
        caller: &Caller,
        action: &str,
        gallery: Option<&Id>,
        result: Result<T>,
        summary: impl FnOnce(&T) -> (Option<String>, Option<f32>),
    ) -> Result<T> {
        let model_id = self.model_id();
        let (subject, top_score, outcome) = match &result {
            Ok(value) => {
                let (subject, score) = summary(value);
                (subject, score, "ok".to_owned())
            }
            Err(e) => (None, None, code_name(e.code())),
        };
        let entry = AuditEntry {
            actor: &caller.id,
            peer: caller.peer.as_deref(),
            action,
            gallery_id: gallery.map(Id::as_str),
            subject_id: subject.as_deref(),
            model_id: Some(&model_id),
            outcome: &outcome,
            top_score,
            detail: None,
        };
        self.write_audit(caller, &entry, result).await
    }

    /// [`Self::audited`] for a model change (reload, promotion): the row
    /// names `model_id` (the model the call loaded or promoted, the active
    /// one when refused) and carries `detail`.
    async fn audited_change<T>(
        &self,
        caller: &Caller,
        action: &str,
        result: Result<T>,
        model_id: &str,
        detail: &serde_json::Value,
    ) -> Result<T> {
        let outcome = match &result {
            Ok(_) => "ok".to_owned(),
            Err(e) => code_name(e.code()),
        };
        let entry = AuditEntry {
            actor: &caller.id,
            peer: caller.peer.as_deref(),
            action,
            gallery_id: None,
            subject_id: None,
            model_id: Some(model_id),
            outcome: &outcome,
            top_score: None,
            detail: Some(detail),
        };
        self.write_audit(caller, &entry, result).await
    }

    async fn write_audit<T>(&self, caller: &Caller, entry: &AuditEntry<'_>, result: Result<T>) -> Result<T> {
        caller.record.mark_audited();
        let written = self
            .store
            .audit(entry)
            .instrument(tracing::info_span!("database", op = "audit"))
            .await;
        match (result, written) {
            (Ok(value), Ok(())) => Ok(value),
            (Ok(_), Err(e)) => Err(e.into()),
            (Err(e), written) => {
                if let Err(audit_error) = written {
                    tracing::warn!(error = %audit_error, action = entry.action, "audit row of a failed call not written");
                }
                Err(e)
            }
        }
    }
}

fn append_loaded(indexes: &Indexes, pending: &mut Vec<TemplateRow>) -> Result<(), IndexError> {
    let Some(first) = pending.first() else {
        return Ok(());
    };
    let index = indexes.get_or_create(&first.gallery_id);
    let rows: Vec<NewRow<'_>> = pending.iter().map(TemplateRow::as_new_row).collect();
    lock(&index).append(&rows)?;
    pending.clear();
    Ok(())
}
