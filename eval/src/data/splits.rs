//! Seeded splits (PROTOCOL.md section 2), written as [`Manifest`]s.
//!
//! Split names: `train_all` (training persons), `train` and `val` (one random
//! image per training person), `test` (test persons), `query{i}` and
//! `gallery{i}` for `i` in `0..n_splits` (one random gallery image per test
//! person, the others are queries) and, for the 11k variant, `gallery_all{i}`.
//!
//! Determinism: persons and images are sorted before any draw; all draws come
//! from ChaCha8 seeded with the recorded seed (one stream per aspect), in a
//! fixed order: `val` first, then split 0, 1, ... So the same seed gives
//! byte-identical manifests on every run and platform.
//!
//! A person with a single image has no `val` image (it stays in `train`) and
//! no query (its image is its gallery entry).

use std::collections::BTreeMap;

use super::hands11k::{Aspect, HandInfo};
use super::manifest::{Entry, Manifest};
use super::rng::Rng;
use super::{Dataset, Sample};
use crate::{Error, Result};

/// Number of query/gallery splits of the protocol.
pub const DEFAULT_SPLITS: usize = 10;

/// Seed used when none is given.
pub const DEFAULT_SEED: u64 = 0;

/// Random stream of the person shuffle in [`by_fraction`] (aspects use 0..3).
const SHUFFLE_STREAM: u64 = 1000;

/// How splits are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitOptions {
    /// Seed of every draw (recorded in the manifest).
    pub seed: u64,
    /// Number of query/gallery splits.
    pub n_splits: usize,
}

impl Default for SplitOptions {
    fn default() -> Self {
        Self {
            seed: DEFAULT_SEED,
            n_splits: DEFAULT_SPLITS,
        }
    }
}

/// Persons in a fixed order, each with its images sorted.
type Persons = Vec<(String, Vec<String>)>;

/// Groups samples by person; `order` sorts the person ids.
fn group(samples: impl IntoIterator<Item = Sample>) -> Persons {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for s in samples {
        map.entry(s.person).or_default().push(s.image);
    }
    map.into_iter()
        .map(|(p, mut images)| {
            images.sort();
            (p, images)
        })
        .collect()
}

/// The drawn splits of one person set.
struct Drawn {
    train_all: Vec<Sample>,
    train: Vec<Sample>,
    val: Vec<Sample>,
    test: Vec<Sample>,
    queries: Vec<Vec<Sample>>,
    galleries: Vec<Vec<Sample>>,
}

fn draw(train_persons: &Persons, test_persons: &Persons, rng: &mut Rng, n_splits: usize) -> Drawn {
    let sample = |p: &str, image: &str| Sample {
        person: p.to_string(),
        image: image.to_string(),
    };
    let all = |persons: &Persons| -> Vec<Sample> {
        persons
            .iter()
            .flat_map(|(p, images)| images.iter().map(move |i| sample(p, i)))
            .collect()
    };
    let mut d = Drawn {
        train_all: all(train_persons),
        train: Vec::new(),
        val: Vec::new(),
        test: all(test_persons),
        queries: Vec::new(),
        galleries: Vec::new(),
    };
    for (p, images) in train_persons {
        let pick = if images.len() > 1 {
            Some(rng.below(images.len()))
        } else {
            None
        };
        for (j, image) in images.iter().enumerate() {
            if Some(j) == pick {
                d.val.push(sample(p, image))
            } else {
                d.train.push(sample(p, image))
            }
        }
    }
    for _ in 0..n_splits {
        let (mut query, mut gallery) = (Vec::new(), Vec::new());
        for (p, images) in test_persons {
            let pick = rng.below(images.len());
            for (j, image) in images.iter().enumerate() {
                if j == pick {
                    gallery.push(sample(p, image))
                } else {
                    query.push(sample(p, image))
                }
            }
        }
        d.queries.push(query);
        d.galleries.push(gallery);
    }
    d
}

fn push(entries: &mut Vec<Entry>, split: &str, samples: &[Sample]) {
    entries.extend(samples.iter().map(|s| Entry {
        split: split.to_string(),
        person: s.person.clone(),
        image: s.image.clone(),
    }));
}

fn entries(d: &Drawn, gallery_all: Option<&[Vec<Sample>]>) -> Vec<Entry> {
    let mut e = Vec::new();
    push(&mut e, "train_all", &d.train_all);
    push(&mut e, "train", &d.train);
    push(&mut e, "val", &d.val);
    push(&mut e, "test", &d.test);
    for (i, (q, g)) in d.queries.iter().zip(&d.galleries).enumerate() {
        push(&mut e, &format!("query{i}"), q);
        push(&mut e, &format!("gallery{i}"), g);
    }
    for (i, g) in gallery_all.into_iter().flatten().enumerate() {
        push(&mut e, &format!("gallery_all{i}"), g);
    }
    e
}

fn check(options: SplitOptions) -> Result<()> {
    if options.n_splits == 0 {
        return Err(Error::Invalid(
            "at least one query/gallery split is needed".into(),
        ));
    }
    Ok(())
}

