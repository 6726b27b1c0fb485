//! The calls of the HandId service, in domain types.

use tracing::Instrument;

use super::page_token::encode_page_token;
use std::sync::Arc;

use super::{DEFAULT_FMR, Engine, Result, types::*};
use crate::error::ServiceError;
use crate::index::{IndexError, NewRow, lock};
use crate::store::{
    AuditEntry, Enrolled, Erased, NewEnrollment, Replay, SideFeatures, StagedEmbeddings, SubjectRecord,
    images_sha256,
};
use crate::telemetry::metrics;
use handid_model::OperatingPoint;

impl Engine {
    /// Enrolls the images of a subject into a gallery; returns once
    /// committed. The images are embedded within the call; the commit, the
    /// index update and the audit row then run to completion whether or not
    /// the caller is still there ([`Engine::detach`]).
    pub async fn enroll(self: &Arc<Self>, caller: &Caller, call: EnrollCall) -> Result<Enrolled> {
        let (gallery, name) = (call.gallery.clone(), call.subject.0.clone());
        match self.embed_enrolment(caller, call).await {
            Ok(Prepared::Embedded(embedded)) => {
                let (engine, caller) = (Arc::clone(self), caller.clone());
                self.detach(async move { engine.commit_enrolment(&caller, embedded).await })
                    .await
            }
            // A replay stores nothing: its row stands alone.
            Ok(Prepared::Replayed(first)) => {
                self.audited(caller, "enroll", Some(&gallery), Ok(first), |_| {
                    (Some(name), None)
                })
                .await
            }
            Err(e) => {
                self.audited(caller, "enroll", Some(&gallery), Err(e), |_: &Enrolled| {
                    (None, None)
                })
                .await
            }
        }
    }

    /// The part of an enrolment that belongs to the call: a replay answered
    /// from the database, or the images embedded by every slot.
    async fn embed_enrolment(&self, caller: &Caller, call: EnrollCall) -> Result<Prepared> {
        let EnrollCall {
            gallery,
            subject,
            images,
            key,
        } = call;
        let digest = images_sha256(&images);
        // A retry needs no forward pass: answer it before embedding.
        if let Some(key) = &key
            && let Some(first) = self
                .store
                .find_replay(&Replay {
                    caller: &caller.id,
                    gallery_id: &gallery.0,
                    key: key.as_str(),
                    subject_id: &subject.0,
                    images: images.len(),
                    images_sha256: &digest,
                })
                .instrument(tracing::info_span!("database", op = "find_replay"))
                .await?
        {
            return Ok(Prepared::Replayed(first));
        }
        let active = self.active();
        let staged = self.staged();
        let side = self.pipeline.side.clone();
        // During a migration the staged model embeds the same images, and
        // with model.side_info the side-information model does; the copies
        // are made only then.
        let side_images = side.as_ref().map(|_| images.clone());
        let models = async {
            match &staged {
                Some(staged) => {
                    let (now, next) =
                        tokio::join!(active.batcher.embed(images.clone()), staged.batcher.embed(images));
                    Ok::<_, ServiceError>((now?, Some(next?)))
                }
                None => Ok((active.batcher.embed(images).await?, None)),
            }
        };
        let side_features = async {
            match (&side, side_images) {
                (Some(side), Some(images)) => Ok::<_, ServiceError>(Some(side.batcher.embed(images).await?)),
                _ => Ok(None),
            }
        };
        let (models, side_features) = tokio::join!(models, side_features);
        let (embeddings, staged_embeddings) = models?;
        Ok(Prepared::Embedded(EmbeddedEnrolment {
            gallery,
            subject,
            key,
            digest,
            active,
            embeddings,
            staged: staged.zip(staged_embeddings),
            side: side.zip(side_features?),
        }))
    }

