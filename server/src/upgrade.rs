//! `handid-server upgrade-templates`: maps the stored templates of an old
//! model into a new model's embedding space with a template transformation
//! (Ramanujan et al., "Forward Compatible Training for Large-Scale Embedding
//! Retrieval Systems", CVPR 2022), without a single image: the new model
//! covers every subject without re-enrolment, and is then promoted.
//!
//! The run is an operator's, beside the serving replicas, on the same
//! database:
//! 1. the new model is staged (ReloadModel, RELOAD_MODE_STAGE_MIGRATION):
//!    Identify keeps answering with the old one, enrolments are dual;
//! 2. this command walks the old model's templates in enrolment order, in
//!    batches: each batch is mapped and inserted in one statement (one
//!    transaction), each new row naming its source (`derived_from`). The
//!    insert trigger records one change per subject, so every replica adds
//!    the new templates to its staged model's index, and GetModel's
//!    coverage grows batch by batch;
//! 3. PromoteModel (with `require_full_coverage`) makes the new model the
//!    active one.
//!
//! A transform fitted with side-information (`fit-transform --side-info S`)
//! takes, beside each template, S's feature of the same image, which a
//! server with `model.side_info: S` stored at enrolment
//! (`template_side_info`); the run refuses to start while a template to map
//! lacks it, and each derived template keeps a copy of its source's.
//!
//! Resumable and idempotent: a template is done when a row of the new model
//! derived from it exists (a unique index holds one per source and model),
//! so a run stopped anywhere (ctrl-c, a crash, a lost database) loses at
//! most its batch in flight, and the next run goes on where it stopped; two
//! runs at once insert each template once. A source deleted meanwhile (a
//! DeleteSubject) is skipped; one being deleted while its batch is written
//! makes the batch roll back and be read again.

use std::sync::atomic::{AtomicBool, Ordering};

use handid_model::transform::{TemplateTransform, TransformManifest};
use tch::Tensor;

use crate::store::{ModelRow, SourceTemplate, Store, StoreError};

/// Retries of a batch that lost to a concurrent deletion.
const CONFLICT_RETRIES: u32 = 5;

/// How an upgrade runs.
#[derive(Debug, Clone)]
pub struct UpgradeOptions {
    /// Templates mapped and inserted per transaction.
    pub batch_size: usize,
    /// Stop after this many templates (spreading the work over several
    /// runs); `None`: all of them.
    pub limit: Option<u64>,
}

impl Default for UpgradeOptions {
    fn default() -> Self {
        Self {
            batch_size: 500,
            limit: None,
        }
    }
}

/// Progress after a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Templates derived by this run so far.
    pub derived: u64,
    /// Templates this run set out to derive.
    pub total: u64,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgraded {
    /// The old model.
    pub from: ModelRow,
    /// The new model.
    pub to: ModelRow,
    /// Templates derived by this run.
    pub derived: u64,
    /// Batches committed.
    pub batches: u64,
    /// Templates of the old model still without a derived one (0 when
    /// done; more after a limit or a stop).
    pub remaining: u64,
    /// Whether the run was asked to stop before its end.
    pub stopped: bool,
}

/// Why an upgrade cannot start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// A model of the transform is not in the database.
    #[error(
        "the database records no model {model_id} (the transform's {which} model): is this the \
         database of the service that served it?"
    )]
    UnknownModel {
        /// `old` or `new`.
        which: &'static str,
        /// Its id.
        model_id: String,
    },
    /// The new model is neither staged nor active.
    #[error(
        "model {model_id} is {role}: stage it first (ReloadModel with RELOAD_MODE_STAGE_MIGRATION \
         and its folder; `handid model reload --stage --path FOLDER`), so Identify keeps \
         answering with the active model and enrolments are dual while the templates are upgraded"
    )]
    NotStaged {
        /// The new model.
        model_id: String,
        /// Its recorded role.
        role: String,
    },
    /// The transform and the database disagree about a model.
    #[error(
        "the transform's {which} model {model_id} is of space {manifest_space:?} and {manifest_dim} \
         dimensions, but the database records space {recorded_space:?} and {recorded_dim}"
    )]
    Mismatch {
        /// `old` or `new`.
        which: &'static str,
        /// The model.
        model_id: String,
        /// Its space, by the transform.
        manifest_space: String,
        /// Its width, by the transform.
        manifest_dim: usize,
        /// Its space, by the database.
        recorded_space: String,
        /// Its width, by the database.
        recorded_dim: usize,
    },
    /// The transform maps a model to itself.
    #[error("the transform maps model {0} to itself")]
    SameModel(String),
    /// Templates to map lack the side-information the transform needs.
    #[error(
        "the transform needs the side-information of model {side_model} beside each template, and \
         {missing} templates of model {from_model} still to map have none (enrolled while the \
         server had no model.side_info, or another one): configure model.side_info with that \
         model and re-enrol those subjects, or fit the transform without --side-info"
    )]
    SideInformation {
        /// The side-information model the transform names.
        side_model: String,
        /// The old model.
        from_model: String,
        /// Its templates without that model's feature.
        missing: u64,
    },
    /// The transform failed or produced a vector that is no template.
    #[error("the transform failed on template {template_id}: {reason}")]
    Transform {
        /// The source template.
        template_id: uuid::Uuid,
        /// What went wrong.
        reason: String,
    },
    /// The database failed; what was committed stays, a new run resumes.
    #[error("{0} (the batches committed so far are kept: run the command again to resume)")]
    Store(#[from] StoreError),
}

