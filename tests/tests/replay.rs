//! The evaluation harness over gRPC (`handid-trainer replay`) against a real
//! server on a local port over a real PostgreSQL (`#[sqlx::test]` gives each
//! test a fresh database):
//! - replay and offline `eval` of one checkpoint on one manifest give the
//!   very same ranking metrics, split by split;
//! - the end-to-end pipeline synthetic data -> splits -> (training) ->
//!   replay writes its report, with sane figures, and leaves no gallery;
//! - failures are explained and still clean up;
//! - the upgrade rehearsal (`replay --upgrade-to B`): A serving, its
//!   galleries, the switch to B (a swap for a B declaring A's space
//!   compatible; staging, `handid-server upgrade-templates` and promotion
//!   with a transform), B's queries against A's templates, B alone: the
//!   three searches give the very figures of offline `eval --query-model B
//!   --gallery-model A [--transform T]`; a switch the server refuses, a
//!   transform of other models, a failed or incomplete template upgrade are
//!   explained, and the galleries are deleted.
//!
//! Sizes are CI-sized: 12 synthetic persons x 4 images of 32x32 pixels and
//! the tiny ViT (16-d embeddings).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use handid_eval::data::synthetic::{self, Layout, SynthOptions};
use handid_eval::data::{MissingImages, folder, splits};
use handid_eval::embeddings::{self, SplitEmbeddings};
use handid_eval::metrics::summary::SplitEvaluation;
use handid_eval::report::Report;
use handid_model::transform::{SideInfo, TemplateTransform, TransformManifest};
use handid_model::{ClipVisionConfig, Manifest, create_random_checkpoint};
use handid_server::Settings;
use handid_server::settings::{ApiKeySettings, Scope};
use handid_trainer::commands::eval::ScoredSplit;
use handid_trainer::commands::{eval, replay};
use handid_trainer::config::TrainConfig;
use handid_trainer::engine::{RunOptions, train};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// Splits drawn; each is replayed on its own gallery.
const SPLITS: usize = 2;

/// Writes the synthetic dataset and its split manifest under `dir`; returns
/// the manifest's path.
fn dataset(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    let options = SynthOptions {
        persons: 12,
        images_per_person: 4,
        size: 32,
        seed: 7,
        layout: Layout::Folder,
    };
    synthetic::generate(&data, &options).expect("synthetic data");
    let dataset = folder::load(&data, MissingImages::Fail).expect("load");
    let manifest = splits::by_fraction(
        &dataset,
        0.5,
        splits::SplitOptions {
            seed: 5,
            n_splits: SPLITS,
        },
    )
    .expect("splits");
    let path = dir.join("splits.tsv");
    manifest.write(&path).expect("write manifest");
    path
}

/// The URL of the test's own database.
fn database_url(options: &PgConnectOptions) -> String {
    format!(
        "postgres://{}@{}:{}/{}",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("postgres")
    )
}

/// The API key replay sends (`auth.keys` holds its hash).
const API_KEY: &str = "replay-test-key";

/// The scopes a plain replay needs.
const REPLAY_SCOPES: [Scope; 2] = [Scope::Identify, Scope::Enroll];
/// The scopes an upgrade rehearsal needs.
const UPGRADE_SCOPES: [Scope; 3] = [Scope::Identify, Scope::Enroll, Scope::Admin];

/// A server on 127.0.0.1:0 serving `checkpoint`, its key granted `scopes`;
/// returns its address and a sender that stops it.
async fn start_server(
    options: &PgConnectOptions,
    checkpoint: &Path,
    max_top_k: u32,
    scopes: &[Scope],
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    start_server_with(options, checkpoint, max_top_k, scopes, None).await
}

