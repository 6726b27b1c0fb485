//! The core of the service: what Enroll, Identify, Verify and the rest do,
//! in domain types. It knows nothing of protobuf; `service.rs` converts.
//!
//! Consistency between Postgres and the in-memory index: mutations of one
//! gallery (enrol, delete) are serialised by a per-gallery async lock held
//! from the database transaction until the index is updated, so the index
//! applies committed changes in commit order. Searches never take that lock.
//!
//! Models: every call takes the active [`Slot`] (model, forward thread,
//! indexes) once, at its start, and uses only that slot: a reload swaps the
//! slot atomically, and calls in flight finish on the one they took, which
//! lives until the last of them drops it. During a migration a second,
//! staged slot receives every enrolment too (both templates in one
//! transaction); Identify and Verify use the active slot only.
//!
//! Replicas: each committed change of the database is numbered (the
//! `changes` table); [`Engine::apply_changes`] re-reads the subjects changed
//! since the last applied number into every slot's indexes, which is what
//! makes another replica's enrolments and deletions visible here.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use handid_model::{DecodeLimits, Embedder, OperatingPoint};
use tracing::Instrument;

use crate::batcher::Batcher;
use crate::error::ServiceError;
use crate::index::{DEFAULT_CHUNK_ROWS, Hit, IndexError, Indexes, NewRow, lock};
use crate::reload::{self, ReloadMode};
use crate::settings::{BatchSettings, LimitSettings};
use crate::store::{
    AuditEntry, Change, Coverage, Enrolled, Erased, ModelRecord, NewEnrollment, StagedEmbeddings, Store,
    StoreError, SubjectRecord, TemplateRow,
};
use crate::telemetry::metrics;

/// The FMR whose calibrated threshold decides when a call gives no rule.
pub const DEFAULT_FMR: f64 = 1e-3;
/// Largest ListSubjects page.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// ListSubjects page when the call asks for 0.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// Longest idempotency key (the schema's CHECK).
pub const MAX_IDEMPOTENCY_KEY: usize = 256;
/// Templates per index append while loading from Postgres.
const LOAD_BATCH: usize = 1024;
/// Changes read per query while catching up.
const CHANGE_BATCH: u32 = 1000;

type Result<T, E = ServiceError> = std::result::Result<T, E>;

/// Why the gallery indexes could not be loaded at start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Reading the templates failed.
    #[error("reading templates: {0}")]
    Store(#[from] StoreError),
    /// A stored template does not fit the index (e.g. its width disagrees
    /// with the model it names): refuse to serve rather than skip it.
    #[error("indexing stored templates: {0}")]
    Index(#[from] IndexError),
}

impl From<LoadError> for ServiceError {
    fn from(e: LoadError) -> Self {
        match e {
            LoadError::Store(e) => e.into(),
            LoadError::Index(e) => e.into(),
        }
    }
}

/// A validated gallery or subject id: 1-128 characters of `[A-Za-z0-9._:-]`
/// (the same rule as the schema's CHECK, enforced first here so a bad id is
/// the client's INVALID_ARGUMENT, not a database error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Id(String);

impl Id {
    /// Validates `value` as the field `field`.
    pub fn parse(field: &'static str, value: String) -> Result<Self> {
        let bad = |problem| Err(ServiceError::BadId { field, problem });
        if value.is_empty() {
            return bad("is empty");
        }
        if value.len() > 128 {
            return bad("is longer than 128 characters");
        }
        if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
        {
            return bad("may only contain A-Z a-z 0-9 . _ : -");
        }
        Ok(Self(value))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How a score becomes a decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// The model's threshold at [`DEFAULT_FMR`].
    Default,
    /// An explicit threshold.
    Threshold(f32),
    /// The model's threshold calibrated at this FMR.
    TargetFmr(f64),
}

/// A match / no-match decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// Whether the score reached the threshold.
    pub is_match: bool,
    /// The threshold applied.
    pub threshold: f32,
    /// The FMR it was calibrated for; 0 for an explicit threshold.
    pub fmr: f64,
}

/// Result of Identify.
#[derive(Debug, Clone)]
pub struct Identified {
    /// Ranked subjects.
    pub hits: Vec<Hit>,
    /// The decision for the top one.
    pub decision: Decision,
    /// Subjects searched.
    pub gallery_size: u32,
    /// The model that embedded the probe.
    pub model_id: String,
}

/// Result of Verify.
#[derive(Debug, Clone)]
pub struct Verified {
    /// Best score over the subject's templates.
    pub score: f32,
    /// The decision.
    pub decision: Decision,
    /// The model that embedded the probe.
    pub model_id: String,
}

/// Result of Embed.
#[derive(Debug, Clone)]
pub struct Embedded {
    /// One embedding per image.
    pub embeddings: Vec<Vec<f32>>,
    /// Their width.
    pub dim: usize,
    /// The model that made them.
    pub model_id: String,
}

/// Result of a reload.
#[derive(Debug, Clone)]
pub struct Reloaded {
    /// The model active before.
    pub previous: ActiveModel,
    /// The model loaded (now active, or staged).
    pub loaded: ActiveModel,
    /// Whether it was staged as a migration rather than swapped in.
    pub staged: bool,
}

/// Result of a promotion.
#[derive(Debug, Clone)]
pub struct Promoted {
    /// The model now active (the formerly staged one).
    pub active: ActiveModel,
    /// The model it replaced.
    pub previous: ActiveModel,
}

/// What GetModel reports.
#[derive(Debug, Clone)]
pub struct ModelReport {
    /// The serving model.
    pub active: ActiveModel,
    /// The staged model, during a migration.
    pub staged: Option<ActiveModel>,
    /// The staged model's enrolment coverage per gallery (empty without one).
    pub coverage: Vec<Coverage>,
}

/// A page of ListSubjects.
#[derive(Debug, Clone)]
pub struct SubjectPage {
    /// The subjects.
    pub subjects: Vec<SubjectRecord>,
    /// Token of the next page, when there is one.
    pub next_page_token: Option<String>,
}

/// The serving model as reported by GetModel.
#[derive(Debug, Clone)]
pub struct ActiveModel {
    /// The loaded checkpoint.
    pub embedder: Arc<Embedder>,
    /// The folder it came from.
    pub path: PathBuf,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// When it was loaded.
    pub loaded_at: DateTime<Utc>,
}

/// Who made a call, as access control established it (`auth.rs`): what
/// the audit log records, and which galleries the caller may touch.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The API key id, the client certificate subject, or `anonymous` when
    /// auth is off.
    pub id: String,
    /// The peer address, recorded as extra.
    pub peer: Option<String>,
    /// When set, the only galleries this caller may use.
    pub galleries: Option<Arc<[String]>>,
}

