//! The harnesses the fuzz targets (`fuzz/fuzz_targets/`) and their
//! regression tests (`server/tests/fuzz_regressions.rs`) share, so a
//! committed input is replayed through exactly the code that was fuzzed.
//!
//! Each takes arbitrary bytes, runs them through the server's own code with
//! its default settings, and panics when an invariant breaks: the fuzzer
//! reports a panic as a crash. Not part of the API.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use handid_model::{DecodeLimits, Preprocess};
use handid_proto::v1 as pb;
use prost::Message;
use tch::{Kind, Tensor};

use crate::batcher::BatchError;
use crate::decode::{decode_pixels, screen};
use crate::engine::{Caller, Id, IdempotencyKey, Rule};
use crate::error::{ImageProblem, ServiceError};
use crate::settings::LimitSettings;
use crate::validate;

/// The preprocessing of every kind of serving checkpoint: CLIP's square
/// (ViT-B/16, RN50) and the re-id resize (CLIP-ReID's 256x128). An input
/// goes through one of them, by the parity of its length: resampling is
/// most of an execution's time, and the fuzzer covers both that way.
const PREPROCESSING: [Preprocess; 2] = [
    Preprocess::Clip { size: 224 },
    Preprocess::Resize {
        height: 256,
        width: 128,
    },
];

/// Longest error message a refusal may carry: it names a field or a
/// limit, it never echoes what was sent.
const MAX_MESSAGE_CHARS: usize = 1024;

/// The gallery the restricted caller of [`requests`] may use.
pub const GRANTED_GALLERY: &str = "lobby";

/// What the server made of an image.
#[derive(Debug)]
pub enum ImageVerdict {
    /// Decoded and preprocessed.
    Accepted {
        /// Width the header declares.
        width: u32,
        /// Height the header declares.
        height: u32,
    },
    /// Refused, as the client is told (INVALID_ARGUMENT).
    Refused(ImageProblem),
}

/// The decode limits of a server with default settings (`server.rs` builds
/// them from [`LimitSettings`] the same way).
pub fn default_decode_limits() -> DecodeLimits {
    let limits = LimitSettings::default();
    DecodeLimits {
        max_bytes: limits.max_image_bytes,
        max_pixels: limits.max_pixels,
        max_side: limits.max_image_side,
        max_aspect_ratio: limits.max_aspect_ratio,
        min_side: limits.min_image_side,
    }
}

/// Untrusted bytes as one image of a call: the header checks, the decode
/// and the preprocessing of [`crate::decode::Decoding::prepare`], without
/// its permits. Panics unless a refusal is the client's fault with a clean
/// message, and an accepted image is as large as its header said and
/// becomes a finite `[3, H, W]` tensor in CLIP's normalised range.
pub fn image(data: &[u8]) -> ImageVerdict {
    let limits = default_decode_limits();
    let (width, height) = match screen(0, data, &limits) {
        Ok(sides) => sides,
        Err(e) => return refused(e),
    };
    assert!(
        limits.check_dimensions(width, height).is_ok(),
        "{width}x{height} passed the header checks outside the limits"
    );
    let image = match decode_pixels(0, data, &limits, &AtomicBool::new(false)) {
        Ok(image) => image,
        Err(e) => return refused(e),
    };
    // EXIF orientation may swap the sides, nothing may change them.
    let decoded = image.dimensions();
    assert!(
        decoded == (width, height) || decoded == (height, width),
        "the header declared {width}x{height}, the decoder made {decoded:?}"
    );
    let preprocess = &PREPROCESSING[data.len() % PREPROCESSING.len()];
    let x = preprocess
        .apply(&image)
        .unwrap_or_else(|e| panic!("an accepted {decoded:?} image fails {preprocess:?}: {e}"));
    let (h, w) = preprocess.input_size();
    assert_eq!(x.size(), [3, i64::from(h), i64::from(w)], "{preprocess:?}");
    assert_eq!(x.kind(), Kind::Float);
    assert_in_clip_range(&x, preprocess);
    ImageVerdict::Accepted { width, height }
}