/// [`start_server`], storing the side-information of model `side_info`
/// beside every template it enrols when given (`model.side_info`).
async fn start_server_with(
    options: &PgConnectOptions,
    checkpoint: &Path,
    max_top_k: u32,
    scopes: &[Scope],
    side_info: Option<&Path>,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let mut settings = Settings::default();
    settings.model.side_info = side_info.map(Path::to_path_buf);
    settings.database.url = database_url(options);
    settings.database.max_connections = 4;
    settings.database.migrate_on_start = true;
    settings.model.path = checkpoint.to_owned();
    // One image per forward pass, as offline `eval --batch-size 1` runs:
    // batch composition changes the float rounding of a forward pass.
    settings.batch.max_batch_size = 1;
    settings.batch.max_wait_ms = 1;
    settings.limits.max_top_k = max_top_k;
    // The CI-sized images are 32 pixels a side, below the default minimum
    // a real hand photo has.
    settings.limits.min_image_side = 32;
    // Access control stays on: replay must authenticate with its key.
    settings.auth.keys = vec![ApiKeySettings {
        id: "replay".to_owned(),
        sha256: handid_server::auth::hash_key(API_KEY),
        scopes: scopes.to_vec(),
        galleries: Vec::new(),
    }];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(handid_server::run(listener, settings, async {
        let _ = stopped.await;
    }));
    // Wait until it answers (model load and migrations take a moment).
    let url = format!("http://{addr}");
    for _ in 0..200 {
        if handid_proto::v1::hand_id_client::HandIdClient::connect(url.clone())
            .await
            .is_ok()
        {
            return (addr, stop);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server at {url} never accepted a connection");
}

fn replay_args(addr: SocketAddr, manifest: &Path, report: &Path) -> replay::Args {
    replay::Args {
        server: format!("http://{addr}"),
        manifest: manifest.to_owned(),
        data: None,
        api_key: Some(API_KEY.to_owned()),
        concurrency: 4,
        gallery_all: false,
        report: report.to_owned(),
        ap: eval::Ap::NonInterpolated,
        retries: 2,
        timeout_s: 60,
        upgrade_to: None,
        transform: None,
        server_config: None,
        server_bin: None,
    }
}

/// Galleries left in the database.
async fn galleries(options: &PgConnectOptions) -> i64 {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options.clone())
        .await
        .expect("pool");
    sqlx::query_scalar("SELECT count(*) FROM galleries")
        .fetch_one(&pool)
        .await
        .expect("count galleries")
}

/// The figures that depend only on each query's ranking of the gallery.
#[derive(Debug, PartialEq)]
struct RankingFigures {
    n_query: usize,
    n_gallery: usize,
    n_without_match: usize,
    map: f64,
    rank_k: Vec<(usize, f64)>,
    cmc: Vec<f64>,
    minp: f64,
}

fn ranking_figures(e: &SplitEvaluation) -> RankingFigures {
    RankingFigures {
        n_query: e.n_query,
        n_gallery: e.n_gallery,
        n_without_match: e.n_without_match,
        map: e.map,
        rank_k: e.rank_k.clone(),
        cmc: e.cmc.clone(),
        minp: e.minp,
    }
}

/// How far a server score may lie from `eval`'s, as a function of the
/// embedding width, when both embed one image per forward pass: the same
/// f32 embeddings, scored in f32 by the server (libtorch mv) and in f64
/// after renormalising by `eval`, which differ by at most about
/// (dim + 4) * 2^-24 for unit vectors (Higham, "Accuracy and Stability of
/// Numerical Algorithms", 2002, §3.1, dot products); twice that.
fn dot_delta(dim: usize) -> f64 {
    (dim as f64 + 4.0) * 2f64.powi(-23)
}

/// Checks the server's similarities against `eval`'s (its saved vectors)
/// and that no rounding can reorder them.
///
/// Why the metrics can then be compared for equality: they depend only on
/// the order of each query's gallery scores (ties by gallery order on both
/// sides). Every server score must lie within `delta(dim)` of eval's; then
/// with `worst` the largest difference seen in the split, every two gallery
/// scores of a query must lie more than 2 * worst apart, so no difference
/// can reorder them: the orders, and with them every ranking figure, must
/// be identical. A failing gap means the test data needs another seed,
/// never a tolerance.
fn check_served_scores(
    what: &str,
    offline: &[SplitEmbeddings],
    served: &[ScoredSplit],
    delta: fn(usize) -> f64,
) {
    assert_eq!(offline.len(), served.len(), "{what}: splits");
    for (split, served) in offline.iter().zip(served) {
        let delta = delta(split.gallery.dim);
        let sim = embeddings::cosine_similarity(&split.query, &split.gallery).expect("sim");
        assert_eq!(
            (&split.query.ids, &split.gallery.ids),
            (&served.query_ids, &served.gallery_ids),
            "{what}: split {}",
            split.name
        );
        let worst = sim
            .iter()
            .zip(&served.sim)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        println!(
            "{what} split {}: server scores within {worst:e} of eval's",
            split.name
        );
        assert!(
            worst <= delta,
            "{what} split {}: server scores differ by {worst:e} > {delta:e}",
            split.name
        );
        for (q, row) in sim.chunks(split.gallery.len()).enumerate() {
            let mut sorted = row.to_vec();
            sorted.sort_by(f64::total_cmp);
            let gap = sorted
                .windows(2)
                .map(|w| w[1] - w[0])
                .fold(f64::INFINITY, f64::min);
            assert!(
                gap > 2.0 * worst,
                "{what} split {} query {q}: two gallery scores only {gap:e} apart (server differs by {worst:e})",
                split.name
            );
        }
    }
}

/// Asserts that two reports of the same splits have identical ranking
/// figures, split by split.
fn same_ranking_figures(what: &str, offline: &Report, replayed: &Report) {
    assert_eq!(offline.splits.len(), SPLITS, "{what}");
    assert_eq!(replayed.splits.len(), SPLITS, "{what}");
    for (o, r) in offline.splits.iter().zip(&replayed.splits) {
        assert_eq!(o.split, r.split);
        assert!(o.n_query > 0 && o.n_gallery > 1, "{o:?}");
        assert_eq!(
            ranking_figures(o),
            ranking_figures(r),
            "{what} split {}: ranking figures differ",
            o.split
        );
    }
}

#[sqlx::test(migrations = false)]
async fn replay_reproduces_offline_eval_exactly(_: PgPoolOptions, options: PgConnectOptions) {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = dataset(dir.path());
    let model = dir.path().join("model");
    create_random_checkpoint(&model, &ClipVisionConfig::tiny_vit(), 3).expect("checkpoint");

    // Offline: the checkpoint embeds every image, one per forward pass.
    let saved = dir.path().join("offline.safetensors");
    let offline = eval::evaluate(&eval::Args {
        embeddings: None,
        model: Some(model.clone()),
        query_model: None,
        gallery_model: None,
        transform: None,
        side_info: None,
        manifest: Some(manifest.clone()),
        data: None,
        gallery_all: false,
        device: "cpu".to_owned(),
        batch_size: 1,
        save_embeddings: Some(saved.clone()),
        out: dir.path().join("offline"),
        ap: eval::Ap::NonInterpolated,
    })
    .expect("offline eval");

    let (addr, stop) = start_server(&options, &model, 100, &REPLAY_SCOPES).await;
    let args = replay_args(addr, &manifest, &dir.path().join("replay"));
    // What `replay::replay` does, in its two steps, so the server's scores
    // can be checked too.
    let scores = replay::collect_scores(&args).await.expect("replay");
    let _ = stop.send(());
    let replayed = eval::report_scored(
        "replay",
        Vec::new(),
        &scores.splits,
        eval::eval_options(args.ap),
        &args.report,
    )
    .expect("replay report");

    let offline_sims = embeddings::read(&saved).expect("saved embeddings");
    check_served_scores("replay", &offline_sims, &scores.splits, dot_delta);

    same_ranking_figures("replay", &offline, &replayed);
    assert_eq!(galleries(&options).await, 0, "replay left galleries behind");
}

/// The pipeline as a user runs it, at test size: data, splits, training,
/// export, the live service, replay, the report.
#[sqlx::test(migrations = false)]
async fn synthetic_data_to_replay_report(_: PgPoolOptions, options: PgConnectOptions) {
    let dir = tempfile::tempdir().expect("tempdir");
    // 1. Data and splits.
    let manifest = dataset(dir.path());
    // 2. A serving checkpoint (the untrained baseline).
    let model = dir.path().join("model");
    create_random_checkpoint(&model, &ClipVisionConfig::tiny_vit(), 1).expect("checkpoint");
    // 3. Train a tiny model on the training persons (the random checkpoint
    //    stays the baseline), export it with calibrated thresholds, serve it.
    let config = TrainConfig::from_yaml(&format!(
        "
name: e2e
seed: 3
model: {{arch: tiny_vit}}
data: {{manifest: {}, persons_per_batch: 3, images_per_person: 2, workers: 1}}
method:
  kind: finetune
  epochs: 2
  losses: {{id: {{}}, triplet: {{margin: 0.3}}}}
  optim: {{lr: 0.001}}
",
        manifest.display()
    ))
    .expect("config");
    let run = dir.path().join("run");
    let options_run = RunOptions {
        out: run.clone(),
        resume: false,
        stop_after_epoch: None,
        progress: false,
        keep_checkpoints: 1,
    };
    let summary = train(&config, &options_run).expect("training");
    assert!(summary.finished && summary.epochs == 2);
    let served = dir.path().join("trained");
    let best = handid_trainer::engine::state::resolve(&run, "best").expect("best checkpoint");
    let exported = handid_trainer::export::export(&best, &served, None).expect("export");
    assert_eq!(exported.manifest.thresholds.len(), 3);
    let baseline = Manifest::read(&model).expect("baseline manifest");
    assert_ne!(exported.manifest.model_id, baseline.model_id);
    // 4. Serve it and replay the manifest through the service.
    let (addr, stop) = start_server(&options, &served, 100, &REPLAY_SCOPES).await;
    let out = dir.path().join("report");
    let report = replay::replay(&replay_args(addr, &manifest, &out))
        .await
        .expect("replay");
    let _ = stop.send(());

    // 5. The report: the files `eval` writes, parseable, with sane figures.
    for name in ["report.md", "report.json", "report.csv"] {
        let path = out.join(name);
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        assert!(len > 0, "{} missing or empty", path.display());
    }
    let json = std::fs::read_to_string(out.join("report.json")).expect("report.json");
    let parsed: serde_json::Value = serde_json::from_str(&json).expect("report.json parses");
    assert_eq!(parsed["splits"].as_array().map(Vec::len), Some(SPLITS), "{json}");
    check_sane(&report);
    assert_eq!(galleries(&options).await, 0, "replay left galleries behind");
}

fn check_sane(report: &Report) {
    assert_eq!(report.splits.len(), SPLITS);
    for s in &report.splits {
        // 6 test persons, one gallery image each, the other 3 as queries.
        assert_eq!((s.n_gallery, s.n_query, s.n_without_match), (6, 18, 0), "{s:?}");
        // With one gallery image per person AP = 1 / rank of the match,
        // so mAP lies in [1 / n_gallery, 1].
        assert!(
            s.map >= 1.0 / s.n_gallery as f64 - 1e-12 && s.map <= 1.0,
            "mAP {}",
            s.map
        );
        assert!(
            s.cmc.windows(2).all(|w| w[0] <= w[1]),
            "CMC not monotone: {:?}",
            s.cmc
        );
        assert_eq!(s.cmc.last().copied(), Some(1.0), "every query has its match");
        let rank = |k: usize| s.rank_k.iter().find(|r| r.0 == k).map(|r| r.1).expect("rank-k");
        assert!(rank(1) <= rank(5) && rank(5) <= rank(10) && rank(10) == 1.0);
        assert!((rank(1) - s.cmc[0]).abs() < 1e-12);
    }
}

#[sqlx::test(migrations = false)]
async fn failures_are_explained_and_clean_up(_: PgPoolOptions, options: PgConnectOptions) {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = dataset(dir.path());
    let model = dir.path().join("model");
    create_random_checkpoint(&model, &ClipVisionConfig::tiny_vit(), 2).expect("checkpoint");

    // Nothing listens on a port just released.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let err = replay::replay(&replay_args(closed, &manifest, &dir.path().join("r0")))
        .await
        .expect_err("no server");
    assert!(
        format!("{err:#}").contains("cannot reach the handid server"),
        "{err:#}"
    );

    // The gallery (6 images) is larger than the server's top_k limit: the
    // error names the setting, and the half-made gallery is deleted.
    let (addr, stop) = start_server(&options, &model, 5, &REPLAY_SCOPES).await;
    let err = replay::replay(&replay_args(addr, &manifest, &dir.path().join("r1")))
        .await
        .expect_err("top_k above the limit");
    assert!(format!("{err:#}").contains("limits.max_top_k"), "{err:#}");
    assert_eq!(
        galleries(&options).await,
        0,
        "the failed split's gallery was kept"
    );

    // Missing images are named before any gallery is created.
    let mut args = replay_args(addr, &manifest, &dir.path().join("r2"));
    args.data = Some(dir.path().join("elsewhere"));
    let err = replay::replay(&args).await.expect_err("missing images");
    assert!(format!("{err:#}").contains("missing under"), "{err:#}");
    let _ = stop.send(());
}

/// `eval`'s arguments for `manifest`, one image per forward pass (as the
/// test server embeds), no model chosen yet.
fn eval_args(manifest: &Path, out: PathBuf, saved: PathBuf) -> eval::Args {
    eval::Args {
        embeddings: None,
        model: None,
        query_model: None,
        gallery_model: None,
        transform: None,
        side_info: None,
        manifest: Some(manifest.to_owned()),
        data: None,
        gallery_all: false,
        device: "cpu".to_owned(),
        batch_size: 1,
        save_embeddings: Some(saved),
        out,
        ap: eval::Ap::NonInterpolated,
    }
}

/// The model the database records as active.
async fn active_model(options: &PgConnectOptions) -> String {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options.clone())
        .await
        .expect("pool");
    sqlx::query_scalar("SELECT model_id FROM models WHERE role = 'active'")
        .fetch_one(&pool)
        .await
        .expect("active model")
}

