//! Decoding untrusted image bytes and CLIP's preprocessing.
//!
//! Images come from security systems over the network, so decoding is
//! defensive: the byte size is checked first, then the dimensions declared in
//! the header (pixel count, longest side, aspect ratio, shortest side), and
//! only then are pixels decoded, under an allocation limit. A caller that
//! stops wanting the result can stop the work ([`decode_cancellable`]).
//! Errors describe what is wrong and never include the bytes.

use std::io::{self, BufRead, Read, Seek, SeekFrom};
use std::sync::atomic::{AtomicBool, Ordering};

/// What [`decode`] returns: 8-bit RGB pixels, row-major.
pub use image::RgbImage;
use image::imageops::{self, FilterType};
use image::{DynamicImage, ImageDecoder, ImageReader, Limits};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// CLIP's per-channel mean (RGB), from OpenAI CLIP `clip.py` `_transform`.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's per-channel standard deviation (RGB), from OpenAI CLIP `clip.py`.
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// The largest image a resize may produce before cropping (64 Mi pixels,
/// 192 MiB of RGB): a bound on preprocessing memory that holds whatever
/// limits decoded the image.
pub const MAX_RESIZE_PIXELS: u64 = 1 << 26;

/// Limits applied to an encoded image before and while decoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest accepted encoded size in bytes.
    pub max_bytes: usize,
    /// Largest accepted width x height, checked from the header before decoding.
    pub max_pixels: u64,
    /// Longest accepted side (width or height), from the header.
    pub max_side: u32,
    /// Largest accepted ratio of the longer side to the shorter (8 = 8:1).
    pub max_aspect_ratio: u32,
    /// Shortest accepted side, from the header.
    pub min_side: u32,
}

impl Default for DecodeLimits {
    /// 20 MiB, 40 megapixels, 16384 pixels a side and 8:1: a modern phone
    /// or camera photo fits (sensors are at most about 3:1, 16k wide), a
    /// decompression bomb or a crafted header does not. No minimum side:
    /// callers that need one (the server) set it.
    fn default() -> Self {
        Self {
            max_bytes: 20 << 20,
            max_pixels: 40_000_000,
            max_side: 16_384,
            max_aspect_ratio: 8,
            min_side: 1,
        }
    }
}

impl DecodeLimits {
    /// Whether an image of `width` x `height` (as its header declares) may
    /// be decoded: every check that needs no pixel, in the order a client
    /// can act on (empty, too long a side, too elongated, too many pixels,
    /// too small).
    pub fn check_dimensions(&self, width: u32, height: u32) -> Result<()> {
        let (long, short) = (width.max(height), width.min(height));
        if short == 0 {
            return Err(Error::Decode(format!("image has no pixels ({width}x{height})")));
        }
        if long > self.max_side {
            return Err(Error::ImageSideTooLong {
                width,
                height,
                max_side: self.max_side,
            });
        }
        // long / short > ratio, without division: long > ratio * short.
        if u64::from(long) > u64::from(self.max_aspect_ratio) * u64::from(short) {
            return Err(Error::ImageAspectRatio {
                width,
                height,
                max_ratio: self.max_aspect_ratio,
            });
        }
        if u64::from(width) * u64::from(height) > self.max_pixels {
            return Err(Error::ImageTooManyPixels {
                width,
                height,
                max_pixels: self.max_pixels,
            });
        }
        if short < self.min_side {
            return Err(Error::ImageTooSmall {
                width,
                height,
                min_side: self.min_side,
            });
        }
        Ok(())
    }
}

/// The dimensions an image's header declares, checked against `limits`;
/// reads the header only, allocates no pixel.
pub fn read_dimensions(bytes: &[u8], limits: &DecodeLimits) -> Result<(u32, u32)> {
    let never = AtomicBool::new(false);
    let (width, height) = open(bytes, limits, &never)?.dimensions();
    limits.check_dimensions(width, height)?;
    Ok((width, height))
}

