//! The augmentation and the parallel loader, on synthetic hands written as PNGs.

use std::path::Path;
use std::sync::Arc;

use handid_eval::data::synthetic::{self, SynthOptions};
use handid_model::Preprocess;
use handid_model::image::{CLIP_MEAN, CLIP_STD};
use handid_trainer::data::{Augment, AugmentConfig, Item, Loader, RandomAffine};
use image::{Rgb, RgbImage};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;
use tch::{Kind, Tensor};

const PRE: Preprocess = Preprocess::Resize {
    height: 32,
    width: 24,
};

fn write_items(dir: &Path, n: usize) -> Vec<Item> {
    let options = SynthOptions {
        persons: 3,
        images_per_person: 4,
        size: 48,
        ..Default::default()
    };
    (0..n)
        .map(|i| {
            let path = dir.join(format!("hand_{i}.png"));
            synthetic::image(&options, i % 3, i / 3)
                .save(&path)
                .expect("write png");
            Item {
                path,
                label: (i % 3) as i64,
            }
        })
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn all_batches(loader: &Loader, batches: &[Vec<usize>], epoch: u64, train: bool) -> Vec<(Tensor, Tensor)> {
    loader
        .batches(batches.to_vec(), epoch, train)
        .map(|b| {
            let b = b.expect("batch");
            (b.images, b.labels)
        })
        .collect()
}

/// A noisy image, so that every shift of it is distinguishable.
fn noise_image(width: u32, height: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        let v = (x.wrapping_mul(7919) ^ y.wrapping_mul(104_729) ^ seed.wrapping_mul(31))
            .wrapping_mul(2_654_435_761);
        Rgb([(v >> 24) as u8, (v >> 16) as u8, (v >> 8) as u8])
    })
}

#[test]
fn same_seed_gives_identical_batches_whatever_the_worker_count() {
    let dir = tempfile::tempdir().expect("tempdir");
    let items = Arc::new(write_items(dir.path(), 7));
    let augment = Arc::new(Augment::new(AugmentConfig::default(), PRE).expect("augment"));
    let batches = vec![vec![0, 1, 2], vec![3, 4], vec![5, 6, 0], vec![1]];
    let reference = all_batches(
        &Loader::new(Arc::clone(&items), Arc::clone(&augment), 0, false, 9),
        &batches,
        1,
        true,
    );
    assert_eq!(reference.len(), 4);
    assert_eq!(reference[0].0.size(), [3, 3, 32, 24]);
    assert_eq!(reference[0].0.kind(), Kind::Float);
    assert_eq!(Vec::<i64>::try_from(&reference[2].1).expect("labels"), [2, 0, 0]);
    for (workers, cache) in [(1, false), (3, false), (3, true), (2, true)] {
        let loader = Loader::new(Arc::clone(&items), Arc::clone(&augment), workers, cache, 9);
        // Twice: the second pass of a caching loader reads from the cache.
        for _ in 0..2 {
            let got = all_batches(&loader, &batches, 1, true);
            assert_eq!(got.len(), reference.len());
            for ((a, la), (b, lb)) in got.iter().zip(&reference) {
                assert_eq!(max_diff(a, b), 0.0, "{workers} workers, cache {cache}");
                assert_eq!(la, lb);
            }
        }
    }
    // Another epoch or seed draws other augmentations of the same images.
    let loader = Loader::new(Arc::clone(&items), Arc::clone(&augment), 2, false, 9);
    let other_epoch = all_batches(&loader, &batches, 2, true);
    let other_seed = all_batches(
        &Loader::new(Arc::clone(&items), augment, 2, false, 10),
        &batches,
        1,
        true,
    );
    for other in [other_epoch, other_seed] {
        assert!(max_diff(&other[0].0, &reference[0].0) > 0.1);
    }
}