/// The `handid-server` binary, built if it is not up to date: a test of
/// this crate can name only its own package's binaries
/// (`CARGO_BIN_EXE_*`), and the rehearsal runs the server's
/// `upgrade-templates`. Built by the cargo running the tests, with its
/// profile, next to this test's own profile folder.
fn server_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    // target/<profile>/deps/<test>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_owned();
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_owned(),
        Some(name) => name.to_owned(),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build
        .args([
            "build",
            "--quiet",
            "-p",
            "handid-server",
            "--bin",
            "handid-server",
            "--profile",
        ])
        .arg(&profile)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    // Without the variables cargo sets for this test's run: build scripts
    // that read one (ring's reads CARGO_MANIFEST_DIR) would record its
    // value, and the next ordinary build would find them stale and rebuild
    // half the workspace.
    for (name, _) in std::env::vars_os() {
        let text = name.to_string_lossy();
        let set_by_cargo = text.starts_with("CARGO_PKG_")
            || text.starts_with("CARGO_BIN_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "OUT_DIR",
            ]
            .contains(&text.as_ref());
        if set_by_cargo {
            build.env_remove(&name);
        }
    }
    let status = build.status().expect("run cargo build");
    assert!(status.success(), "cargo build -p handid-server: {status}");
    profile_dir.join(format!("handid-server{}", std::env::consts::EXE_SUFFIX))
}