/// Decodes a JPEG, PNG, BMP or PNM (PGM/PPM) image into 8-bit RGB.
///
/// EXIF orientation is applied, grey images are replicated to three
/// channels, alpha is dropped and 16-bit samples are scaled to 8 bits.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage> {
    decode_cancellable(bytes, limits, &AtomicBool::new(false))
}

/// [`decode`] that gives up with [`Error::Cancelled`] once `cancelled` is
/// set: the decoder reads its input a few KiB at a time through a reader
/// that checks the flag, so a PNG stops within one chunk of compressed
/// data; a JPEG (read whole, then decoded) stops before and after its
/// decode.
pub fn decode_cancellable(bytes: &[u8], limits: &DecodeLimits, cancelled: &AtomicBool) -> Result<RgbImage> {
    let stopped = |e: Error| {
        if cancelled.load(Ordering::Relaxed) {
            Error::Cancelled
        } else {
            e
        }
    };
    let mut decoder = open(bytes, limits, cancelled).map_err(stopped)?;
    let (width, height) = decoder.dimensions();
    limits.check_dimensions(width, height)?;
    // The decoder's own limits back up the header check (16-bit RGBA is
    // the widest layout we accept: 8 bytes per pixel).
    let mut decoder_limits = Limits::default();
    decoder_limits.max_image_width = Some(limits.max_side);
    decoder_limits.max_image_height = Some(limits.max_side);
    decoder_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(1 << 20));
    decoder.set_limits(decoder_limits).map_err(decode_error)?;
    // A missing or malformed EXIF block is not worth rejecting the photo.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder)
        .map_err(decode_error)
        .map_err(stopped)?;
    if cancelled.load(Ordering::Relaxed) {
        return Err(Error::Cancelled);
    }
    image.apply_orientation(orientation);
    Ok(image.into_rgb8())
}

/// The decoder of `bytes`' format, its header read, after the byte limit.
fn open<'a>(
    bytes: &'a [u8],
    limits: &DecodeLimits,
    cancelled: &'a AtomicBool,
) -> Result<impl ImageDecoder + 'a> {
    if bytes.len() > limits.max_bytes {
        return Err(Error::ImageTooManyBytes {
            bytes: bytes.len(),
            max_bytes: limits.max_bytes,
        });
    }
    let reader = ImageReader::new(Chunked {
        bytes,
        at: 0,
        cancelled,
    })
    .with_guessed_format()
    .map_err(|e| Error::Decode(without_image_bytes(&e.to_string())))?;
    if reader.format().is_none() {
        return Err(Error::Decode(
            "unrecognised format (accepted: JPEG, PNG, BMP, PNM)".to_owned(),
        ));
    }
    reader.into_decoder().map_err(decode_error)
}

/// Bytes handed to a decoder [`Chunked::CHUNK`] at a time, refusing to
/// hand more once `cancelled` is set: how a decode is interrupted.
struct Chunked<'a> {
    bytes: &'a [u8],
    at: usize,
    cancelled: &'a AtomicBool,
}

impl Chunked<'_> {
    const CHUNK: usize = 4096;

    fn check(&self) -> io::Result<()> {
        if self.cancelled.load(Ordering::Relaxed) {
            // Not `Interrupted`: readers retry that one.
            return Err(io::Error::other("decoding cancelled"));
        }
        Ok(())
    }
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = {
            let available = self.fill_buf()?;
            let n = available.len().min(buf.len());
            buf[..n].copy_from_slice(&available[..n]);
            n
        };
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for Chunked<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.check()?;
        let start = self.at.min(self.bytes.len());
        let end = start.saturating_add(Self::CHUNK).min(self.bytes.len());
        Ok(&self.bytes[start..end])
    }

    fn consume(&mut self, amount: usize) {
        self.at = self.at.saturating_add(amount).min(self.bytes.len());
    }
}

impl Seek for Chunked<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let len = self.bytes.len() as i128;
        let target = match to {
            SeekFrom::Start(n) => i128::from(n),
            SeekFrom::End(n) => len + i128::from(n),
            SeekFrom::Current(n) => self.at as i128 + i128::from(n),
        };
        if target < 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the image",
            ));
        }
        // Past the end is allowed (reads then return nothing), as a Cursor.
        self.at = usize::try_from(target).unwrap_or(usize::MAX);
        Ok(self.at as u64)
    }
}

