//! Readers and splits on the real 11k sample and on synthetic data.

use std::path::{Path, PathBuf};

use handid_eval::data::hands11k::{self, Aspect, Filter};
use handid_eval::data::manifest::Manifest;
use handid_eval::data::splits::{self, SplitOptions};
use handid_eval::data::synthetic::{self, Layout, SynthOptions};
use handid_eval::data::{MissingImages, folder};

const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/11k-hands-sample");

fn sample_root() -> PathBuf {
    PathBuf::from(SAMPLE)
}

const DORSAL_RIGHT: Filter = Filter {
    aspect: Some(Aspect::DorsalRight),
    without_accessories: true,
};
const NO_ACCESSORIES: Filter = Filter {
    aspect: None,
    without_accessories: true,
};

fn sample_manifest(seed: u64, gallery_all: bool) -> Manifest {
    let (rows, _) =
        hands11k::load(&sample_root(), NO_ACCESSORIES, MissingImages::Fail).expect("sample loads");
    let options = SplitOptions {
        seed,
        ..SplitOptions::default()
    };
    splits::hands11k(&rows, Aspect::DorsalRight, options, gallery_all, SAMPLE).expect("splits")
}

fn count(m: &Manifest, split: &str) -> (usize, usize) {
    let c = m
        .counts()
        .into_iter()
        .find(|c| c.split == split)
        .expect("split present");
    (c.images, c.persons)
}

#[test]
fn sample_dorsal_right_without_accessories() {
    let (rows, dataset) = hands11k::load(&sample_root(), DORSAL_RIGHT, MissingImages::Fail).expect("loads");
    // The sample's README: 125 dorsal-right images without accessories.
    assert_eq!(rows.len(), 125);
    assert_eq!(dataset.samples.len(), 125);
    assert!(dataset.skipped.is_empty());
    assert!(
        dataset
            .samples
            .iter()
            .all(|s| s.person.len() == 7 && s.image.starts_with("Hands/Hand_"))
    );
}

#[test]
fn sample_split_counts() {
    let m = sample_manifest(0, false);
    let test_persons = count(&m, "test").1;
    assert_eq!(
        count(&m, "train_all").0,
        count(&m, "train").0 + count(&m, "val").0
    );
    for i in 0..10 {
        let (q, g) = (count(&m, &format!("query{i}")), count(&m, &format!("gallery{i}")));
        assert_eq!(
            g,
            (test_persons, test_persons),
            "one gallery image per test person"
        );
        assert_eq!(q.0 + g.0, count(&m, "test").0);
    }
    // Counted independently from HandInfo.csv (persons with id <= 1050 train;
    // 21 of the 33 training persons and 16 of the 27 test persons have two or
    // more images). Documented in eval/README.md.
    let counts: Vec<String> = m
        .counts()
        .iter()
        .map(|c| format!("{} {} {}", c.split, c.images, c.persons))
        .collect();
    assert_eq!(
        counts[..6],
        [
            "train_all 69 33",
            "train 48 33",
            "val 21 21",
            "test 56 27",
            "query0 29 16",
            "gallery0 27 27"
        ]
        .map(String::from)
    );
    assert_eq!(counts.len(), 4 + 2 * 10);
    assert_eq!(m.meta("seed"), Some("0"));
}

#[test]
fn splits_are_reproducible_and_seeded() {
    let a = sample_manifest(7, true).to_text();
    assert_eq!(a, sample_manifest(7, true).to_text(), "same seed, same bytes");
    let b = sample_manifest(8, true).to_text();
    assert_ne!(a, b, "another seed draws other galleries");
    // Written and read back through a file, the manifest is unchanged.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dorsal_right.tsv");
    let m = sample_manifest(7, true);
    m.write(&path).expect("write");
    assert_eq!(std::fs::read_to_string(&path).expect("read"), a);
    assert_eq!(Manifest::read(&path).expect("parse"), m);
}

#[test]
fn gallery_all_adds_the_other_aspects_as_distractors() {
    let m = sample_manifest(0, true);
    for i in 0..10 {
        let gallery = m.split(&format!("gallery{i}"));
        let all = m.split(&format!("gallery_all{i}"));
        // Test persons per aspect in the sample: 27 dorsal right, 35 dorsal
        // left, 28 palmar right, 40 palmar left.
        assert_eq!((gallery.len(), all.len()), (27, 27 + 35 + 28 + 40));
        assert!(
            gallery
                .iter()
                .all(|e| all.iter().any(|a| a.image == e.image && a.person == e.person))
        );
        let others: Vec<_> = all.iter().filter(|e| e.person.contains(':')).collect();
        assert_eq!(others.len(), 35 + 28 + 40);
        assert!(others.iter().all(|e| {
            ["dorsal_left:", "palmar_right:", "palmar_left:"]
                .iter()
                .any(|p| e.person.starts_with(p))
        }));
    }
}

