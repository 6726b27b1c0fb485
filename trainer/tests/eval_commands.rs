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

/// In `dir`: `data/` (synthetic, `persons` persons of 3 images),
/// `splits.tsv` (2 splits), and two random tiny models `a/` and `b/`.
fn two_models(dir: &Path, persons: u32) {
    let path = |name: &str| dir.join(name);
    let persons = persons.to_string();
    trainer(&[
        "synth",
        "--out",
        p(&path("data")),
        "--layout",
        "11k",
        "--persons",
        &persons,
        "--images-per-person",
        "3",
        "--size",
        "32",
    ]);
    trainer(&[
        "splits",
        "--data",
        p(&path("data")),
        "--splits",
        "2",
        "--out",
        p(&path("splits.tsv")),
    ]);
    for (seed, name) in [("0", "a"), ("1", "b")] {
        trainer(&[
            "init",
            "--arch",
            "tiny-vit",
            "--seed",
            seed,
            "--out",
            p(&path(name)),
        ]);
    }
}

#[test]
fn across_models_reports_each_model_alone_and_the_compatibility_criterion() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |name: &str| dir.path().join(name);
    two_models(dir.path(), 8);
    let across = |query: &str, gallery: &str, out: &str| {
        trainer(&[
            "eval",
            "--query-model",
            p(&path(query)),
            "--gallery-model",
            p(&path(gallery)),
            "--manifest",
            p(&path("splits.tsv")),
            "--out",
            p(&path(out)),
        ])
    };
    let read = |file: std::path::PathBuf| {
        std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
    };
    let json =
        |file: std::path::PathBuf| -> serde_json::Value { serde_json::from_str(&read(file)).expect("JSON") };

    // A model against itself: the crossed search is its own search, so
    // not "compatible" (M(A,A) is not beaten by itself).
    let said = across("a", "a", "aa");
    assert!(said.contains("## Compatibility"), "{said}");
    assert_eq!(read(path("aa/report.csv")), read(path("aa/old-old/report.csv")));
    assert_eq!(read(path("aa/report.csv")), read(path("aa/new-new/report.csv")));
    let aa = json(path("aa/report.json"));
    assert_eq!(aa["compatibility"]["new_old"], aa["compatibility"]["old_old"]);
    assert!(read(path("aa/report.md")).contains("**no**"));

    // B against A: each alone as `eval --model` reports it, and the
    // crossed figures are their own.
    across("b", "a", "ba");
    trainer(&[
        "eval",
        "--model",
        p(&path("b")),
        "--manifest",
        p(&path("splits.tsv")),
        "--out",
        p(&path("b-alone")),
    ]);
    assert_eq!(
        read(path("ba/new-new/report.csv")),
        read(path("b-alone/report.csv"))
    );
    assert_eq!(read(path("ba/old-old/report.csv")), read(path("aa/report.csv")));
    let ba = json(path("ba/report.json"));
    let map = |report: &serde_json::Value| {
        report["summary"]
            .as_array()
            .expect("summary")
            .iter()
            .find(|m| m["name"] == "mAP")
            .expect("mAP")["mean"]
            .clone()
    };
    assert_eq!(ba["compatibility"]["new_old"][0], map(&ba));
    assert_eq!(
        ba["compatibility"]["new_new"][0],
        map(&json(path("b-alone/report.json")))
    );
    assert_ne!(read(path("ba/report.csv")), read(path("b-alone/report.csv")));
    let verdict = ba["compatibility"]["new_old"][0].as_f64() > ba["compatibility"]["old_old"][0].as_f64();
    let expected = if verdict { "**yes**" } else { "**no**" };
    assert!(read(path("ba/report.md")).contains(expected));

    // Models of other widths cannot be compared without a transform.
    let narrow = ClipVisionConfig {
        output_dim: 8,
        ..ClipVisionConfig::tiny_vit()
    };
    create_random_checkpoint(&path("narrow"), &narrow, 2).expect("checkpoint");
    let out = Command::new(env!("CARGO_BIN_EXE_handid-trainer"))
        .args([
            "eval",
            "--query-model",
            p(&path("narrow")),
            "--gallery-model",
            p(&path("a")),
        ])
        .args(["--manifest", p(&path("splits.tsv")), "--out", p(&path("na"))])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("8 dimensions") && stderr.contains("16"),
        "{stderr}"
    );
}

