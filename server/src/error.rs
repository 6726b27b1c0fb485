//! The service's error type and its one conversion to a gRPC status.
//!
//! Every failure of a call ends up as a [`ServiceError`]; the single
//! `From<ServiceError> for tonic::Status` below decides the code and the
//! message a client sees. Messages name the problem (which field, which
//! image, which limit) but never carry database text, image bytes or
//! embedding values; server faults are logged here in full and answered
//! with a generic message.

use crate::batcher::BatchError;
use crate::index::IndexError;
use crate::reload::ReloadError;
use crate::store::StoreError;

/// Why one image of a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageProblem {
    /// No bytes at all.
    #[error("is empty (0 bytes)")]
    Empty,
    /// Over the byte limit.
    #[error("is {bytes} bytes, over the limit of {max}")]
    TooManyBytes {
        /// Its size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// Over the pixel limit (judged from the header, before decoding).
    #[error("is {width}x{height} pixels, over the limit of {max} pixels")]
    TooManyPixels {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// The limit.
        max: u64,
    },
    /// A side longer than the limit (judged from the header).
    #[error("is {width}x{height} pixels, a side longer than the limit of {max} pixels")]
    SideTooLong {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// The limit.
        max: u32,
    },
    /// More elongated than any camera makes (judged from the header).
    #[error("is {width}x{height} pixels, more elongated than the limit of {max}:1")]
    AspectRatio {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// The limit (longer side / shorter side).
        max: u32,
    },
    /// Too small to show a hand (judged from the header).
    #[error(
        "is {width}x{height} pixels, too small to show a hand (the shorter side must be at least {min} pixels)"
    )]
    TooSmall {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// The limit.
        min: u32,
    },
    /// Decoded, but the model's embedding of it is not finite (NaN or
    /// infinity): nothing to store or compare.
    #[error("gives no usable embedding (the model's output for it is not finite)")]
    NotEmbeddable,
    /// Not a JPEG/PNG/BMP/PGM, or truncated or corrupt.
    #[error("is not a decodable image ({0})")]
    Undecodable(String),
}

