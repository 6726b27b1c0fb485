//! Stage 1 of embedding: untrusted bytes to a preprocessed tensor, with
//! every resource it takes bounded.
//!
//! An image is judged from its header before a pixel is allocated (bytes,
//! sides, aspect ratio, pixel count, minimum size: [`DecodeLimits`]). Only
//! then does it wait for its turn: a decode slot (about one per core, so
//! decoding cannot take every CPU from the forward pass and the runtime)
//! and its pixels in a server-wide budget (so many large images at once
//! cannot take the memory). Both permits travel with the blocking work and
//! are released when that work ends, not when the call does; and a call
//! that goes away (cancelled by the client, past the request timeout) sets
//! a flag that stops its decode ([`handid_model::image::decode_cancellable`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use handid_model::image::{RgbImage, decode_cancellable, read_dimensions};
use handid_model::{DecodeLimits, Error as ModelError, Preprocess};
use tch::Tensor;
use tokio::sync::Semaphore;

use crate::batcher::BatchError;
use crate::error::ImageProblem;

/// The decode slots, the pixel budget and the limits every image is held to.
#[derive(Debug)]
pub struct Decoding {
    limits: DecodeLimits,
    slots: Arc<Semaphore>,
    pixels: Arc<Semaphore>,
}

impl Decoding {
    /// `slots` decodes at once (0: one per core), at most `pixel_budget`
    /// pixels being decoded at once (at least `limits.max_pixels`, so every
    /// admissible image fits).
    pub fn new(limits: DecodeLimits, slots: usize, pixel_budget: u64) -> Self {
        let slots = match slots {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        };
        let budget = pixel_budget
            .max(limits.max_pixels)
            .min(u64::from(u32::MAX))
            .min(Semaphore::MAX_PERMITS as u64);
        Self {
            limits,
            slots: Arc::new(Semaphore::new(slots)),
            pixels: Arc::new(Semaphore::new(budget as usize)),
        }
    }

    /// The limits images are held to.
    pub fn limits(&self) -> &DecodeLimits {
        &self.limits
    }

    /// Image `index` of a call, decoded and preprocessed into `[3, H, W]`.
    /// Refusals that need no decoding come first and take no permit.
    pub async fn prepare(
        &self,
        index: usize,
        bytes: Vec<u8>,
        preprocess: Arc<Preprocess>,
    ) -> Result<Tensor, BatchError> {
        let (width, height) = screen(index, &bytes, &self.limits)?;
        let pixels = u32::try_from(u64::from(width) * u64::from(height)).unwrap_or(u32::MAX);
        let closed = |_| BatchError::Stopped;
        let pixels = Arc::clone(&self.pixels)
            .acquire_many_owned(pixels)
            .await
            .map_err(closed)?;
        let slot = Arc::clone(&self.slots).acquire_owned().await.map_err(closed)?;
        let cancel = CancelOnDrop(Arc::new(AtomicBool::new(false)));
        let cancelled = Arc::clone(&cancel.0);
        let limits = self.limits;
        let span = tracing::info_span!("decode", index, bytes = bytes.len(), width, height);
        let work = tokio::task::spawn_blocking(move || {
            // Held until the work ends, whether or not anyone still waits.
            let _permits = (slot, pixels);
            span.in_scope(|| {
                let image = decode_pixels(index, &bytes, &limits, &cancelled)?;
                preprocess
                    .apply(&image)
                    .map_err(|e| BatchError::Model(format!("preprocessing: {e}")))
            })
        });
        let prepared = work
            .await
            .map_err(|e| BatchError::Model(format!("preprocessing task failed: {e}")))?;
        drop(cancel);
        prepared
    }
}

/// The checks of image `index` that need only its bytes and its header:
/// not empty, not a cut JPEG, the sizes the header declares within
/// `limits`. Allocates no pixel; returns the declared width and height.
pub fn screen(index: usize, bytes: &[u8], limits: &DecodeLimits) -> Result<(u32, u32), BatchError> {
    let bad = |problem| BatchError::BadImage { index, problem };
    if bytes.is_empty() {
        return Err(bad(ImageProblem::Empty));
    }
    if bytes.len() <= limits.max_bytes && jpeg_is_truncated(bytes) {
        return Err(bad(ImageProblem::Undecodable(
            "truncated JPEG: the data ends before the end-of-image marker".to_owned(),
        )));
    }
    read_dimensions(bytes, limits).map_err(|e| refusal(index, e))
}

/// The pixels of image `index`, after [`screen`]: the blocking half of
/// [`Decoding::prepare`], which stops once `cancelled` is set.
pub fn decode_pixels(
    index: usize,
    bytes: &[u8],
    limits: &DecodeLimits,
    cancelled: &AtomicBool,
) -> Result<RgbImage, BatchError> {
    let image = decode_cancellable(bytes, limits, cancelled).map_err(|e| refusal(index, e))?;
    if cancelled.load(Ordering::Relaxed) {
        return Err(refusal(index, ModelError::Cancelled));
    }
    Ok(image)
}

