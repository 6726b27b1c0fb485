//! Training-time image augmentation on top of the checkpoint's preprocessing.
//!
//! The training view follows CLIP-ReID's transform (Li et al., "CLIP-ReID:
//! Exploiting Vision-Language Model for Image Re-Identification without
//! Concrete Text Labels", AAAI 2023, "Implementation details" of the experiments, and
//! its `datasets/make_dataloader_clipreid.py`): resize to the input size,
//! (flip,) pad 10 then random crop back, normalise, random erasing with
//! probability 0.5. Steps, in order:
//!
//! 1. geometry of [`Preprocess::resize`], the same resize serving uses;
//! 2. horizontal flip with `hflip_prob`, **off by default**: a flip turns a
//!    right hand into a left one, and PROTOCOL.md keeps aspects as separate
//!    classes (CLIP-ReID's default 0.5 suits pedestrians, not hands);
//! 3. colour jitter (torchvision `ColorJitter` semantics: brightness,
//!    contrast, saturation factors drawn uniformly from `[max(0, 1 - v), 1 + v]`,
//!    hue shift from `[-v, v]` of a full turn, applied in a random order as
//!    torchvision does); off by default, as in CLIP-ReID;
//! 4. random affine (torchvision `RandomAffine` semantics, without shear or
//!    translation): a rotation by an angle uniform in `[-degrees, degrees]`
//!    and a scaling by a factor uniform in `[scale_min, scale_max]`, both
//!    about the image centre, bilinear, fill 0 (black before
//!    normalisation); off by default, as in CLIP-ReID. It imitates a
//!    hand photographed at another angle and distance, the nuisance a
//!    self-supervised model has to learn to ignore (SimCLR's augmentations
//!    stand for ImageNet's nuisances the same way);
//! 5. zero padding of `padding` pixels on every side (torchvision `Pad`,
//!    fill 0 = black before normalisation) and a random crop back to the
//!    input size, each offset uniform in `[0, 2 * padding]`;
//! 6. normalisation with CLIP's mean and standard deviation;
//! 7. random erasing (Zhong et al., "Random Erasing Data Augmentation",
//!    AAAI 2020, Alg. 1): area fraction uniform in [0.02, 0.4], aspect ratio
//!    in [0.3, 1/0.3] drawn log-uniformly (timm's `RandomErasing`, which
//!    CLIP-ReID uses), up to 10 attempts to fit the rectangle. The rectangle
//!    is filled with independent N(0, 1) values per pixel and channel in the
//!    normalised space (timm `mode='pixel'`, CLIP-ReID's setting), rather
//!    than the paper's uniform [0, 255] noise or ImageNet mean.

use anyhow::{Result, bail};
use handid_model::Preprocess;
use handid_model::image::{CLIP_MEAN, CLIP_STD, to_normalised_tensor};
use image::RgbImage;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::RngCore;
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// Random erasing's area fraction range (Zhong et al. 2020: s_l, s_h).
const ERASE_AREA: (f64, f64) = (0.02, 0.4);
/// Random erasing's smallest aspect ratio r_1; the largest is 1 / r_1 (Zhong et al. 2020).
const ERASE_MIN_ASPECT: f64 = 0.3;
/// Attempts to place an erasing rectangle inside the image (timm: 10).
const ERASE_ATTEMPTS: usize = 10;

/// Colour jitter strengths (torchvision `ColorJitter`); 0 turns a component off.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ColorJitter {
    /// Brightness factor drawn from `[max(0, 1 - b), 1 + b]`.
    pub brightness: f64,
    /// Contrast factor drawn from `[max(0, 1 - c), 1 + c]`.
    pub contrast: f64,
    /// Saturation factor drawn from `[max(0, 1 - s), 1 + s]`.
    pub saturation: f64,
    /// Hue shift drawn from `[-h, h]` turns; at most 0.5.
    pub hue: f64,
}

/// Random rotation and scaling about the centre (torchvision
/// `RandomAffine(degrees, scale=(scale_min, scale_max))`); the default is off.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RandomAffine {
    /// Rotation angle drawn from `[-degrees, degrees]`; at most 180.
    pub degrees: f64,
    /// Smallest scale factor (greater than 0).
    pub scale_min: f64,
    /// Largest scale factor (at least `scale_min`).
    pub scale_max: f64,
}

