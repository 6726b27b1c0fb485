//! The evaluation commands end to end: synthetic data -> splits manifest ->
//! `eval --model` with a random tiny checkpoint -> `eval --embeddings` on the
//! saved vectors. Both entry points must give the same report.

use std::path::Path;
use std::process::Command;

use handid_model::{ClipVisionConfig, create_random_checkpoint};

fn trainer(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_handid-trainer"))
        .args(args)
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{args:?} failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

#[test]
fn synth_splits_and_both_eval_entry_points() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, manifest, model) = (
        dir.path().join("data"),
        dir.path().join("splits.tsv"),
        dir.path().join("model"),
    );
    trainer(&[
        "synth",
        "--out",
        p(&data),
        "--layout",
        "11k",
        "--persons",
        "8",
        "--images-per-person",
        "3",
        "--size",
        "32",
    ]);
    let counts = trainer(&[
        "splits",
        "--data",
        p(&data),
        "--splits",
        "2",
        "--seed",
        "5",
        "--out",
        p(&manifest),
    ]);
    assert!(
        counts.contains("gallery1") && counts.contains("seed 5"),
        "{counts}"
    );

    let said = trainer(&["init", "--arch", "tiny-vit", "--seed", "0", "--out", p(&model)]);
    // `init` is create_random_checkpoint: the same seed gives the same model id.
    let reference = dir.path().join("reference");
    let manifest_ref =
        create_random_checkpoint(&reference, &ClipVisionConfig::tiny_vit(), 0).expect("checkpoint");
    assert!(said.contains(&manifest_ref.model_id), "{said}");
    let saved = dir.path().join("emb.safetensors");
    let (by_model, by_file) = (dir.path().join("r1"), dir.path().join("r2"));
    trainer(&[
        "eval",
        "--model",
        p(&model),
        "--manifest",
        p(&manifest),
        "--save-embeddings",
        p(&saved),
        "--out",
        p(&by_model),
    ]);
    trainer(&["eval", "--embeddings", p(&saved), "--out", p(&by_file)]);
    let csv = |d: &Path| std::fs::read_to_string(d.join("report.csv")).expect("report.csv");
    assert_eq!(csv(&by_model), csv(&by_file));
    // Two splits of 4 test persons, 2 queries each: header, 2 rows, mean, std.
    assert_eq!(csv(&by_model).lines().count(), 5);
    assert!(
        csv(&by_model)
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("0,8,4,")),
        "{}",
        csv(&by_model)
    );
}
