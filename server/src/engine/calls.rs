//! The calls of the HandId service, in domain types.

use tracing::Instrument;

use super::page_token::encode_page_token;
use super::{DEFAULT_FMR, Engine, Result, types::*};
use crate::error::ServiceError;
use crate::index::{IndexError, NewRow, lock};
use crate::store::{Enrolled, Erased, NewEnrollment, StagedEmbeddings, StoreError, SubjectRecord};
use crate::telemetry::metrics;
use handid_model::OperatingPoint;

impl Engine {
    /// Enrolls the images of a subject into a gallery; returns once
    /// committed.
    pub async fn enroll(&self, caller: &Caller, call: EnrollCall) -> Result<Enrolled> {
        let (gallery, name) = (call.gallery.clone(), call.subject.0.clone());
        let result = self.enroll_inner(caller, call).await;
        self.audited(caller, "enroll", Some(&gallery), result, |_| (Some(name), None))
            .await
    }

    async fn enroll_inner(&self, caller: &Caller, call: EnrollCall) -> Result<Enrolled> {
        let EnrollCall {
            gallery,
            subject,
            images,
            key,
        } = call;
        let gallery = &gallery;
        let subject = &subject;
        let key = key.as_ref().map(IdempotencyKey::as_str);
        // A retry needs no forward pass: answer it before embedding.
        if let Some(key) = key
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
                idempotency_key: key,
                creator: &caller.id,
                max_galleries: self.limits.max_galleries_per_caller,
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
            Some(index) => {
                let span = tracing::info_span!("search", top_k);
                tokio::task::spawn_blocking(move || {
                    let _in_search = span.enter();
                    let index = lock(&index);
                    index
                        .search(&probe, top_k)
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
                    slot.indexes.forget_if_empty(&gallery.0);
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
                    slot.indexes.forget_if_empty(&gallery.0);
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
    pub async fn list_subjects(&self, call: PageCall) -> Result<SubjectPage> {
        let PageCall { gallery, size, after } = call;
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