#[test]
fn loader_yields_what_a_serial_loop_computes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let items = Arc::new(write_items(dir.path(), 9));
    let augment = Arc::new(Augment::new(AugmentConfig::default(), PRE).expect("augment"));
    let batches: Vec<Vec<usize>> = (0..9).map(|i| vec![i, (i + 4) % 9]).collect();
    let loader = Loader::new(Arc::clone(&items), Arc::clone(&augment), 2, false, 5);
    let mut yielded = 0;
    for (b, batch) in loader.batches(batches.clone(), 3, true).enumerate() {
        let batch = batch.expect("batch");
        // Hold the batch a moment, as a training step would, while the workers prefetch.
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(batch.indices, batches[b]);
        let want: Vec<Tensor> = batches[b]
            .iter()
            .enumerate()
            .map(|(p, &i)| {
                let img = image::open(&items[i].path).expect("open").to_rgb8();
                augment
                    .train(&img, &mut Loader::image_rng(5, 3, b, p))
                    .expect("train view")
            })
            .collect();
        assert_eq!(
            max_diff(&batch.images, &Tensor::stack(&want, 0)),
            0.0,
            "batch {b}"
        );
        yielded += 1;
    }
    assert_eq!(yielded, 9);
    // A consumer that stops early does not hang the workers.
    let first: Vec<_> = loader.batches(batches, 0, true).take(1).collect();
    assert_eq!(first.len(), 1);
}

#[test]
fn eval_view_is_exactly_the_serving_preprocessing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let items = Arc::new(write_items(dir.path(), 4));
    for pre in [PRE, Preprocess::Clip { size: 32 }] {
        let augment = Arc::new(Augment::new(AugmentConfig::default(), pre.clone()).expect("augment"));
        for (workers, cache) in [(0, false), (2, true)] {
            let loader = Loader::new(Arc::clone(&items), Arc::clone(&augment), workers, cache, 1);
            let got = all_batches(&loader, &[vec![3, 1], vec![0, 2]], 0, false);
            for (batch, indices) in got.iter().zip([[3, 1], [0, 2]]) {
                for (row, i) in indices.into_iter().enumerate() {
                    let img = image::open(&items[i].path).expect("open").to_rgb8();
                    let want = pre.apply(&img).expect("apply");
                    assert_eq!(max_diff(&batch.0.get(row as i64), &want), 0.0);
                    assert_eq!(max_diff(&augment.eval(&img).expect("eval"), &want), 0.0);
                }
            }
        }
    }
    // With every augmentation off the training view is the evaluation view.
    let augment = Augment::new(AugmentConfig::none(), PRE).expect("augment");
    let img = noise_image(40, 50, 3);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let train = augment.train(&img, &mut rng).expect("train");
    assert!(max_diff(&train, &PRE.apply(&img).expect("apply")) < 1e-6);
}

#[test]
fn flip_is_off_by_default_and_on_when_asked() {
    assert_eq!(AugmentConfig::default().hflip_prob, 0.0);
    // Left half white, right half black; wide enough that the default
    // 10-pixel crop shift and erasing cannot swap the halves' brightness.
    let pre = Preprocess::Resize {
        height: 64,
        width: 96,
    };
    let img = RgbImage::from_fn(96, 64, |x, _| if x < 48 { Rgb([255; 3]) } else { Rgb([0; 3]) });
    let halves = |x: &Tensor| {
        let left = x.narrow(2, 0, 48).mean(Kind::Float).double_value(&[]);
        let right = x.narrow(2, 48, 48).mean(Kind::Float).double_value(&[]);
        (left, right)
    };
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let default = Augment::new(AugmentConfig::default(), pre.clone()).expect("augment");
    for _ in 0..200 {
        let (left, right) = halves(&default.train(&img, &mut rng).expect("train"));
        assert!(left > right + 0.5, "flipped: left {left}, right {right}");
    }
    let flipping = Augment::new(
        AugmentConfig {
            hflip_prob: 1.0,
            ..AugmentConfig::default()
        },
        pre,
    )
    .expect("augment");
    for _ in 0..20 {
        let (left, right) = halves(&flipping.train(&img, &mut rng).expect("train"));
        assert!(right > left + 0.5, "not flipped: left {left}, right {right}");
    }
}

