//! Synthetic identity-labelled hand images, so that training, evaluation and
//! the demo run anywhere without the real dataset.
//!
//! Each person is a random but stable set of shape and colour parameters: a
//! palm ellipse, five fingers (length, width, spread angle), a skin tone and
//! a few marks (moles, scars). Each image of that person renders the same
//! hand under a random view: rotation, scale, shift, lighting (brightness and
//! a gradient), background colour and pixel noise. Views vary less than
//! persons do, so identities are separable, but not trivially: a learned
//! feature must ignore pose, light and background.
//!
//! Everything derives from one seed (person `k` draws from its own stream,
//! image `j` of it from another), so output is byte-for-byte reproducible.

use std::path::Path;

use image::{Rgb, RgbImage};

use super::rng::Rng;
use crate::{Error, Result};

/// Which layout to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `Hands/Hand_XXXXXXX.jpg` plus `HandInfo.csv` (all `dorsal right`,
    /// no accessories; ids straddle the dorsal-right threshold 1050 so that
    /// about half the persons train and half test).
    Hands11k,
    /// `<root>/person_XXXX/image_XXX.png`.
    Folder,
}

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynthOptions {
    /// Number of persons.
    pub persons: usize,
    /// Images per person.
    pub images_per_person: usize,
    /// Side of the square images, in pixels.
    pub size: u32,
    /// Seed of everything.
    pub seed: u64,
    /// Output layout.
    pub layout: Layout,
}

impl Default for SynthOptions {
    fn default() -> Self {
        Self {
            persons: 100,
            images_per_person: 8,
            size: 64,
            seed: 0,
            layout: Layout::Folder,
        }
    }
}

/// One finger: a capsule from the palm edge outwards.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Finger {
    /// Where it leaves the palm, as an angle around the palm centre.
    base_angle: f64,
    /// Direction it points (radians from "up").
    direction: f64,
    length: f64,
    width: f64,
}

/// A small disc of colour on the back of the hand.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Mark {
    x: f64,
    y: f64,
    radius: f64,
    colour: [f64; 3],
}

/// The stable appearance of one person.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    palm: (f64, f64),
    fingers: Vec<Finger>,
    skin: [f64; 3],
    marks: Vec<Mark>,
}

impl Identity {
    fn random(rng: &mut Rng) -> Self {
        let palm = (rng.range(0.28, 0.42), rng.range(0.30, 0.42));
        let spread = rng.range(0.12, 0.30);
        let mut fingers: Vec<Finger> = (0..4)
            .map(|i| {
                let offset = i as f64 - 1.5;
                Finger {
                    base_angle: offset * 0.32,
                    direction: offset * spread + rng.range(-0.08, 0.08),
                    length: rng.range(0.28, 0.55) * if i == 0 || i == 3 { 0.8 } else { 1.0 },
                    width: rng.range(0.07, 0.12),
                }
            })
            .collect();
        // The thumb leaves the side of the palm and points outwards.
        fingers.push(Finger {
            base_angle: -rng.range(1.0, 1.5),
            direction: -rng.range(0.7, 1.3),
            length: rng.range(0.25, 0.40),
            width: rng.range(0.09, 0.13),
        });
        let tone = rng.unit();
        let skin =
            [0.35 + 0.6 * tone, 0.22 + 0.5 * tone, 0.15 + 0.42 * tone].map(|c| c + 0.05 * rng.normal());
        let marks = (0..1 + rng.below(3))
            .map(|_| Mark {
                x: rng.range(-0.25, 0.25),
                y: rng.range(0.0, 0.45),
                radius: rng.range(0.04, 0.09),
                colour: [rng.unit(), rng.unit() * 0.6, rng.unit() * 0.5],
            })
            .collect();
        Self {
            palm,
            fingers,
            skin,
            marks,
        }
    }

    /// Colour of the hand at `(x, y)` (hand coordinates, y down, palm centre
    /// at (0, 0.15)), or `None` off the hand.
    fn colour_at(&self, x: f64, y: f64) -> Option<[f64; 3]> {
        let (cx, cy) = (0.0, 0.15);
        let (px, py) = ((x - cx) / self.palm.0, (y - cy) / self.palm.1);
        let in_palm = px * px + py * py <= 1.0;
        let in_finger = self.fingers.iter().any(|f| {
            let (bx, by) = (
                cx + self.palm.0 * 0.85 * f.base_angle.sin(),
                cy - self.palm.1 * 0.85 * f.base_angle.cos(),
            );
            let (tx, ty) = (
                bx + f.length * f.direction.sin(),
                by - f.length * f.direction.cos(),
            );
            segment_distance(x, y, bx, by, tx, ty) <= f.width / 2.0
        });
        if !in_palm && !in_finger {
            return None;
        }
        let mark = self
            .marks
            .iter()
            .find(|m| (x - m.x).powi(2) + (y - m.y).powi(2) <= m.radius * m.radius);
        Some(mark.map_or(self.skin, |m| m.colour))
    }
}