fn decode_error(error: image::ImageError) -> Error {
    match error {
        image::ImageError::Limits(limit) => Error::Decode(format!("decoder limit reached: {limit}")),
        other => Error::Decode(without_image_bytes(&other.to_string())),
    }
}

/// Longest decoder message passed on (in characters).
const MAX_DECODER_MESSAGE: usize = 200;

/// A decoder's message, kept for what it says is wrong but not for what it
/// quotes: decoders quote the input they choke on (the PNM decoder an
/// unknown header line or tuple type, whole, however long), and no image
/// byte may reach a client or a log. Quoted text becomes `"…"`, control
/// characters become spaces, and the rest is cut at
/// [`MAX_DECODER_MESSAGE`] characters.
fn without_image_bytes(message: &str) -> String {
    let mut out = String::new();
    let mut quoted = false;
    let mut chars = message.chars();
    while let Some(c) = chars.next() {
        match c {
            // Debug-formatted quotes escape their own quotes (`\"`).
            '\\' if quoted => {
                chars.next();
            }
            '"' => {
                quoted = !quoted;
                out.push_str(if quoted { "\"…" } else { "\"" });
            }
            _ if quoted => {}
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    if quoted {
        out.push('"');
    }
    match out.char_indices().nth(MAX_DECODER_MESSAGE) {
        Some((cut, _)) => format!("{}…", &out[..cut]),
        None => out,
    }
}

/// How an RGB image becomes the model's input tensor; recorded in every
/// checkpoint manifest so training, evaluation and serving agree.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Preprocess {
    /// OpenAI CLIP's `_transform`: resize the shorter side to `size`
    /// (bicubic), centre crop `size` x `size`, scale to [0, 1], normalise with
    /// [`CLIP_MEAN`] / [`CLIP_STD`].
    Clip {
        /// Side of the square input.
        size: u32,
    },
    /// Re-id style (CLIP-ReID, 256x128): resize to exactly `height` x `width`
    /// (bicubic) ignoring the aspect ratio, then scale and normalise as CLIP.
    Resize {
        /// Input height.
        height: u32,
        /// Input width.
        width: u32,
    },
}

impl Preprocess {
    /// The (height, width) of the tensors [`Preprocess::apply`] produces.
    pub fn input_size(&self) -> (u32, u32) {
        match *self {
            Preprocess::Clip { size } => (size, size),
            Preprocess::Resize { height, width } => (height, width),
        }
    }

    /// Turns an image into a normalised `[3, H, W]` f32 tensor on the CPU:
    /// [`Preprocess::resize`] then [`to_normalised_tensor`].
    pub fn apply(&self, img: &RgbImage) -> Result<Tensor> {
        Ok(to_normalised_tensor(&self.resize(img)?))
    }

    /// The geometric half of [`Preprocess::apply`]: the image resized (and
    /// cropped) to [`Preprocess::input_size`], still 8-bit RGB. Training
    /// augmentation starts from here so it sees the serving geometry.
    pub fn resize(&self, img: &RgbImage) -> Result<RgbImage> {
        let (height, width) = self.input_size();
        if height == 0 || width == 0 {
            return Err(Error::InvalidInput(format!(
                "preprocessing to an empty size {height}x{width}"
            )));
        }
        if img.width() == 0 || img.height() == 0 {
            return Err(Error::InvalidInput("image has no pixels".to_owned()));
        }
        match *self {
            Preprocess::Clip { size } => resize_shorter_and_crop(img, size),
            Preprocess::Resize { height, width } => {
                if u64::from(height) * u64::from(width) > MAX_RESIZE_PIXELS {
                    return Err(Error::InvalidInput(format!(
                        "preprocessing to {height}x{width} needs more than {MAX_RESIZE_PIXELS} pixels"
                    )));
                }
                Ok(imageops::resize(img, width, height, FilterType::CatmullRom))
            }
        }
    }
}

/// torchvision `Resize(size)` + `CenterCrop(size)` as OpenAI CLIP composes
/// them: the longer side is `int(size * long / short)`, the crop offset
/// `round((len - size) / 2)`. The target is computed with checked
/// arithmetic and refused beyond [`MAX_RESIZE_PIXELS`].
fn resize_shorter_and_crop(img: &RgbImage, size: u32) -> Result<RgbImage> {
    let (w, h) = (u64::from(img.width()), u64::from(img.height()));
    let size64 = u64::from(size);
    let too_large = || {
        Error::InvalidInput(format!(
            "resizing a {w}x{h} image to a shorter side of {size} needs more than {MAX_RESIZE_PIXELS} pixels"
        ))
    };
    // Integer floor division is torchvision's int() of a positive ratio.
    let (new_w, new_h) = if w <= h {
        (size64, size64.checked_mul(h).ok_or_else(too_large)? / w)
    } else {
        (size64.checked_mul(w).ok_or_else(too_large)? / h, size64)
    };
    if new_w
        .checked_mul(new_h)
        .is_none_or(|pixels| pixels > MAX_RESIZE_PIXELS)
    {
        return Err(too_large());
    }
    let new_w = u32::try_from(new_w).map_err(|_| too_large())?;
    let new_h = u32::try_from(new_h).map_err(|_| too_large())?;
    let resized = if (new_w, new_h) == (img.width(), img.height()) {
        img.clone()
    } else {
        imageops::resize(img, new_w, new_h, FilterType::CatmullRom)
    };
    let left = ((f64::from(new_w) - f64::from(size)) / 2.0).round() as u32;
    let top = ((f64::from(new_h) - f64::from(size)) / 2.0).round() as u32;
    Ok(imageops::crop_imm(&resized, left, top, size, size).to_image())
}

/// The value half of [`Preprocess::apply`]: `[H, W, 3]` u8 -> `[3, H, W]`
/// f32 scaled to [0, 1] and normalised with [`CLIP_MEAN`] / [`CLIP_STD`].
pub fn to_normalised_tensor(img: &RgbImage) -> Tensor {
    let (w, h) = (i64::from(img.width()), i64::from(img.height()));
    let mean = Tensor::from_slice(&CLIP_MEAN).view([3, 1, 1]);
    let std = Tensor::from_slice(&CLIP_STD).view([3, 1, 1]);
    // [H, W, 3] u8 -> [3, H, W] f32 in [0, 1]
    let x = Tensor::from_slice(img.as_raw())
        .view([h, w, 3])
        .permute([2, 0, 1])
        .to_kind(Kind::Float)
        / 255.0;
    ((x - mean) / std).contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Write};

    use image::{ImageFormat, Rgb};

    fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).expect("encode");
        out.into_inner()
    }

    fn gradient(width: u32, height: u32) -> RgbImage {
        RgbImage::from_fn(width, height, |x, y| {
            Rgb([(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8])
        })
    }

    #[test]
    fn decodes_each_accepted_format() {
        let img = DynamicImage::ImageRgb8(gradient(21, 13));
        for format in [
            ImageFormat::Png,
            ImageFormat::Bmp,
            ImageFormat::Pnm,
            ImageFormat::Jpeg,
        ] {
            let decoded = decode(&encode(&img, format), &DecodeLimits::default())
                .unwrap_or_else(|e| panic!("{format:?}: {e}"));
            assert_eq!(decoded.dimensions(), (21, 13), "{format:?}");
            if format != ImageFormat::Jpeg {
                assert_eq!(&decoded, img.as_rgb8().expect("rgb"), "{format:?} is lossless");
            }
        }
    }

    #[test]
    fn grey_alpha_and_16_bit_become_rgb8() {
        let grey = DynamicImage::ImageLuma8(image::GrayImage::from_fn(4, 3, |x, _| {
            image::Luma([x as u8 * 50])
        }));
        let pgm = decode(&encode(&grey, ImageFormat::Pnm), &DecodeLimits::default()).expect("pgm");
        assert_eq!(pgm.get_pixel(2, 1), &Rgb([100, 100, 100]));

        let rgba = DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(3, 2, image::Rgba([10, 20, 30, 0])));
        let png = decode(&encode(&rgba, ImageFormat::Png), &DecodeLimits::default()).expect("rgba png");
        assert_eq!(png.get_pixel(0, 0), &Rgb([10, 20, 30]));

        let deep = DynamicImage::ImageRgb16(image::ImageBuffer::from_pixel(2, 2, Rgb([65535u16, 0, 32896])));
        let png16 = decode(&encode(&deep, ImageFormat::Png), &DecodeLimits::default()).expect("16-bit png");
        assert_eq!(png16.get_pixel(1, 1), &Rgb([255, 0, 128]));
    }

    /// A JPEG with an APP1 EXIF block whose only tag is Orientation = 6
    /// ("rotate 90 degrees clockwise to display").
    fn jpeg_with_orientation_6(img: &DynamicImage) -> Vec<u8> {
        let jpeg = encode(img, ImageFormat::Jpeg);
        let mut tiff = Vec::new();
        tiff.extend_from_slice(b"II*\0"); // little-endian TIFF header
        tiff.extend_from_slice(&8u32.to_le_bytes()); // first IFD at offset 8
        tiff.extend_from_slice(&1u16.to_le_bytes()); // one entry
        tiff.extend_from_slice(&0x0112u16.to_le_bytes()); // Orientation
        tiff.extend_from_slice(&3u16.to_le_bytes()); // SHORT
        tiff.extend_from_slice(&1u32.to_le_bytes()); // count
        tiff.extend_from_slice(&[6, 0, 0, 0]); // value, padded
        tiff.extend_from_slice(&0u32.to_le_bytes()); // no next IFD
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend_from_slice(&tiff);
        let mut out = jpeg[..2].to_vec(); // SOI
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(&app1);
        out.extend_from_slice(&jpeg[2..]);
        out
    }

    #[test]
    fn exif_orientation_is_applied() {
        // Left half white, right half black, 32 wide x 16 high.
        let img = DynamicImage::ImageRgb8(RgbImage::from_fn(32, 16, |x, _| {
            if x < 16 {
                Rgb([255, 255, 255])
            } else {
                Rgb([0, 0, 0])
            }
        }));
        let decoded = decode(&jpeg_with_orientation_6(&img), &DecodeLimits::default()).expect("jpeg");
        // Rotated 90 degrees clockwise: 16 wide x 32 high, white on top.
        assert_eq!(decoded.dimensions(), (16, 32));
        assert!(decoded.get_pixel(8, 4)[0] > 200, "top should be white");
        assert!(decoded.get_pixel(8, 28)[0] < 50, "bottom should be black");
    }

    #[test]
    fn corrupt_truncated_empty_and_unknown_inputs_are_errors() {
        let png = encode(&DynamicImage::ImageRgb8(gradient(40, 30)), ImageFormat::Png);
        let jpeg = encode(&DynamicImage::ImageRgb8(gradient(40, 30)), ImageFormat::Jpeg);
        let mut flipped = png.clone();
        for b in flipped.iter_mut().skip(40).step_by(3) {
            *b ^= 0x5A;
        }
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("text", b"definitely not an image".to_vec()),
            ("truncated png", png[..png.len() / 2].to_vec()),
            ("truncated jpeg", jpeg[..jpeg.len() / 3].to_vec()),
            ("png header only", png[..8].to_vec()),
            ("corrupt png", flipped),
        ];
        for (name, bytes) in cases {
            match decode(&bytes, &DecodeLimits::default()) {
                Err(Error::Decode(message)) => assert!(!message.is_empty(), "{name}"),
                other => panic!("{name}: expected a decode error, got {other:?}"),
            }
        }
    }

    #[test]
    fn decoder_messages_quote_no_image_bytes() {
        // Found with the fuzz target's message invariant (fuzz/, issue 14):
        // the PNM decoder quoted a PAM header's unknown line or tuple type
        // whole, 60 KB of it if that is what was sent.
        let pam = [b"P7\n".as_slice(), &[b'X'; 3000], b" 1\nENDHDR\n"].concat();
        let tuple = [
            b"P7\nWIDTH 64\nHEIGHT 64\nDEPTH 3\nMAXVAL 255\nTUPLTYPE Q\x1b[2J".as_slice(),
            &[b'Q'; 3000],
            b"\nENDHDR\n",
            &[0; 64 * 64 * 3],
        ]
        .concat();
        for bytes in [pam, tuple] {
            match decode(&bytes, &DecodeLimits::default()) {
                Err(Error::Decode(message)) => {
                    assert!(message.contains("\"…\""), "{message}");
                    assert!(!message.contains("XX") && !message.contains("QQ"), "{message}");
                    assert!(message.chars().count() < 300 && !message.chars().any(char::is_control));
                }
                other => panic!("expected a decode error, got {other:?}"),
            }
        }
        assert_eq!(
            without_image_bytes("a \"quoted \\\" text\" and\tmore"),
            "a \"…\" and more"
        );
        assert_eq!(
            without_image_bytes(&"y".repeat(500)).chars().count(),
            MAX_DECODER_MESSAGE + 1
        );
    }

    #[test]
    fn huge_images_are_refused_from_the_header() {
        // A valid BMP header that declares 60000 x 60000 pixels (10 GB of
        // RGB): refused from the header, before any pixel is allocated.
        let mut bmp = encode(&DynamicImage::ImageRgb8(gradient(2, 2)), ImageFormat::Bmp);
        bmp[18..22].copy_from_slice(&60_000i32.to_le_bytes());
        bmp[22..26].copy_from_slice(&60_000i32.to_le_bytes());
        match decode(&bmp, &DecodeLimits::default()) {
            Err(Error::ImageSideTooLong { width, height, .. }) => {
                assert_eq!((width, height), (60_000, 60_000))
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        let roomy = DecodeLimits {
            max_side: 100_000,
            max_pixels: 40_000_000,
            ..DecodeLimits::default()
        };
        assert!(matches!(
            decode(&bmp, &roomy),
            Err(Error::ImageTooManyPixels {
                width: 60_000,
                height: 60_000,
                ..
            })
        ));
        let small = encode(&DynamicImage::ImageRgb8(gradient(30, 20)), ImageFormat::Bmp);
        let tight = DecodeLimits {
            max_bytes: 1 << 20,
            max_pixels: 599,
            ..DecodeLimits::default()
        };
        assert!(matches!(
            decode(&small, &tight),
            Err(Error::ImageTooManyPixels {
                width: 30,
                height: 20,
                ..
            })
        ));
        let tiny = DecodeLimits {
            max_bytes: 100,
            ..DecodeLimits::default()
        };
        assert!(matches!(
            decode(&small, &tiny),
            Err(Error::ImageTooManyBytes { .. })
        ));
    }

    /// A PNG whose IHDR declares `width` x `height` RGB pixels, followed by
    /// a deflate stream of `rows` rows of zeros: what a decompression bomb
    /// looks like (kilobytes that inflate to gigabytes).
    fn png_declaring(width: u32, height: u32, rows: u32) -> Vec<u8> {
        fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            let start = out.len();
            out.extend_from_slice(kind);
            out.extend_from_slice(data);
            let crc = crc32(&out[start..]);
            out.extend_from_slice(&crc.to_be_bytes());
        }
        fn crc32(bytes: &[u8]) -> u32 {
            let mut crc = 0xFFFF_FFFFu32;
            for &b in bytes {
                crc ^= u32::from(b);
                for _ in 0..8 {
                    crc = if crc & 1 == 1 {
                        (crc >> 1) ^ 0xEDB8_8320
                    } else {
                        crc >> 1
                    };
                }
            }
            !crc
        }
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&width.to_be_bytes());
        ihdr.extend_from_slice(&height.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
        chunk(&mut out, b"IHDR", &ihdr);
        let raw = vec![0u8; rows as usize * (1 + 3 * width as usize)];
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(&raw).expect("deflate");
        chunk(&mut out, b"IDAT", &z.finish().expect("deflate"));
        chunk(&mut out, b"IEND", &[]);
        out
    }

    #[test]
    fn shapes_no_camera_makes_are_refused_from_the_header() {
        let limits = DecodeLimits::default();
        // Within 40 megapixels, but 30 million pixels long: the shape of
        // the attack that once asked the resizer for 122 GB.
        for (w, h) in [(30_000_000, 1), (1, 30_000_000)] {
            assert!(
                matches!(
                    decode(&png_declaring(w, h, 1), &limits),
                    Err(Error::ImageSideTooLong { max_side: 16_384, .. })
                ),
                "{w}x{h}"
            );
        }
        // Within every side limit, but 10:1.
        for (w, h) in [(10_000, 1_000), (1_000, 10_000)] {
            assert!(
                matches!(
                    decode(&png_declaring(w, h, 1), &limits),
                    Err(Error::ImageAspectRatio { max_ratio: 8, .. })
                ),
                "{w}x{h}"
            );
        }
        assert!(limits.check_dimensions(8_000, 1_000).is_ok(), "8:1 is allowed");
        assert!(matches!(limits.check_dimensions(0, 10), Err(Error::Decode(_))));
        let with_minimum = DecodeLimits {
            min_side: 64,
            ..DecodeLimits::default()
        };
        let one_pixel = encode(&DynamicImage::ImageRgb8(gradient(1, 1)), ImageFormat::Png);
        assert!(matches!(
            decode(&one_pixel, &with_minimum),
            Err(Error::ImageTooSmall {
                width: 1,
                height: 1,
                min_side: 64
            })
        ));
        assert_eq!(read_dimensions(&one_pixel, &limits).expect("header"), (1, 1));
        assert!(matches!(
            read_dimensions(&one_pixel, &with_minimum),
            Err(Error::ImageTooSmall { .. })
        ));
    }

    #[test]
    fn a_cancelled_decode_stops() {
        // 6000 x 6000 zeros: a few hundred KB of deflate, 108 MB decoded.
        let bomb = png_declaring(6_000, 6_000, 6_000);
        assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
        let cancelled = AtomicBool::new(true);
        assert!(matches!(
            decode_cancellable(&bomb, &DecodeLimits::default(), &cancelled),
            Err(Error::Cancelled)
        ));
        // Cancelled while inflating: it stops with the flag, long before the
        // 108 MB are decoded (which takes far more than the 5 ms given).
        let flag = std::sync::Arc::new(AtomicBool::new(false));
        let decoding = {
            let flag = std::sync::Arc::clone(&flag);
            let bomb = bomb.clone();
            std::thread::spawn(move || decode_cancellable(&bomb, &DecodeLimits::default(), &flag))
        };
        std::thread::sleep(std::time::Duration::from_millis(5));
        flag.store(true, Ordering::Relaxed);
        let result = decoding.join().expect("decode thread");
        assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
        let image = decode(&bomb, &DecodeLimits::default()).expect("decodes when not cancelled");
        assert_eq!(image.dimensions(), (6_000, 6_000));
    }

    #[test]
    fn resize_targets_are_checked() {
        // 8:1 at a 224 input: 1792 x 224, fine.
        let wide = RgbImage::new(800, 100);
        let x = Preprocess::Clip { size: 224 }.apply(&wide).expect("8:1");
        assert_eq!(x.size(), [3, 224, 224]);
        // A 1 x 40000 strip resized to a shorter side of 224 would be
        // 224 x 8960000 pixels: refused, not allocated.
        let strip = RgbImage::new(1, 40_000);
        assert!(matches!(
            Preprocess::Clip { size: 224 }.resize(&strip),
            Err(Error::InvalidInput(_))
        ));
        let huge = Preprocess::Resize {
            height: 1 << 20,
            width: 1 << 20,
        };
        assert!(matches!(huge.resize(&wide), Err(Error::InvalidInput(_))));
        assert!(matches!(
            Preprocess::Clip { size: u32::MAX }.resize(&wide),
            Err(Error::InvalidInput(_))
        ));
    }

    #[test]
    fn preprocess_gives_the_input_size() {
        let landscape = gradient(300, 200);
        let portrait = gradient(90, 250);
        for pre in [
            Preprocess::Clip { size: 224 },
            Preprocess::Clip { size: 32 },
            Preprocess::Resize {
                height: 224,
                width: 128,
            },
            Preprocess::Resize {
                height: 256,
                width: 128,
            },
        ] {
            let (h, w) = pre.input_size();
            for img in [&landscape, &portrait] {
                let x = pre.apply(img).expect("preprocess");
                assert_eq!(x.size(), [3, i64::from(h), i64::from(w)], "{pre:?}");
                assert_eq!(x.kind(), Kind::Float);
            }
        }
        assert!(Preprocess::Clip { size: 0 }.apply(&landscape).is_err());
    }

    #[test]
    fn preprocess_normalises_with_clip_statistics() {
        // A uniform image stays uniform through resize and crop, so every
        // output value is (v / 255 - mean) / std exactly.
        let img = RgbImage::from_pixel(50, 70, Rgb([255, 128, 0]));
        let x = Preprocess::Clip { size: 16 }.apply(&img).expect("preprocess");
        for (c, v) in [255.0f32, 128.0, 0.0].into_iter().enumerate() {
            let want = (v / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
            let channel = x.get(c as i64);
            let (lo, hi) = (channel.min().double_value(&[]), channel.max().double_value(&[]));
            assert!(
                (lo - f64::from(want)).abs() < 1e-5 && (hi - f64::from(want)).abs() < 1e-5,
                "channel {c}"
            );
        }
    }

    #[test]
    fn clip_preprocess_crops_the_centre() {
        // 40 wide x 20 high: left quarter red, centre green, right quarter blue.
        // Resized to 32x16 then centre-cropped to 16x16, only green remains.
        let img = RgbImage::from_fn(40, 20, |x, _| match x {
            0..10 => Rgb([255, 0, 0]),
            10..30 => Rgb([0, 255, 0]),
            _ => Rgb([0, 0, 255]),
        });
        let x = Preprocess::Clip { size: 16 }.apply(&img).expect("preprocess");
        let red_max = x.get(0).max().double_value(&[]);
        let green_min = x.get(1).min().double_value(&[]);
        assert!(
            red_max < f64::from((0.05 - CLIP_MEAN[0]) / CLIP_STD[0]),
            "red leaked in: {red_max}"
        );
        assert!(
            green_min > f64::from((0.95 - CLIP_MEAN[1]) / CLIP_STD[1]),
            "green lost: {green_min}"
        );
    }

    #[test]
    fn preprocess_serialises_as_tagged_yaml() {
        let yaml = serde_yaml::to_string(&Preprocess::Resize {
            height: 224,
            width: 128,
        })
        .expect("yaml");
        assert_eq!(yaml, "kind: resize\nheight: 224\nwidth: 128\n");
        let back: Preprocess = serde_yaml::from_str("kind: clip\nsize: 224\n").expect("parse");
        assert_eq!(back, Preprocess::Clip { size: 224 });
        assert!(serde_yaml::from_str::<Preprocess>("kind: clip\nsize: 224\nmean: 1\n").is_err());
    }

    #[test]
    fn decodes_a_real_11k_hands_photo() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/data/11k-hands-sample/Hands"
        );
        let entry = std::fs::read_dir(dir)
            .expect("sample folder")
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("jpg")))
            .min()
            .expect("a jpg in the sample");
        let bytes = std::fs::read(&entry).expect("read");
        let img = decode(&bytes, &DecodeLimits::default()).expect("decode");
        assert!(img.width() >= 100 && img.height() >= 100);
        let x = Preprocess::Clip { size: 224 }.apply(&img).expect("preprocess");
        assert_eq!(x.size(), [3, 224, 224]);
    }
}