/// Checks that the transform fits the database: both models recorded with
/// the transform's spaces and widths, the new one staged or active.
pub async fn check(
    store: &Store,
    manifest: &TransformManifest,
) -> Result<(ModelRow, ModelRow), UpgradeError> {
    if manifest.from_model == manifest.to_model {
        return Err(UpgradeError::SameModel(manifest.from_model.clone()));
    }
    let recorded = |which: &'static str, model_id: &str, space: &str, dim: usize| {
        let store = store.clone();
        let (model_id, space) = (model_id.to_owned(), space.to_owned());
        async move {
            let row = store
                .model_row(&model_id)
                .await?
                .ok_or_else(|| UpgradeError::UnknownModel {
                    which,
                    model_id: model_id.clone(),
                })?;
            if row.embedding_space != space || row.embedding_dim != dim {
                return Err(UpgradeError::Mismatch {
                    which,
                    model_id,
                    manifest_space: space,
                    manifest_dim: dim,
                    recorded_space: row.embedding_space,
                    recorded_dim: row.embedding_dim,
                });
            }
            Ok(row)
        }
    };
    let from = recorded(
        "old",
        &manifest.from_model,
        &manifest.from_space,
        manifest.from_dim,
    )
    .await?;
    let to = recorded("new", &manifest.to_model, &manifest.to_space, manifest.to_dim).await?;
    if to.role != "staged" && to.role != "active" {
        return Err(UpgradeError::NotStaged {
            model_id: to.model_id,
            role: to.role,
        });
    }
    if let Some(side) = &manifest.side_info {
        let missing = store
            .count_underived_without_side(&from.model_id, &to.model_id, &side.model)
            .await?;
        if missing > 0 {
            return Err(UpgradeError::SideInformation {
                side_model: side.model.clone(),
                from_model: from.model_id,
                missing,
            });
        }
    }
    Ok((from, to))
}

/// Upgrades the old model's templates (see the module's documentation),
/// calling `progress` after each committed batch, until every template is
/// done, `options.limit` is reached or `stop` is set (checked between
/// batches).
pub async fn upgrade_templates(
    store: &Store,
    transform: &TemplateTransform,
    options: &UpgradeOptions,
    stop: &AtomicBool,
    mut progress: impl FnMut(Progress),
) -> Result<Upgraded, UpgradeError> {
    let (from, to) = check(store, transform.manifest()).await?;
    let batch_size = options.batch_size.max(1);
    let underived = store.count_underived(&from.model_id, &to.model_id).await?;
    let total = options.limit.map_or(underived, |limit| limit.min(underived));
    let (mut derived, mut batches, mut stopped) = (0u64, 0u64, false);
    // Passes over the templates in enrolment order; another pass only when
    // the last one derived something and some remain (a template whose
    // number was taken before the cursor passed it but committed after).
    'passes: loop {
        let (mut cursor, mut derived_in_pass) = (0i64, 0u64);
        loop {
            if stop.load(Ordering::Relaxed) {
                stopped = true;
                break 'passes;
            }
            let room = options
                .limit
                .map_or(u64::MAX, |limit| limit.saturating_sub(derived));
            if room == 0 {
                break 'passes;
            }
            let want = usize::try_from(room).unwrap_or(usize::MAX).min(batch_size);
            let Some((inserted, last_seq)) = derive_batch(store, transform, &from, &to, cursor, want).await?
            else {
                break;
            };
            cursor = last_seq;
            derived += inserted;
            derived_in_pass += inserted;
            batches += 1;
            progress(Progress {
                derived,
                total: total.max(derived),
            });
        }
        if derived_in_pass == 0 || store.count_underived(&from.model_id, &to.model_id).await? == 0 {
            break;
        }
    }
    let remaining = store.count_underived(&from.model_id, &to.model_id).await?;
    Ok(Upgraded {
        from,
        to,
        derived,
        batches,
        remaining,
        stopped,
    })
}