/// Every value of `x` (`[3, H, W]`) is `(v - mean) / std` of its channel
/// for some `v` in [0, 1]: finite, and no resampling overshoot left the
/// 8-bit range.
fn assert_in_clip_range(x: &Tensor, preprocess: &Preprocess) {
    use handid_model::image::{CLIP_MEAN, CLIP_STD};
    for (c, (mean, std)) in CLIP_MEAN.iter().zip(CLIP_STD).enumerate() {
        let channel = x.get(c as i64);
        let (lo, hi) = (channel.min().double_value(&[]), channel.max().double_value(&[]));
        let (want_lo, want_hi) = (f64::from(-mean / std), f64::from((1.0 - mean) / std));
        // NaN fails both comparisons.
        assert!(
            lo >= want_lo - 1e-4 && hi <= want_hi + 1e-4,
            "{preprocess:?} channel {c}: values in [{lo}, {hi}], outside [{want_lo}, {want_hi}]"
        );
    }
}

fn refused(error: BatchError) -> ImageVerdict {
    match error {
        BatchError::BadImage { index: 0, problem } => {
            let status = tonic::Status::from(ServiceError::BadImage {
                index: 0,
                problem: problem.clone(),
            });
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert_clean_message(status.message());
            ImageVerdict::Refused(problem)
        }
        other => panic!("an image was refused as a server fault, not the client's: {other:?}"),
    }
}

/// A message a client (and a log) may be shown: short, one line, no
/// control characters (no terminal escapes, no NUL).
fn assert_clean_message(message: &str) {
    assert!(
        !message.is_empty() && message.chars().count() <= MAX_MESSAGE_CHARS,
        "message of {} characters",
        message.chars().count()
    );
    assert!(
        !message.chars().any(char::is_control),
        "control character in the message {message:?}"
    );
}

/// Untrusted bytes as every request message of both services, each
/// validated as the handlers do (`service.rs`), by an unrestricted caller
/// and by one granted only [`GRANTED_GALLERY`]; bytes that are not a
/// message are what tonic answers INVALID_ARGUMENT. Panics unless every
/// refusal is INVALID_ARGUMENT (PERMISSION_DENIED for another gallery)
/// with a clean message, and every accepted call keeps the documented
/// rules. Returns how many (message, caller) validations accepted.
pub fn requests(data: &[u8]) -> usize {
    let limits = LimitSettings::default();
    let callers = [
        Caller::anonymous(None),
        Caller {
            galleries: Some(Arc::from([GRANTED_GALLERY.to_owned()])),
            ..Caller::named("desk", None)
        },
    ];
    let mut accepted = 0;
    let mut judge = |verdict: Result<(), ServiceError>| match verdict {
        Ok(()) => accepted += 1,
        Err(e) => assert_refusal(e),
    };
    for caller in &callers {
        if let Ok(r) = pb::EnrollRequest::decode(data) {
            judge(validate::enroll(caller, r.clone(), &limits).map(|call| {
                check_gallery(caller, &call.gallery);
                check_id(&call.subject);
                if let Some(key) = &call.key {
                    check_key(key);
                }
                check_images(&call.images, &r.images, &limits);
            }));
        }
        if let Ok(r) = pb::IdentifyRequest::decode(data) {
            judge(validate::identify(caller, r.clone(), &limits).map(|call| {
                check_gallery(caller, &call.gallery);
                assert!(
                    (1..=limits.max_top_k as usize).contains(&call.top_k),
                    "{}",
                    call.top_k
                );
                assert_eq!(Some(&call.image), r.image.as_ref().map(|i| &i.data));
                check_rule(call.rule);
            }));
        }
        if let Ok(r) = pb::VerifyRequest::decode(data) {
            judge(validate::verify(caller, r.clone()).map(|call| {
                check_gallery(caller, &call.gallery);
                check_id(&call.subject);
                assert_eq!(Some(&call.image), r.image.as_ref().map(|i| &i.data));
                check_rule(call.rule);
            }));
        }
        if let Ok(r) = pb::ListSubjectsRequest::decode(data) {
            judge(validate::list(caller, r.clone()).map(|call| {
                check_gallery(caller, &call.gallery);
                assert!(
                    (1..=validate::MAX_PAGE_SIZE).contains(&call.size),
                    "{}",
                    call.size
                );
                assert!(r.page_size == 0 || r.page_size == call.size);
                assert_eq!(call.after.is_none(), r.page_token.is_empty());
                call.after.iter().for_each(check_id);
            }));
        }
        // DeleteSubject and GetSubject: a gallery and a subject.
        for (gallery_id, subject_id) in [
            pb::DeleteSubjectRequest::decode(data).map(|r| (r.gallery_id, r.subject_id)),
            pb::GetSubjectRequest::decode(data).map(|r| (r.gallery_id, r.subject_id)),
        ]
        .into_iter()
        .flatten()
        {
            judge(
                validate::gallery(caller, gallery_id)
                    .and_then(|g| validate::subject(subject_id).map(|s| (g, s)))
                    .map(|(g, s)| {
                        check_gallery(caller, &g);
                        check_id(&s);
                    }),
            );
        }
        if let Ok(r) = pb::DeleteGalleryRequest::decode(data) {
            judge(validate::gallery(caller, r.gallery_id).map(|g| check_gallery(caller, &g)));
        }
    }
    if let Ok(r) = pb::EmbedRequest::decode(data) {
        judge(validate::embed(r.clone(), &limits).map(|images| check_images(&images, &r.images, &limits)));
    }
    if let Ok(r) = pb::ReloadModelRequest::decode(data) {
        judge(validate::reload(r.clone()).map(|(path, _mode)| {
            assert_eq!(path.is_none(), r.path.is_empty());
            assert!(!r.path.chars().any(char::is_control), "{:?}", r.path);
            assert!(pb::ReloadMode::try_from(r.mode).is_ok(), "mode {}", r.mode);
        }));
    }
    // The others carry nothing to validate: decoding must not panic.
    let _ = pb::GetModelRequest::decode(data);
    let _ = pb::PromoteModelRequest::decode(data);
    let _ = pb::CancelMigrationRequest::decode(data);
    let _ = pb::RollbackModelRequest::decode(data);
    let _ = pb::ReloadSettingsRequest::decode(data);
    accepted
}