impl Caller {
    /// A caller with every right (auth off; also in-process tools).
    pub fn anonymous(peer: Option<String>) -> Self {
        Self {
            id: "anonymous".to_owned(),
            peer,
            galleries: None,
        }
    }

    /// PERMISSION_DENIED unless this caller may use `gallery`.
    pub fn check_gallery(&self, gallery: &Id) -> Result<()> {
        match &self.galleries {
            Some(allowed) if !allowed.iter().any(|g| g == gallery.as_str()) => {
                Err(ServiceError::GalleryDenied {
                    caller: self.id.clone(),
                    gallery: gallery.0.clone(),
                })
            }
            _ => Ok(()),
        }
    }
}

/// One loaded model and what serves with it: its forward thread and the
/// gallery indexes of the templates it can be compared with (those of its
/// embedding space and of the spaces it declares compatible).
#[derive(Debug)]
pub struct Slot {
    /// The model.
    pub model: ActiveModel,
    /// Its forward thread (stops when the last call holding the slot ends).
    pub batcher: Batcher,
    /// Its gallery indexes; shared with the slot it replaced when both
    /// compare the same spaces.
    pub indexes: Arc<Indexes>,
    spaces: Vec<String>,
}

impl Slot {
    /// The model id.
    pub fn model_id(&self) -> &str {
        self.model.embedder.model_id()
    }
}

/// How new slots are built (the forward thread's settings).
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// Batching of forward passes.
    pub batch: BatchSettings,
    /// Limits on decoded images.
    pub decode: DecodeLimits,
}

