//! The Admin service's calls: the serving model, reloads, migrations
//! (staged, promoted or cancelled).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;

use super::{Engine, Result, types::*};
use crate::audit::code_name;
use crate::batcher::Batcher;
use crate::error::ServiceError;
use crate::index::Indexes;
use crate::live::{LiveSettings, SettingsReloaded};
use crate::reload::{self, ReloadMode};
use crate::store::{Coverage, ModelRecord, Promotion, RecordedModel, Role, Rollback};
use crate::telemetry::metrics;

/// Why a checkpoint is loaded.
#[derive(Debug, Clone, Copy)]
enum Purpose<'a> {
    /// An operator's reload (ReloadModel, SIGHUP).
    Reload(ReloadMode),
    /// At start, staging again the recorded staged model of this id.
    Restore(&'a str),
    /// RollbackModel, to the previous active model of this id (`to`),
    /// provided the active one is still `from` when one is given.
    Rollback { to: &'a str, from: Option<&'a str> },
    /// Following another replica's change: the database records the model
    /// of this id in this role already.
    Follow(&'a str, Role),
}

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
            rollback_target: self.store.previous_active().await?,
            side_info: self.pipeline.side.as_ref().map(|side| side.model.clone()),
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
            let result = engine.reload_inner(path, Purpose::Reload(mode)).await;
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
                .reload_inner(Some(path.clone()), Purpose::Restore(&expected))
                .await;
            engine
                .audited_reload(&caller, result, Some(path), ReloadMode::StageMigration, from)
                .await
        })
        .await
    }

    /// Reads the settings file again and applies its keys and grants
    /// ([`LiveSettings::reload`]); audited (`reload_settings`) with the
    /// file, the ids added, removed and changed, and the settings that wait
    /// for a restart, or the reason nothing changed.
    pub async fn reload_settings(&self, caller: &Caller, live: &LiveSettings) -> Result<SettingsReloaded> {
        let result = live
            .reload()
            .map_err(|e| ServiceError::SettingsRefused(e.to_string()));
        let detail = match &result {
            Ok(r) => {
                if !r.restart_required.is_empty() {
                    tracing::warn!(
                        settings = ?r.restart_required,
                        "settings changed in the file apply at the next start"
                    );
                }
                tracing::info!(
                    path = %r.path.display(),
                    keys = r.keys,
                    added = ?r.added,
                    removed = ?r.removed,
                    changed = ?r.changed,
                    "settings reloaded: the new keys are in force"
                );
                serde_json::json!({
                    "path": r.path.display().to_string(),
                    "keys": r.keys,
                    "certificate_grants": r.certificate_grants,
                    "added": r.added,
                    "removed": r.removed,
                    "changed": r.changed,
                    "restart_required": r.restart_required,
                })
            }
            Err(e) => {
                tracing::error!(reason = %e, "settings reload refused; the running keys stay in force");
                serde_json::json!({ "reason": e.to_string() })
            }
        };
        let model_id = self.model_id();
        self.audited_change(caller, "reload_settings", result, &model_id, &detail)
            .await
    }

    /// Makes the model that was active before the active one (the most
    /// recently replaced, as the database records it) active again, loaded
    /// from its recorded folder with the checks of a reload, whatever its
    /// embedding space. Refused while a migration is staged, without a
    /// previous model, when its folder holds another model now, and when a
    /// subject has no template it can compare (enrolled after it was
    /// replaced, by a model of another space). With `expected_active`,
    /// refused unless that model is the active one, here and in the
    /// database as the rollback is recorded: a retry of a rollback whose
    /// answer was lost changes nothing instead of rolling forward again.
    /// Detached and audited (`rollback`) as a reload.
    pub async fn rollback(
        self: &Arc<Self>,
        caller: &Caller,
        expected_active: Option<String>,
    ) -> Result<Reloaded> {
        let (engine, caller) = (Arc::clone(self), caller.clone());
        self.detach(async move {
            let from = engine.model_id();
            let (result, target) = engine.rollback_inner(expected_active.as_deref()).await;
            let mut detail = serde_json::json!({ "from_model": from });
            if let Some(target) = &target {
                detail["to_model"] = target.model_id.clone().into();
                detail["path"] = target.path.clone().into();
            }
            if let Err(e) = &result {
                detail["reason"] = e.to_string().into();
            }
            let outcome = match &result {
                Ok(_) => "ok".to_owned(),
                Err(e) => code_name(e.code()),
            };
            metrics().model_reloaded(&outcome);
            let model_id = engine.model_id();
            engine
                .audited_change(&caller, "rollback", result, &model_id, &detail)
                .await
        })
        .await
    }

    /// The rollback, and the model it went back to (or tried to).
    async fn rollback_inner(
        &self,
        expected_active: Option<&str>,
    ) -> (Result<Reloaded>, Option<RecordedModel>) {
        let _one = self.reloading.lock().await;
        if let Some(expected) = expected_active
            && self.model_id() != expected
        {
            return (Err(not_active(expected, Some(&self.model_id()))), None);
        }
        if let Some(staged) = self.staged() {
            let reason = format!(
                "a migration to model {} is staged: promote it before rolling back",
                staged.model_id()
            );
            return (Err(ServiceError::RollbackRefused(reason)), None);
        }
        let target = match self.store.previous_active().await {
            Ok(Some(target)) => target.model,
            Ok(None) => {
                let reason = format!(
                    "model {} is the only model this database has served: there is nothing to roll \
                     back to",
                    self.model_id()
                );
                return (Err(ServiceError::RollbackRefused(reason)), None);
            }
            Err(e) => return (Err(e.into()), None),
        };
        let Some(path) = target.path.clone() else {
            let reason = format!(
                "model {} was recorded without its folder: reload it with ReloadModel and a path",
                target.model_id
            );
            return (Err(ServiceError::RollbackRefused(reason)), Some(target));
        };
        let result = self
            .load_and_publish(
                PathBuf::from(path),
                Purpose::Rollback {
                    to: &target.model_id,
                    from: expected_active,
                },
            )
            .await;
        (result, Some(target))
    }

    /// Subjects that no template of `spaces` covers, per gallery, as
    /// RollbackModel's refusal.
    async fn uncovered(&self, spaces: &[String], model_id: &str) -> Result<()> {
        refuse_uncovered(self.store.coverage(spaces).await?, model_id)
    }

    /// A reload or the restoration of a staged model, one at a time.
    async fn reload_inner(&self, path: Option<PathBuf>, purpose: Purpose<'_>) -> Result<Reloaded> {
        let _one = self.reloading.lock().await;
        let path = path.unwrap_or_else(|| self.active().model.path.clone());
        self.load_and_publish(path, purpose).await
    }

    /// Loads `path` on the side, checks it for `purpose`, loads its
    /// indexes and publishes it as the active or the staged model. The
    /// caller holds `reloading`.
    async fn load_and_publish(&self, path: PathBuf, purpose: Purpose<'_>) -> Result<Reloaded> {
        let active = self.active();
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
        let compatible = reload::compatible(active.model.embedder.manifest(), embedder.manifest());
        let staging = match (compatible, purpose) {
            // The database's decision, checked by the replica that made it.
            (_, Purpose::Follow(expected, role)) => {
                if embedder.model_id() != expected {
                    return Err(ServiceError::Internal(format!(
                        "{} now holds model {}, not model {expected} that the database records as {}",
                        path.display(),
                        embedder.model_id(),
                        role.as_str()
                    )));
                }
                role == Role::Staged
            }
            // Going back: the templates decide, not the direction of
            // compatibility (checked below, and again as it is recorded).
            (_, Purpose::Rollback { .. }) => false,
            (Ok(()), _) => false,
            (Err(_), Purpose::Reload(ReloadMode::StageMigration) | Purpose::Restore(_)) => true,
            (Err(reason), Purpose::Reload(ReloadMode::Swap)) => {
                return Err(ServiceError::IncompatibleModel(reason));
            }
        };
        if let Purpose::Rollback { to: expected, .. } = purpose {
            if embedder.model_id() != expected {
                return Err(ServiceError::RollbackRefused(format!(
                    "{} now holds model {}, not model {expected}: put model {expected} back in its \
                     folder, or reload the model you want with ReloadModel",
                    path.display(),
                    embedder.model_id()
                )));
            }
            self.uncovered(&reload::spaces(embedder.manifest()), expected)
                .await?;
        }
        if let Purpose::Restore(expected) = purpose
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
                Arc::new(Indexes::new(embedder.dim(), device, self.pipeline.search.clone()))
            },
            model,
            batcher,
            spaces,
        });
        let role = if staging { Role::Staged } else { Role::Active };
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
            // The database records the change first, still with writers
            // held off, so this replica's writers see the database and this
            // slot agree (a write that finds this model serving finds the
            // database recording it), and a refusal changes nothing here. A
            // restart and every other replica then serve this model (the
            // model it replaces retired); a replica following that record
            // has nothing to write.
            let path = slot.model.path.display().to_string();
            match purpose {
                Purpose::Follow(..) => {}
                // The coverage checked again in the transaction that records
                // the rollback, after every enrolment that could still add a
                // subject without a template of this model (here, before
                // writers were held off, or on another replica) committed;
                // later ones are refused ([`crate::store::Store::enroll`]).
                Purpose::Rollback { to, from } => {
                    match self
                        .store
                        .roll_back_to(slot.model_id(), &path, &slot.spaces, from)
                        .await?
                    {
                        Rollback::Recorded => {}
                        Rollback::Uncovered(lacking) => refuse_uncovered(lacking, to)?,
                        Rollback::NotActive(active) => {
                            return Err(not_active(from.unwrap_or_default(), active.as_deref()));
                        }
                    }
                }
                _ => {
                    self.store.assign_role(slot.model_id(), role, &path).await?;
                }
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
        tracing::info!(
            previous = %active.model_id(),
            loaded = %slot.model_id(),
            role = role.as_str(),
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
            // A first look, before the catch-up: most refusals come here.
            let lacking: Vec<Coverage> = self
                .store
                .coverage(&staged.spaces)
                .await?
                .into_iter()
                .filter(|c| c.covered < c.subjects)
                .collect();
            if !lacking.is_empty() {
                return Err(coverage_incomplete(lacking));
            }
        }
        // The staged slot must hold every template the database has for it
        // before it serves. Those another process wrote (`handid-server
        // upgrade-templates`, another replica) reach it only through the
        // change feed, which nothing else applies on a server without
        // replication: applied here first with writers going on (to every
        // slot, as the follower does; without a follower, every change since
        // the start or the last promotion), then the few committed since
        // with writers held off, up to the publication.
        self.apply_changes().await?;
        let _applying = self.applying.lock().await;
        let _published = self.publishing.write().await;
        self.catch_up_slot(&staged, self.applied_change()).await?;
        // Recorded in one transaction, first: the staged model becomes the
        // active one, the previous active model is retired, unless another
        // replica cancelled the migration (its templates are gone) and this
        // one has not followed yet.
        // With full coverage required, checked again in that transaction,
        // after every enrolment that could still add a subject without a
        // template of the staged model (on a replica that has not followed
        // the staging) committed; later ones are refused.
        let promotion = self
            .store
            .promote_staged(
                staged.model_id(),
                &staged.model.path.display().to_string(),
                require_full_coverage.then_some(staged.spaces.as_slice()),
            )
            .await?;
        match promotion {
            Promotion::Recorded => {}
            Promotion::NotStaged => {
                return Err(ServiceError::NoMigration(format!(
                    "model {} is no longer staged in the database (another replica cancelled the \
                     migration; this one follows within replication.poll_interval_ms)",
                    staged.model_id()
                )));
            }
            Promotion::Uncovered(lacking) => return Err(coverage_incomplete(lacking)),
        }
        let previous = self.publish_promotion(&staged);
        tracing::info!(previous = %previous.model_id(), active = %staged.model_id(), "staged model promoted");
        Ok(Promoted {
            active: staged.model.clone(),
            previous: previous.model.clone(),
        })
    }

    /// Abandons the staged migration: the database retires the staged model
    /// and deletes its templates but those still needed
    /// ([`crate::store::Store::cancel_staged`]), then this replica drops
    /// its staged slot; the active slot is not touched. Detached and
    /// audited (`cancel_migration`) as a promotion.
    pub async fn cancel_migration(self: &Arc<Self>, caller: &Caller) -> Result<Cancelled> {
        let (engine, caller) = (Arc::clone(self), caller.clone());
        self.detach(async move {
            let staged = engine.staged().map(|s| s.model_id().to_owned());
            let result = engine.cancel_inner().await;
            let mut detail = serde_json::json!({ "cancelled_model": staged });
            match &result {
                Ok(c) => {
                    detail["path"] = c.cancelled.path.display().to_string().into();
                    detail["templates_deleted"] = c.templates.templates_deleted.into();
                    detail["templates_kept"] = c.templates.templates_kept.into();
                    detail["subjects_without_active_templates"] = c.templates.subjects_without_active.into();
                    detail["rollback_target"] = c.templates.rollback_target.into();
                }
                Err(e) => detail["reason"] = e.to_string().into(),
            }
            let model_id = engine.model_id();
            engine
                .audited_change(&caller, "cancel_migration", result, &model_id, &detail)
                .await
        })
        .await
    }

    async fn cancel_inner(&self) -> Result<Cancelled> {
        let _one = self.reloading.lock().await;
        let staged = self
            .staged()
            .ok_or_else(|| ServiceError::NoMigration("no model is staged".to_owned()))?;
        let active = self.active();
        // Recorded first: a refusal or a database failure leaves the
        // migration as it was, here and everywhere.
        let templates = self
            .store
            .cancel_staged(staged.model_id(), &active.spaces)
            .await?
            .ok_or_else(|| {
                ServiceError::NoMigration(format!(
                    "model {} is no longer staged in the database (another replica promoted or \
                     cancelled it; this one follows within replication.poll_interval_ms)",
                    staged.model_id()
                ))
            })?;
        {
            // Writers are held off while the slot goes, as when following
            // a cancellation.
            let _published = self.publishing.write().await;
            *self
                .staged
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        }
        if templates.subjects_without_active > 0 {
            tracing::warn!(
                cancelled = %staged.model_id(),
                subjects = templates.subjects_without_active,
                "subjects without a template of the active model keep their templates of the \
                 cancelled model: re-enrol them, or delete them"
            );
        }
        tracing::info!(
            active = %active.model_id(),
            cancelled = %staged.model_id(),
            deleted = templates.templates_deleted,
            kept = templates.templates_kept,
            rollback_target = templates.rollback_target,
            "migration cancelled"
        );
        Ok(Cancelled {
            active: active.model.clone(),
            cancelled: staged.model.clone(),
            templates,
        })
    }

    /// The staged slot becomes the active one; returns the slot it replaced.
    fn publish_promotion(&self, staged: &Arc<Slot>) -> Arc<Slot> {
        let mut active = self
            .active
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut slot = self
            .staged
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *slot = None;
        std::mem::replace(&mut *active, Arc::clone(staged))
    }

    /// Brings this replica's models in line with the roles the database
    /// records, when another replica changed them (a swap, a staging, a
    /// promotion, a cancellation, a rollback, an adoption): a staged model that became the
    /// active one is promoted here too, other models are loaded from their
    /// recorded folders, a staged model no longer recorded is dropped. The
    /// change-feed follower calls it on every role notification and poll. A
    /// recorded model that does not load here keeps this replica NOT_SERVING
    /// ([`Self::unfollowed`]) until it does. Returns whether anything changed.
    pub async fn follow_roles(&self) -> Result<bool> {
        let roles = self.store.model_roles().await?;
        if self.roles_match(&roles) {
            self.set_unfollowed(None);
            return Ok(false);
        }
        // A change of this replica's own is in progress: it records itself,
        // and the next poll compares again.
        let Ok(_one) = self.reloading.try_lock() else {
            return Ok(false);
        };
        let roles = self.store.model_roles().await?;
        let result = self.follow_locked(&roles).await;
        match &result {
            Ok(changed) => {
                self.set_unfollowed(None);
                if *changed {
                    tracing::info!(
                        active = %self.model_id(),
                        staged = ?self.staged().map(|s| s.model_id().to_owned()),
                        "followed another replica's model change"
                    );
                }
            }
            Err(e) => {
                let reason = match e {
                    ServiceError::Internal(detail) => detail.clone(),
                    other => other.to_string(),
                };
                tracing::error!(%reason, "cannot serve the models the database records");
                self.set_unfollowed(Some(format!(
                    "another replica changed the models and this one cannot follow: {reason}"
                )));
            }
        }
        result
    }

    /// Whether this replica serves the recorded active and staged models.
    fn roles_match(&self, roles: &crate::store::ModelRoles) -> bool {
        let active = self.active();
        let active_matches = roles
            .active
            .as_ref()
            .is_none_or(|m| m.model_id == active.model_id());
        let staged = self.staged();
        active_matches
            && roles.staged.as_ref().map(|m| m.model_id.as_str()) == staged.as_ref().map(|s| s.model_id())
    }

    async fn follow_locked(&self, roles: &crate::store::ModelRoles) -> Result<bool> {
        let folder = |m: &RecordedModel| {
            m.path.clone().map(PathBuf::from).ok_or_else(|| {
                ServiceError::Internal(format!("model {} was recorded without its folder", m.model_id))
            })
        };
        let mut changed = false;
        if let Some(recorded) = &roles.active
            && recorded.model_id != self.active().model_id()
        {
            match self.staged() {
                Some(staged) if staged.model_id() == recorded.model_id => {
                    let _published = self.publishing.write().await;
                    self.publish_promotion(&staged);
                }
                _ => {
                    self.load_and_publish(
                        folder(recorded)?,
                        Purpose::Follow(&recorded.model_id, Role::Active),
                    )
                    .await?;
                }
            }
            changed = true;
        }
        let staged = self.staged();
        match (&roles.staged, staged) {
            (Some(recorded), local)
                if local.as_ref().map(|s| s.model_id()) != Some(recorded.model_id.as_str()) =>
            {
                // Identify does not need the staged model: a replica that
                // cannot load it keeps serving (its enrolments are not dual,
                // and GetModel's coverage shows it) and tries again at the
                // next poll.
                let staged = match folder(recorded) {
                    Ok(path) => {
                        self.load_and_publish(path, Purpose::Follow(&recorded.model_id, Role::Staged))
                            .await
                    }
                    Err(e) => Err(e),
                };
                match staged {
                    Ok(_) => changed = true,
                    Err(e) => tracing::error!(
                        model_id = %recorded.model_id,
                        error = %e,
                        "cannot stage the model the database records as staged; enrolments here are not dual"
                    ),
                }
            }
            (None, Some(_)) => {
                let _published = self.publishing.write().await;
                *self
                    .staged
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
                changed = true;
            }
            _ => {}
        }
        Ok(changed)
    }

    /// Why this replica cannot serve the recorded models (health).
    pub fn unfollowed(&self) -> Option<String> {
        self.unfollowed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set_unfollowed(&self, reason: Option<String>) {
        *self
            .unfollowed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = reason;
    }
}