fn assert_refusal(error: ServiceError) {
    let denied = matches!(error, ServiceError::GalleryDenied { .. });
    let status = tonic::Status::from(error);
    let want = if denied {
        tonic::Code::PermissionDenied
    } else {
        tonic::Code::InvalidArgument
    };
    assert_eq!(status.code(), want, "{}", status.message());
    assert_clean_message(status.message());
}

/// The schema's rule for ids: 1-128 of `[A-Za-z0-9._:-]`.
fn check_id(id: &Id) {
    let s = id.as_str();
    assert!(
        (1..=128).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b)),
        "accepted id {s:?}"
    );
}

fn check_gallery(caller: &Caller, gallery: &Id) {
    check_id(gallery);
    if let Some(allowed) = &caller.galleries {
        assert!(
            allowed.iter().any(|g| g == gallery.as_str()),
            "{} used {:?}",
            caller.id,
            gallery.as_str()
        );
    }
}

fn check_key(key: &IdempotencyKey) {
    let s = key.as_str();
    let chars = s.chars().count();
    assert!(
        (1..=IdempotencyKey::MAX_CHARS).contains(&chars) && !s.chars().any(char::is_control),
        "accepted idempotency key {s:?}"
    );
}

/// 1 to `max_images_per_request` images, each passed on as sent.
fn check_images(images: &[Vec<u8>], sent: &[pb::Image], limits: &LimitSettings) {
    assert!((1..=limits.max_images_per_request).contains(&images.len()));
    assert!(images.iter().eq(sent.iter().map(|i| &i.data)));
}

fn check_rule(rule: Rule) {
    match rule {
        Rule::Default => {}
        Rule::Threshold(t) => assert!(t.is_finite(), "threshold {t}"),
        Rule::TargetFmr(f) => assert!(f > 0.0 && f < 1.0, "target_fmr {f}"),
    }
}