/// The service core.
#[derive(Debug)]
pub struct Engine {
    store: Store,
    active: RwLock<Arc<Slot>>,
    staged: RwLock<Option<Arc<Slot>>>,
    pipeline: Pipeline,
    limits: LimitSettings,
    writers: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// One reload or promotion at a time.
    reloading: tokio::sync::Mutex<()>,
    /// One catch-up at a time; changes are applied in order.
    applying: tokio::sync::Mutex<()>,
    /// The last change applied to the indexes.
    applied: AtomicI64,
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
            writers: Mutex::new(HashMap::new()),
            reloading: tokio::sync::Mutex::new(()),
            applying: tokio::sync::Mutex::new(()),
            applied: AtomicI64::new(applied),
        };
        engine.load_indexes(&engine.active()).await?;
        Ok(engine)
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

    /// The last change applied to the indexes.
    pub fn applied_change(&self) -> i64 {
        self.applied.load(Ordering::SeqCst)
    }

    async fn load_indexes(&self, slot: &Slot) -> Result<(), LoadError> {
        let model_id = slot.model_id().to_owned();
        let started = Instant::now();
        let mut last_report = Instant::now();
        let mut loaded = 0usize;
        let mut pending: Vec<TemplateRow> = Vec::with_capacity(LOAD_BATCH);
        let dim = slot.model.embedder.dim();
        let mut rows = std::pin::pin!(self.store.templates_in_spaces(&slot.spaces, dim));
        tracing::info!(%model_id, spaces = ?slot.spaces, "loading gallery indexes from the database");
        while let Some(row) = rows.try_next().await? {
            if pending.first().is_some_and(|p| p.gallery_id != row.gallery_id) || pending.len() == LOAD_BATCH
            {
                loaded += pending.len();
                append_loaded(&slot.indexes, &mut pending)?;
            }
            pending.push(row);
            if last_report.elapsed().as_secs() >= 5 {
                tracing::info!(templates = loaded, "still loading gallery indexes");
                last_report = Instant::now();
            }
        }
        loaded += pending.len();
        append_loaded(&slot.indexes, &mut pending)?;
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

    fn writer(&self, gallery: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.writers).entry(gallery.to_owned()).or_default().clone()
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
        let written = self
            .store
            .audit(&AuditEntry {
                actor: &caller.id,
                peer: caller.peer.as_deref(),
                action,
                gallery_id: gallery.map(Id::as_str),
                subject_id: subject.as_deref(),
                model_id: Some(&model_id),
                outcome: &outcome,
                top_score,
            })
            .instrument(tracing::info_span!("database", op = "audit"))
            .await;
        match (result, written) {
            (Ok(value), Ok(())) => Ok(value),
            (Ok(_), Err(e)) => Err(e.into()),
            (Err(e), written) => {
                if let Err(audit_error) = written {
                    tracing::warn!(error = %audit_error, action, "audit row of a failed call not written");
                }
                Err(e)
            }
        }
    }

    /// Enrolls `images` of `subject` into `gallery`; returns once committed.
    pub async fn enroll(
        &self,
        caller: &Caller,
        gallery: Id,
        subject: Id,
        images: Vec<Vec<u8>>,
        idempotency_key: Option<String>,
    ) -> Result<Enrolled> {
        let result = self
            .enroll_inner(&gallery, &subject, images, idempotency_key)
            .await;
        let name = subject.0.clone();
        self.audited(caller, "enroll", Some(&gallery), result, |_| (Some(name), None))
            .await
    }

    async fn enroll_inner(
        &self,
        gallery: &Id,
        subject: &Id,
        images: Vec<Vec<u8>>,
        key: Option<String>,
    ) -> Result<Enrolled> {
        self.check_image_count(images.len())?;
        if key
            .as_ref()
            .is_some_and(|k| k.chars().count() > MAX_IDEMPOTENCY_KEY)
        {
            return Err(ServiceError::IdempotencyKeyTooLong {
                max: MAX_IDEMPOTENCY_KEY,
            });
        }
        // A retry needs no forward pass: answer it before embedding.
        if let Some(key) = &key
            && let Some(first) = self
                .store
                .find_replay(key, &gallery.0, &subject.0, images.len())
                .instrument(tracing::info_span!("database", op = "find_replay"))
                .await?
        {
            return Ok(first);
        }
        let active = self.active();
        let staged = self.staged();
        // During a migration the staged model embeds the same images; the
        // copy is made only then.
        let (embeddings, staged_embeddings) = match &staged {
            Some(staged) => {
                let (now, next) =
                    tokio::join!(active.batcher.embed(images.clone()), staged.batcher.embed(images));
                (now?, Some(next?))
            }
            None => (active.batcher.embed(images).await?, None),
        };
        // No quality estimator exists yet; every template records full quality.
        let qualities = vec![1.0f32; embeddings.len()];
        let writer = self.writer(&gallery.0);
        let _serialised = writer.lock().await;
        let enrolled = self
            .store
            .enroll(&NewEnrollment {
                gallery_id: &gallery.0,
                subject_id: &subject.0,
                model_id: active.model_id(),
                embeddings: &embeddings,
                qualities: &qualities,
                idempotency_key: key.as_deref(),
                staged: staged
                    .as_ref()
                    .zip(staged_embeddings.as_deref())
                    .map(|(slot, embeddings)| StagedEmbeddings {
                        model_id: slot.model_id(),
                        embeddings,
                    }),
            })
            .instrument(tracing::info_span!("database", op = "enroll"))
            .await?;
        if !enrolled.replayed {
            append_enrolled(&active, &gallery.0, &subject.0, &enrolled.templates, &embeddings)?;
            if let (Some(slot), Some(vectors)) = (&staged, &staged_embeddings) {
                append_enrolled(slot, &gallery.0, &subject.0, &enrolled.staged_templates, vectors)?;
            }
        }
        Ok(enrolled)
    }

    /// 1:N search of `gallery` for the subject in `image`.
    pub async fn identify(
        &self,
        caller: &Caller,
        gallery: Id,
        image: Vec<u8>,
        top_k: u32,
        rule: Rule,
    ) -> Result<Identified> {
        let result = self.identify_inner(&gallery, image, top_k, rule).await;
        if let Ok(r) = &result
            && let Some(top) = r.hits.first()
        {
            metrics().score("identify", top.score, r.decision.is_match);
        }
        self.audited(caller, "identify", Some(&gallery), result, |r| {
            let matched = r
                .decision
                .is_match
                .then(|| r.hits.first().map(|h| h.subject_id.clone()));
            (matched.flatten(), r.hits.first().map(|h| h.score))
        })
        .await
    }

    async fn identify_inner(
        &self,
        gallery: &Id,
        image: Vec<u8>,
        top_k: u32,
        rule: Rule,
    ) -> Result<Identified> {
        if top_k == 0 || top_k > self.limits.max_top_k {
            return Err(ServiceError::TopK {
                got: top_k,
                max: self.limits.max_top_k,
            });
        }
        let slot = self.active();
        let (threshold, fmr) = resolve(&slot, rule)?;
        let probe = embed_one(&slot, image).await?;
        let searched = match slot.indexes.get(&gallery.0) {
            Some(index) => {
                let span = tracing::info_span!("search", top_k);
                tokio::task::spawn_blocking(move || {
                    let _in_search = span.enter();
                    let index = lock(&index);
                    index
                        .search(&probe, top_k as usize)
                        .map(|hits| (hits, index.subject_count()))
                })
                .await
                .map_err(|e| ServiceError::Internal(format!("search task: {e}")))??
            }
            None => (Vec::new(), 0),
        };
        let (hits, size) = searched;
        if size == 0
            && !self
                .store
                .gallery_exists(&gallery.0)
                .instrument(tracing::info_span!("database", op = "gallery_exists"))
                .await?
        {
            return Err(ServiceError::GalleryNotFound(gallery.0.clone()));
        }
        let is_match = hits.first().is_some_and(|h| h.score >= threshold);
        Ok(Identified {
            hits,
            decision: Decision {
                is_match,
                threshold,
                fmr,
            },
            gallery_size: u32::try_from(size).unwrap_or(u32::MAX),
            model_id: slot.model_id().to_owned(),
        })
    }

    /// 1:1 comparison of `image` with `subject` of `gallery`.
    pub async fn verify(
        &self,
        caller: &Caller,
        gallery: Id,
        subject: Id,
        image: Vec<u8>,
        rule: Rule,
    ) -> Result<Verified> {
        let result = self.verify_inner(&gallery, &subject, image, rule).await;
        if let Ok(v) = &result {
            metrics().score("verify", v.score, v.decision.is_match);
        }
        let name = subject.0.clone();
        self.audited(caller, "verify", Some(&gallery), result, |v| {
            (Some(name), Some(v.score))
        })
        .await
    }

    async fn verify_inner(&self, gallery: &Id, subject: &Id, image: Vec<u8>, rule: Rule) -> Result<Verified> {
        let slot = self.active();
        let (threshold, fmr) = resolve(&slot, rule)?;
        let probe = embed_one(&slot, image).await?;
        let score = match slot.indexes.get(&gallery.0) {
            Some(index) => {
                tracing::info_span!("search").in_scope(|| lock(&index).verify(&subject.0, &probe))?
            }
            None => None,
        };
        let Some(score) = score else {
            // Not in the index: say precisely why.
            self.store
                .get_subject(&gallery.0, &subject.0)
                .await
                .map_err(|e| not_found(e, gallery, Some(subject)))?;
            return Err(ServiceError::NoTemplatesForModel {
                subject: subject.0.clone(),
                model_id: slot.model_id().to_owned(),
            });
        };
        Ok(Verified {
            score,
            decision: Decision {
                is_match: score >= threshold,
                threshold,
                fmr,
            },
            model_id: slot.model_id().to_owned(),
        })
    }

    /// The embeddings of `images`, storing nothing.
    pub async fn embed(&self, images: Vec<Vec<u8>>) -> Result<Embedded> {
        self.check_image_count(images.len())?;
        let slot = self.active();
        Ok(Embedded {
            embeddings: slot.batcher.embed(images).await?,
            dim: slot.model.embedder.dim(),
            model_id: slot.model_id().to_owned(),
        })
    }

    /// Erases a subject from the database and the index.
    pub async fn delete_subject(&self, caller: &Caller, gallery: Id, subject: Id) -> Result<u32> {
        let result = async {
            let writer = self.writer(&gallery.0);
            let _serialised = writer.lock().await;
            let erased = self
                .store
                .delete_subject(&gallery.0, &subject.0)
                .await
                .map_err(|e| not_found(e, &gallery, Some(&subject)))?;
            for slot in self.slots() {
                if let Some(index) = slot.indexes.get(&gallery.0) {
                    lock(&index).remove_subject(&subject.0)?;
                }
            }
            Ok(erased)
        }
        .await;
        let name = subject.0.clone();
        self.audited(caller, "delete_subject", Some(&gallery), result, |_| {
            (Some(name), None)
        })
        .await
    }

    /// Erases a gallery from the database and the index.
    pub async fn delete_gallery(&self, caller: &Caller, gallery: Id) -> Result<Erased> {
        let result = async {
            let writer = self.writer(&gallery.0);
            let _serialised = writer.lock().await;
            let erased = self
                .store
                .delete_gallery(&gallery.0)
                .await
                .map_err(|e| not_found(e, &gallery, None))?;
            for slot in self.slots() {
                if let Some(index) = slot.indexes.get(&gallery.0) {
                    lock(&index).clear();
                }
            }
            Ok(erased)
        }
        .await;
        self.audited(caller, "delete_gallery", Some(&gallery), result, |_| (None, None))
            .await
    }

    /// One subject's record.
    pub async fn get_subject(&self, gallery: Id, subject: Id) -> Result<SubjectRecord> {
        self.store
            .get_subject(&gallery.0, &subject.0)
            .await
            .map_err(|e| not_found(e, &gallery, Some(&subject)))
    }

    /// One page of a gallery's subjects, by subject id.
    pub async fn list_subjects(&self, gallery: Id, page_size: u32, page_token: &str) -> Result<SubjectPage> {
        let size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n <= MAX_PAGE_SIZE => n,
            got => {
                return Err(ServiceError::PageSize {
                    got,
                    max: MAX_PAGE_SIZE,
                });
            }
        };
        let after = decode_page_token(page_token)?;
        let mut subjects = self
            .store
            .list_subjects(&gallery.0, after.as_ref().map(Id::as_str), size + 1)
            .await
            .map_err(|e| not_found(e, &gallery, None))?;
        let next_page_token = if subjects.len() > size as usize {
            subjects.truncate(size as usize);
            subjects.last().map(|s| encode_page_token(&s.subject_id))
        } else {
            None
        };
        Ok(SubjectPage {
            subjects,
            next_page_token,
        })
    }

    fn check_image_count(&self, n: usize) -> Result<()> {
        if n == 0 {
            return Err(ServiceError::MissingImage("at least one image is required"));
        }
        if n > self.limits.max_images_per_request {
            return Err(ServiceError::TooManyImages {
                got: n,
                max: self.limits.max_images_per_request,
            });
        }
        Ok(())
    }

    /// The threshold (and its FMR) a rule stands for, with the active model.
    pub fn resolve(&self, rule: Rule) -> Result<(f32, f64)> {
        resolve(&self.active(), rule)
    }

    /// The active slot and, during a migration, the staged one.
    fn slots(&self) -> Vec<Arc<Slot>> {
        let mut slots = vec![self.active()];
        slots.extend(self.staged());
        slots
    }

    /// What GetModel reports.
    pub async fn report(&self) -> Result<ModelReport> {
        let staged = self.staged();
        let coverage = match &staged {
            Some(slot) => self.store.coverage(&slot.spaces).await?,
            None => Vec::new(),
        };
        Ok(ModelReport {
            active: self.model(),
            staged: staged.map(|s| s.model.clone()),
            coverage,
        })
    }

    /// Loads the checkpoint folder `path` (the active model's folder when
    /// `None`) on the side, checks it and swaps it in, or stages it as a
    /// migration. A refused checkpoint changes nothing.
    pub async fn reload(&self, caller: &Caller, path: Option<PathBuf>, mode: ReloadMode) -> Result<Reloaded> {
        let result = self.reload_inner(path, mode).await;
        let outcome = match &result {
            Ok(_) => "ok".to_owned(),
            Err(e) => code_name(e.code()),
        };
        metrics().model_reloaded(&outcome);
        self.audited(caller, "reload", None, result, |_| (None, None))
            .await
    }

    async fn reload_inner(&self, path: Option<PathBuf>, mode: ReloadMode) -> Result<Reloaded> {
        let _one = self.reloading.lock().await;
        let active = self.active();
        let path = path.unwrap_or_else(|| active.model.path.clone());
        let device = active.model.embedder.device();
        let started = Instant::now();
        let loading = path.clone();
        let embedder = tokio::task::spawn_blocking(move || reload::load_checked(&loading, device))
            .await
            .map_err(|e| ServiceError::Internal(format!("model load task: {e}")))?
            .map_err(|reason| ServiceError::BadCheckpoint {
                path: path.display().to_string(),
                reason,
            })?;
        let embedder = Arc::new(embedder);
        let staging = match (
            reload::compatible(active.model.embedder.manifest(), embedder.manifest()),
            mode,
        ) {
            (Ok(()), _) => false,
            (Err(_), ReloadMode::StageMigration) => true,
            (Err(reason), ReloadMode::Swap) => {
                return Err(ServiceError::IncompatibleModel(format!(
                    "{reason}; stage it as a migration (RELOAD_MODE_STAGE_MIGRATION) and promote it \
                     once enrolments cover the galleries"
                )));
            }
        };
        let manifest = embedder.manifest();
        self.store
            .record_model(&ModelRecord {
                model_id: manifest.model_id.clone(),
                embedding_space: manifest.embedding_space.clone(),
                architecture: manifest.architecture.clone(),
                embedding_dim: manifest.embedding_dim,
                manifest_json: serde_json::to_string(manifest)
                    .map_err(|e| ServiceError::Internal(format!("manifest as JSON: {e}")))?,
            })
            .await?;
        let spaces = reload::spaces(manifest);
        let model = ActiveModel {
            embedder: Arc::clone(&embedder),
            path,
            device: active.model.device.clone(),
            loaded_at: Utc::now(),
        };
        let batcher = Batcher::start(Arc::clone(&embedder), &self.pipeline.batch, self.pipeline.decode)
            .map_err(|e| ServiceError::Internal(format!("starting the forward thread: {e}")))?;
        // Same spaces, same width: the templates are the same, keep the index.
        let shared = !staging && spaces == active.spaces;
        let slot = Arc::new(Slot {
            indexes: if shared {
                Arc::clone(&active.indexes)
            } else {
                Arc::new(Indexes::new(embedder.dim(), device, DEFAULT_CHUNK_ROWS))
            },
            model,
            batcher,
            spaces,
        });
        let from = self.store.last_change().await?;
        if !shared {
            self.load_indexes(&slot)
                .await
                .map_err(|e| ServiceError::Internal(format!("loading the new model's indexes: {e}")))?;
        }
        if staging {
            *self
                .staged
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::clone(&slot));
        } else {
            *self
                .active
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::clone(&slot);
        }
        if !shared {
            // Enrolments committed while the index loaded went to the old
            // slots only: re-read what changed since the load began.
            self.resync_since(from).await?;
        }
        let role = if staging { "staged" } else { "active" };
        self.store.mark_model(slot.model_id(), role).await?;
        tracing::info!(
            previous = %active.model_id(),
            loaded = %slot.model_id(),
            role,
            seconds = started.elapsed().as_secs_f32(),
            "model reloaded"
        );
        Ok(Reloaded {
            previous: active.model.clone(),
            loaded: slot.model.clone(),
            staged: staging,
        })
    }

    /// Makes the staged model the active one. With `require_full_coverage`,
    /// refuses while any subject lacks a template of the staged model.
    pub async fn promote(&self, caller: &Caller, require_full_coverage: bool) -> Result<Promoted> {
        let result = self.promote_inner(require_full_coverage).await;
        self.audited(caller, "promote", None, result, |_| (None, None))
            .await
    }

    async fn promote_inner(&self, require_full_coverage: bool) -> Result<Promoted> {
        let _one = self.reloading.lock().await;
        let staged = self.staged().ok_or(ServiceError::NothingStaged)?;
        if require_full_coverage {
            let lacking: Vec<String> = self
                .store
                .coverage(&staged.spaces)
                .await?
                .into_iter()
                .filter(|c| c.covered < c.subjects)
                .map(|c| format!("{} ({} of {} subjects)", c.gallery_id, c.covered, c.subjects))
                .collect();
            if !lacking.is_empty() {
                return Err(ServiceError::CoverageIncomplete(lacking.join(", ")));
            }
        }
        let previous = {
            let mut active = self
                .active
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut slot = self
                .staged
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *slot = None;
            std::mem::replace(&mut *active, Arc::clone(&staged))
        };
        self.store.mark_model(previous.model_id(), "retired").await?;
        self.store.mark_model(staged.model_id(), "active").await?;
        tracing::info!(previous = %previous.model_id(), active = %staged.model_id(), "staged model promoted");
        Ok(Promoted {
            active: staged.model.clone(),
            previous: previous.model.clone(),
        })
    }

    /// Applies every change committed since the last applied one to the
    /// indexes of every slot, in order; returns how many were applied.
    pub async fn apply_changes(&self) -> Result<usize, LoadError> {
        let _one = self.applying.lock().await;
        let mut applied = 0;
        loop {
            let after = self.applied.load(Ordering::SeqCst);
            let changes = self.store.changes_after(after, CHANGE_BATCH).await?;
            if changes.is_empty() {
                return Ok(applied);
            }
            for change in changes {
                self.apply_change(&change).await?;
                self.applied.store(change.seq, Ordering::SeqCst);
                applied += 1;
            }
        }
    }

    /// Re-applies the changes after `from` (idempotent), then goes on from
    /// wherever the follower had got to.
    async fn resync_since(&self, from: i64) -> Result<(), LoadError> {
        let _one = self.applying.lock().await;
        let mut after = from;
        loop {
            let changes = self.store.changes_after(after, CHANGE_BATCH).await?;
            let Some(last) = changes.last().map(|c| c.seq) else {
                return Ok(());
            };
            for change in &changes {
                self.apply_change(change).await?;
            }
            after = last;
            self.applied.fetch_max(last, Ordering::SeqCst);
        }
    }

    /// Makes every slot's index of the change's gallery agree with the
    /// database: a subject's templates are re-read and replace what the
    /// index holds (so applying a change twice is harmless); a deleted
    /// gallery is emptied.
    async fn apply_change(&self, change: &Change) -> Result<(), LoadError> {
        let writer = self.writer(&change.gallery_id);
        let _serialised = writer.lock().await;
        for slot in self.slots() {
            match change.subject_id.as_deref() {
                Some(subject) if change.kind == "subject" => {
                    let dim = slot.model.embedder.dim();
                    let rows = self
                        .store
                        .subject_templates_in_spaces(&change.gallery_id, subject, &slot.spaces, dim)
                        .await?;
                    let index = if rows.is_empty() {
                        slot.indexes.get(&change.gallery_id)
                    } else {
                        Some(slot.indexes.get_or_create(&change.gallery_id))
                    };
                    if let Some(index) = index {
                        let new: Vec<NewRow<'_>> = rows.iter().map(TemplateRow::as_new_row).collect();
                        // One critical section: a search never sees the
                        // subject half replaced.
                        let mut index = lock(&index);
                        index.remove_subject(subject)?;
                        index.append(&new)?;
                    }
                }
                _ => {
                    if let Some(index) = slot.indexes.get(&change.gallery_id) {
                        lock(&index).clear();
                    }
                }
            }
        }
        Ok(())
    }
}

