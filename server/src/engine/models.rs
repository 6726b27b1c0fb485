//! The Admin service's calls: the serving model, reloads, migrations.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;

use super::{Engine, Result, types::*};
use crate::audit::code_name;
use crate::batcher::Batcher;
use crate::error::ServiceError;
use crate::index::{Indexes, MAX_CHUNK_ROWS};
use crate::reload::{self, ReloadMode};
use crate::store::{ModelRecord, RecordedModel, Role};
use crate::telemetry::metrics;

impl Engine {
    /// What GetModel reports.
    pub async fn report(&self, caller: &Caller) -> Result<ModelReport> {
        let result = self.model_report().await;
        self.audited(caller, "get_model", None, result, |_| (None, None))
            .await
    }

    async fn model_report(&self) -> Result<ModelReport> {
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
    ///
    /// Detached from the call: a reload once begun runs to its end and is
    /// audited, whether or not the operator's client waits for it.
    pub async fn reload(
        self: &Arc<Self>,
        caller: &Caller,
        path: Option<PathBuf>,
        mode: ReloadMode,
    ) -> Result<Reloaded> {
        let (engine, caller) = (Arc::clone(self), caller.clone());
        self.detach(async move {
            let from = engine.model_id();
            let requested = path.clone();
            let result = engine.reload_inner(path, mode, None).await;
            let outcome = match &result {
                Ok(_) => "ok".to_owned(),
                Err(e) => code_name(e.code()),
            };
            metrics().model_reloaded(&outcome);
            engine
                .audited_reload(&caller, result, requested, mode, from)
                .await
        })
        .await
    }

    /// The audit row of a reload: the folder (the active one when none was
    /// named), the mode, the model it replaced or staged beside, the model
    /// it loaded, and the reason when refused.
    async fn audited_reload(
        &self,
        caller: &Caller,
        result: Result<Reloaded>,
        requested: Option<PathBuf>,
        mode: ReloadMode,
        from: String,
    ) -> Result<Reloaded> {
        let mut detail = serde_json::json!({
            "mode": match mode {
                ReloadMode::Swap => "swap",
                ReloadMode::StageMigration => "stage_migration",
            },
            "from_model": from,
        });
        let model_id = match &result {
            Ok(r) => {
                detail["path"] = r.loaded.path.display().to_string().into();
                detail["to_model"] = r.loaded.embedder.model_id().into();
                detail["staged"] = r.staged.into();
                r.loaded.embedder.model_id().to_owned()
            }
            Err(e) => {
                detail["path"] = requested
                    .unwrap_or_else(|| self.active().model.path.clone())
                    .display()
                    .to_string()
                    .into();
                detail["reason"] = e.to_string().into();
                self.model_id()
            }
        };
        self.audited_change(caller, "reload", result, &model_id, &detail)
            .await
    }

    /// At start: stages again the model the database records as staged
    /// (a migration in progress when the server stopped), from its recorded
    /// folder, provided the folder still holds that model and it still needs
    /// staging. Audited as a reload by `startup`.
    pub async fn restore_staged(self: &Arc<Self>, recorded: &RecordedModel) -> Result<Reloaded> {
        let path = recorded.path.clone().map(PathBuf::from).ok_or_else(|| {
            ServiceError::Internal(format!(
                "staged model {} has no recorded folder",
                recorded.model_id
            ))
        })?;
        let (engine, expected) = (Arc::clone(self), recorded.model_id.clone());
        let caller = Caller::named("startup", None);
        self.detach(async move {
            let from = engine.model_id();
            let result = engine
                .reload_inner(Some(path.clone()), ReloadMode::StageMigration, Some(&expected))
                .await;
            engine
                .audited_reload(&caller, result, Some(path), ReloadMode::StageMigration, from)
                .await
        })
        .await
    }

    /// A reload; with `restoring`, only the staging of that model id.
    async fn reload_inner(
        &self,
        path: Option<PathBuf>,
        mode: ReloadMode,
        restoring: Option<&str>,
    ) -> Result<Reloaded> {
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
            (Err(reason), ReloadMode::Swap) => return Err(ServiceError::IncompatibleModel(reason)),
        };
        if let Some(expected) = restoring
            && (embedder.model_id() != expected || !staging)
        {
            return Err(ServiceError::Internal(format!(
                "{} now holds model {}, {}: the staged model {expected} is not restored",
                path.display(),
                embedder.model_id(),
                if staging {
                    "another model"
                } else {
                    "one compatible with the active model"
                },
            )));
        }
        let manifest = embedder.manifest();
        if manifest.thresholds.is_empty() {
            tracing::warn!(
                model_id = %embedder.model_id(),
                path = %path.display(),
                "the loaded model has no calibrated thresholds: Identify and Verify without an \
                 explicit threshold are refused; run handid-trainer calibrate on the checkpoint"
            );
        }
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
        let batcher = Batcher::start(
            Arc::clone(&embedder),
            &self.pipeline.batch,
            Arc::clone(&self.pipeline.decoding),
        )
        .map_err(|e| ServiceError::Internal(format!("starting the forward thread: {e}")))?;
        // Same spaces, same width: the templates are the same, keep the index.
        let shared = !staging && spaces == active.spaces;
        let slot = Arc::new(Slot {
            indexes: if shared {
                Arc::clone(&active.indexes)
            } else {
                Arc::new(Indexes::new(embedder.dim(), device, MAX_CHUNK_ROWS))
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
        if let Some(pause) = crate::faults::after_index_load() {
            tokio::time::sleep(pause).await;
        }
        {
            // Under the change lock and with writers held off: changes
            // committed while the index loaded (here and on other replicas)
            // are applied to the new slot before any call can see it, and
            // none lands between the catch-up and the publication.
            let _applying = self.applying.lock().await;
            let _published = self.publishing.write().await;
            if !shared {
                self.catch_up_slot(&slot, from).await.map_err(|e| {
                    ServiceError::Internal(format!("catching the new model's indexes up: {e}"))
                })?;
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
        }
        let role = if staging { Role::Staged } else { Role::Active };
        // The database records the swap (the model it replaces retired), so
        // a restart and every replica starting later serve this model.
        self.store
            .assign_role(slot.model_id(), role, &slot.model.path.display().to_string())
            .await?;
        let role = role.as_str();
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
    /// Detached from the call, as a reload.
    pub async fn promote(self: &Arc<Self>, caller: &Caller, require_full_coverage: bool) -> Result<Promoted> {
        let (engine, caller) = (Arc::clone(self), caller.clone());
        self.detach(async move {
            let (from, to) = (
                engine.model_id(),
                engine.staged().map(|s| s.model_id().to_owned()),
            );
            let result = engine.promote_inner(require_full_coverage).await;
            let mut detail = serde_json::json!({
                "from_model": from,
                "to_model": to,
                "require_full_coverage": require_full_coverage,
            });
            if let Ok(p) = &result {
                detail["path"] = p.active.path.display().to_string().into();
                detail["to_model"] = p.active.embedder.model_id().into();
            }
            if let Err(e) = &result {
                detail["reason"] = e.to_string().into();
            }
            let model_id = engine.model_id();
            engine
                .audited_change(&caller, "promote", result, &model_id, &detail)
                .await
        })
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
        // Recorded in one transaction: the staged model becomes the active
        // one, the previous active model is retired.
        self.store
            .assign_role(
                staged.model_id(),
                Role::Active,
                &staged.model.path.display().to_string(),
            )
            .await?;
        tracing::info!(previous = %previous.model_id(), active = %staged.model_id(), "staged model promoted");
        Ok(Promoted {
            active: staged.model.clone(),
            previous: previous.model.clone(),
        })
    }
}