/// The server's settings file as `upgrade-templates` reads it: the test's
/// database.
fn server_config(dir: &Path, options: &PgConnectOptions, model: &Path) -> PathBuf {
    let path = dir.join("server.yaml");
    std::fs::write(
        &path,
        format!(
            "database:\n  url: {}\n  max_connections: 2\nmodel:\n  path: {}\n",
            database_url(options),
            model.display()
        ),
    )
    .expect("settings file");
    path
}

/// A transform from `old` to `new` with libtorch's default (random)
/// initialisation, saved in `dir`: the figures' equality does not depend on
/// its quality.
fn random_transform(dir: &Path, old: &Manifest, new: &Manifest) {
    random_transform_with(dir, old, new, None);
}

/// [`random_transform`], fitted (as its manifest says) with `side_info`.
fn random_transform_with(dir: &Path, old: &Manifest, new: &Manifest, side_info: Option<SideInfo>) {
    TemplateTransform::new(
        TransformManifest {
            from_model: old.model_id.clone(),
            from_space: old.embedding_space.clone(),
            to_model: new.model_id.clone(),
            to_space: new.embedding_space.clone(),
            from_dim: old.embedding_dim,
            to_dim: new.embedding_dim,
            arch: handid_model::TransformArch::Mlp,
            inner_dim: 16,
            side_info,
            provenance: vec![("fitted".to_owned(), "no: a test's random transform".to_owned())],
        },
        handid_model::parse_device("cpu").expect("cpu"),
    )
    .save(dir)
    .expect("save transform");
}