impl Default for RandomAffine {
    fn default() -> Self {
        Self {
            degrees: 0.0,
            scale_min: 1.0,
            scale_max: 1.0,
        }
    }
}

impl RandomAffine {
    fn is_off(&self) -> bool {
        self.degrees == 0.0 && self.scale_min == 1.0 && self.scale_max == 1.0
    }
}

impl ColorJitter {
    fn is_off(&self) -> bool {
        self.brightness == 0.0 && self.contrast == 0.0 && self.saturation == 0.0 && self.hue == 0.0
    }
}

/// The `augment:` section of the training config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    /// Zero padding on each side before the random crop (CLIP-ReID: 10).
    /// Only used when `random_crop` is on.
    pub padding: u32,
    /// Pad then crop back to the input size at a random offset.
    pub random_crop: bool,
    /// Probability of random erasing (CLIP-ReID: 0.5).
    pub erasing_prob: f64,
    /// Colour jitter; all off by default.
    pub color_jitter: ColorJitter,
    /// Random rotation and scaling; off by default.
    pub random_affine: RandomAffine,
    /// Probability of a horizontal flip; 0 by default (a flipped right hand is a left hand).
    pub hflip_prob: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            padding: 10,
            random_crop: true,
            erasing_prob: 0.5,
            color_jitter: ColorJitter::default(),
            random_affine: RandomAffine::default(),
            hflip_prob: 0.0,
        }
    }
}

impl AugmentConfig {
    /// Every augmentation off: the training view equals the evaluation view.
    pub fn none() -> Self {
        Self {
            padding: 0,
            random_crop: false,
            erasing_prob: 0.0,
            color_jitter: ColorJitter::default(),
            random_affine: RandomAffine::default(),
            hflip_prob: 0.0,
        }
    }

    /// Checks every range; errors name the offending key.
    pub fn validate(&self) -> Result<()> {
        let probability = |key: &str, v: f64| -> Result<()> {
            if !(0.0..=1.0).contains(&v) {
                bail!("augment.{key} must be a probability in [0, 1], got {v}");
            }
            Ok(())
        };
        probability("erasing_prob", self.erasing_prob)?;
        probability("hflip_prob", self.hflip_prob)?;
        let jitter = &self.color_jitter;
        for (key, v) in [
            ("brightness", jitter.brightness),
            ("contrast", jitter.contrast),
            ("saturation", jitter.saturation),
        ] {
            if !v.is_finite() || v < 0.0 {
                bail!("augment.color_jitter.{key} must be a finite number >= 0, got {v}");
            }
        }
        if !(0.0..=0.5).contains(&jitter.hue) {
            bail!(
                "augment.color_jitter.hue must be in [0, 0.5] (a fraction of a full turn), got {}",
                jitter.hue
            );
        }
        let affine = &self.random_affine;
        if !(0.0..=180.0).contains(&affine.degrees) {
            bail!(
                "augment.random_affine.degrees must be in [0, 180], got {}",
                affine.degrees
            );
        }
        if !(affine.scale_min.is_finite() && affine.scale_max.is_finite())
            || affine.scale_min <= 0.0
            || affine.scale_min > affine.scale_max
            || affine.scale_max > 10.0
        {
            bail!(
                "augment.random_affine needs 0 < scale_min <= scale_max <= 10, got scale_min {} and \
                 scale_max {}",
                affine.scale_min,
                affine.scale_max
            );
        }
        // Beyond a few hundred pixels the crop would mostly be padding.
        if self.padding > 1000 {
            bail!(
                "augment.padding must be at most 1000 pixels, got {}",
                self.padding
            );
        }
        Ok(())
    }
}

/// Training and evaluation views of an image for one checkpoint's preprocessing.
#[derive(Clone, Debug)]
pub struct Augment {
    config: AugmentConfig,
    preprocess: Preprocess,
}

impl Augment {
    /// `preprocess` is the checkpoint's geometry + normalisation (the same one serving uses).
    pub fn new(config: AugmentConfig, preprocess: Preprocess) -> Result<Self> {
        config.validate()?;
        let (height, width) = preprocess.input_size();
        if height == 0 || width == 0 {
            bail!("preprocessing has an empty input size {height}x{width}");
        }
        Ok(Self { config, preprocess })
    }

