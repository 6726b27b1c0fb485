//! The gRPC handlers: validate, convert to domain types, call the
//! [`Engine`], convert back. No logic lives here.

use std::sync::Arc;

use handid_proto::v1::{self as pb, admin_server::Admin, hand_id_server::HandId};
use tonic::{Request, Response, Status};

use crate::engine::{ActiveModel, Caller, Decision, Engine};
use crate::live::LiveSettings;
use crate::store::SubjectRecord;
use crate::telemetry::caller_text;
use crate::validate;

/// The `handid.v1.HandId` service.
#[derive(Debug, Clone)]
pub struct HandIdService {
    engine: Arc<Engine>,
}

/// The `handid.v1.Admin` service.
#[derive(Debug, Clone)]
pub struct AdminService {
    engine: Arc<Engine>,
    settings: Option<Arc<LiveSettings>>,
}

impl HandIdService {
    /// Serves `engine`.
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

impl AdminService {
    /// Serves `engine`; ReloadSettings is refused (no settings to reload).
    pub fn new(engine: Arc<Engine>) -> Self {
        Self {
            engine,
            settings: None,
        }
    }

    /// Serves `engine`; ReloadSettings reloads `settings`.
    pub fn with_settings(engine: Arc<Engine>, settings: Arc<LiveSettings>) -> Self {
        Self {
            engine,
            settings: Some(settings),
        }
    }
}

/// The audit log's "who", as the access-control layer established it
/// (`layers.rs`); a service mounted without that layer (in-process use)
/// sees an anonymous caller with the peer address.
fn caller<T>(request: &Request<T>) -> Caller {
    match request.extensions().get::<Caller>() {
        Some(caller) => caller.clone(),
        None => Caller::anonymous(request.remote_addr().map(|a| a.to_string())),
    }
}

fn decision(d: Decision) -> pb::Decision {
    pb::Decision {
        is_match: d.is_match,
        threshold: d.threshold,
        fmr: d.fmr,
    }
}

fn timestamp(t: chrono::DateTime<chrono::Utc>) -> handid_proto::Timestamp {
    handid_proto::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

fn subject_record(gallery_id: &str, s: SubjectRecord) -> pb::Subject {
    pb::Subject {
        gallery_id: gallery_id.to_owned(),
        subject_id: s.subject_id,
        templates: s
            .templates
            .into_iter()
            .map(|t| pb::TemplateInfo {
                template_id: t.template_id.to_string(),
                model_id: t.model_id,
                created_at: Some(timestamp(t.created_at)),
            })
            .collect(),
        created_at: Some(timestamp(s.created_at)),
    }
}

fn model_info(m: &ActiveModel) -> pb::ModelInfo {
    let manifest = m.embedder.manifest();
    pb::ModelInfo {
        model_id: manifest.model_id.clone(),
        embedding_space: manifest.embedding_space.clone(),
        compatible_spaces: manifest.compatible_spaces.clone(),
        architecture: manifest.architecture.clone(),
        embedding_dim: u32::try_from(manifest.embedding_dim).unwrap_or(u32::MAX),
        operating_points: manifest
            .thresholds
            .iter()
            .map(|p| pb::OperatingPoint {
                fmr: p.fmr,
                threshold: p.threshold,
            })
            .collect(),
        path: m.path.display().to_string(),
        device: m.device.clone(),
        loaded_at: Some(timestamp(m.loaded_at)),
        calibrated: !manifest.thresholds.is_empty(),
    }
}

#[tonic::async_trait]
impl HandId for HandIdService {
    #[tracing::instrument(skip_all, fields(gallery = %caller_text(&request.get_ref().gallery_id), images = request.get_ref().images.len()))]
    async fn enroll(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let caller = caller(&request);
        let call = validate::enroll(&caller, request.into_inner(), self.engine.limits())?;
        let (g, s) = (call.gallery.clone(), call.subject.clone());
        let out = self.engine.enroll(&caller, call).await?;
        Ok(Response::new(pb::EnrollResponse {
            gallery_id: g.as_str().to_owned(),
            subject_id: s.as_str().to_owned(),
            template_ids: out.templates.iter().map(|t| t.template_id.to_string()).collect(),
            template_count: out.template_count,
            replayed: out.replayed,
            model_id: out.model_id,
        }))
    }

    #[tracing::instrument(skip_all, fields(gallery = %caller_text(&request.get_ref().gallery_id), top_k = request.get_ref().top_k))]
    async fn identify(
        &self,
        request: Request<pb::IdentifyRequest>,
    ) -> Result<Response<pb::IdentifyResponse>, Status> {
        let caller = caller(&request);
        let call = validate::identify(&caller, request.into_inner(), self.engine.limits())?;
        let out = self.engine.identify(&caller, call).await?;
        let matched_subject_id = match (out.decision.is_match, out.hits.first()) {
            (true, Some(top)) => top.subject_id.clone(),
            _ => String::new(),
        };
        Ok(Response::new(pb::IdentifyResponse {
            candidates: out
                .hits
                .into_iter()
                .zip(1u32..)
                .map(|(h, rank)| pb::Candidate {
                    subject_id: h.subject_id,
                    score: h.score,
                    rank,
                })
                .collect(),
            decision: Some(decision(out.decision)),
            matched_subject_id,
            gallery_size: out.gallery_size,
            model_id: out.model_id,
        }))
    }

    #[tracing::instrument(skip_all, fields(gallery = %caller_text(&request.get_ref().gallery_id)))]
    async fn verify(
        &self,
        request: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let caller = caller(&request);
        let call = validate::verify(&caller, request.into_inner())?;
        let out = self.engine.verify(&caller, call).await?;
        Ok(Response::new(pb::VerifyResponse {
            score: out.score,
            decision: Some(decision(out.decision)),
            model_id: out.model_id,
        }))
    }

    #[tracing::instrument(skip_all, fields(images = request.get_ref().images.len()))]
    async fn embed(&self, request: Request<pb::EmbedRequest>) -> Result<Response<pb::EmbedResponse>, Status> {
        let caller = caller(&request);
        caller.check_embed()?;
        let images = validate::embed(request.into_inner(), self.engine.limits())?;
        let out = self.engine.embed(&caller, images).await?;
        Ok(Response::new(pb::EmbedResponse {
            dimension: u32::try_from(out.dim).unwrap_or(u32::MAX),
            embeddings: out
                .embeddings
                .into_iter()
                .map(|values| pb::Embedding { values })
                .collect(),
            model_id: out.model_id,
        }))
    }

    #[tracing::instrument(skip_all, fields(gallery = %caller_text(&request.get_ref().gallery_id)))]
    async fn delete_subject(
        &self,
        request: Request<pb::DeleteSubjectRequest>,
    ) -> Result<Response<pb::DeleteSubjectResponse>, Status> {
        let caller = caller(&request);
        let r = request.into_inner();
        let (g, s) = (
            validate::gallery(&caller, r.gallery_id)?,
            validate::subject(r.subject_id)?,
        );
        let templates_deleted = self.engine.delete_subject(&caller, g, s).await?;
        Ok(Response::new(pb::DeleteSubjectResponse {
            templates_deleted,
            model_id: self.engine.model_id().to_owned(),
        }))
    }

    #[tracing::instrument(skip_all, fields(gallery = %caller_text(&request.get_ref().gallery_id)))]
    async fn delete_gallery(
        &self,
        request: Request<pb::DeleteGalleryRequest>,
    ) -> Result<Response<pb::DeleteGalleryResponse>, Status> {
        let caller = caller(&request);
        let g = validate::gallery(&caller, request.into_inner().gallery_id)?;
        let erased = self.engine.delete_gallery(&caller, g).await?;
        Ok(Response::new(pb::DeleteGalleryResponse {
            subjects_deleted: erased.subjects,
            templates_deleted: erased.templates,
            model_id: self.engine.model_id().to_owned(),
        }))
    }

    #[tracing::instrument(skip_all, fields(gallery = %caller_text(&request.get_ref().gallery_id)))]
    async fn get_subject(
        &self,
        request: Request<pb::GetSubjectRequest>,
    ) -> Result<Response<pb::GetSubjectResponse>, Status> {
        let caller = caller(&request);
        let r = request.into_inner();
        let (g, s) = (
            validate::gallery(&caller, r.gallery_id)?,
            validate::subject(r.subject_id)?,
        );
        let record = self.engine.get_subject(&caller, g.clone(), s).await?;
        Ok(Response::new(pb::GetSubjectResponse {
            subject: Some(subject_record(g.as_str(), record)),
            model_id: self.engine.model_id().to_owned(),
        }))
    }

    #[tracing::instrument(skip_all, fields(gallery = %caller_text(&request.get_ref().gallery_id)))]
    async fn list_subjects(
        &self,
        request: Request<pb::ListSubjectsRequest>,
    ) -> Result<Response<pb::ListSubjectsResponse>, Status> {
        let caller = caller(&request);
        let call = validate::list(&caller, request.into_inner())?;
        let g = call.gallery.clone();
        let page = self.engine.list_subjects(&caller, call).await?;
        Ok(Response::new(pb::ListSubjectsResponse {
            subjects: page
                .subjects
                .into_iter()
                .map(|s| subject_record(g.as_str(), s))
                .collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
            model_id: self.engine.model_id().to_owned(),
        }))
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_model(
        &self,
        request: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::GetModelResponse>, Status> {
        let report = self.engine.report(&caller(&request)).await?;
        Ok(Response::new(pb::GetModelResponse {
            active: Some(model_info(&report.active)),
            staged: report.staged.as_ref().map(model_info),
            coverage: report
                .coverage
                .into_iter()
                .map(|c| pb::GalleryCoverage {
                    gallery_id: c.gallery_id,
                    subjects: c.subjects,
                    subjects_with_staged_templates: c.covered,
                })
                .collect(),
            rollback_target: report.rollback_target.map(|r| pb::RetiredModel {
                model_id: r.model.model_id,
                embedding_space: r.embedding_space,
                path: r.model.path.unwrap_or_default(),
                active_until: Some(timestamp(r.active_until)),
            }),
            side_info: report.side_info.as_ref().map(model_info),
        }))
    }

    #[tracing::instrument(skip_all, fields(path = %caller_text(&request.get_ref().path), mode = request.get_ref().mode))]
    async fn reload_model(
        &self,
        request: Request<pb::ReloadModelRequest>,
    ) -> Result<Response<pb::ReloadModelResponse>, Status> {
        let caller = caller(&request);
        let (path, mode) = validate::reload(request.into_inner())?;
        let out = self.engine.reload(&caller, path, mode).await?;
        Ok(Response::new(pb::ReloadModelResponse {
            previous: Some(model_info(&out.previous)),
            loaded: Some(model_info(&out.loaded)),
            staged: out.staged,
        }))
    }

    async fn promote_model(
        &self,
        request: Request<pb::PromoteModelRequest>,
    ) -> Result<Response<pb::PromoteModelResponse>, Status> {
        let caller = caller(&request);
        let r = request.into_inner();
        let out = self.engine.promote(&caller, r.require_full_coverage).await?;
        Ok(Response::new(pb::PromoteModelResponse {
            active: Some(model_info(&out.active)),
            previous: Some(model_info(&out.previous)),
        }))
    }

    async fn rollback_model(
        &self,
        request: Request<pb::RollbackModelRequest>,
    ) -> Result<Response<pb::RollbackModelResponse>, Status> {
        let caller = caller(&request);
        let expected = Some(request.into_inner().expected_active).filter(|m| !m.is_empty());
        let out = self.engine.rollback(&caller, expected).await?;
        Ok(Response::new(pb::RollbackModelResponse {
            active: Some(model_info(&out.loaded)),
            previous: Some(model_info(&out.previous)),
        }))
    }

    async fn cancel_migration(
        &self,
        request: Request<pb::CancelMigrationRequest>,
    ) -> Result<Response<pb::CancelMigrationResponse>, Status> {
        let out = self.engine.cancel_migration(&caller(&request)).await?;
        Ok(Response::new(pb::CancelMigrationResponse {
            active: Some(model_info(&out.active)),
            cancelled: Some(model_info(&out.cancelled)),
            templates_deleted: out.templates.templates_deleted,
            templates_kept: out.templates.templates_kept,
            subjects_without_active_templates: out.templates.subjects_without_active,
            rollback_target: out.templates.rollback_target,
        }))
    }

    async fn reload_settings(
        &self,
        request: Request<pb::ReloadSettingsRequest>,
    ) -> Result<Response<pb::ReloadSettingsResponse>, Status> {
        let caller = caller(&request);
        let out = match &self.settings {
            Some(settings) => self.engine.reload_settings(&caller, settings).await?,
            None => {
                return Err(crate::ServiceError::SettingsRefused(
                    crate::live::SettingsReloadError::NoFile.to_string(),
                )
                .into());
            }
        };
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Ok(Response::new(pb::ReloadSettingsResponse {
            path: out.path.display().to_string(),
            keys: count(out.keys),
            certificate_grants: count(out.certificate_grants),
            added: out.added,
            removed: out.removed,
            changed: out.changed,
            restart_required: out.restart_required,
        }))
    }
}