/// Draws one aspect's splits from 11k rows (already filtered, e.g. without
/// accessories; rows of other aspects are ignored).
fn draw_aspect(rows: &[HandInfo], aspect: Aspect, options: SplitOptions) -> Drawn {
    let threshold = aspect.train_threshold();
    let samples = |train: bool| {
        rows.iter()
            .filter(move |r| r.aspect == aspect && (r.id <= threshold) == train)
    };
    let persons = |train: bool| {
        group(samples(train).map(|r| Sample {
            person: r.person(),
            image: format!("Hands/{}", r.image_name),
        }))
    };
    let mut rng = Rng::new(options.seed, aspect.index() as u64);
    draw(&persons(true), &persons(false), &mut rng, options.n_splits)
}

/// The 11k protocol for `aspect`: persons with `id <= T(aspect)` train, the
/// others test. `rows` should be the dataset's rows without accessories (all
/// four aspects when `gallery_all` is asked for). With `gallery_all`,
/// `gallery_all{i}` merges `gallery{i}` of every aspect; persons of the other
/// aspects are prefixed with the aspect (`dorsal_left:0000004`) so that they
/// act as distinct distractor identities.
pub fn hands11k(
    rows: &[HandInfo],
    aspect: Aspect,
    options: SplitOptions,
    gallery_all: bool,
    root: &str,
) -> Result<Manifest> {
    check(options)?;
    let drawn = draw_aspect(rows, aspect, options);
    let merged: Option<Vec<Vec<Sample>>> = gallery_all.then(|| {
        let mut merged = drawn.galleries.clone();
        for other in Aspect::ALL.into_iter().filter(|&a| a != aspect) {
            for (i, g) in draw_aspect(rows, other, options)
                .galleries
                .into_iter()
                .enumerate()
            {
                merged[i].extend(g.into_iter().map(|s| Sample {
                    person: format!("{}:{}", other.slug(), s.person),
                    ..s
                }));
            }
        }
        merged
    });
    Ok(Manifest {
        meta: vec![
            ("dataset".into(), "11k".into()),
            ("root".into(), root.to_string()),
            ("aspect".into(), aspect.name().into()),
            ("train_threshold".into(), aspect.train_threshold().to_string()),
            ("seed".into(), options.seed.to_string()),
            ("n_splits".into(), options.n_splits.to_string()),
        ],
        entries: entries(&drawn, merged.as_deref()),
    })
}

/// Name of the split [`hands11k_train_extra`] adds.
pub const TRAIN_EXTRA: &str = "train_extra";

/// Extra training images for the 11k protocol of `aspect`: every image of a
/// training person (`id <= T(aspect)`) that `protocol` (drawn by
/// [`hands11k`]) leaves out of `train_all`: the target aspect's images with
/// accessories (same person) and the other three aspects, whose persons are
/// prefixed with the aspect (`dorsal_left:0000004`) because a left hand or a
/// palm is a different biometric trait from the same person's dorsal right
/// hand. `rows` is the whole `HandInfo.csv`, accessories included. Test
/// persons (`id > T(aspect)`) contribute nothing, in any aspect, so the test
/// splits stay person-disjoint from all training data. Sorted by person then
/// image, so the result is deterministic.
pub fn hands11k_train_extra(rows: &[HandInfo], aspect: Aspect, protocol: &Manifest) -> Vec<Entry> {
    let threshold = aspect.train_threshold();
    let taken: std::collections::BTreeSet<&str> = protocol
        .split("train_all")
        .into_iter()
        .map(|e| e.image.as_str())
        .collect();
    let mut extra: Vec<Entry> = rows
        .iter()
        .filter(|r| r.id <= threshold)
        .map(|r| Entry {
            split: TRAIN_EXTRA.to_owned(),
            person: if r.aspect == aspect {
                r.person()
            } else {
                format!("{}:{}", r.aspect.slug(), r.person())
            },
            image: format!("Hands/{}", r.image_name),
        })
        .filter(|e| !taken.contains(e.image.as_str()))
        .collect();
    extra.sort();
    extra.dedup();
    extra
}

/// Person-disjoint split for datasets without id thresholds: a seeded
/// shuffle of the sorted persons puts `round(test_fraction * persons)` of
/// them in `test` (at least one, and at least one left to train).
pub fn by_fraction(dataset: &Dataset, test_fraction: f64, options: SplitOptions) -> Result<Manifest> {
    check(options)?;
    if !(test_fraction > 0.0 && test_fraction < 1.0) {
        return Err(Error::Invalid(format!(
            "test fraction {test_fraction} is not in (0, 1)"
        )));
    }
    let mut persons = group(dataset.samples.iter().cloned());
    if persons.len() < 2 {
        return Err(Error::Invalid(format!(
            "{} person(s): at least 2 are needed",
            persons.len()
        )));
    }
    Rng::new(options.seed, SHUFFLE_STREAM).shuffle(&mut persons);
    let n_test = ((test_fraction * persons.len() as f64).round() as usize).clamp(1, persons.len() - 1);
    let mut test = persons.split_off(persons.len() - n_test);
    persons.sort();
    test.sort();
    let mut rng = Rng::new(options.seed, 0);
    let drawn = draw(&persons, &test, &mut rng, options.n_splits);
    Ok(Manifest {
        meta: vec![
            ("dataset".into(), "folder".into()),
            ("root".into(), dataset.root.display().to_string()),
            ("test_fraction".into(), test_fraction.to_string()),
            ("seed".into(), options.seed.to_string()),
            ("n_splits".into(), options.n_splits.to_string()),
        ],
        entries: entries(&drawn, None),
    })
}
