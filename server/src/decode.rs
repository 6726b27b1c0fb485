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
                preprocess.apply(&image).map_err(BatchError::Preprocess)
            })
        });
        let prepared = work.await.map_err(BatchError::Task)?;
        drop(cancel);
        prepared
    }
}

/// The checks of image `index` that need only its bytes and its header:
/// not empty, not a cut JPEG ([`jpeg_shortfall`]), the sizes the header declares within
/// `limits`. Allocates no pixel; returns the declared width and height.
pub fn screen(index: usize, bytes: &[u8], limits: &DecodeLimits) -> Result<(u32, u32), BatchError> {
    let bad = |problem| BatchError::BadImage { index, problem };
    if bytes.is_empty() {
        return Err(bad(ImageProblem::Empty));
    }
    let mut dimensions = read_dimensions(bytes, limits);
    // A size the limits refuse is named as such, before what the scans lack.
    if let Err(e) = dimensions {
        if !matches!(e, ModelError::Decode(_)) {
            return Err(refusal(index, e));
        }
        dimensions = Err(e);
    }
    if bytes.len() <= limits.max_bytes
        && let Some(problem) = jpeg_shortfall(bytes)
    {
        return Err(bad(ImageProblem::Undecodable(problem)));
    }
    dimensions.map_err(|e| refusal(index, e))
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
        ModelError::Cancelled => BatchError::Cancelled,
        // The model crate guarantees its errors never contain image bytes.
        other => bad(ImageProblem::Undecodable(other.to_string())),
    }
}

/// Why `bytes`, a JPEG, cannot hold the whole image its header declares;
/// `None` when it can, or when it is not a JPEG (the decoder judges those).
///
/// The decoder (`image`'s zune-jpeg) paints whatever a scan lacks grey and
/// reports success, and an embedding of half a hand, or of 96x64 pixels of
/// hand in a 4000x3000 frame of grey, must not be enrolled (nor cost a
/// decode of 12 megapixels for 2 KB sent). So two kinds of cut are refused:
/// data that ends before the end-of-image marker, and scans too short for
/// the size the frame header declares. The second is a bound no complete
/// JPEG can miss: every 8x8 block of every component carries at least a
/// DC code and an end-of-block code of one bit or more each (sequential),
/// or at least a DC code in the first DC scan (progressive).
///
/// Walks the marker segments (so an EXIF thumbnail's own EOI is skipped with
/// its APP1 segment) and the entropy-coded data of each scan, where a 0xFF
/// byte is always followed by 0x00 (stuffing) or a restart marker, until EOI.
pub fn jpeg_shortfall(bytes: &[u8]) -> Option<String> {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return None;
    }
    let cut = || Some("truncated JPEG: the data ends before the end-of-image marker".to_owned());
    let len = bytes.len();
    let mut frame: Option<Frame> = None;
    // Bytes of the scans that must code every block (see `Frame::needs`).
    let mut coded = 0u64;
    let mut i = 2;
    loop {
        // A marker: 0xFF (any number of fill bytes), then its code.
        while bytes.get(i) == Some(&0xFF) {
            i += 1;
        }
        let Some(&marker) = bytes.get(i) else {
            return cut();
        };
        i += 1;
        match marker {
            0xD9 => return frame.and_then(|f| f.shortfall(coded)),
            // Standalone markers carry no length.
            0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        let Some(&[high, low]) = bytes.get(i..i + 2) else {
            return cut();
        };
        let segment = usize::from(u16::from_be_bytes([high, low]));
        if segment < 2 || i + segment > len {
            return cut();
        }
        let body = &bytes[i + 2..i + segment];
        i += segment;
        match marker {
            // Huffman-coded baseline, extended sequential, progressive.
            0xC0..=0xC2 => frame = Frame::parse(marker == 0xC2, body),
            // Lossless, hierarchical, arithmetic-coded: no bound (the
            // decoder refuses what it cannot decode).
            0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => frame = None,
            _ => {}
        }
        if marker == 0xDA {
            // Entropy-coded data of the scan, up to the next real marker.
            let start = i;
            loop {
                match bytes.get(i..i + 2) {
                    None => return cut(),
                    Some(&[0xFF, next]) if next != 0x00 && !(0xD0..=0xD7).contains(&next) => break,
                    Some(_) => i += 1,
                }
            }
            if frame.as_ref().is_some_and(|f| f.needs(body)) {
                coded += (i - start) as u64;
            }
        } else if bytes.get(i) != Some(&0xFF) {
            // Segments follow each other directly; anything else is damage.
            return cut();
        }
    }
}

/// What a JPEG's frame header (SOF) declares: enough to bound its data.
struct Frame {
    progressive: bool,
    width: u16,
    height: u16,
    /// 8x8 blocks of all components together (each component's plane,
    /// subsampled, rounded up to whole blocks).
    blocks: u64,
}