    /// The configuration in use.
    pub fn config(&self) -> &AugmentConfig {
        &self.config
    }

    /// The checkpoint preprocessing in use.
    pub fn preprocess(&self) -> &Preprocess {
        &self.preprocess
    }

    /// The deterministic first step of both views: [`Preprocess::resize`].
    /// The loader caches its result.
    pub fn resize(&self, img: &RgbImage) -> Result<RgbImage> {
        Ok(self.preprocess.resize(img)?)
    }

    /// Training view: resize as `preprocess` does, then jitter/pad+crop/erasing;
    /// `[3, H, W]` f32 normalised, CPU.
    pub fn train(&self, img: &RgbImage, rng: &mut ChaCha8Rng) -> Result<Tensor> {
        self.train_resized(&self.resize(img)?, rng)
    }

    /// Evaluation view: exactly `preprocess.apply(img)`.
    pub fn eval(&self, img: &RgbImage) -> Result<Tensor> {
        Ok(self.preprocess.apply(img)?)
    }

    /// Evaluation view of an image already passed through [`Augment::resize`].
    pub fn eval_resized(&self, resized: &RgbImage) -> Result<Tensor> {
        self.check_size(resized)?;
        Ok(to_normalised_tensor(resized))
    }

    /// Training view of an image already passed through [`Augment::resize`].
    pub fn train_resized(&self, resized: &RgbImage, rng: &mut ChaCha8Rng) -> Result<Tensor> {
        self.check_size(resized)?;
        let (h, w) = (resized.height() as usize, resized.width() as usize);
        let cfg = &self.config;
        // [H, W, 3] in [0, 1]
        let mut hwc: Vec<f32> = resized.as_raw().iter().map(|&v| f32::from(v) / 255.0).collect();
        if cfg.hflip_prob > 0.0 && uniform(rng) < cfg.hflip_prob {
            hflip(&mut hwc, h, w);
        }
        if !cfg.color_jitter.is_off() {
            color_jitter(&mut hwc, &cfg.color_jitter, rng);
        }
        if !cfg.random_affine.is_off() {
            hwc = random_affine(&hwc, h, w, &cfg.random_affine, rng);
        }
        if cfg.random_crop && cfg.padding > 0 {
            hwc = pad_and_crop(&hwc, h, w, cfg.padding as usize, rng);
        }
        // [3, H, W] normalised, computed as `to_normalised_tensor` does.
        let mut chw = vec![0f32; 3 * h * w];
        for (i, px) in hwc.chunks_exact(3).enumerate() {
            for c in 0..3 {
                chw[c * h * w + i] = (px[c] - CLIP_MEAN[c]) / CLIP_STD[c];
            }
        }
        if cfg.erasing_prob > 0.0 && uniform(rng) < cfg.erasing_prob {
            random_erase(&mut chw, h, w, rng);
        }
        Ok(Tensor::from_slice(&chw).view([3, h as i64, w as i64]))
    }

    fn check_size(&self, resized: &RgbImage) -> Result<()> {
        let (height, width) = self.preprocess.input_size();
        if (resized.height(), resized.width()) != (height, width) {
            bail!(
                "expected a {height}x{width} resized image, got {}x{}",
                resized.height(),
                resized.width()
            );
        }
        Ok(())
    }
}