    /// Commits an embedded enrolment with its audit row (one transaction),
    /// then adds it to the indexes. Runs detached from the call.
    ///
    /// Refused (ABORTED, nothing stored) when the serving model compares
    /// none of its templates: a rollback, a promotion or another replica's
    /// change replaced the model that embedded the images meanwhile, and
    /// the subject would be stored where no search finds it. The retry
    /// embeds them with the serving model.
    async fn commit_enrolment(&self, caller: &Caller, mut e: EmbeddedEnrolment) -> Result<Enrolled> {
        if let Some(pause) = crate::faults::before_commit() {
            tokio::time::sleep(pause).await;
        }
        let writer = self.writer(&e.gallery.0);
        let _serialised = writer.lock().await;
        // Models change with writers held off (reloads, promotions, and the
        // database's record of them): from here to the index update they
        // stay as read below.
        let _published = self.publishing.read().await;
        let serving = self.active();
        // The staged embeddings are kept while their model is still staged
        // here, or became the active one (a promotion); a migration
        // cancelled or replaced since drops them, as the store does when
        // the database retired the model.
        let staged_now = self.staged();
        if let Some((slot, _)) = &e.staged
            && slot.model_id() != serving.model_id()
            && staged_now
                .as_ref()
                .is_none_or(|now| now.model_id() != slot.model_id())
        {
            e.staged = None;
        }
        let compared =
            serving.compares(&e.active) || e.staged.as_ref().is_some_and(|(slot, _)| serving.compares(slot));
        let (gallery, subject) = (&e.gallery, &e.subject);
        if !compared {
            let changed = ServiceError::ModelChanged {
                embedded_by: e.active.model_id().to_owned(),
                serving: serving.model_id().to_owned(),
            };
            return self
                .audited(caller, "enroll", Some(gallery), Err(changed), |_: &Enrolled| {
                    (None, None)
                })
                .await;
        }
        let stored = self
            .store
            .enroll(
                &NewEnrollment {
                    gallery_id: &gallery.0,
                    subject_id: &subject.0,
                    model_id: e.active.model_id(),
                    embeddings: &e.embeddings,
                    idempotency_key: e.key.as_ref().map(IdempotencyKey::as_str),
                    images_sha256: &e.digest,
                    caller: &caller.id,
                    max_galleries: self.limits.max_galleries_per_caller,
                    max_templates: self.limits.max_templates_per_subject,
                    staged: e.staged.as_ref().map(|(slot, embeddings)| StagedEmbeddings {
                        model_id: slot.model_id(),
                        embeddings,
                    }),
                    side: e.side.as_ref().map(|(side, features)| SideFeatures {
                        model_id: side.model.embedder.model_id(),
                        features,
                    }),
                },
                &AuditEntry {
                    actor: &caller.id,
                    peer: caller.peer.as_deref(),
                    action: "enroll",
                    gallery_id: Some(&gallery.0),
                    subject_id: Some(&subject.0),
                    model_id: Some(e.active.model_id()),
                    outcome: "ok",
                    top_score: None,
                    detail: None,
                },
            )
            .instrument(tracing::info_span!("database", op = "enroll"))
            .await;
        let enrolled = match stored {
            Ok(enrolled) => enrolled,
            Err(error) => {
                return self
                    .audited(
                        caller,
                        "enroll",
                        Some(gallery),
                        Err(error.into()),
                        |_: &Enrolled| (None, None),
                    )
                    .await;
            }
        };
        if enrolled.replayed {
            // A concurrent call with the same key stored first; this one
            // stored nothing and its row stands alone.
            let name = subject.0.clone();
            return self
                .audited(caller, "enroll", Some(gallery), Ok(enrolled), |_| {
                    (Some(name), None)
                })
                .await;
        }
        caller.record.mark_audited();
        if let Some(pause) = crate::faults::after_commit() {
            tokio::time::sleep(pause).await;
        }
        // Committed: from here on the answer is yes. An index that cannot
        // take the rows (device memory) is logged; the change feed re-reads
        // the subject at its next pass.
        self.index_enrolled(gallery, subject, &e.active, &enrolled.templates, &e.embeddings);
        if let Some((slot, vectors)) = &e.staged {
            self.index_enrolled(gallery, subject, slot, &enrolled.staged_templates, vectors);
        }
        Ok(enrolled)
    }

    /// Adds committed templates embedded by `by`'s model to every current
    /// slot that compares that model's space (the slots may have changed
    /// since the images were embedded: a reload in between).
    fn index_enrolled(
        &self,
        gallery: &Id,
        subject: &Id,
        by: &Slot,
        templates: &[crate::store::CreatedTemplate],
        embeddings: &[Vec<f32>],
    ) {
        let rows: Vec<NewRow<'_>> = templates
            .iter()
            .zip(embeddings)
            .map(|(t, e)| NewRow {
                subject_id: &subject.0,
                seq: t.seq,
                embedding: e,
            })
            .collect();
        for slot in self.slots() {
            if !slot.compares(by) {
                continue;
            }
            if let Err(error) = lock(&slot.indexes.get_or_create(&gallery.0)).append(&rows) {
                tracing::error!(
                    %error,
                    gallery = %gallery.0,
                    subject = %subject.0,
                    "committed templates not indexed; the change feed will re-read them"
                );
            }
        }
    }