/// RollbackModel's refusal to go back to `model_id` while some subjects
/// have no template it compares (`coverage` of its spaces says which).
/// PromoteModel's refusal with full coverage required: the galleries
/// lacking it, each with its counts.
fn coverage_incomplete(lacking: Vec<Coverage>) -> ServiceError {
    let lacking: Vec<String> = lacking
        .into_iter()
        .map(|c| format!("{} ({} of {} subjects)", c.gallery_id, c.covered, c.subjects))
        .collect();
    ServiceError::CoverageIncomplete(lacking.join(", "))
}

/// RollbackModel's refusal when the model the caller expected to roll back
/// from is not the active one.
fn not_active(expected: &str, active: Option<&str>) -> ServiceError {
    ServiceError::RollbackRefused(format!(
        "model {expected} is not the active model ({}): a rollback already took effect, or \
         another change did; nothing changed",
        active.map_or_else(|| "none is recorded".to_owned(), |a| format!("{a} is"))
    ))
}

fn refuse_uncovered(coverage: Vec<Coverage>, model_id: &str) -> Result<()> {
    let lacking: Vec<String> = coverage
        .into_iter()
        .filter(|c| c.covered < c.subjects)
        .map(|c| {
            format!(
                "{} ({} of {} subjects)",
                c.gallery_id,
                c.subjects - c.covered,
                c.subjects
            )
        })
        .collect();
    if lacking.is_empty() {
        return Ok(());
    }
    Err(ServiceError::RollbackRefused(format!(
        "subjects have no template model {model_id} can compare (enrolled after it was \
         replaced, by a model of another embedding space): {}; stage model {model_id} as a \
         migration (ReloadModel RELOAD_MODE_STAGE_MIGRATION with its folder), re-enrol them \
         and promote it",
        lacking.join(", ")
    )))
}