#[test]
fn train_extra_adds_training_persons_other_images_and_never_a_test_person() {
    let protocol = sample_manifest(0, false);
    let everything = Filter {
        aspect: None,
        without_accessories: false,
    };
    let (all_rows, _) = hands11k::load(&sample_root(), everything, MissingImages::Fail).expect("loads");
    let extra = splits::hands11k_train_extra(&all_rows, Aspect::DorsalRight, &protocol);
    // Training persons (id <= 1050) in the sample: 381 images in all, 69 of
    // them in the protocol's train_all (dorsal right without accessories).
    assert_eq!(extra.len(), 381 - 69);
    assert!(extra.iter().all(|e| e.split == splits::TRAIN_EXTRA));
    let train_all: Vec<&str> = protocol
        .split("train_all")
        .iter()
        .map(|e| e.image.as_str())
        .collect();
    assert!(extra.iter().all(|e| !train_all.contains(&e.image.as_str())));
    // No test person appears, under any aspect prefix.
    let test: std::collections::BTreeSet<&str> =
        protocol.split("test").iter().map(|e| e.person.as_str()).collect();
    for e in &extra {
        let id = e.person.rsplit(':').next().expect("id");
        assert!(!test.contains(id), "{} is a test person", e.person);
        assert!(id.parse::<u32>().expect("numeric id") <= Aspect::DorsalRight.train_threshold());
    }
    // Dorsal-right images with accessories keep the person id; the other
    // aspects are prefixed (different traits, different identities).
    let same_aspect = extra.iter().filter(|e| !e.person.contains(':')).count();
    assert_eq!(same_aspect, 38);
    assert!(extra.iter().filter(|e| e.person.contains(':')).all(|e| {
        ["dorsal_left:", "palmar_right:", "palmar_left:"]
            .iter()
            .any(|p| e.person.starts_with(p))
    }));
    // Deterministic.
    assert_eq!(
        extra,
        splits::hands11k_train_extra(&all_rows, Aspect::DorsalRight, &protocol)
    );
}

fn synth(dir: &Path, layout: Layout) -> SynthOptions {
    let options = SynthOptions {
        persons: 6,
        images_per_person: 3,
        size: 32,
        seed: 1,
        layout,
    };
    let written = synthetic::generate(dir, &options).expect("generate");
    assert_eq!(written, 18);
    options
}

#[test]
fn unreadable_images_fail_by_name_or_are_skipped_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    synth(dir.path(), Layout::Hands11k);
    let missing = dir.path().join("Hands/Hand_0000004.jpg");
    let corrupt = dir.path().join("Hands/Hand_0000009.jpg");
    std::fs::remove_file(&missing).expect("remove");
    std::fs::write(&corrupt, b"not an image").expect("corrupt");

    let err = hands11k::load(dir.path(), DORSAL_RIGHT, MissingImages::Fail).expect_err("missing image");
    assert!(err.to_string().contains("Hand_0000004.jpg"), "{err}");
    let (rows, dataset) = hands11k::load(dir.path(), DORSAL_RIGHT, MissingImages::Skip).expect("skips");
    assert_eq!(
        (rows.len(), dataset.samples.len(), dataset.skipped.len()),
        (16, 16, 2)
    );
    let skipped: Vec<&PathBuf> = dataset.skipped.iter().map(|(p, _)| p).collect();
    assert_eq!(skipped, [&missing, &corrupt]);
}

#[test]
fn synthetic_11k_layout_reads_back_and_splits() {
    let dir = tempfile::tempdir().expect("tempdir");
    synth(dir.path(), Layout::Hands11k);
    let (rows, _) = hands11k::load(dir.path(), NO_ACCESSORIES, MissingImages::Fail).expect("loads");
    let m = splits::hands11k(
        &rows,
        Aspect::DorsalRight,
        SplitOptions::default(),
        false,
        "synthetic",
    )
    .expect("splits");
    // 6 persons: ids 1048..1053, half below the threshold.
    assert_eq!((count(&m, "train_all"), count(&m, "test")), ((9, 3), (9, 3)));
    assert_eq!(
        (count(&m, "val"), count(&m, "query0"), count(&m, "gallery0")),
        ((3, 3), (6, 3), (3, 3))
    );
}

#[test]
fn folder_layout_reads_back_and_splits_by_fraction() {
    let dir = tempfile::tempdir().expect("tempdir");
    synth(dir.path(), Layout::Folder);
    // Grey PGM and BMP images and a stray text file in a person folder.
    let grey = image::GrayImage::from_pixel(8, 8, image::Luma([128]));
    grey.save(dir.path().join("person_0000/extra.pgm")).expect("pgm");
    grey.save(dir.path().join("person_0001/extra.BMP")).expect("bmp");
    std::fs::write(dir.path().join("person_0001/notes.txt"), "not an image").expect("txt");
    let dataset = folder::load(dir.path(), MissingImages::Fail).expect("loads");
    assert_eq!(dataset.samples.len(), 20);
    assert!(dataset.samples.iter().any(|s| s.image == "person_0001/extra.BMP"));

    let options = SplitOptions { seed: 3, n_splits: 2 };
    let m = splits::by_fraction(&dataset, 0.5, options).expect("splits");
    assert_eq!((count(&m, "train_all").1, count(&m, "test").1), (3, 3));
    let train: Vec<&str> = m.split("train_all").iter().map(|e| e.person.as_str()).collect();
    assert!(
        m.split("test")
            .iter()
            .all(|e| !train.contains(&e.person.as_str())),
        "person-disjoint"
    );
    assert_eq!(
        m.to_text(),
        splits::by_fraction(&dataset, 0.5, options)
            .expect("again")
            .to_text()
    );
    let other = SplitOptions { seed: 4, n_splits: 2 };
    assert_ne!(
        m.to_text(),
        splits::by_fraction(&dataset, 0.5, other)
            .expect("other seed")
            .to_text()
    );
}
