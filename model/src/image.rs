//! Decoding untrusted image bytes and CLIP's preprocessing.
//!
//! Images come from security systems over the network, so decoding is
//! defensive: the byte size is checked first, then the dimensions declared in
//! the header, and only then are pixels decoded. Errors describe what is wrong
//! and never include the bytes.

use std::io::Cursor;

use image::imageops::{self, FilterType};
use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// CLIP's per-channel mean (RGB), from OpenAI CLIP `clip.py` `_transform`.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's per-channel standard deviation (RGB), from OpenAI CLIP `clip.py`.
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// Limits applied to an encoded image before and while decoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest accepted encoded size in bytes.
    pub max_bytes: usize,
    /// Largest accepted width x height, checked from the header before decoding.
    pub max_pixels: u64,
}

impl Default for DecodeLimits {
    /// 20 MiB and 40 megapixels: a modern phone photo fits, a decompression
    /// bomb does not.
    fn default() -> Self {
        Self {
            max_bytes: 20 << 20,
            max_pixels: 40_000_000,
        }
    }
}

/// Decodes a JPEG, PNG, BMP or PNM (PGM/PPM) image into 8-bit RGB.
///
/// EXIF orientation is applied, grey images are replicated to three
/// channels, alpha is dropped and 16-bit samples are scaled to 8 bits.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage> {
    if bytes.len() > limits.max_bytes {
        return Err(Error::ImageTooManyBytes {
            bytes: bytes.len(),
            max_bytes: limits.max_bytes,
        });
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::Decode(e.to_string()))?;
    if reader.format().is_none() {
        return Err(Error::Decode(
            "unrecognised format (accepted: JPEG, PNG, BMP, PNM)".to_owned(),
        ));
    }
    let mut decoder = reader.into_decoder().map_err(decode_error)?;
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels {
        return Err(Error::ImageTooManyPixels {
            width,
            height,
            max_pixels: limits.max_pixels,
        });
    }
    if pixels == 0 {
        return Err(Error::Decode(format!("image has no pixels ({width}x{height})")));
    }
    // The decoder's own allocation limit backs up the header check (16-bit
    // RGBA is the widest layout we accept: 8 bytes per pixel).
    let mut decoder_limits = Limits::default();
    decoder_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(1 << 20));
    decoder.set_limits(decoder_limits).map_err(decode_error)?;
    // A missing or malformed EXIF block is not worth rejecting the photo.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(decode_error)?;
    image.apply_orientation(orientation);
    Ok(image.into_rgb8())
}

fn decode_error(error: image::ImageError) -> Error {
    match error {
        image::ImageError::Limits(limit) => Error::Decode(format!("decoder limit reached: {limit}")),
        other => Error::Decode(other.to_string()),
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
        let resized = match *self {
            Preprocess::Clip { size } => resize_shorter_and_crop(img, size),
            Preprocess::Resize { height, width } => {
                imageops::resize(img, width, height, FilterType::CatmullRom)
            }
        };
        Ok(resized)
    }
}

/// torchvision `Resize(size)` + `CenterCrop(size)` as OpenAI CLIP composes
/// them: the longer side is `int(size * long / short)`, the crop offset
/// `round((len - size) / 2)`.
fn resize_shorter_and_crop(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = (u64::from(img.width()), u64::from(img.height()));
    let size64 = u64::from(size);
    // Integer floor division is torchvision's int() of a positive ratio.
    let (new_w, new_h) = if w <= h {
        (size64, size64 * h / w)
    } else {
        (size64 * w / h, size64)
    };
    // The longer side is at least `size`, and at most `size` times the
    // pixel count, which the decoder limits bound; u32 holds it.
    let new_w = u32::try_from(new_w).unwrap_or(u32::MAX);
    let new_h = u32::try_from(new_h).unwrap_or(u32::MAX);
    let resized = if (new_w, new_h) == (img.width(), img.height()) {
        img.clone()
    } else {
        imageops::resize(img, new_w, new_h, FilterType::CatmullRom)
    };
    let left = ((f64::from(new_w) - f64::from(size)) / 2.0).round() as u32;
    let top = ((f64::from(new_h) - f64::from(size)) / 2.0).round() as u32;
    imageops::crop_imm(&resized, left, top, size, size).to_image()
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
    fn huge_images_are_refused_from_the_header() {
        // A valid BMP header that declares 60000 x 60000 pixels (10 GB of
        // RGB): refused from the header, before any pixel is allocated.
        let mut bmp = encode(&DynamicImage::ImageRgb8(gradient(2, 2)), ImageFormat::Bmp);
        bmp[18..22].copy_from_slice(&60_000i32.to_le_bytes());
        bmp[22..26].copy_from_slice(&60_000i32.to_le_bytes());
        match decode(&bmp, &DecodeLimits::default()) {
            Err(Error::ImageTooManyPixels { width, height, .. }) => {
                assert_eq!((width, height), (60_000, 60_000))
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        let small = encode(&DynamicImage::ImageRgb8(gradient(30, 20)), ImageFormat::Bmp);
        let tight = DecodeLimits {
            max_bytes: 1 << 20,
            max_pixels: 599,
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
            max_pixels: 1 << 20,
        };
        assert!(matches!(
            decode(&small, &tiny),
            Err(Error::ImageTooManyBytes { .. })
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