/// Old model A (serving) and new model B under `dir`; B declares A's space
/// compatible when `compatible` (as backward-compatible training makes it),
/// else it has a space of its own.
fn two_models(dir: &Path, compatible: bool) -> (PathBuf, Manifest, PathBuf, Manifest) {
    let (a_dir, b_dir) = (dir.join("a"), dir.join("b"));
    let a = create_random_checkpoint(&a_dir, &ClipVisionConfig::tiny_vit(), 3).expect("A");
    let mut b = create_random_checkpoint(&b_dir, &ClipVisionConfig::tiny_vit(), 4).expect("B");
    assert_ne!(a.embedding_space, b.embedding_space);
    if compatible {
        b.compatible_spaces = vec![a.embedding_space.clone()];
        b.write(&b_dir).expect("B's manifest");
    }
    (a_dir, a, b_dir, b)
}

/// The rehearsal of the upgrade from A to B (through a random transform
/// unless B is `compatible`) gives, search by search and split by split,
/// the figures of offline `eval --query-model B --gallery-model A
/// [--transform T]`, leaves the server serving B and no gallery behind.
async fn rehearsal_matches_offline_eval(options: &PgConnectOptions, upgrade: Upgrade) {
    let started = std::time::Instant::now();
    let compatible = upgrade == Upgrade::Swap;
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = dataset(dir.path());
    let (a_dir, a, b_dir, b) = two_models(dir.path(), compatible);
    // A side-information model the server runs at every enrolment.
    let side_dir = (upgrade == Upgrade::TransformWithSideInformation).then(|| dir.path().join("side"));
    let side = side_dir.as_ref().map(|side_dir| {
        let m = create_random_checkpoint(side_dir, &ClipVisionConfig::tiny_vit(), 5).expect("side model");
        SideInfo {
            model: m.model_id,
            space: m.embedding_space,
            dim: m.embedding_dim,
        }
    });
    let transform = (!compatible).then(|| {
        let t = dir.path().join("transform");
        random_transform_with(&t, &a, &b, side.clone());
        t
    });

    // Offline: each model alone, and B's queries against A's galleries
    // (mapped by the transform), every image embedded one per pass.
    let offline = |name: &str, set: &dyn Fn(&mut eval::Args)| {
        let saved = dir.path().join(format!("{name}.safetensors"));
        let mut args = eval_args(&manifest, dir.path().join(name), saved.clone());
        set(&mut args);
        let report = eval::evaluate(&args).expect("offline eval");
        (report, embeddings::read(&saved).expect("saved embeddings"))
    };
    let (aa, aa_vectors) = offline("aa", &|args| args.model = Some(a_dir.clone()));
    let (bb, bb_vectors) = offline("bb", &|args| args.model = Some(b_dir.clone()));
    let (ba, ba_vectors) = offline("ba", &|args| {
        args.query_model = Some(b_dir.clone());
        args.gallery_model = Some(a_dir.clone());
        args.transform.clone_from(&transform);
        args.side_info.clone_from(&side_dir);
    });
    let offline_s = started.elapsed().as_secs_f64();

    let (addr, stop) = start_server_with(options, &a_dir, 100, &UPGRADE_SCOPES, side_dir.as_deref()).await;
    let mut args = replay_args(addr, &manifest, &dir.path().join("rehearsal"));
    args.upgrade_to = Some(b_dir.clone());
    if let Some(t) = &transform {
        args.transform = Some(t.clone());
        let config = server_config(dir.path(), options, &a_dir);
        if let Some(side_dir) = &side_dir {
            let text = std::fs::read_to_string(&config).expect("settings");
            let with_side = format!("model:\n  side_info: {}\n", side_dir.display());
            std::fs::write(&config, text.replacen("model:\n", &with_side, 1)).expect("settings");
        }
        args.server_config = Some(config);
        args.server_bin = Some(server_binary());
    }
    // What `replay::rehearse` does, in its two steps, so the server's
    // scores can be checked too.
    let service_started = std::time::Instant::now();
    let rehearsal = replay::collect_rehearsal(&args).await.expect("rehearsal");
    let service_s = service_started.elapsed().as_secs_f64();
    assert_eq!(active_model(options).await, b.model_id, "the server serves B");
    let _ = stop.send(());
    assert_eq!(galleries(options).await, 0, "the rehearsal left galleries behind");
    assert_eq!(
        (&rehearsal.old.model_id, &rehearsal.new.model_id),
        (&a.model_id, &b.model_id)
    );
    let report = replay::report_rehearsal(&args, &rehearsal).expect("rehearsal report");

    // The server's scores are eval's. Templates mapped by the transform on
    // the server went through another batch than eval's (all stored
    // templates at once, against one split's gallery), whose composition
    // may change the rounding of the transform's matrix products.
    check_served_scores("M(A,A)", &aa_vectors, &rehearsal.old_old, dot_delta);
    check_served_scores("M(B,B)", &bb_vectors, &rehearsal.new_new, dot_delta);
    // With side-information, eval fed the transform the side model's
    // features of the gallery images: equal scores mean the server mapped
    // every template through its own image's stored feature.
    let crossed_delta = if compatible { dot_delta } else { transform_delta };
    check_served_scores("M(B,A)", &ba_vectors, &rehearsal.new_old, crossed_delta);

    // And so are the figures: split by split, and the Compatibility section.
    let scored = |name: &str, splits: &[ScoredSplit]| {
        eval::report_scored(
            name,
            Vec::new(),
            splits,
            eval::eval_options(args.ap),
            &dir.path().join(name),
        )
        .expect("report")
    };
    same_ranking_figures("M(A,A)", &aa, &scored("replayed-aa", &rehearsal.old_old));
    same_ranking_figures("M(B,B)", &bb, &scored("replayed-bb", &rehearsal.new_new));
    same_ranking_figures("M(B,A)", &ba, &report);
    let (offline_c, replayed_c) = (
        ba.compatibility.as_ref().expect("offline compatibility"),
        report.compatibility.as_ref().expect("replayed compatibility"),
    );
    assert_eq!(
        (offline_c.old_old, offline_c.new_new, offline_c.new_old),
        (replayed_c.old_old, replayed_c.new_new, replayed_c.new_old)
    );
    assert_eq!(replayed_c.transform.is_some(), !compatible);
    let md = std::fs::read_to_string(args.report.join("report.md")).expect("report.md");
    assert!(md.contains("## Compatibility"), "{md}");
    for sub in ["old-old", "new-new"] {
        assert!(args.report.join(sub).join("report.md").is_file(), "{sub} report");
    }
    println!("rehearsal ({upgrade:?}): offline evals {offline_s:.1} s, through the service {service_s:.1} s");
}