/// Sets its flag when dropped: a call dropped while its image decodes
/// (client cancel, request timeout) stops the decode.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What a model-crate decoding error means for the client.
fn refusal(index: usize, error: ModelError) -> BatchError {
    let bad = |problem| BatchError::BadImage { index, problem };
    match error {
        ModelError::ImageTooManyBytes { bytes, max_bytes } => bad(ImageProblem::TooManyBytes {
            bytes,
            max: max_bytes,
        }),
        ModelError::ImageTooManyPixels {
            width,
            height,
            max_pixels,
        } => bad(ImageProblem::TooManyPixels {
            width,
            height,
            max: max_pixels,
        }),
        ModelError::ImageSideTooLong {
            width,
            height,
            max_side,
        } => bad(ImageProblem::SideTooLong {
            width,
            height,
            max: max_side,
        }),
        ModelError::ImageAspectRatio {
            width,
            height,
            max_ratio,
        } => bad(ImageProblem::AspectRatio {
            width,
            height,
            max: max_ratio,
        }),
        ModelError::ImageTooSmall {
            width,
            height,
            min_side,
        } => bad(ImageProblem::TooSmall {
            width,
            height,
            min: min_side,
        }),
        // Only a dropped call cancels, so no one reads this answer.
        ModelError::Cancelled => BatchError::Model("decoding cancelled".to_owned()),
        // The model crate guarantees its errors never contain image bytes.
        other => bad(ImageProblem::Undecodable(other.to_string())),
    }
}

/// Whether `bytes` is a JPEG whose data stops before its end-of-image
/// marker. The decoder (`image`'s zune-jpeg) pads a truncated scan with grey
/// and reports success, and an embedding of half a hand must not be
/// enrolled. Walks the marker segments (so an EXIF thumbnail's own EOI is
/// skipped with its APP1 segment) and the entropy-coded data of each scan,
/// where a 0xFF byte is always followed by 0x00 (stuffing) or a restart
/// marker, until EOI. Bytes that are not a JPEG are left to the decoder.
pub fn jpeg_is_truncated(bytes: &[u8]) -> bool {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return false;
    }
    let len = bytes.len();
    let mut i = 2;
    loop {
        // A marker: 0xFF (any number of fill bytes), then its code.
        while bytes.get(i) == Some(&0xFF) {
            i += 1;
        }
        let Some(&marker) = bytes.get(i) else {
            return true;
        };
        i += 1;
        match marker {
            0xD9 => return false,
            // Standalone markers carry no length.
            0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        let Some(&[high, low]) = bytes.get(i..i + 2) else {
            return true;
        };
        let segment = usize::from(u16::from_be_bytes([high, low]));
        if segment < 2 || i + segment > len {
            return true;
        }
        i += segment;
        if marker == 0xDA {
            // Entropy-coded data of the scan, up to the next real marker.
            loop {
                match bytes.get(i..i + 2) {
                    None => return true,
                    Some(&[0xFF, next]) if next != 0x00 && !(0xD0..=0xD7).contains(&next) => break,
                    Some(_) => i += 1,
                }
            }
        } else if bytes.get(i) != Some(&0xFF) {
            // Segments follow each other directly; anything else is damage.
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real baseline JPEG with an entropy-coded scan of a few KB.
    fn sample_jpeg() -> Vec<u8> {
        let image = image::RgbImage::from_fn(64, 48, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 5) as u8, ((x * y) % 256) as u8])
        });
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
            .encode_image(&image)
            .expect("encode jpeg");
        jpeg
    }

    #[test]
    fn complete_jpegs_pass_and_cut_ones_are_caught() {
        let jpeg = sample_jpeg();
        assert!(!jpeg_is_truncated(&jpeg));
        // Trailing bytes after EOI (some cameras append data) are not damage.
        assert!(!jpeg_is_truncated(&[jpeg.as_slice(), b"trailer"].concat()));
        for tenth in 1..10 {
            let cut = &jpeg[..jpeg.len() * tenth / 10];
            assert!(jpeg_is_truncated(cut), "cut at {tenth}/10 passed");
        }
        assert!(
            jpeg_is_truncated(&jpeg[..jpeg.len() - 1]),
            "missing the last byte of EOI"
        );
        assert!(
            !jpeg_is_truncated(b"\x89PNG not a jpeg"),
            "other formats are the decoder's business"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_pixel_budget_and_the_slots_bound_what_decodes_at_once() {
        let limits = DecodeLimits {
            min_side: 16,
            max_pixels: 64 * 48,
            ..DecodeLimits::default()
        };
        // One slot, and a budget of exactly one 64 x 48 image.
        let decoding = Arc::new(Decoding::new(limits, 1, 64 * 48));
        let held = Arc::clone(&decoding.pixels)
            .acquire_many_owned(64 * 48)
            .await
            .expect("budget");
        let preprocess = Arc::new(Preprocess::Clip { size: 32 });
        let waiting = {
            let decoding = Arc::clone(&decoding);
            let preprocess = Arc::clone(&preprocess);
            tokio::spawn(async move { decoding.prepare(0, sample_jpeg(), preprocess).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "decoded without pixels in the budget");
        drop(held);
        let tensor = waiting
            .await
            .expect("task")
            .expect("decoded once the budget had room");
        assert_eq!(tensor.size(), [3, 32, 32]);
        // A refusal from the header takes no permit at all.
        let tiny = DecodeLimits {
            min_side: 64,
            ..DecodeLimits::default()
        };
        let strict = Decoding::new(tiny, 1, 0);
        let _slot = Arc::clone(&strict.slots).acquire_owned().await.expect("slot");
        let refused = strict
            .prepare(3, sample_jpeg(), preprocess)
            .await
            .expect_err("48 pixels high");
        assert!(
            matches!(
                refused,
                BatchError::BadImage {
                    index: 3,
                    problem: ImageProblem::TooSmall {
                        width: 64,
                        height: 48,
                        min: 64
                    }
                }
            ),
            "{refused:?}"
        );
    }
}