#[test]
fn a_fitted_transform_maps_old_galleries_for_the_new_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |name: &str| dir.path().join(name);
    two_models(dir.path(), 12);
    let fit_with = |manifest: &str, out: &str, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_handid-trainer"))
            .args(["fit-transform", "--old", p(&path("a")), "--new", p(&path("b"))])
            .args(["--manifest", p(&path(manifest)), "--out", p(&path(out))])
            .args(["--epochs", "20", "--batch-size", "16", "--inner-dim", "32"])
            .args(extra)
            .output()
            .expect("runs")
    };
    let fit_views = |manifest: &str, out: &str, views: &str| fit_with(manifest, out, &["--views", views]);
    let fit = |manifest: &str, out: &str| fit_views(manifest, out, "1");
    let fitted = fit("splits.tsv", "t");
    assert!(
        fitted.status.success(),
        "{}",
        String::from_utf8_lossy(&fitted.stderr)
    );
    let said = String::from_utf8_lossy(&fitted.stdout);
    assert!(said.contains("final MSE"), "{said}");
    let manifest: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path("t/transform.yaml")).expect("transform.yaml"))
            .expect("YAML");
    let a = create_random_checkpoint(&path("a-again"), &ClipVisionConfig::tiny_vit(), 0).expect("checkpoint");
    assert_eq!(manifest["from_model"].as_str(), Some(a.model_id.as_str()));
    assert_eq!(manifest["to_dim"].as_u64(), Some(16));

    // Augmented views: more pairs from the same images, recorded; the same
    // seed and views give the same transform, other views another one.
    for out in ["t3", "t3-again"] {
        let fitted = fit_views("splits.tsv", out, "3");
        assert!(
            fitted.status.success(),
            "{}",
            String::from_utf8_lossy(&fitted.stderr)
        );
    }
    // A transform manifest's provenance entry.
    let provenance = |transform: &str, key: &str| -> Option<String> {
        let text = std::fs::read_to_string(path(transform).join("transform.yaml")).expect("transform.yaml");
        let manifest: serde_yaml::Value = serde_yaml::from_str(&text).expect("YAML");
        manifest["provenance"]
            .as_sequence()
            .expect("provenance")
            .iter()
            .find(|pair| pair[0].as_str() == Some(key))
            .and_then(|pair| pair[1].as_str().map(str::to_owned))
    };
    assert_eq!(provenance("t3", "views").as_deref(), Some("3"));
    let weights = |t: &str| std::fs::read(path(t).join("transform.safetensors")).expect("weights");
    assert_eq!(weights("t3"), weights("t3-again"), "deterministic");
    assert_ne!(weights("t3"), weights("t"), "the views changed the fit");

    // Targets pulled toward each person's mean: recorded, another fit; out
    // of 0..1 refused by name.
    let fit_person_target =
        |out: &str, weight: &str| fit_with("splits.tsv", out, &["--person-target", weight]);
    let fitted = fit_person_target("t-person", "0.5");
    assert!(
        fitted.status.success(),
        "{}",
        String::from_utf8_lossy(&fitted.stderr)
    );
    let text = std::fs::read_to_string(path("t-person/transform.yaml")).expect("transform.yaml");
    assert!(text.contains("- person_target\n  - '0.5'"), "{text}");
    assert_ne!(weights("t-person"), weights("t"), "the targets changed the fit");
    let refused = fit_person_target("t-bad", "1.5");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("--person-target must be between 0 and 1"),
        "{stderr}"
    );
    assert!(!path("t-bad").exists(), "nothing written");

    // The transformed search is reported as such, with the same M(A,A) and
    // M(B,B) as without the transform.
    let eval = |transform: Option<&str>, out: &str| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_handid-trainer"));
        command
            .args([
                "eval",
                "--query-model",
                p(&path("b")),
                "--gallery-model",
                p(&path("a")),
            ])
            .args(["--manifest", p(&path("splits.tsv")), "--out", p(&path(out))]);
        if let Some(t) = transform {
            command.args(["--transform", p(&path(t))]);
        }
        command.output().expect("runs")
    };
    assert!(eval(Some("t"), "with").status.success());
    assert!(eval(None, "without").status.success());
    let read = |file: &str| std::fs::read_to_string(path(file)).expect("report");
    assert!(read("with/report.md").contains("M(B,T(A))"));
    assert_eq!(
        read("with/old-old/report.csv"),
        read("without/old-old/report.csv")
    );
    assert_eq!(
        read("with/new-new/report.csv"),
        read("without/new-new/report.csv")
    );
    assert_ne!(
        read("with/report.csv"),
        read("without/report.csv"),
        "the transform changed the galleries"
    );

    // The linear transform: one affine map in closed form, its
    // architecture in the manifest (no inner width), evaluated the same way;
    // `--ridge auto` records the ridge it chose from the grid and how; a
    // negative ridge is refused by name.
    let linear = fit_with("splits.tsv", "t-linear", &["--arch", "linear", "--ridge", "0.01"]);
    assert!(
        linear.status.success(),
        "{}",
        String::from_utf8_lossy(&linear.stderr)
    );
    let text = read("t-linear/transform.yaml");
    assert!(
        text.contains("arch: linear")
            && text.contains("inner_dim: 0")
            && text.contains("- ridge\n  - '0.01'"),
        "{text}"
    );
    assert!(
        !read("t/transform.yaml").contains("arch:"),
        "the paper's network is the default"
    );
    assert!(eval(Some("t-linear"), "with-linear").status.success());
    assert!(read("with-linear/report.md").contains("M(B,T(A))"));
    assert_ne!(read("with-linear/report.csv"), read("with/report.csv"));
    let auto = fit_with("splits.tsv", "t-auto", &["--arch", "linear", "--ridge", "auto"]);
    assert!(auto.status.success(), "{}", String::from_utf8_lossy(&auto.stderr));
    let said = String::from_utf8_lossy(&auto.stdout);
    assert!(said.contains("--ridge auto: "), "{said}");
    let chosen: f64 = provenance("t-auto", "ridge")
        .expect("ridge")
        .parse()
        .expect("a number");
    assert!(
        handid_trainer::commands::fit_transform::RIDGE_GRID.contains(&chosen),
        "{chosen}"
    );
    let selection = provenance("t-auto", "ridge_selection").expect("ridge_selection");
    assert!(selection.starts_with("auto, held-out cosine"), "{selection}");
    assert!(said.contains(&format!("--ridge auto: {chosen} ")), "{said}");
    for bad in ["--ridge=-1", "--ridge=NaN", "--ridge=often"] {
        let refused = fit_with("splits.tsv", "t-bad", &["--arch", "linear", bad]);
        assert!(!refused.status.success(), "{bad}");
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            stderr.contains("--ridge") && stderr.contains("`auto` or a finite number of at least 0"),
            "{stderr}"
        );
        assert!(!path("t-bad").exists(), "nothing written");
    }

    // A transform of other models is refused, naming them.
    let wrong = Command::new(env!("CARGO_BIN_EXE_handid-trainer"))
        .args([
            "eval",
            "--query-model",
            p(&path("a")),
            "--gallery-model",
            p(&path("b")),
        ])
        .args([
            "--manifest",
            p(&path("splits.tsv")),
            "--out",
            p(&path("wrong")),
            "--transform",
            p(&path("t")),
        ])
        .output()
        .expect("runs");
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("not the gallery model"));

    // Fitting on a split that holds a test person is refused.
    let text = read("splits.tsv");
    let query = text
        .lines()
        .find(|l| l.starts_with("query0\t"))
        .expect("a query line");
    let leaked = format!("{text}{}\n", query.replacen("query0", "train", 1));
    std::fs::write(path("leaky.tsv"), leaked).expect("write");
    let refused = fit("leaky.tsv", "t2");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("training persons only"), "{stderr}");
    assert!(!path("t2").exists(), "nothing written");
}