#[test]
fn random_erasing_replaces_one_rectangle_of_the_configured_size() {
    let config = AugmentConfig {
        erasing_prob: 1.0,
        ..AugmentConfig::none()
    };
    let pre = Preprocess::Resize {
        height: 64,
        width: 48,
    };
    let augment = Augment::new(config, pre.clone()).expect("augment");
    let img = noise_image(48, 64, 1);
    let clean = pre.apply(&img).expect("apply");
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut areas = Vec::new();
    for _ in 0..100 {
        let x = augment.train(&img, &mut rng).expect("train");
        // [H, W] true where any channel changed
        let changed = (&x - &clean).abs().amax([0], false).gt(0.0);
        let rows = Vec::<bool>::try_from(changed.any_dim(1, false)).expect("rows");
        let cols = Vec::<bool>::try_from(changed.any_dim(0, false)).expect("cols");
        let (h, w) = (
            rows.iter().filter(|&&r| r).count(),
            cols.iter().filter(|&&c| c).count(),
        );
        let count = changed.sum(Kind::Int64).int64_value(&[]) as usize;
        assert!(h > 0 && w > 0, "nothing erased");
        // Exactly a rectangle (every pixel of the bounding box changed).
        assert_eq!(count, h * w, "erased region is not a rectangle");
        let fraction = count as f64 / (64.0 * 48.0);
        // Rounding the sides to whole pixels moves the area a little.
        assert!((0.015..=0.43).contains(&fraction), "area fraction {fraction}");
        let aspect = h as f64 / w as f64;
        assert!((0.25..=4.0).contains(&aspect), "aspect {aspect}");
        areas.push(fraction);
    }
    let mean = areas.iter().sum::<f64>() / areas.len() as f64;
    assert!((0.12..0.30).contains(&mean), "mean erased fraction {mean}");
    // Probability 0: never.
    let never = Augment::new(AugmentConfig::none(), pre).expect("augment");
    for _ in 0..20 {
        assert!(max_diff(&never.train(&img, &mut rng).expect("train"), &clean) < 1e-6);
    }
}

#[test]
fn pad_and_crop_shift_the_image_by_at_most_the_padding() {
    let config = AugmentConfig {
        padding: 4,
        random_crop: true,
        ..AugmentConfig::none()
    };
    let augment = Augment::new(config, PRE).expect("augment");
    let img = noise_image(24, 32, 2);
    let clean = PRE.apply(&img).expect("apply");
    // Black, normalised: the padding's value per channel.
    let black = Tensor::from_slice(&[0, 1, 2].map(|c| -CLIP_MEAN[c] / CLIP_STD[c])).view([3, 1, 1]);
    // Shift (dy, dx): out[y, x] = clean[y + dy, x + dx], black outside.
    let shifted = |dy: i64, dx: i64| {
        let padded = black.expand([3, 32 + 8, 24 + 8], false).copy();
        padded.narrow(1, 4, 32).narrow(2, 4, 24).copy_(&clean);
        padded.narrow(1, 4 + dy, 32).narrow(2, 4 + dx, 24)
    };
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..30 {
        let x = augment.train(&img, &mut rng).expect("train");
        let shift = (-4..=4)
            .flat_map(|dy| (-4..=4).map(move |dx| (dy, dx)))
            .find(|&(dy, dx)| max_diff(&x, &shifted(dy, dx)) < 1e-5)
            .expect("the output is a shift of the input within the padding");
        seen.insert(shift);
    }
    assert!(seen.len() > 5, "crops barely vary: {seen:?}");
}

#[test]
fn random_affine_rotates_and_scales_within_its_ranges() {
    let affine = |degrees: f64, scale: f64| {
        let config = AugmentConfig {
            random_affine: RandomAffine {
                degrees,
                scale_min: scale,
                scale_max: scale,
            },
            ..AugmentConfig::none()
        };
        Augment::new(config, PRE).expect("augment")
    };
    let grey = RgbImage::from_pixel(24, 32, Rgb([128, 128, 128]));
    let clean = PRE.apply(&grey).expect("apply");
    let black: Vec<f64> = (0..3).map(|c| f64::from(-CLIP_MEAN[c] / CLIP_STD[c])).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for _ in 0..10 {
        // Enlarged twice and turned by at most 30 degrees, every
        // output pixel still samples inside the image: nothing black.
        let x = affine(30.0, 2.0).train(&grey, &mut rng).expect("train");
        assert!(max_diff(&x, &clean) < 1e-5);
        // Halved: the centre stays, the corners are black padding.
        let x = affine(30.0, 0.5).train(&grey, &mut rng).expect("train");
        assert!(
            max_diff(
                &x.narrow(1, 14, 4).narrow(2, 10, 4),
                &clean.narrow(1, 14, 4).narrow(2, 10, 4)
            ) < 1e-5
        );
        for c in 0..3 {
            let corner = x.double_value(&[c, 0, 0]);
            assert!((corner - black[c as usize]).abs() < 1e-5, "corner {corner}");
        }
    }
    // A textured image is turned differently draw by draw.
    let img = noise_image(24, 32, 6);
    let turn = affine(20.0, 1.0);
    let (a, b) = (
        turn.train(&img, &mut rng).expect("train"),
        turn.train(&img, &mut rng).expect("train"),
    );
    assert!(max_diff(&a, &b) > 0.1, "two draws gave the same view");
}