/// A failed call, by cause.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A field that breaks its rule: an id that is empty or outside
    /// `[A-Za-z0-9._:-]{1,128}`, an idempotency key or a path with a NUL,
    /// an unknown enum value.
    #[error("{field} {problem}")]
    BadField {
        /// The field, as the proto names it.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// A request without the image(s) it needs.
    #[error("{0}")]
    MissingImage(&'static str),
    /// More images than the server takes in one call.
    #[error("{got} images in one call, over the limit of {max}")]
    TooManyImages {
        /// Images sent.
        got: usize,
        /// The limit.
        max: usize,
    },
    /// One image is unusable.
    #[error("image {index} {problem}")]
    BadImage {
        /// 0-based position in the request.
        index: usize,
        /// Why.
        problem: ImageProblem,
    },
    /// `top_k` of 0 or above the limit.
    #[error("top_k must be 1..={max}, got {got}")]
    TopK {
        /// Asked for.
        got: u32,
        /// The server's limit.
        max: u32,
    },
    /// A decision rule the server cannot apply.
    #[error("{0}")]
    BadRule(String),
    /// The model has no calibrated default threshold.
    #[error(
        "the model has no threshold calibrated at FMR {fmr}; send an explicit threshold, or calibrate \
         the checkpoint (handid-trainer calibrate) and reload it"
    )]
    NotCalibrated {
        /// The default FMR looked for.
        fmr: f64,
    },
    /// A page token this server did not issue.
    #[error("page_token is not a token this server issued")]
    BadPageToken,
    /// A page size outside 0..=1000.
    #[error("page_size must be 0 (default) to {max}, got {got}")]
    PageSize {
        /// Asked for.
        got: u32,
        /// The limit.
        max: u32,
    },
    /// The idempotency key was used for another enrolment.
    #[error(
        "idempotency_key was already used, by this caller in this gallery, for another subject or other images"
    )]
    IdempotencyKeyReused,
    /// The caller's key is limited to other galleries.
    #[error("{caller:?} may not use gallery {gallery:?} (its key is limited to other galleries)")]
    GalleryDenied {
        /// Key id or certificate grant.
        caller: String,
        /// The gallery asked for.
        gallery: String,
    },
    /// A caller limited to galleries asked for Embed, which serves none.
    #[error(
        "{caller:?} is limited to galleries, and Embed belongs to none; use a key without a gallery list"
    )]
    EmbedDenied {
        /// Key id or certificate grant.
        caller: String,
    },
    /// No such gallery.
    #[error("gallery {0:?} not found")]
    GalleryNotFound(String),
    /// No such subject.
    #[error("subject {subject:?} not found in gallery {gallery:?}")]
    SubjectNotFound {
        /// Gallery id.
        gallery: String,
        /// Subject id.
        subject: String,
    },
    /// The subject exists, but none of its templates was made by the
    /// serving model, so it cannot be compared.
    #[error("subject {subject:?} has no template of the serving model {model_id}")]
    NoTemplatesForModel {
        /// Subject id.
        subject: String,
        /// Serving model.
        model_id: String,
    },
    /// The caller may not create another gallery.
    #[error(
        "{caller:?} has created {max} galleries, its limit (limits.max_galleries_per_caller); \
         enrol into an existing gallery or delete one"
    )]
    GalleryQuota {
        /// Key id or certificate grant.
        caller: String,
        /// The limit.
        max: u32,
    },
    /// The subject may not hold more templates.
    #[error(
        "subject {subject:?} holds {held} templates of the serving model and may hold at most {max} \
         (limits.max_templates_per_subject); delete the subject and enrol it again with its best images"
    )]
    TemplateQuota {
        /// Subject id.
        subject: String,
        /// Its templates before the refused enrolment.
        held: u32,
        /// The limit.
        max: u32,
    },
    /// A concurrent change (e.g. the gallery was deleted meanwhile); retry.
    #[error("the call conflicted with a concurrent change and was rolled back; retry")]
    Conflict,
    /// An Enroll whose images were embedded by a model whose templates the
    /// serving model cannot compare: a rollback, a promotion or another
    /// replica's change replaced it meanwhile. Nothing was stored; a retry
    /// embeds the images with the serving model.
    #[error(
        "the serving model changed while the images were embedded (by model {embedded_by}; model \
         {serving} serves now and cannot compare its templates); nothing was stored: retry the call"
    )]
    ModelChanged {
        /// The model that embedded the images.
        embedded_by: String,
        /// The model serving now.
        serving: String,
    },
    /// The database cannot be reached.
    #[error("the database is unavailable; retry with backoff")]
    Unavailable,
    /// The model cannot run on this replica (a device fault; its self-test
    /// fails); health says NOT_SERVING meanwhile.
    #[error("the model cannot run on this replica at present; retry on another replica")]
    ModelUnavailable,
    /// The server is stopping.
    #[error("the server is shutting down; retry on another replica")]
    ShuttingDown,
    /// A checkpoint that cannot serve: unreadable manifest, weights that do
    /// not match it, a failed self-test.
    #[error("checkpoint {path} refused: {reason}")]
    BadCheckpoint {
        /// The folder.
        path: String,
        /// What is wrong with it.
        reason: ReloadError,
    },
    /// A checkpoint of another embedding space, loaded without staging it.
    #[error(
        "checkpoint refused: {0}; stage it as a migration (RELOAD_MODE_STAGE_MIGRATION) and promote it \
         once enrolments cover the galleries"
    )]
    IncompatibleModel(ReloadError),
    /// PromoteModel without a staged model.
    #[error("no model is staged; stage one with ReloadModel (RELOAD_MODE_STAGE_MIGRATION) first")]
    NothingStaged,
    /// CancelMigration without a staged model; the reason says which.
    #[error("no migration to cancel: {0}")]
    NoMigration(String),
    /// PromoteModel with full coverage required, and galleries lacking it.
    #[error("the staged model does not cover every subject yet; galleries lacking coverage: {0}")]
    CoverageIncomplete(String),
    /// ReloadSettings changed nothing: no settings file, or one that does
    /// not validate (the reason names the file and the setting).
    #[error("{0}")]
    SettingsRefused(String),
    /// RollbackModel cannot go back; the reason says why and what to do.
    #[error("cannot roll back: {0}")]
    RollbackRefused(String),
    /// A server fault; the detail is logged, never sent.
    #[error("internal error")]
    Internal(String),
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(cause) => {
                tracing::warn!(error = %cause, "database unavailable");
                ServiceError::Unavailable
            }
            StoreError::IdempotencyKeyReused => ServiceError::IdempotencyKeyReused,
            StoreError::GalleryQuota { caller, max } => ServiceError::GalleryQuota { caller, max },
            StoreError::TemplateQuota { subject, held, max } => {
                ServiceError::TemplateQuota { subject, held, max }
            }
            StoreError::Conflict(constraint) => {
                tracing::info!(%constraint, "concurrent modification");
                ServiceError::Conflict
            }
            StoreError::ModelChanged { model_id, active } => ServiceError::ModelChanged {
                embedded_by: model_id,
                serving: active,
            },
            StoreError::GalleryNotFound(gallery) => ServiceError::GalleryNotFound(gallery),
            StoreError::SubjectNotFound { gallery, subject } => {
                ServiceError::SubjectNotFound { gallery, subject }
            }
            StoreError::Database(cause) => ServiceError::Internal(format!("database: {cause}")),
            e @ (StoreError::SchemaBehind { .. }
            | StoreError::SchemaModified { .. }
            | StoreError::ModelRetired(_)) => ServiceError::Internal(e.to_string()),
        }
    }
}

impl From<IndexError> for ServiceError {
    fn from(e: IndexError) -> Self {
        ServiceError::Internal(format!("gallery index: {e}"))
    }
}