#[test]
fn a_transform_fitted_with_side_information_needs_that_model_to_map() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |name: &str| dir.path().join(name);
    two_models(dir.path(), 12);
    trainer(&[
        "init",
        "--arch",
        "tiny-vit",
        "--seed",
        "2",
        "--out",
        p(&path("s")),
    ]);
    let said = trainer(&[
        "fit-transform",
        "--old",
        p(&path("a")),
        "--new",
        p(&path("b")),
        "--side-info",
        p(&path("s")),
        "--manifest",
        p(&path("splits.tsv")),
        "--out",
        p(&path("ts")),
        "--epochs",
        "20",
        "--batch-size",
        "16",
        "--inner-dim",
        "32",
    ]);
    assert!(said.contains("final MSE"), "{said}");
    let manifest: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path("ts/transform.yaml")).expect("transform.yaml"))
            .expect("YAML");
    let s = create_random_checkpoint(&path("s-again"), &ClipVisionConfig::tiny_vit(), 2).expect("checkpoint");
    assert_eq!(manifest["side_info"]["model"].as_str(), Some(s.model_id.as_str()));
    assert_eq!(manifest["side_info"]["dim"].as_u64(), Some(16));

    let eval = |out: &str, side: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_handid-trainer"));
        command
            .args([
                "eval",
                "--query-model",
                p(&path("b")),
                "--gallery-model",
                p(&path("a")),
            ])
            .args(["--manifest", p(&path("splits.tsv")), "--out", p(&path(out))])
            .args(["--transform", p(&path("ts"))]);
        if let Some(side) = side {
            command.args(["--side-info", p(&path(side))]);
        }
        command.output().expect("runs")
    };
    let with = eval("with", Some("s"));
    assert!(with.status.success(), "{}", String::from_utf8_lossy(&with.stderr));
    assert!(
        std::fs::read_to_string(path("with/report.md"))
            .expect("report")
            .contains("M(B,T(A))")
    );
    // Without the side-information model, or with another one: refused,
    // naming what is missing, and no report written.
    let missing = eval("missing", None);
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("pass that model as --side-info"), "{stderr}");
    let other = eval("other", Some("a"));
    assert!(!other.status.success());
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(
        stderr.contains("fitted with the side-information of model"),
        "{stderr}"
    );
    assert!(!path("missing/report.md").exists() && !path("other/report.md").exists());
}