    /// 1:N search of a gallery for the subject in a probe image.
    pub async fn identify(&self, caller: &Caller, call: IdentifyCall) -> Result<Identified> {
        let gallery = call.gallery.clone();
        let result = self.identify_inner(call).await;
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

    async fn identify_inner(&self, call: IdentifyCall) -> Result<Identified> {
        let IdentifyCall {
            gallery,
            image,
            top_k,
            rule,
        } = call;
        let gallery = &gallery;
        let slot = self.active();
        let (threshold, fmr) = resolve(&slot, rule)?;
        let probe = embed_one(&slot, image).await?;
        let searched = match slot.indexes.get(&gallery.0) {
            Some(gallery) => {
                let span = tracing::info_span!("search", top_k, batched_with = tracing::field::Empty);
                tokio::task::spawn_blocking(move || {
                    let _in_search = span.enter();
                    let (searched, batch) = gallery.search(probe, top_k)?;
                    span.record("batched_with", batch);
                    Ok::<_, IndexError>(searched)
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

    /// 1:1 comparison of a probe image with one subject.
    pub async fn verify(&self, caller: &Caller, call: VerifyCall) -> Result<Verified> {
        let (gallery, name) = (call.gallery.clone(), call.subject.0.clone());
        let result = self.verify_inner(call).await;
        if let Ok(v) = &result {
            metrics().score("verify", v.score, v.decision.is_match);
        }
        self.audited(caller, "verify", Some(&gallery), result, |v| {
            (Some(name), Some(v.score))
        })
        .await
    }

    async fn verify_inner(&self, call: VerifyCall) -> Result<Verified> {
        let VerifyCall {
            gallery,
            subject,
            image,
            rule,
        } = call;
        let (gallery, subject) = (&gallery, &subject);
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
            self.store.get_subject(&gallery.0, &subject.0).await?;
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

    /// The embeddings of `images`, storing nothing (but the audit row).
    pub async fn embed(&self, caller: &Caller, images: Vec<Vec<u8>>) -> Result<Embedded> {
        let slot = self.active();
        let result = slot.batcher.embed(images).await.map_err(ServiceError::from);
        let result = result.map(|embeddings| Embedded {
            embeddings,
            dim: slot.model.embedder.dim(),
            model_id: slot.model_id().to_owned(),
        });
        self.audited(caller, "embed", None, result, |_| (None, None))
            .await
    }

    /// Erases a subject from the database (with its audit row, one
    /// transaction) and from every index; detached from the call.
    pub async fn delete_subject(self: &Arc<Self>, caller: &Caller, gallery: Id, subject: Id) -> Result<u32> {
        let (engine, caller) = (Arc::clone(self), caller.clone());
        self.detach(async move { engine.erase_subject(&caller, gallery, subject).await })
            .await
    }

    async fn erase_subject(&self, caller: &Caller, gallery: Id, subject: Id) -> Result<u32> {
        let writer = self.writer(&gallery.0);
        let _serialised = writer.lock().await;
        let _published = self.publishing.read().await;
        let model_id = self.model_id();
        let erased = self
            .store
            .delete_subject(
                &gallery.0,
                &subject.0,
                &AuditEntry {
                    actor: &caller.id,
                    peer: caller.peer.as_deref(),
                    action: "delete_subject",
                    gallery_id: Some(&gallery.0),
                    subject_id: Some(&subject.0),
                    model_id: Some(&model_id),
                    outcome: "ok",
                    top_score: None,
                    detail: None,
                },
            )
            .instrument(tracing::info_span!("database", op = "delete_subject"))
            .await;
        let erased = match erased {
            Ok(erased) => erased,
            Err(error) => {
                return self
                    .audited(
                        caller,
                        "delete_subject",
                        Some(&gallery),
                        Err(error.into()),
                        |_: &u32| (None, None),
                    )
                    .await;
            }
        };
        caller.record.mark_audited();
        if let Some(pause) = crate::faults::after_commit() {
            tokio::time::sleep(pause).await;
        }
        for slot in self.slots() {
            if let Some(index) = slot.indexes.get(&gallery.0) {
                // The subject leaves the index's bookkeeping first, so even a
                // failure moving its rows cannot make a search return it.
                if let Err(error) = lock(&index).remove_subject(&subject.0) {
                    tracing::error!(%error, gallery = %gallery.0, "erased subject's rows not reclaimed");
                }
                slot.indexes.forget_if_empty(&gallery.0);
            }
        }
        Ok(erased)
    }

    /// Erases a gallery from the database (with its audit row, one
    /// transaction) and from every index; detached from the call.
    pub async fn delete_gallery(self: &Arc<Self>, caller: &Caller, gallery: Id) -> Result<Erased> {
        let (engine, caller) = (Arc::clone(self), caller.clone());
        self.detach(async move { engine.erase_gallery(&caller, gallery).await })
            .await
    }

    async fn erase_gallery(&self, caller: &Caller, gallery: Id) -> Result<Erased> {
        let writer = self.writer(&gallery.0);
        let _serialised = writer.lock().await;
        let _published = self.publishing.read().await;
        let model_id = self.model_id();
        let erased = self
            .store
            .delete_gallery(
                &gallery.0,
                &AuditEntry {
                    actor: &caller.id,
                    peer: caller.peer.as_deref(),
                    action: "delete_gallery",
                    gallery_id: Some(&gallery.0),
                    subject_id: None,
                    model_id: Some(&model_id),
                    outcome: "ok",
                    top_score: None,
                    detail: None,
                },
            )
            .instrument(tracing::info_span!("database", op = "delete_gallery"))
            .await;
        let erased = match erased {
            Ok(erased) => erased,
            Err(error) => {
                return self
                    .audited(
                        caller,
                        "delete_gallery",
                        Some(&gallery),
                        Err(error.into()),
                        |_: &Erased| (None, None),
                    )
                    .await;
            }
        };
        caller.record.mark_audited();
        for slot in self.slots() {
            if let Some(index) = slot.indexes.get(&gallery.0) {
                lock(&index).clear();
                slot.indexes.forget_if_empty(&gallery.0);
            }
        }
        Ok(erased)
    }

    /// One subject's record.
    pub async fn get_subject(&self, caller: &Caller, gallery: Id, subject: Id) -> Result<SubjectRecord> {
        let result = self
            .store
            .get_subject(&gallery.0, &subject.0)
            .await
            .map_err(ServiceError::from);
        let name = subject.0.clone();
        self.audited(caller, "get_subject", Some(&gallery), result, |_| {
            (Some(name), None)
        })
        .await
    }

    /// One page of a gallery's subjects, by subject id.
    pub async fn list_subjects(&self, caller: &Caller, call: PageCall) -> Result<SubjectPage> {
        let gallery = call.gallery.clone();
        let result = self.list_page(call).await;
        self.audited(caller, "list_subjects", Some(&gallery), result, |_| (None, None))
            .await
    }

    async fn list_page(&self, call: PageCall) -> Result<SubjectPage> {
        let PageCall { gallery, size, after } = call;
        let mut subjects = self
            .store
            .list_subjects(&gallery.0, after.as_ref().map(Id::as_str), size + 1)
            .await?;
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
}

/// An enrolment after its call's part.
enum Prepared {
    /// A retry of a stored enrolment: its first result.
    Replayed(Enrolled),
    /// Images embedded, ready to commit.
    Embedded(EmbeddedEnrolment),
}

/// An enrolment's embeddings, with the slots that made them.
struct EmbeddedEnrolment {
    gallery: Id,
    subject: Id,
    key: Option<IdempotencyKey>,
    /// The images' digest, which a retry must carry again.
    digest: String,
    active: Arc<Slot>,
    embeddings: Vec<Vec<f32>>,
    /// During a migration: the staged slot and its embeddings.
    staged: Option<(Arc<Slot>, Vec<Vec<f32>>)>,
    /// With model.side_info: the side-information model and its features.
    side: Option<(Arc<SideModel>, Vec<Vec<f32>>)>,
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
        Rule::Threshold(t) => Ok((t, 0.0)),
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

/// FMRs are compared with a relative tolerance: `1e-3` sent as a double and
/// `0.001` read from YAML need not be the same bits.
fn find_operating_point(points: &[OperatingPoint], fmr: f64) -> Option<(f32, f64)> {
    points
        .iter()
        .find(|p| (p.fmr - fmr).abs() <= 1e-9 * fmr.abs().max(f64::MIN_POSITIVE))
        .map(|p| (p.threshold, p.fmr))
}

#[cfg(test)]
mod tests {
    use super::*;

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