#[test]
fn color_jitter_stays_within_its_ranges() {
    let img = noise_image(24, 32, 4);
    let raw = |x: &Tensor| {
        let mean = Tensor::from_slice(&CLIP_MEAN).view([3, 1, 1]);
        let std = Tensor::from_slice(&CLIP_STD).view([3, 1, 1]);
        x * std + mean
    };
    let clean = raw(&PRE.apply(&img).expect("apply"));
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    // Brightness 0.4: every unsaturated value is scaled by one factor in [0.6, 1.4].
    let bright = Augment::new(
        AugmentConfig {
            color_jitter: handid_trainer::data::ColorJitter {
                brightness: 0.4,
                ..Default::default()
            },
            ..AugmentConfig::none()
        },
        PRE,
    )
    .expect("augment");
    let mut factors = Vec::new();
    for _ in 0..20 {
        let x = raw(&bright.train(&img, &mut rng).expect("train"));
        let mask = clean.gt(0.05).logical_and(&x.lt(0.99));
        let ratio = (&x / &clean).masked_select(&mask);
        let (lo, hi) = (ratio.min().double_value(&[]), ratio.max().double_value(&[]));
        assert!(hi - lo < 1e-3, "not one factor: {lo}..{hi}");
        assert!((0.6 - 1e-4..=1.4 + 1e-4).contains(&lo), "factor {lo}");
        factors.push(lo);
    }
    assert!(
        factors.iter().any(|&f| f < 0.9) && factors.iter().any(|&f| f > 1.1),
        "{factors:?}"
    );
    // Hue: a rotation in HSV keeps each pixel's largest and smallest channel.
    let hue = Augment::new(
        AugmentConfig {
            color_jitter: handid_trainer::data::ColorJitter {
                hue: 0.5,
                ..Default::default()
            },
            ..AugmentConfig::none()
        },
        PRE,
    )
    .expect("augment");
    let x = raw(&hue.train(&img, &mut rng).expect("train"));
    assert!(max_diff(&x.amax([0], false), &clean.amax([0], false)) < 1e-4);
    assert!(max_diff(&x.amin([0], false), &clean.amin([0], false)) < 1e-4);
    assert!(max_diff(&x, &clean) > 0.01, "hue did not change");
}

#[test]
fn bad_config_values_are_refused_naming_the_key() {
    let cases: Vec<(&str, &str)> = vec![
        ("erasing_prob: 1.5", "augment.erasing_prob"),
        ("hflip_prob: -0.1", "augment.hflip_prob"),
        ("color_jitter: {hue: 0.7}", "augment.color_jitter.hue"),
        (
            "color_jitter: {brightness: -1}",
            "augment.color_jitter.brightness",
        ),
        ("color_jitter: {contrast: .nan}", "augment.color_jitter.contrast"),
        ("padding: 5000", "augment.padding"),
        ("random_affine: {degrees: 200}", "augment.random_affine.degrees"),
        ("random_affine: {scale_min: 0}", "augment.random_affine"),
        (
            "random_affine: {scale_min: 1.2, scale_max: 0.8}",
            "augment.random_affine",
        ),
    ];
    for (yaml, key) in cases {
        let config: AugmentConfig = serde_yaml::from_str(yaml).expect(yaml);
        let error = Augment::new(config, PRE).expect_err(yaml).to_string();
        assert!(error.contains(key), "{yaml}: {error}");
    }
    assert!(serde_yaml::from_str::<AugmentConfig>("erasing: 0.5").is_err());
    assert!(serde_yaml::from_str::<AugmentConfig>("color_jitter: {gamma: 1}").is_err());
    let defaults: AugmentConfig = serde_yaml::from_str("{}").expect("empty");
    assert_eq!(defaults, AugmentConfig::default());
    assert_eq!(
        (defaults.padding, defaults.random_crop, defaults.erasing_prob),
        (10, true, 0.5)
    );
    assert!(Augment::new(AugmentConfig::default(), Preprocess::Clip { size: 0 }).is_err());
}