impl Frame {
    /// `None` for a header too damaged to bound anything (the decoder
    /// refuses it).
    fn parse(progressive: bool, body: &[u8]) -> Option<Self> {
        // precision, height, width, component count, then 3 bytes each:
        // id, horizontal << 4 | vertical sampling factor, quantisation table.
        let (&[_, h1, h0, w1, w0, count], rest) = body.split_first_chunk::<6>()?;
        let (height, width) = (u16::from_be_bytes([h1, h0]), u16::from_be_bytes([w1, w0]));
        let factors: Vec<(u64, u64)> = rest
            .chunks_exact(3)
            .take(usize::from(count))
            .map(|c| (u64::from(c[1] >> 4), u64::from(c[1] & 0x0F)))
            .collect();
        if factors.len() != usize::from(count)
            || factors
                .iter()
                .any(|&(h, v)| !(1..=4).contains(&h) || !(1..=4).contains(&v))
        {
            return None;
        }
        let h_max = factors.iter().map(|f| f.0).max()?;
        let v_max = factors.iter().map(|f| f.1).max()?;
        let blocks = factors
            .iter()
            .map(|&(h, v)| {
                let plane_width = (u64::from(width) * h).div_ceil(h_max);
                let plane_height = (u64::from(height) * v).div_ceil(v_max);
                plane_width.div_ceil(8) * plane_height.div_ceil(8)
            })
            .sum();
        Some(Self {
            progressive,
            width,
            height,
            blocks,
        })
    }

    /// Whether the scan whose header is `sos` must code every block of its
    /// components: every sequential scan; a progressive one only when it is
    /// a first DC scan (spectral start 0, no successive approximation yet).
    fn needs(&self, sos: &[u8]) -> bool {
        if !self.progressive {
            return true;
        }
        let count = usize::from(sos.first().copied().unwrap_or(0));
        match (sos.get(1 + 2 * count), sos.get(3 + 2 * count)) {
            (Some(&spectral_start), Some(&approximation)) => spectral_start == 0 && approximation >> 4 == 0,
            _ => false,
        }
    }

    /// What is missing when `coded` bytes of the scans that must code every
    /// block cannot hold one bit (progressive) or two (sequential) a block.
    fn shortfall(&self, coded: u64) -> Option<String> {
        let bits_per_block = if self.progressive { 1 } else { 2 };
        let least = (self.blocks * bits_per_block).div_ceil(8);
        (coded < least).then(|| {
            format!(
                "truncated JPEG: its scans hold {coded} bytes, fewer than the {least} that even a blank {}x{} image needs",
                self.width, self.height
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real baseline JPEG with an entropy-coded scan of a few KB.
    fn sample_jpeg() -> Vec<u8> {
        let image = RgbImage::from_fn(64, 48, |x, y| {
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
        assert_eq!(jpeg_shortfall(&jpeg), None);
        // Trailing bytes after EOI (some cameras append data) are not damage.
        assert_eq!(jpeg_shortfall(&[jpeg.as_slice(), b"trailer"].concat()), None);
        for tenth in 1..10 {
            let cut = &jpeg[..jpeg.len() * tenth / 10];
            assert!(jpeg_shortfall(cut).is_some(), "cut at {tenth}/10 passed");
        }
        assert!(
            jpeg_shortfall(&jpeg[..jpeg.len() - 1]).is_some(),
            "missing the last byte of EOI"
        );
        assert_eq!(
            jpeg_shortfall(b"\x89PNG not a jpeg"),
            None,
            "other formats are the decoder's business"
        );
    }

    /// `jpeg` with the sides in its frame header replaced.
    fn with_declared_size(jpeg: &[u8], width: u16, height: u16) -> Vec<u8> {
        let mut out = jpeg.to_vec();
        let sof = out
            .windows(2)
            .position(|w| w == [0xFF, 0xC0])
            .expect("a baseline frame header");
        out[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
        out[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
        out
    }

    #[test]
    fn scans_too_short_for_the_declared_size_are_caught() {
        // Found by the fuzz target's seeds: 2 KB of 64x48 scan data in a
        // frame that declares 4000x3000 decoded "successfully" to 12
        // megapixels of grey, and took seconds to preprocess.
        let jpeg = sample_jpeg();
        let inflated = with_declared_size(&jpeg, 4000, 3000);
        let problem = jpeg_shortfall(&inflated).expect("refused");
        assert!(
            problem.starts_with("truncated JPEG: its scans hold ")
                && problem.ends_with("blank 4000x3000 image needs"),
            "{problem}"
        );
        // Somewhat larger than its data, but within what the data could
        // hold: the decoder's business (its scan ends where it ends).
        assert_eq!(jpeg_shortfall(&with_declared_size(&jpeg, 64, 64)), None);
        // The cameras of the 11k Hands sample write whole JPEGs.
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/data/11k-hands-sample/Hands"
        );
        let mut photos = 0;
        for entry in std::fs::read_dir(dir).expect("sample folder") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|x| x.eq_ignore_ascii_case("jpg")) {
                let bytes = std::fs::read(&path).expect("read");
                assert_eq!(jpeg_shortfall(&bytes), None, "{}", path.display());
                photos += 1;
            }
        }
        assert!(photos > 100, "{photos} photos");
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