/// Uniform in [0, 1) with 53 random bits.
pub(crate) fn uniform(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

fn uniform_in(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * uniform(rng)
}

/// Uniform integer in `0..=max`.
fn below_or_eq(rng: &mut ChaCha8Rng, max: usize) -> usize {
    ((uniform(rng) * (max as f64 + 1.0)) as usize).min(max)
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1 = 1.0 - uniform(rng); // (0, 1]
    let u2 = uniform(rng);
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

fn hflip(hwc: &mut [f32], h: usize, w: usize) {
    for row in hwc.chunks_exact_mut(3 * w).take(h) {
        for x in 0..w / 2 {
            for c in 0..3 {
                row.swap(3 * x + c, 3 * (w - 1 - x) + c);
            }
        }
    }
}

/// ITU-R 601 luma, as torchvision's `rgb_to_grayscale`.
fn luma(px: &[f32]) -> f32 {
    0.299 * px[0] + 0.587 * px[1] + 0.114 * px[2]
}

fn color_jitter(hwc: &mut [f32], jitter: &ColorJitter, rng: &mut ChaCha8Rng) {
    // torchvision draws a random order of the four adjustments (Fisher-Yates here).
    let mut order = [0usize, 1, 2, 3];
    for i in (1..4).rev() {
        order.swap(i, below_or_eq(rng, i));
    }
    let factor = |rng: &mut ChaCha8Rng, v: f64| uniform_in(rng, (1.0 - v).max(0.0), 1.0 + v) as f32;
    for op in order {
        match op {
            0 if jitter.brightness > 0.0 => {
                let f = factor(rng, jitter.brightness);
                hwc.iter_mut().for_each(|v| *v = (*v * f).clamp(0.0, 1.0));
            }
            1 if jitter.contrast > 0.0 => {
                let f = factor(rng, jitter.contrast);
                let pixels = (hwc.len() / 3).max(1) as f32;
                let mean = hwc.chunks_exact(3).map(luma).sum::<f32>() / pixels;
                hwc.iter_mut()
                    .for_each(|v| *v = (f * *v + (1.0 - f) * mean).clamp(0.0, 1.0));
            }
            2 if jitter.saturation > 0.0 => {
                let f = factor(rng, jitter.saturation);
                for px in hwc.chunks_exact_mut(3) {
                    let grey = luma(px);
                    px.iter_mut()
                        .for_each(|v| *v = (f * *v + (1.0 - f) * grey).clamp(0.0, 1.0));
                }
            }
            3 if jitter.hue > 0.0 => {
                let shift = uniform_in(rng, -jitter.hue, jitter.hue) as f32;
                hwc.chunks_exact_mut(3).for_each(|px| shift_hue(px, shift));
            }
            _ => {}
        }
    }
}

/// Rotates a pixel's hue by `shift` turns (RGB -> HSV -> RGB).
fn shift_hue(px: &mut [f32], shift: f32) {
    let (r, g, b) = (px[0], px[1], px[2]);
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let delta = max - min;
    if delta <= 0.0 {
        return; // grey: no hue
    }
    let hue = if max == r {
        ((g - b) / delta).rem_euclid(6.0)
    } else if max == g {
        (b - r) / delta + 2.0
    } else {
        (r - g) / delta + 4.0
    } / 6.0;
    let hue = (hue + shift).rem_euclid(1.0) * 6.0;
    let (s, v) = (delta / max, max);
    let sector = (hue.floor() as i32).rem_euclid(6);
    let frac = hue - hue.floor();
    let p = v * (1.0 - s);
    let q = v * (1.0 - s * frac);
    let t = v * (1.0 - s * (1.0 - frac));
    let (r, g, b) = match sector {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    };
    px.copy_from_slice(&[r, g, b]);
}

/// Rotates by a random angle and scales by a random factor about the
/// centre; see the module docs. Each output pixel samples the source
/// bilinearly at the inverse-mapped position; outside the source is 0.
fn random_affine(hwc: &[f32], h: usize, w: usize, affine: &RandomAffine, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let angle = uniform_in(rng, -affine.degrees, affine.degrees).to_radians();
    let scale = uniform_in(rng, affine.scale_min, affine.scale_max);
    rotate_and_scale(hwc, h, w, angle, scale)
}

/// `hwc` rotated by `angle` radians and scaled by `scale` about its centre.
fn rotate_and_scale(hwc: &[f32], h: usize, w: usize, angle: f64, scale: f64) -> Vec<f32> {
    let (sin, cos) = angle.sin_cos();
    // The centre of the pixel grid (torchvision rotates about it too).
    let (cy, cx) = ((h as f64 - 1.0) / 2.0, (w as f64 - 1.0) / 2.0);
    let at = |y: isize, x: isize, c: usize| -> f32 {
        if y < 0 || x < 0 || y as usize >= h || x as usize >= w {
            0.0
        } else {
            hwc[3 * (y as usize * w + x as usize) + c]
        }
    };
    let mut out = vec![0f32; hwc.len()];
    for y in 0..h {
        for x in 0..w {
            // Inverse map: undo the scaling, then the rotation.
            let (u, v) = ((x as f64 - cx) / scale, (y as f64 - cy) / scale);
            let (sx, sy) = (cos * u + sin * v + cx, -sin * u + cos * v + cy);
            let (x0, y0) = (sx.floor(), sy.floor());
            let (fx, fy) = ((sx - x0) as f32, (sy - y0) as f32);
            let (x0, y0) = (x0 as isize, y0 as isize);
            for c in 0..3 {
                let top = at(y0, x0, c) * (1.0 - fx) + at(y0, x0 + 1, c) * fx;
                let bottom = at(y0 + 1, x0, c) * (1.0 - fx) + at(y0 + 1, x0 + 1, c) * fx;
                out[3 * (y * w + x) + c] = top * (1.0 - fy) + bottom * fy;
            }
        }
    }
    out
}

/// Zero-pads by `pad` on every side and crops `h` x `w` at a random offset.
fn pad_and_crop(hwc: &[f32], h: usize, w: usize, pad: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let top = below_or_eq(rng, 2 * pad);
    let left = below_or_eq(rng, 2 * pad);
    let mut out = vec![0f32; hwc.len()];
    for y in 0..h {
        // Row y of the crop is row y + top - pad of the source.
        let Some(src_y) = (y + top).checked_sub(pad).filter(|&s| s < h) else {
            continue;
        };
        for x in 0..w {
            let Some(src_x) = (x + left).checked_sub(pad).filter(|&s| s < w) else {
                continue;
            };
            let (dst, src) = (3 * (y * w + x), 3 * (src_y * w + src_x));
            out[dst..dst + 3].copy_from_slice(&hwc[src..src + 3]);
        }
    }
    out
}

/// Random erasing on a normalised `[3, H, W]` buffer; see the module docs.
fn random_erase(chw: &mut [f32], h: usize, w: usize, rng: &mut ChaCha8Rng) {
    let area = (h * w) as f64;
    let (log_lo, log_hi) = (ERASE_MIN_ASPECT.ln(), (1.0 / ERASE_MIN_ASPECT).ln());
    for _ in 0..ERASE_ATTEMPTS {
        let target = area * uniform_in(rng, ERASE_AREA.0, ERASE_AREA.1);
        let aspect = uniform_in(rng, log_lo, log_hi).exp();
        let eh = (target * aspect).sqrt().round() as usize;
        let ew = (target / aspect).sqrt().round() as usize;
        if eh == 0 || ew == 0 || eh >= h || ew >= w {
            continue;
        }
        let top = below_or_eq(rng, h - eh);
        let left = below_or_eq(rng, w - ew);
        for c in 0..3 {
            for y in top..top + eh {
                let row = c * h * w + y * w;
                for v in &mut chw[row + left..row + left + ew] {
                    *v = normal(rng);
                }
            }
        }
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 4 x 5 image whose every value differs.
    fn ramp(h: usize, w: usize) -> Vec<f32> {
        (0..h * w * 3).map(|i| i as f32 / 100.0).collect()
    }

    #[test]
    fn no_rotation_and_unit_scale_is_the_identity() {
        let image = ramp(4, 5);
        assert_eq!(rotate_and_scale(&image, 4, 5, 0.0, 1.0), image);
    }

    #[test]
    fn a_quarter_turn_moves_every_pixel_where_a_quarter_turn_puts_it() {
        let n = 5;
        let image = ramp(n, n);
        let turned = rotate_and_scale(&image, n, n, std::f64::consts::FRAC_PI_2, 1.0);
        // Output (y, x) samples the source at (x, n - 1 - y) under the
        // inverse map sx = cos u + sin v, sy = -sin u + cos v.
        for y in 0..n {
            for x in 0..n {
                for c in 0..3 {
                    let want = image[3 * ((n - 1 - x) * n + y) + c];
                    let got = turned[3 * (y * n + x) + c];
                    assert!((got - want).abs() < 1e-4, "({y}, {x}, {c}): {got} != {want}");
                }
            }
        }
    }

    #[test]
    fn shrinking_keeps_the_centre_and_fills_the_border_with_black() {
        let n = 9;
        let image = vec![0.5f32; n * n * 3];
        let shrunk = rotate_and_scale(&image, n, n, 0.0, 0.5);
        // The centre pixel maps onto itself.
        assert_eq!(&shrunk[3 * (4 * n + 4)..3 * (4 * n + 4) + 3], &[0.5; 3]);
        // The corner samples two pixels outside the source.
        assert_eq!(&shrunk[0..3], &[0.0; 3]);
    }
}