#[test]
fn unreadable_and_corrupt_images_are_errors_naming_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Two large photos, slow to decode next to a failure, which is instant.
    let mut items: Vec<Item> = (0..2)
        .map(|i| {
            let path = dir.path().join(format!("large_{i}.png"));
            noise_image(1200, 1200, i).save(&path).expect("write png");
            Item { path, label: 0 }
        })
        .collect();
    let corrupt = dir.path().join("corrupt.jpg");
    std::fs::write(&corrupt, b"SECRET-PIXELS not a jpeg at all").expect("write");
    items.push(Item {
        path: corrupt.clone(),
        label: 0,
    });
    let missing = dir.path().join("missing.png");
    items.push(Item {
        path: missing.clone(),
        label: 1,
    });
    let items = Arc::new(items);
    let augment = Arc::new(Augment::new(AugmentConfig::default(), PRE).expect("augment"));
    for workers in [0, 2] {
        let loader = Loader::new(Arc::clone(&items), Arc::clone(&augment), workers, false, 0);
        for (index, path) in [(2, &corrupt), (3, &missing)] {
            // The bad image is the fourth batch, within the workers' prefetch
            // window: one worker fails on it while the other still decodes
            // the third. The good batches still come out first, then the
            // error, then nothing.
            let order = vec![vec![0], vec![1], vec![0], vec![index], vec![0]];
            let results: Vec<_> = loader.batches(order, 0, true).collect();
            assert_eq!(results.len(), 4, "{workers} workers");
            assert!(results[..3].iter().all(Result::is_ok), "{workers} workers");
            let error = format!("{:#}", results[3].as_ref().expect_err("bad image"));
            assert!(error.contains(&path.display().to_string()), "{error}");
            assert!(!error.contains("SECRET"), "image bytes leaked: {error}");
        }
        let out_of_range: Vec<_> = loader.batches(vec![vec![0, 99]], 0, false).collect();
        assert!(out_of_range[0].is_err());
    }
}

/// Throughput on real 11k Hands photos (1600x1200 JPEGs) at 224x224, with a
/// simulated 40 ms training step per batch: prefetching should hide decoding
/// behind the step. A measurement, not a check: run with `--ignored --nocapture`.
#[test]
#[ignore = "timing measurement on the 11k Hands sample"]
fn measure_loader_throughput_on_11k_hands() {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/11k-hands-sample/Hands"
    );
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .expect("sample folder")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    paths.sort();
    paths.truncate(64);
    let items = Arc::new(
        paths
            .into_iter()
            .enumerate()
            .map(|(i, path)| Item {
                path,
                label: (i % 8) as i64,
            })
            .collect::<Vec<_>>(),
    );
    let augment =
        Arc::new(Augment::new(AugmentConfig::default(), Preprocess::Clip { size: 224 }).expect("augment"));
    let batches: Vec<Vec<usize>> = (0..8).map(|b| (b * 8..b * 8 + 8).collect()).collect();
    for workers in [0, 1, 2, 0] {
        let loader = Loader::new(Arc::clone(&items), Arc::clone(&augment), workers, false, 0);
        let start = std::time::Instant::now();
        for batch in loader.batches(batches.clone(), 0, true) {
            batch.expect("batch");
            std::thread::sleep(std::time::Duration::from_millis(40));
        }
        let seconds = start.elapsed().as_secs_f64();
        println!(
            "{workers} workers: 64 images + 8 x 40 ms steps in {seconds:.2} s ({:.1} img/s)",
            64.0 / seconds
        );
    }
}
