//! Requests as they arrive (protobuf) to the core's validated calls.
//!
//! Every check that needs neither the database nor the model lives here,
//! so a handler is one conversion and one call, and so the fuzzer
//! (`fuzz/fuzz_targets/requests.rs`) can drive all of it with arbitrary
//! messages. A refusal names the field and what is wrong with it.

use std::path::PathBuf;

use handid_proto::v1::{self as pb, decision_rule};

use crate::engine::{
    Caller, EnrollCall, Id, IdempotencyKey, IdentifyCall, PageCall, Rule, VerifyCall, control_character,
};
use crate::error::ServiceError;
use crate::reload::ReloadMode;
use crate::settings::LimitSettings;

type Result<T> = std::result::Result<T, ServiceError>;

/// Largest ListSubjects page.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// ListSubjects page when the call asks for 0.
pub const DEFAULT_PAGE_SIZE: u32 = 100;

/// A valid gallery id that `caller` may use.
pub fn gallery(caller: &Caller, id: String) -> Result<Id> {
    let id = Id::parse("gallery_id", id)?;
    caller.check_gallery(&id)?;
    Ok(id)
}

/// A valid subject id.
pub fn subject(id: String) -> Result<Id> {
    Id::parse("subject_id", id)
}

/// An Enroll: ids, 1 to `max_images_per_request` images, the key.
pub fn enroll(caller: &Caller, r: pb::EnrollRequest, limits: &LimitSettings) -> Result<EnrollCall> {
    let (gallery, subject) = (gallery(caller, r.gallery_id)?, subject(r.subject_id)?);
    let key = IdempotencyKey::parse(r.idempotency_key)?;
    let images = images(r.images, limits)?;
    Ok(EnrollCall {
        gallery,
        subject,
        images,
        key,
    })
}

/// An Identify: the gallery, the probe, `top_k` within the limit, a rule.
pub fn identify(caller: &Caller, r: pb::IdentifyRequest, limits: &LimitSettings) -> Result<IdentifyCall> {
    let gallery = gallery(caller, r.gallery_id)?;
    if r.top_k == 0 || r.top_k > limits.max_top_k {
        return Err(ServiceError::TopK {
            got: r.top_k,
            max: limits.max_top_k,
        });
    }
    Ok(IdentifyCall {
        gallery,
        image: probe(r.image)?,
        top_k: r.top_k as usize,
        rule: rule(r.rule)?,
    })
}

/// A Verify: the subject, the probe, a rule.
pub fn verify(caller: &Caller, r: pb::VerifyRequest) -> Result<VerifyCall> {
    let (gallery, subject) = (gallery(caller, r.gallery_id)?, subject(r.subject_id)?);
    Ok(VerifyCall {
        gallery,
        subject,
        image: probe(r.image)?,
        rule: rule(r.rule)?,
    })
}

/// An Embed: 1 to `max_images_per_request` images.
pub fn embed(r: pb::EmbedRequest, limits: &LimitSettings) -> Result<Vec<Vec<u8>>> {
    images(r.images, limits)
}

/// A ListSubjects: the gallery, a page size, where the page starts.
pub fn list(caller: &Caller, r: pb::ListSubjectsRequest) -> Result<PageCall> {
    let gallery = gallery(caller, r.gallery_id)?;
    let size = match r.page_size {
        0 => DEFAULT_PAGE_SIZE,
        n if n <= MAX_PAGE_SIZE => n,
        got => {
            return Err(ServiceError::PageSize {
                got,
                max: MAX_PAGE_SIZE,
            });
        }
    };
    Ok(PageCall {
        gallery,
        size,
        after: crate::engine::decode_page_token(&r.page_token)?,
    })
}

/// A ReloadModel: the folder (`None`: the active model's) and the mode.
pub fn reload(r: pb::ReloadModelRequest) -> Result<(Option<PathBuf>, ReloadMode)> {
    let mode = match pb::ReloadMode::try_from(r.mode) {
        Ok(pb::ReloadMode::Unspecified) => ReloadMode::Swap,
        Ok(pb::ReloadMode::StageMigration) => ReloadMode::StageMigration,
        Err(_) => {
            return Err(ServiceError::BadField {
                field: "mode",
                problem: format!("{} is not a ReloadMode", r.mode),
            });
        }
    };
    if let Some(problem) = control_character(&r.path) {
        return Err(ServiceError::BadField {
            field: "path",
            problem,
        });
    }
    let path = Some(r.path).filter(|p| !p.is_empty()).map(PathBuf::from);
    Ok((path, mode))
}

fn images(images: Vec<pb::Image>, limits: &LimitSettings) -> Result<Vec<Vec<u8>>> {
    match images.len() {
        0 => Err(ServiceError::MissingImage("at least one image is required")),
        n if n > limits.max_images_per_request => Err(ServiceError::TooManyImages {
            got: n,
            max: limits.max_images_per_request,
        }),
        _ => Ok(images.into_iter().map(|i| i.data).collect()),
    }
}

fn probe(image: Option<pb::Image>) -> Result<Vec<u8>> {
    image
        .map(|i| i.data)
        .ok_or(ServiceError::MissingImage("image is required"))
}