impl From<BatchError> for ServiceError {
    fn from(e: BatchError) -> Self {
        match e {
            BatchError::BadImage { index, problem } => ServiceError::BadImage { index, problem },
            BatchError::Stopped => ServiceError::ShuttingDown,
            e @ (BatchError::Forward(_)
            | BatchError::Preprocess(_)
            | BatchError::Task(_)
            | BatchError::Cancelled) => ServiceError::Internal(format!("embedding: {e}")),
            BatchError::Unavailable => ServiceError::ModelUnavailable,
        }
    }
}

impl ServiceError {
    /// The gRPC code of this error.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            ServiceError::BadField { .. }
            | ServiceError::MissingImage(_)
            | ServiceError::TooManyImages { .. }
            | ServiceError::BadImage { .. }
            | ServiceError::TopK { .. }
            | ServiceError::BadRule(_)
            | ServiceError::BadPageToken
            | ServiceError::PageSize { .. }
            | ServiceError::BadCheckpoint { .. } => Code::InvalidArgument,
            ServiceError::NotCalibrated { .. }
            | ServiceError::IncompatibleModel(_)
            | ServiceError::NothingStaged
            | ServiceError::NoMigration(_)
            | ServiceError::CoverageIncomplete(_)
            | ServiceError::RollbackRefused(_)
            | ServiceError::SettingsRefused(_) => Code::FailedPrecondition,
            ServiceError::IdempotencyKeyReused => Code::AlreadyExists,
            ServiceError::GalleryNotFound(_)
            | ServiceError::SubjectNotFound { .. }
            | ServiceError::NoTemplatesForModel { .. } => Code::NotFound,
            ServiceError::Conflict | ServiceError::ModelChanged { .. } => Code::Aborted,
            ServiceError::GalleryQuota { .. } | ServiceError::TemplateQuota { .. } => Code::ResourceExhausted,
            ServiceError::GalleryDenied { .. } | ServiceError::EmbedDenied { .. } => Code::PermissionDenied,
            ServiceError::Unavailable | ServiceError::ShuttingDown | ServiceError::ModelUnavailable => {
                Code::Unavailable
            }
            ServiceError::Internal(_) => Code::Internal,
        }
    }
}

impl From<ServiceError> for tonic::Status {
    fn from(e: ServiceError) -> Self {
        if let ServiceError::Internal(detail) = &e {
            // The only place server faults are reported in full.
            tracing::error!(%detail, "internal error");
        }
        tonic::Status::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn internal_details_stay_on_the_server() {
        let status = tonic::Status::from(ServiceError::Internal(
            "relation \"templates\" is broken".to_owned(),
        ));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
        let status = tonic::Status::from(ServiceError::from(StoreError::Database(sqlx::Error::RowNotFound)));
        assert_eq!(status.message(), "internal error");
    }

    #[test]
    fn refused_checkpoints_and_failed_batches_keep_their_typed_causes() {
        use crate::batcher::ForwardError;
        use crate::reload::SelfTestError;
        let incompatible = ServiceError::IncompatibleModel(ReloadError::OtherSpace {
            space: "b".to_owned(),
            compatible: Vec::new(),
            active: "a".to_owned(),
        });
        assert!(matches!(
            &incompatible,
            ServiceError::IncompatibleModel(ReloadError::OtherSpace { active, .. }) if active == "a"
        ));
        let status = tonic::Status::from(incompatible);
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            "checkpoint refused: the checkpoint's embedding space \"b\" (compatible with []) is not the \
             active model's \"a\"; stage it as a migration (RELOAD_MODE_STAGE_MIGRATION) and promote it \
             once enrolments cover the galleries"
        );
        let status = tonic::Status::from(ServiceError::BadCheckpoint {
            path: "/models/next".to_owned(),
            reason: SelfTestError::Norm(0.5).into(),
        });
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "checkpoint /models/next refused: self-test embedding has norm 0.5, not 1"
        );
        // A failed forward pass is a server fault: its cause stays here.
        let failed = BatchError::Forward(std::sync::Arc::new(ForwardError::Injected));
        let status = tonic::Status::from(ServiceError::from(failed));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }

    #[test]
    fn codes_follow_the_api_contract() {
        let cases = [
            (ServiceError::TopK { got: 0, max: 10 }, Code::InvalidArgument),
            (
                ServiceError::BadImage {
                    index: 2,
                    problem: ImageProblem::Empty,
                },
                Code::InvalidArgument,
            ),
            (ServiceError::GalleryNotFound("g".to_owned()), Code::NotFound),
            (ServiceError::IdempotencyKeyReused, Code::AlreadyExists),
            (
                ServiceError::ModelChanged {
                    embedded_by: "c".to_owned(),
                    serving: "a".to_owned(),
                },
                Code::Aborted,
            ),
            (
                ServiceError::from(StoreError::Unavailable(sqlx::Error::PoolTimedOut)),
                Code::Unavailable,
            ),
        ];
        for (error, code) in cases {
            assert_eq!(tonic::Status::from(error).code(), code);
        }
        let status = tonic::Status::from(ServiceError::BadImage {
            index: 2,
            problem: ImageProblem::TooManyBytes { bytes: 10, max: 5 },
        });
        assert_eq!(status.message(), "image 2 is 10 bytes, over the limit of 5");
    }
}
