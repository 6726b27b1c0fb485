//! The evaluation harness over gRPC (`handid-trainer replay`) against a real
//! server on a local port over a real PostgreSQL (`#[sqlx::test]` gives each
//! test a fresh database):
//! - replay and offline `eval` of one checkpoint on one manifest give the
//!   very same ranking metrics, split by split;
//! - the end-to-end pipeline synthetic data -> splits -> (training) ->
//!   replay writes its report, with sane figures, and leaves no gallery;
//! - failures are explained and still clean up.
//!
//! Sizes are CI-sized: 12 synthetic persons x 4 images of 32x32 pixels and
//! the tiny ViT (16-d embeddings).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use handid_eval::data::synthetic::{self, Layout, SynthOptions};
use handid_eval::data::{MissingImages, folder, splits};
use handid_eval::embeddings;
use handid_eval::metrics::summary::SplitEvaluation;
use handid_eval::report::Report;
use handid_model::{ClipVisionConfig, create_random_checkpoint};
use handid_server::Settings;
use handid_server::settings::{ApiKeySettings, Scope};
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

/// A server on 127.0.0.1:0 serving `checkpoint`; returns its address and a
/// sender that stops it.
async fn start_server(
    options: &PgConnectOptions,
    checkpoint: &Path,
    max_top_k: u32,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let mut settings = Settings::default();
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
        scopes: vec![Scope::Identify, Scope::Enroll],
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

    let (addr, stop) = start_server(&options, &model, 100).await;
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

    // Why the metrics can be compared for equality: they depend only on the
    // order of each query's gallery scores (ties by gallery order on both
    // sides). Both sides embed one image per forward pass, so the
    // embeddings are the same f32 values; the server then scores in f32
    // (libtorch mv) and `eval` in f64 after renormalising, which differ by
    // at most about (dim + 4) * 2^-24 for unit vectors (Higham, "Accuracy
    // and Stability of Numerical Algorithms", 2002, §3.1, dot products).
    // Below, every server score is checked to lie within `delta` of eval's
    // (twice that bound); then with `worst` the largest difference seen in
    // the split, every two gallery scores of a query must lie more than
    // 2 * worst apart, so no difference can reorder them: the orders, and
    // with them every ranking figure, must be identical. A failing gap
    // means the test data needs another seed, never a tolerance.
    let offline_sims = embeddings::read(&saved).expect("saved embeddings");
    assert_eq!(offline_sims.len(), scores.splits.len());
    for (split, served) in offline_sims.iter().zip(&scores.splits) {
        let delta = (split.gallery.dim as f64 + 4.0) * 2f64.powi(-23);
        let sim = embeddings::cosine_similarity(&split.query, &split.gallery).expect("sim");
        assert_eq!(
            (&split.query.ids, &split.gallery.ids),
            (&served.query_ids, &served.gallery_ids)
        );
        let worst = sim
            .iter()
            .zip(&served.sim)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            worst <= delta,
            "split {}: server scores differ by {worst:e} > {delta:e}",
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
                "split {} query {q}: two gallery scores only {gap:e} apart (server differs by {worst:e})",
                split.name
            );
        }
    }

    assert_eq!(offline.splits.len(), SPLITS);
    assert_eq!(replayed.splits.len(), SPLITS);
    for (o, r) in offline.splits.iter().zip(&replayed.splits) {
        assert_eq!(o.split, r.split);
        assert!(o.n_query > 0 && o.n_gallery > 1, "{o:?}");
        assert_eq!(
            ranking_figures(o),
            ranking_figures(r),
            "split {}: ranking figures differ",
            o.split
        );
    }
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
    let baseline = handid_model::Manifest::read(&model).expect("baseline manifest");
    assert_ne!(exported.manifest.model_id, baseline.model_id);
    // 4. Serve it and replay the manifest through the service.
    let (addr, stop) = start_server(&options, &served, 100).await;
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
    let (addr, stop) = start_server(&options, &model, 5).await;
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