/// A decision rule the server can apply: a finite threshold, or a
/// false-match rate in (0, 1) (whether the model is calibrated at it is the
/// core's question).
fn rule(rule: Option<pb::DecisionRule>) -> Result<Rule> {
    match rule.and_then(|r| r.rule) {
        None => Ok(Rule::Default),
        Some(decision_rule::Rule::Threshold(t)) if t.is_finite() => Ok(Rule::Threshold(t)),
        Some(decision_rule::Rule::Threshold(t)) => Err(ServiceError::BadRule(format!(
            "threshold must be a finite number, got {t}"
        ))),
        Some(decision_rule::Rule::TargetFmr(f)) if f > 0.0 && f < 1.0 => Ok(Rule::TargetFmr(f)),
        Some(decision_rule::Rule::TargetFmr(f)) => Err(ServiceError::BadRule(format!(
            "target_fmr must be a rate between 0 and 1, got {f}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn anyone() -> Caller {
        Caller::anonymous(None)
    }

    fn message(e: ServiceError) -> (Code, String) {
        (e.code(), e.to_string())
    }

    #[test]
    fn nul_and_control_characters_are_named_in_every_string() {
        let limits = LimitSettings::default();
        let image = || vec![pb::Image { data: vec![1] }];
        let cases = [
            (
                pb::EnrollRequest {
                    gallery_id: "g\0".to_owned(),
                    subject_id: "s".to_owned(),
                    images: image(),
                    idempotency_key: String::new(),
                },
                "gallery_id contains a NUL character at position 1",
            ),
            (
                pb::EnrollRequest {
                    gallery_id: "g".to_owned(),
                    subject_id: "\0".to_owned(),
                    images: image(),
                    idempotency_key: String::new(),
                },
                "subject_id contains a NUL character at position 0",
            ),
            (
                pb::EnrollRequest {
                    gallery_id: "g".to_owned(),
                    subject_id: "s".to_owned(),
                    images: image(),
                    idempotency_key: "key\0".to_owned(),
                },
                "idempotency_key contains a NUL character at position 3",
            ),
            (
                pb::EnrollRequest {
                    gallery_id: "g".to_owned(),
                    subject_id: "s".to_owned(),
                    images: image(),
                    idempotency_key: "k\u{1b}[31m".to_owned(),
                },
                "idempotency_key contains the control character U+001B at position 1",
            ),
        ];
        for (request, says) in cases {
            let (code, text) = message(enroll(&anyone(), request, &limits).expect_err(says));
            assert_eq!((code, text.as_str()), (Code::InvalidArgument, says));
        }
        let (code, text) = message(
            reload(pb::ReloadModelRequest {
                path: "/srv/ckpt\0/../../etc".to_owned(),
                mode: 0,
            })
            .expect_err("NUL in a path"),
        );
        assert_eq!(code, Code::InvalidArgument);
        assert_eq!(text, "path contains a NUL character at position 9");
        let (code, text) = message(
            reload(pb::ReloadModelRequest {
                path: String::new(),
                mode: 7,
            })
            .expect_err("unknown mode"),
        );
        assert_eq!(
            (code, text.as_str()),
            (Code::InvalidArgument, "mode 7 is not a ReloadMode")
        );
    }

    #[test]
    fn rules_and_ranges_are_checked() {
        let limits = LimitSettings::default();
        let identify_with = |top_k, rule| {
            identify(
                &anyone(),
                pb::IdentifyRequest {
                    gallery_id: "g".to_owned(),
                    image: Some(pb::Image { data: vec![1] }),
                    top_k,
                    rule: Some(pb::DecisionRule { rule: Some(rule) }),
                },
                &limits,
            )
        };
        for rule in [
            decision_rule::Rule::Threshold(f32::NAN),
            decision_rule::Rule::Threshold(f32::INFINITY),
            decision_rule::Rule::TargetFmr(f64::NAN),
            decision_rule::Rule::TargetFmr(0.0),
            decision_rule::Rule::TargetFmr(1.0),
            decision_rule::Rule::TargetFmr(-1e-3),
        ] {
            let err = identify_with(1, rule).expect_err("refused");
            assert_eq!(err.code(), Code::InvalidArgument, "{rule:?}");
        }
        assert!(identify_with(1, decision_rule::Rule::TargetFmr(1e-3)).is_ok());
        for top_k in [0, limits.max_top_k + 1, u32::MAX] {
            let err = identify_with(top_k, decision_rule::Rule::Threshold(0.5)).expect_err("top_k");
            assert_eq!(err.code(), Code::InvalidArgument);
        }
        let err = enroll(
            &anyone(),
            pb::EnrollRequest {
                gallery_id: "g".to_owned(),
                subject_id: "s".to_owned(),
                images: vec![pb::Image::default(); limits.max_images_per_request + 1],
                idempotency_key: "k".repeat(IdempotencyKey::MAX_CHARS),
            },
            &limits,
        )
        .expect_err("too many images");
        assert!(err.to_string().starts_with("17 images"), "{err}");
        let err = IdempotencyKey::parse("k".repeat(IdempotencyKey::MAX_CHARS + 1)).expect_err("too long");
        assert_eq!(err.to_string(), "idempotency_key is longer than 256 characters");
        let err = list(
            &anyone(),
            pb::ListSubjectsRequest {
                gallery_id: "g".to_owned(),
                page_size: MAX_PAGE_SIZE + 1,
                page_token: String::new(),
            },
        )
        .expect_err("page size");
        assert_eq!(err.code(), Code::InvalidArgument);
    }
}
