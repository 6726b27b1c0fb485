//! The domain types of the core: what calls take and return.

use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use handid_model::Embedder;

use super::Result;
use crate::audit::CallRecord;
use crate::batcher::Batcher;
use crate::decode::Decoding;
use crate::error::ServiceError;
use crate::index::{Hit, IndexError, Indexes};
use crate::settings::BatchSettings;
use crate::store::{Coverage, StoreError, SubjectRecord};

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
pub struct Id(pub(super) String);

impl Id {
    /// Validates `value` as the field `field`.
    pub fn parse(field: &'static str, value: String) -> Result<Self> {
        let bad = |problem: &str| {
            Err(ServiceError::BadField {
                field,
                problem: problem.to_owned(),
            })
        };
        if value.is_empty() {
            return bad("is empty");
        }
        if let Some(problem) = control_character(&value) {
            return Err(ServiceError::BadField { field, problem });
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

/// What is wrong with a text field that holds a NUL or another control
/// character (Postgres refuses NUL in text, and logs should not carry
/// terminal escapes), naming the character and where it is; `None` when
/// there is none.
pub fn control_character(value: &str) -> Option<String> {
    let (at, c) = value.chars().enumerate().find(|(_, c)| c.is_control())?;
    let name = if c == '\0' {
        "a NUL character".to_owned()
    } else {
        format!("the control character U+{:04X}", u32::from(c))
    };
    Some(format!("contains {name} at position {at}"))
}

/// A validated idempotency key: 1-256 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Longest key (the schema's CHECK).
    pub const MAX_CHARS: usize = 256;

    /// `None` for the empty string (no key), else the validated key.
    pub fn parse(value: String) -> Result<Option<Self>> {
        let bad = |problem: String| ServiceError::BadField {
            field: "idempotency_key",
            problem,
        };
        if value.is_empty() {
            return Ok(None);
        }
        if let Some(problem) = control_character(&value) {
            return Err(bad(problem));
        }
        if value.chars().count() > Self::MAX_CHARS {
            return Err(bad(format!("is longer than {} characters", Self::MAX_CHARS)));
        }
        Ok(Some(Self(value)))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A validated Enroll.
#[derive(Debug, Clone)]
pub struct EnrollCall {
    /// The gallery (created on first use).
    pub gallery: Id,
    /// The subject (created on first use).
    pub subject: Id,
    /// 1 to `limits.max_images_per_request` encoded images.
    pub images: Vec<Vec<u8>>,
    /// Replays of the same key return the first result.
    pub key: Option<IdempotencyKey>,
}

/// A validated Identify.
#[derive(Debug, Clone)]
pub struct IdentifyCall {
    /// The gallery searched.
    pub gallery: Id,
    /// The probe.
    pub image: Vec<u8>,
    /// 1 to `limits.max_top_k`.
    pub top_k: usize,
    /// How the top score becomes a decision.
    pub rule: Rule,
}

/// A validated Verify.
#[derive(Debug, Clone)]
pub struct VerifyCall {
    /// The subject's gallery.
    pub gallery: Id,
    /// The subject compared with.
    pub subject: Id,
    /// The probe.
    pub image: Vec<u8>,
    /// How the score becomes a decision.
    pub rule: Rule,
}

/// A validated ListSubjects.
#[derive(Debug, Clone)]
pub struct PageCall {
    /// The gallery listed.
    pub gallery: Id,
    /// 1 to [`super::MAX_PAGE_SIZE`] subjects.
    pub size: u32,
    /// The last subject of the previous page.
    pub after: Option<Id>,
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

/// Result of a cancelled migration.
#[derive(Debug, Clone)]
pub struct Cancelled {
    /// The model that keeps serving.
    pub active: ActiveModel,
    /// The model that was staged.
    pub cancelled: ActiveModel,
    /// What became of its templates.
    pub templates: crate::store::CancelledStaging,
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
    /// The model RollbackModel would make active again.
    pub rollback_target: Option<crate::store::RetiredModel>,
    /// The side-information model (`model.side_info`), when configured.
    pub side_info: Option<ActiveModel>,
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
    /// The API key id, the certificate grant's subject or san text, or
    /// `anonymous` when auth is off (the certificate's subject, with mutual
    /// TLS).
    pub id: String,
    /// The peer address, recorded as extra.
    pub peer: Option<String>,
    /// When set, the only galleries this caller may use.
    pub galleries: Option<Arc<[String]>>,
    /// This call's audit record: the core marks it once it wrote the row.
    pub record: Arc<CallRecord>,
}

impl Caller {
    /// A caller with every right (auth off; also in-process tools).
    pub fn anonymous(peer: Option<String>) -> Self {
        Self::named("anonymous", peer)
    }

    /// A caller with every right, named `id` (e.g. `signal:SIGHUP`).
    pub fn named(id: &str, peer: Option<String>) -> Self {
        Self {
            id: id.to_owned(),
            peer,
            galleries: None,
            record: Arc::default(),
        }
    }

    /// PERMISSION_DENIED unless this caller may call Embed: an embedding
    /// belongs to no gallery (it can be compared offline with anything), so
    /// a caller limited to galleries may not make one.
    pub fn check_embed(&self) -> Result<()> {
        match self.galleries {
            Some(_) => Err(ServiceError::EmbedDenied {
                caller: self.id.clone(),
            }),
            None => Ok(()),
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
    pub(super) spaces: Vec<String>,
}

impl Slot {
    /// The model id.
    pub fn model_id(&self) -> &str {
        self.model.embedder.model_id()
    }

    /// Whether this slot compares the templates `by`'s model makes: of one
    /// of its spaces, and of its width.
    pub(super) fn compares(&self, by: &Slot) -> bool {
        self.spaces
            .contains(&by.model.embedder.manifest().embedding_space)
            && self.model.embedder.dim() == by.model.embedder.dim()
    }
}

/// How new slots are built (the forward thread's settings).
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// Batching of forward passes.
    pub batch: BatchSettings,
    /// How gallery indexes are held and searched.
    pub search: crate::index::SearchOptions,
    /// Decoding: limits, slots and pixel budget, shared by every slot.
    pub decoding: Arc<Decoding>,
    /// The side-information model (`model.side_info`), when configured.
    pub side: Option<Arc<SideModel>>,
}

/// The side-information model: its feature of every enrolled image is
/// stored beside the image's templates (migration `side_information`).
#[derive(Debug)]
pub struct SideModel {
    /// The model, where it came from and when it was loaded.
    pub model: ActiveModel,
    /// Its forward thread.
    pub batcher: Batcher,
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
}
