//! The core of the service: what Enroll, Identify, Verify and the rest do,
//! in domain types. It knows nothing of protobuf; `service.rs` converts.
//!
//! Consistency between Postgres and the in-memory index: mutations of one
//! gallery (enrol, delete) are serialised by a per-gallery async lock held
//! from the database transaction until the index is updated, so the index
//! applies committed changes in commit order. Searches never take that lock.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use handid_model::{Embedder, OperatingPoint};
use tracing::Instrument;

use crate::batcher::Batcher;
use crate::error::ServiceError;
use crate::index::{Hit, IndexError, Indexes, NewRow, lock};
use crate::settings::LimitSettings;
use crate::store::{
    AuditEntry, Enrolled, Erased, NewEnrollment, Store, StoreError, SubjectRecord, TemplateRow,
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
}

/// Result of Verify.
#[derive(Debug, Clone, Copy)]
pub struct Verified {
    /// Best score over the subject's templates.
    pub score: f32,
    /// The decision.
    pub decision: Decision,
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

/// The service core.
#[derive(Debug)]
pub struct Engine {
    store: Store,
    indexes: Indexes,
    batcher: Batcher,
    model: ActiveModel,
    limits: LimitSettings,
    writers: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Engine {
    /// Assembles the core and loads every gallery index of the active model
    /// from Postgres.
    pub async fn start(
        store: Store,
        indexes: Indexes,
        batcher: Batcher,
        model: ActiveModel,
        limits: LimitSettings,
    ) -> Result<Self, LoadError> {
        let engine = Self {
            store,
            indexes,
            batcher,
            model,
            limits,
            writers: Mutex::new(HashMap::new()),
        };
        engine.load_indexes().await?;
        Ok(engine)
    }

    /// The store (health checks).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The serving model.
    pub fn model(&self) -> &ActiveModel {
        &self.model
    }

    /// Templates held in memory per gallery (metrics).
    pub fn gallery_sizes(&self) -> Vec<(String, usize)> {
        self.indexes.sizes()
    }

    /// The serving model's id.
    pub fn model_id(&self) -> &str {
        self.model.embedder.model_id()
    }

    async fn load_indexes(&self) -> Result<(), LoadError> {
        let model_id = self.model_id().to_owned();
        let started = Instant::now();
        let mut last_report = Instant::now();
        let mut loaded = 0usize;
        let mut pending: Vec<TemplateRow> = Vec::with_capacity(LOAD_BATCH);
        let mut rows = std::pin::pin!(self.store.templates_of_model(&model_id));
        tracing::info!(%model_id, "loading gallery indexes from the database");
        while let Some(row) = rows.try_next().await? {
            if pending.first().is_some_and(|p| p.gallery_id != row.gallery_id) || pending.len() == LOAD_BATCH
            {
                loaded += pending.len();
                self.append_loaded(&mut pending)?;
            }
            pending.push(row);
            if last_report.elapsed().as_secs() >= 5 {
                tracing::info!(templates = loaded, "still loading gallery indexes");
                last_report = Instant::now();
            }
        }
        loaded += pending.len();
        self.append_loaded(&mut pending)?;
        let (galleries, templates) = self.indexes.totals();
        tracing::info!(
            galleries,
            templates,
            read = loaded,
            seconds = started.elapsed().as_secs_f32(),
            "gallery indexes loaded"
        );
        Ok(())
    }

    fn append_loaded(&self, pending: &mut Vec<TemplateRow>) -> Result<(), IndexError> {
        let Some(first) = pending.first() else {
            return Ok(());
        };
        let index = self.indexes.get_or_create(&first.gallery_id);
        let rows: Vec<NewRow<'_>> = pending
            .iter()
            .map(|r| NewRow {
                subject_id: &r.subject_id,
                seq: r.seq,
                embedding: &r.embedding,
            })
            .collect();
        lock(&index).append(&rows)?;
        pending.clear();
        Ok(())
    }

    fn writer(&self, gallery: &Id) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.writers).entry(gallery.0.clone()).or_default().clone()
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
                model_id: Some(self.model_id()),
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
        let embeddings = self.batcher.embed(images).await?;
        // No quality estimator exists yet; every template records full quality.
        let qualities = vec![1.0f32; embeddings.len()];
        let writer = self.writer(gallery);
        let _serialised = writer.lock().await;
        let enrolled = self
            .store
            .enroll(&NewEnrollment {
                gallery_id: &gallery.0,
                subject_id: &subject.0,
                model_id: self.model_id(),
                embeddings: &embeddings,
                qualities: &qualities,
                idempotency_key: key.as_deref(),
            })
            .instrument(tracing::info_span!("database", op = "enroll"))
            .await?;
        if !enrolled.replayed {
            let rows: Vec<NewRow<'_>> = enrolled
                .templates
                .iter()
                .zip(&embeddings)
                .map(|(t, e)| NewRow {
                    subject_id: &subject.0,
                    seq: t.seq,
                    embedding: e,
                })
                .collect();
            lock(&self.indexes.get_or_create(&gallery.0)).append(&rows)?;
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
        let (threshold, fmr) = self.resolve(rule)?;
        let probe = self.embed_one(image).await?;
        let searched = match self.indexes.get(&gallery.0) {
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
        let (threshold, fmr) = self.resolve(rule)?;
        let probe = self.embed_one(image).await?;
        let score = match self.indexes.get(&gallery.0) {
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
                model_id: self.model_id().to_owned(),
            });
        };
        Ok(Verified {
            score,
            decision: Decision {
                is_match: score >= threshold,
                threshold,
                fmr,
            },
        })
    }

    /// The embeddings of `images`, storing nothing.
    pub async fn embed(&self, images: Vec<Vec<u8>>) -> Result<Vec<Vec<f32>>> {
        self.check_image_count(images.len())?;
        Ok(self.batcher.embed(images).await?)
    }

    /// Erases a subject from the database and the index.
    pub async fn delete_subject(&self, caller: &Caller, gallery: Id, subject: Id) -> Result<u32> {
        let result = async {
            let writer = self.writer(&gallery);
            let _serialised = writer.lock().await;
            let erased = self
                .store
                .delete_subject(&gallery.0, &subject.0)
                .await
                .map_err(|e| not_found(e, &gallery, Some(&subject)))?;
            if let Some(index) = self.indexes.get(&gallery.0) {
                lock(&index).remove_subject(&subject.0)?;
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
            let writer = self.writer(&gallery);
            let _serialised = writer.lock().await;
            let erased = self
                .store
                .delete_gallery(&gallery.0)
                .await
                .map_err(|e| not_found(e, &gallery, None))?;
            if let Some(index) = self.indexes.get(&gallery.0) {
                lock(&index).clear();
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

    async fn embed_one(&self, image: Vec<u8>) -> Result<Vec<f32>> {
        self.batcher
            .embed(vec![image])
            .await?
            .pop()
            .ok_or_else(|| ServiceError::Internal("no embedding for the probe".to_owned()))
    }

    /// The threshold (and its FMR) a rule stands for.
    pub fn resolve(&self, rule: Rule) -> Result<(f32, f64)> {
        let calibrated = &self.model.embedder.manifest().thresholds;
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