/// Appends the rows of one enrolment to a slot's index.
fn append_enrolled(
    slot: &Slot,
    gallery: &str,
    subject: &str,
    templates: &[crate::store::CreatedTemplate],
    embeddings: &[Vec<f32>],
) -> Result<(), IndexError> {
    let rows: Vec<NewRow<'_>> = templates
        .iter()
        .zip(embeddings)
        .map(|(t, e)| NewRow {
            subject_id: subject,
            seq: t.seq,
            embedding: e,
        })
        .collect();
    lock(&slot.indexes.get_or_create(gallery)).append(&rows)
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

async fn embed_one(slot: &Slot, image: Vec<u8>) -> Result<Vec<f32>> {
    slot.batcher
        .embed(vec![image])
        .await?
        .pop()
        .ok_or_else(|| ServiceError::Internal("no embedding for the probe".to_owned()))
}

/// The threshold (and its FMR) a rule stands for with the slot's model.
fn resolve(slot: &Slot, rule: Rule) -> Result<(f32, f64)> {
    let calibrated = &slot.model.embedder.manifest().thresholds;
    match rule {
        Rule::Threshold(t) if t.is_finite() => Ok((t, 0.0)),
        Rule::Threshold(_) => Err(ServiceError::BadRule(
            "threshold must be a finite number".to_owned(),
        )),
        Rule::TargetFmr(fmr) => find_operating_point(calibrated, fmr).ok_or_else(|| {
            let known: Vec<String> = calibrated.iter().map(|p| format!("{:e}", p.fmr)).collect();
            ServiceError::BadRule(format!(
                "no threshold calibrated at FMR {fmr:e}; this model has [{}]",
                known.join(", ")
            ))
        }),
        Rule::Default => find_operating_point(calibrated, DEFAULT_FMR)
            .ok_or(ServiceError::NotCalibrated { fmr: DEFAULT_FMR }),
    }
}

/// The gRPC name of a status code (`INVALID_ARGUMENT`), as the audit log
/// records outcomes; tonic's `Debug` spells it `InvalidArgument`.
fn code_name(code: tonic::Code) -> String {
    let mut name = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

/// FMRs are compared with a relative tolerance: `1e-3` sent as a double and
/// `0.001` read from YAML need not be the same bits.
fn find_operating_point(points: &[OperatingPoint], fmr: f64) -> Option<(f32, f64)> {
    points
        .iter()
        .find(|p| (p.fmr - fmr).abs() <= 1e-9 * fmr.abs().max(f64::MIN_POSITIVE))
        .map(|p| (p.threshold, p.fmr))
}

/// Names the missing gallery or subject.
fn not_found(e: StoreError, gallery: &Id, subject: Option<&Id>) -> ServiceError {
    match (e, subject) {
        (StoreError::GalleryNotFound, _) => ServiceError::GalleryNotFound(gallery.0.clone()),
        (StoreError::SubjectNotFound, Some(subject)) => ServiceError::SubjectNotFound {
            gallery: gallery.0.clone(),
            subject: subject.0.clone(),
        },
        (other, _) => other.into(),
    }
}

/// Page tokens are opaque to clients: a version tag and the hex of the last
/// subject id of the page.
const PAGE_TOKEN_PREFIX: &str = "p1.";

fn encode_page_token(last_subject: &str) -> String {
    format!("{PAGE_TOKEN_PREFIX}{}", hex::encode(last_subject))
}

fn decode_page_token(token: &str) -> Result<Option<Id>> {
    if token.is_empty() {
        return Ok(None);
    }
    let bytes = token
        .strip_prefix(PAGE_TOKEN_PREFIX)
        .and_then(|h| hex::decode(h).ok())
        .ok_or(ServiceError::BadPageToken)?;
    let text = String::from_utf8(bytes).map_err(|_| ServiceError::BadPageToken)?;
    Id::parse("page_token", text)
        .map(Some)
        .map_err(|_| ServiceError::BadPageToken)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_schema_rule() {
        assert!(Id::parse("gallery_id", "site-1.door:2_b".to_owned()).is_ok());
        for bad in ["", "has space", "semi;colon", "é", &"x".repeat(129)] {
            let err = Id::parse("gallery_id", bad.to_owned()).expect_err(bad);
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.to_string().starts_with("gallery_id "), "{err}");
        }
    }

    #[test]
    fn page_tokens_round_trip_and_foreign_ones_are_refused() {
        let token = encode_page_token("subject-42");
        assert_eq!(
            decode_page_token(&token).expect("ours").map(|i| i.0),
            Some("subject-42".to_owned())
        );
        assert_eq!(decode_page_token("").expect("first page"), None);
        for bad in ["subject-42", "p1.zz", "p1.20", "p2.6162"] {
            assert!(
                matches!(decode_page_token(bad), Err(ServiceError::BadPageToken)),
                "{bad}"
            );
        }
    }

    #[test]
    fn audit_outcomes_use_grpc_code_names() {
        assert_eq!(code_name(tonic::Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(tonic::Code::NotFound), "NOT_FOUND");
        assert_eq!(code_name(tonic::Code::Unavailable), "UNAVAILABLE");
    }

    #[test]
    fn operating_points_match_with_tolerance() {
        let points = [
            OperatingPoint {
                fmr: 0.01,
                threshold: 0.5,
            },
            OperatingPoint {
                fmr: 0.001,
                threshold: 0.7,
            },
        ];
        assert_eq!(find_operating_point(&points, 1e-3), Some((0.7, 0.001)));
        assert_eq!(find_operating_point(&points, 1e-4), None);
    }
}