fn segment_distance(x: f64, y: f64, ax: f64, ay: f64, bx: f64, by: f64) -> f64 {
    let (dx, dy) = (bx - ax, by - ay);
    let t = (((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy)).clamp(0.0, 1.0);
    ((x - ax - t * dx).powi(2) + (y - ay - t * dy).powi(2)).sqrt()
}

/// The conditions of one photograph.
#[derive(Debug, Clone, Copy, PartialEq)]
struct View {
    rotation: f64,
    scale: f64,
    shift: (f64, f64),
    brightness: f64,
    gradient: f64,
    background: [f64; 3],
    noise: f64,
}

impl View {
    fn random(rng: &mut Rng) -> Self {
        let grey = rng.range(0.65, 0.9);
        Self {
            rotation: rng.range(-0.2, 0.2),
            // The hand fills most of the frame, as in the 11k photographs.
            scale: 1.15 * rng.range(0.9, 1.1),
            shift: (rng.range(-0.06, 0.06), rng.range(-0.06, 0.06)),
            brightness: rng.range(0.85, 1.15),
            gradient: rng.range(-0.15, 0.15),
            background: [0, 1, 2].map(|_| grey + rng.range(-0.04, 0.04)),
            noise: rng.range(0.01, 0.04),
        }
    }
}

/// Renders one image of `identity`; `rng` supplies the pixel noise.
fn render(identity: &Identity, view: &View, size: u32, rng: &mut Rng) -> RgbImage {
    let (sin, cos) = view.rotation.sin_cos();
    RgbImage::from_fn(size, size, |i, j| {
        // Image coordinates in [-1, 1], then back into hand coordinates.
        let u = (i as f64 + 0.5) / size as f64 * 2.0 - 1.0 - view.shift.0;
        let v = (j as f64 + 0.5) / size as f64 * 2.0 - 1.0 - view.shift.1;
        let (x, y) = (
            (cos * u + sin * v) / view.scale,
            (-sin * u + cos * v) / view.scale,
        );
        let base = identity.colour_at(x, y).unwrap_or(view.background);
        let light = view.brightness * (1.0 + view.gradient * u);
        Rgb(base.map(|c| ((c * light + view.noise * rng.normal()).clamp(0.0, 1.0) * 255.0).round() as u8))
    })
}

/// Image `index` of person `person`, exactly as [`generate`] writes it.
pub fn image(options: &SynthOptions, person: usize, index: usize) -> RgbImage {
    let identity = Identity::random(&mut Rng::new(options.seed, 2 * person as u64 + 1));
    // Each person's images draw from its own stream; image j skips ahead by
    // regenerating the earlier views, which is cheap.
    let mut rng = Rng::new(options.seed, 2 * person as u64 + 2);
    let mut view = View::random(&mut rng);
    for _ in 0..index {
        view = View::random(&mut rng);
    }
    let mut noise = Rng::new(options.seed ^ 0x5eed_f00d, ((person as u64) << 20) | index as u64);
    render(&identity, &view, options.size, &mut noise)
}

fn skin_name(skin: [f64; 3]) -> &'static str {
    match (skin[0] + skin[1] + skin[2]) / 3.0 {
        m if m < 0.4 => "dark",
        m if m < 0.6 => "medium",
        _ => "fair",
    }
}

/// Writes the dataset under `out` (created if needed); returns the number of
/// images written.
pub fn generate(out: &Path, options: &SynthOptions) -> Result<usize> {
    if options.persons < 2 || options.images_per_person < 1 || options.size < 16 {
        return Err(Error::Invalid(
            "synthetic data needs >= 2 persons, >= 1 image each, size >= 16".into(),
        ));
    }
    let mkdir = |dir: &Path| std::fs::create_dir_all(dir).map_err(Error::io(dir));
    let save = |img: &RgbImage, path: &Path| {
        img.save(path).map_err(|cause| Error::Image {
            path: path.into(),
            cause,
        })
    };
    let mut csv = String::from(
        "id,age,gender,skinColor,accessories,nailPolish,aspectOfHand,imageName,irregularities\n",
    );
    // Half the persons (rounded up) get ids <= 1050, the dorsal-right threshold.
    let first_id = 1051 - options.persons.div_ceil(2);
    let mut written = 0;
    for person in 0..options.persons {
        let identity = Identity::random(&mut Rng::new(options.seed, 2 * person as u64 + 1));
        for index in 0..options.images_per_person {
            let img = image(options, person, index);
            match options.layout {
                Layout::Hands11k => {
                    let id = first_id + person;
                    let name = format!("Hand_{:07}.jpg", written);
                    mkdir(&out.join("Hands"))?;
                    save(&img, &out.join("Hands").join(&name))?;
                    csv.push_str(&format!(
                        "\"{id:07}\",30,\"male\",\"{}\",0,0,\"dorsal right\",\"{name}\",0\n",
                        skin_name(identity.skin)
                    ));
                }
                Layout::Folder => {
                    let dir = out.join(format!("person_{person:04}"));
                    mkdir(&dir)?;
                    save(&img, &dir.join(format!("image_{index:03}.png")))?;
                }
            }
            written += 1;
        }
    }
    if options.layout == Layout::Hands11k {
        let path = out.join("HandInfo.csv");
        std::fs::write(&path, csv).map_err(Error::io(&path))?;
    }
    Ok(written)
}