/// Reads, maps and inserts the next batch after `cursor`: `None` when no
/// template is left there, else the rows inserted and the last enrolment
/// number read. A batch that lost to a concurrent deletion is read again.
async fn derive_batch(
    store: &Store,
    transform: &TemplateTransform,
    from: &ModelRow,
    to: &ModelRow,
    cursor: i64,
    want: usize,
) -> Result<Option<(u64, i64)>, UpgradeError> {
    let mut attempt = 0;
    loop {
        let side_model = transform.side_info().map(|side| side.model.as_str());
        let sources = store
            .underived_templates(&from.model_id, &to.model_id, side_model, cursor, want)
            .await?;
        let Some(last_seq) = sources.last().map(|s| s.seq) else {
            return Ok(None);
        };
        let mapped = map(transform, &sources, to.embedding_dim)?;
        match store.insert_derived(&to.model_id, &mapped).await {
            Ok(inserted) => return Ok(Some((inserted, last_seq))),
            // CancelMigration on a replica meanwhile.
            Err(StoreError::ModelRetired(model_id)) => {
                return Err(UpgradeError::NotStaged {
                    model_id,
                    role: "retired".to_owned(),
                });
            }
            Err(StoreError::Conflict(reason)) if attempt < CONFLICT_RETRIES => {
                attempt += 1;
                tracing::info!(%reason, attempt, "a batch lost to a concurrent change; reading it again");
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The new-space templates of `sources`, each checked: `dim` finite values.
fn map(
    transform: &TemplateTransform,
    sources: &[SourceTemplate],
    dim: usize,
) -> Result<Vec<(uuid::Uuid, Vec<f32>)>, UpgradeError> {
    let width = transform.manifest().from_dim;
    let side_width = transform.side_info().map(|side| side.dim);
    let failed = |template_id, reason: String| UpgradeError::Transform { template_id, reason };
    let mut flat = Vec::with_capacity(sources.len() * width);
    let mut side_flat = Vec::with_capacity(sources.len() * side_width.unwrap_or(0));
    for source in sources {
        if source.embedding.len() != width {
            return Err(failed(
                source.template_id,
                format!(
                    "it has {} values, the transform maps {width}",
                    source.embedding.len()
                ),
            ));
        }
        flat.extend_from_slice(&source.embedding);
        if let Some(side_width) = side_width {
            // Enrolled by a server without the side model after the check.
            let side = source.side.as_deref().ok_or_else(|| {
                failed(
                    source.template_id,
                    "no side-information is stored beside it (enrolled by a server without \
                     model.side_info)"
                        .to_owned(),
                )
            })?;
            if side.len() != side_width {
                return Err(failed(
                    source.template_id,
                    format!(
                        "its side-information has {} values, the transform takes {side_width}",
                        side.len()
                    ),
                ));
            }
            side_flat.extend_from_slice(side);
        }
    }
    let rows = sources.len() as i64;
    let old = Tensor::from_slice(&flat).view([rows, width as i64]);
    let side = side_width.map(|w| Tensor::from_slice(&side_flat).view([rows, w as i64]));
    let new = transform
        .apply(&old, side.as_ref())
        .and_then(|t| Vec::<f32>::try_from(&t.contiguous().view([-1])).map_err(Into::into))
        .map_err(|e| failed(sources[0].template_id, e.to_string()))?;
    if new.len() != sources.len() * dim {
        return Err(failed(
            sources[0].template_id,
            format!(
                "it gave {} values for {} templates of {dim}",
                new.len(),
                sources.len()
            ),
        ));
    }
    sources
        .iter()
        .zip(new.chunks(dim))
        .map(|(source, values)| {
            if values.iter().any(|v| !v.is_finite()) {
                return Err(failed(source.template_id, "a value is not finite".to_owned()));
            }
            Ok((source.template_id, values.to_vec()))
        })
        .collect()
}