/// How a rehearsal moves the server from A to B.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upgrade {
    /// B is backward-compatible: swapped in.
    Swap,
    /// A's templates transformed into B's space.
    Transform,
    /// The same with a transform that takes side-information, which the
    /// server stored at enrolment.
    TransformWithSideInformation,
}

/// [`dot_delta`] for templates mapped by a transform: their entries may
/// differ from eval's by a few ulps (up to 8 allowed), which moves a cosine
/// with a unit probe by at most 8 * 2^-24 (Cauchy-Schwarz).
fn transform_delta(dim: usize) -> f64 {
    dot_delta(dim) + 8.0 * 2f64.powi(-24)
}

#[sqlx::test(migrations = false)]
async fn upgrade_rehearsal_to_a_compatible_model_reproduces_offline_eval(
    _: PgPoolOptions,
    options: PgConnectOptions,
) {
    rehearsal_matches_offline_eval(&options, Upgrade::Swap).await;
}

#[sqlx::test(migrations = false)]
async fn upgrade_rehearsal_through_a_transform_reproduces_offline_eval(
    _: PgPoolOptions,
    options: PgConnectOptions,
) {
    rehearsal_matches_offline_eval(&options, Upgrade::Transform).await;
}

#[sqlx::test(migrations = false)]
async fn upgrade_rehearsal_through_a_transform_with_side_information_reproduces_offline_eval(
    _: PgPoolOptions,
    options: PgConnectOptions,
) {
    rehearsal_matches_offline_eval(&options, Upgrade::TransformWithSideInformation).await;
}

/// An executable script under `dir` standing in for `handid-server`.
fn fake_server(dir: &Path, name: &str, script: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).expect("script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// A stand-in for `handid-server` whose `upgrade-templates` says it
/// succeeded but upgrades nothing.
fn upgrader_ok(dir: &Path) -> PathBuf {
    fake_server(
        dir,
        "idle",
        "echo '0 templates of model a mapped into model b (0 batches); 0 left'",
    )
}

#[sqlx::test(migrations = false)]
async fn refused_upgrades_are_explained_and_clean_up(_: PgPoolOptions, options: PgConnectOptions) {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = dataset(dir.path());
    let (a_dir, a, b_dir, b) = two_models(dir.path(), false);
    let (addr, stop) = start_server(&options, &a_dir, 100, &UPGRADE_SCOPES).await;
    let config = server_config(dir.path(), &options, &a_dir);
    let rehearse = |name: &str, transform: Option<&Path>, server_bin: Option<PathBuf>| {
        let mut args = replay_args(addr, &manifest, &dir.path().join(name));
        args.upgrade_to = Some(b_dir.clone());
        args.transform = transform.map(Path::to_path_buf);
        args.server_config = transform.map(|_| config.clone());
        args.server_bin = server_bin;
        async move { replay::rehearse(&args).await.expect_err("refused") }
    };
    let nothing_changed = |what: &'static str| {
        let options = options.clone();
        let a_id = a.model_id.clone();
        async move {
            assert_eq!(galleries(&options).await, 0, "{what}: galleries left behind");
            assert_eq!(active_model(&options).await, a_id, "{what}: the server left A");
        }
    };

    // B is of another embedding space: the server refuses the swap, and
    // the error says what to do.
    let err = format!("{:#}", rehearse("swap", None, None).await);
    assert!(err.contains("refuses to swap"), "{err}");
    assert!(
        err.contains("--transform") && err.contains("compatible_spaces"),
        "{err}"
    );
    nothing_changed("a refused swap").await;

    // A transform of other models is refused before any call changes
    // anything (here: from B to A, the wrong way round).
    let backwards = dir.path().join("backwards");
    random_transform(&backwards, &b, &a);
    let err = format!(
        "{:#}",
        rehearse("backwards", Some(&backwards), Some(upgrader_ok(dir.path()))).await
    );
    assert!(err.contains("maps the templates of model"), "{err}");
    nothing_changed("a transform of other models").await;

    // So is a transform that needs side-information the server does not
    // store: its settings name no model.side_info.
    let with_side = dir.path().join("with-side");
    let side = SideInfo {
        model: "5".repeat(64),
        space: "side".to_owned(),
        dim: 8,
    };
    random_transform_with(&with_side, &a, &b, Some(side));
    let err = format!(
        "{:#}",
        rehearse("with-side", Some(&with_side), Some(upgrader_ok(dir.path()))).await
    );
    assert!(
        err.contains("name no model.side_info") && err.contains("fit the transform without --side-info"),
        "{err}"
    );
    nothing_changed("a transform with side-information").await;
    // Or names another side model than the transform's.
    let other_side = dir.path().join("other-side");
    create_random_checkpoint(&other_side, &ClipVisionConfig::tiny_vit(), 9).expect("side model");
    let text = std::fs::read_to_string(&config).expect("settings");
    let with_other_side = dir.path().join("server-side.yaml");
    std::fs::write(
        &with_other_side,
        text.replacen(
            "model:\n",
            &format!("model:\n  side_info: {}\n", other_side.display()),
            1,
        ),
    )
    .expect("settings with a side model");
    let mut args = replay_args(addr, &manifest, &dir.path().join("other-side-report"));
    args.upgrade_to = Some(b_dir.clone());
    args.transform = Some(with_side.clone());
    args.server_config = Some(with_other_side);
    args.server_bin = Some(upgrader_ok(dir.path()));
    let err = format!("{:#}", replay::rehearse(&args).await.expect_err("refused"));
    assert!(err.contains("but the server's model.side_info"), "{err}");
    nothing_changed("a transform with another side model").await;

    // upgrade-templates fails: its message is shown, B is not promoted.
    let transform = dir.path().join("transform");
    random_transform(&transform, &a, &b);
    let failing = fake_server(
        dir.path(),
        "failing",
        "echo 'Error: connecting to the database: refused' >&2; exit 1",
    );
    let err = format!("{:#}", rehearse("failing", Some(&transform), Some(failing)).await);
    assert!(err.contains("connecting to the database: refused"), "{err}");
    assert!(err.contains("stays staged"), "{err}");
    nothing_changed("a failed upgrade").await;

    // B stays staged: a second rehearsal is refused before it enrols
    // anything (its enrolments would be dual).
    let err = format!(
        "{:#}",
        rehearse("again", Some(&transform), Some(upgrader_ok(dir.path()))).await
    );
    assert!(err.contains("is staged on the server"), "{err}");
    nothing_changed("a rehearsal during a migration").await;
    let _ = stop.send(());
}

#[sqlx::test(migrations = false)]
async fn an_incomplete_template_upgrade_is_not_promoted(_: PgPoolOptions, options: PgConnectOptions) {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = dataset(dir.path());
    let (a_dir, a, b_dir, b) = two_models(dir.path(), false);
    let transform = dir.path().join("transform");
    random_transform(&transform, &a, &b);
    let (addr, stop) = start_server(&options, &a_dir, 100, &UPGRADE_SCOPES).await;
    let mut args = replay_args(addr, &manifest, &dir.path().join("report"));
    args.upgrade_to = Some(b_dir);
    args.transform = Some(transform);
    args.server_config = Some(server_config(dir.path(), &options, &a_dir));
    // upgrade-templates says it succeeded but left the replay's galleries
    // without templates of B.
    args.server_bin = Some(upgrader_ok(dir.path()));
    let err = format!("{:#}", replay::rehearse(&args).await.expect_err("refused"));
    let _ = stop.send(());
    assert!(err.contains("not promoting model"), "{err}");
    assert!(err.contains("(0 of 6 subjects)"), "{err}");
    assert_eq!(galleries(&options).await, 0, "galleries left behind");
    assert_eq!(active_model(&options).await, a.model_id, "the server left A");
}
