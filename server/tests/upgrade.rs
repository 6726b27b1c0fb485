//! Model upgrades without re-enrolment (issue #18), end to end on real
//! servers and real Postgres: the stored templates of model A are mapped
//! into a staged model C's space by `handid-server upgrade-templates` (the
//! real binary), in batches, resumed after a limit, while two replicas
//! answer Identify; C is promoted and both replicas search the upgraded
//! templates. And the upgrade's library: refusals, a stop and a resume, two
//! runs at once, a subject deleted while its batch is written.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{
    TestServer, checkpoint_in, database_url, enroll, identify, linear_transform, offline_embedding, people,
    reload, settings, transform, until_models, wait_for_health,
};
use handid_model::transform::TemplateTransform;
use handid_model::{Embedder, Manifest};
use handid_proto::v1 as pb;
use handid_server::store::{Store, embedding_from_bytes};
use handid_server::upgrade::{UpgradeError, UpgradeOptions, upgrade_templates};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tch::{Device, Tensor};
use tonic_health::pb::health_check_response::ServingStatus;

/// `transform` applied to one vector, as the upgrade stores it.
fn mapped(transform: &TemplateTransform, old: &[f32]) -> Vec<f32> {
    mapped_with(transform, old, None)
}

/// `transform` applied to one vector with its side-information feature.
fn mapped_with(transform: &TemplateTransform, old: &[f32], side: Option<&[f32]>) -> Vec<f32> {
    let row = |v: &[f32]| Tensor::from_slice(v).view([1, -1]);
    let out = transform.apply(&row(old), side.map(row).as_ref()).expect("apply");
    Vec::<f32>::try_from(&out.get(0)).expect("to vec")
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

/// Every (source subject, derived subject, source embedding, derived
/// embedding) pair of templates of `to` derived from `from`.
async fn derived_pairs(pool: &PgPool, from: &str, to: &str) -> Vec<(i64, i64, Vec<f32>, Vec<f32>)> {
    let rows: Vec<(i64, i64, Vec<u8>, Vec<u8>)> = sqlx::query_as(
        "SELECT s.subject, d.subject, s.embedding, d.embedding
         FROM templates s JOIN templates d ON d.derived_from = s.template_id
         WHERE s.model_id = $1 AND d.model_id = $2 ORDER BY s.seq",
    )
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await
    .expect("derived templates");
    rows.into_iter()
        .map(|(a, b, x, y)| {
            (
                a,
                b,
                embedding_from_bytes(&x).expect("source"),
                embedding_from_bytes(&y).expect("derived"),
            )
        })
        .collect()
}

/// Runs `handid-server upgrade-templates` (the real binary): exit status
/// and standard output.
async fn upgrade_command(config: &Path, transform: &Path, extra: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_handid-server"))
        .arg("upgrade-templates")
        .arg("--config")
        .arg(config)
        .arg("--transform")
        .arg(transform)
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("run upgrade-templates");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), format!("{stdout}{stderr}"))
}

/// GetModel's answer.
async fn model_report(server: &TestServer) -> pb::GetModelResponse {
    server
        .admin()
        .await
        .get_model(pb::GetModelRequest {})
        .await
        .expect("get model")
        .into_inner()
}

/// Staged coverage as GetModel reports it: (gallery, subjects, covered).
async fn coverage(server: &TestServer) -> Vec<(String, u32, u32)> {
    model_report(server)
        .await
        .coverage
        .iter()
        .map(|c| (c.gallery_id.clone(), c.subjects, c.subjects_with_staged_templates))
        .collect()
}

/// Old model A (seed 11) and new model C (seed 13), each a random
/// checkpoint of its own space in its own folder.
fn a_and_c() -> (tempfile::TempDir, Manifest, tempfile::TempDir, Manifest) {
    let (a_dir, c_dir) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("c"));
    let a = checkpoint_in(a_dir.path(), 11, None);
    let c = checkpoint_in(c_dir.path(), 13, None);
    assert_ne!(a.embedding_space, c.embedding_space);
    (a_dir, a, c_dir, c)
}

#[sqlx::test(migrations = false)]
async fn an_upgrade_under_identify_traffic_fails_no_call_loses_no_subject_and_replicas_follow(
    _: PgPoolOptions,
    options: PgConnectOptions,
) {
    let (a_dir, a, c_dir, c) = a_and_c();
    let t_dir = tempfile::tempdir().expect("transform");
    let mut config = settings(&options, a_dir.path());
    config.replication.poll_interval_ms = 300;
    // Load generators from one address (the rate limit is overload.rs's).
    config.server.rate_limit_per_second = 0.0;
    let one = TestServer::start(config.clone()).await;
    wait_for_health(&one, ServingStatus::Serving).await;
    let two = TestServer::start(config).await;
    wait_for_health(&two, ServingStatus::Serving).await;
    let mut client = one.client().await;

    // Six people under A: four in g1, two in g2, one photo each.
    let people = people(6, 2);
    for (i, (subject, photos)) in people.iter().enumerate() {
        let gallery = if i < 4 { "g1" } else { "g2" };
        client
            .enroll(enroll(gallery, subject, &photos[..1]))
            .await
            .expect("enrol under A");
    }
    one.admin()
        .await
        .reload_model(reload(c_dir.path(), pb::ReloadMode::StageMigration))
        .await
        .expect("stage C");
    until_models(&two, (&a.model_id, Some(&c.model_id))).await;
    assert_eq!(
        coverage(&one).await,
        [("g1".to_owned(), 4, 0), ("g2".to_owned(), 2, 0)]
    );
    // A linear transform (`fit-transform --arch linear`); the other tests
    // use the paper's network.
    let t = linear_transform(&a, &c);
    t.save(t_dir.path()).expect("save transform");

    // Four clients, two per replica, call Identify in a loop throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for (w, (_, photos)) in people.iter().enumerate().take(4) {
        let mut client = if w % 2 == 0 {
            one.client().await
        } else {
            two.client().await
        };
        let stop = Arc::clone(&stop);
        let probe = photos[1].clone();
        workers.push(tokio::spawn(async move {
            let (mut models, mut failures) = (Vec::new(), Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match client.identify(identify("g1", &probe)).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        assert_eq!(r.gallery_size, 4, "a subject went missing");
                        models.push(r.model_id);
                    }
                    Err(status) => failures.push(status),
                }
            }
            (models, failures)
        }));
    }

    // The service's settings file: the command reads its database.
    let config_file = t_dir.path().join("server.yaml");
    std::fs::write(
        &config_file,
        format!(
            "database:\n  url: {}\n  max_connections: 2\nmodel:\n  path: {}\n",
            database_url(&options),
            a_dir.path().display()
        ),
    )
    .expect("settings file");

    // A first run limited to three templates, in batches of two.
    let (status, out) =
        upgrade_command(&config_file, t_dir.path(), &["--batch-size", "2", "--limit", "3"]).await;
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("3 templates of model"), "{out}");
    assert!(out.contains("(2 batches); 3 left"), "{out}");
    assert!(out.contains("run the same command again"), "{out}");
    let covered: u32 = coverage(&one).await.iter().map(|(_, _, c)| c).sum();
    assert_eq!(covered, 3, "GetModel shows the partial upgrade");
    assert_eq!(coverage(&two).await, coverage(&one).await);

    // Resumed: the other three; then a third run finds nothing to do.
    let (status, out) = upgrade_command(&config_file, t_dir.path(), &["--batch-size", "2"]).await;
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("3 templates of model"), "{out}");
    assert!(out.contains("; 0 left"), "{out}");
    assert!(out.contains("gallery g1: 4 of 4 subjects"), "{out}");
    assert!(
        out.contains(&format!("done: promote model {}", c.model_id)),
        "{out}"
    );
    let (status, out) = upgrade_command(&config_file, t_dir.path(), &[]).await;
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("0 templates of model"), "{out}");
    assert_eq!(
        coverage(&one).await,
        [("g1".to_owned(), 4, 4), ("g2".to_owned(), 2, 2)]
    );

    // One derived template per A template, on its subject, equal to the
    // transform's output.
    let pool = PgPoolOptions::new()
        .connect(&database_url(&options))
        .await
        .expect("pool");
    let pairs = derived_pairs(&pool, &a.model_id, &c.model_id).await;
    assert_eq!(pairs.len(), 6);
    for (source_subject, subject, old, new) in &pairs {
        assert_eq!(source_subject, subject);
        let want = mapped(&t, old);
        let worst = want
            .iter()
            .zip(new)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-5,
            "stored template differs from the transform by {worst}"
        );
    }

    // Promoted on one replica; the other follows.
    let promoted = one
        .admin()
        .await
        .promote_model(pb::PromoteModelRequest {
            require_full_coverage: true,
        })
        .await
        .expect("promote with full coverage")
        .into_inner();
    assert_eq!(promoted.active.expect("active").model_id, c.model_id);
    until_models(&two, (&c.model_id, None)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let mut calls = 0;
    for worker in workers {
        let (models, failures) = worker.await.expect("worker");
        assert!(failures.is_empty(), "failed Identify calls: {failures:?}");
        let first_c = models
            .iter()
            .position(|m| *m == c.model_id)
            .expect("answers move to C");
        assert!(first_c > 0, "never answered with A");
        assert!(models[first_c..].iter().all(|m| *m == c.model_id));
        calls += models.len();
    }
    println!("upgrade under load: {calls} Identify calls, none failed");

    // Both replicas now search the upgraded templates with C: every score is
    // the cosine of C's probe embedding and the transform of A's enrolled
    // embedding, computed here offline.
    let (embed_a, embed_c) = (
        Embedder::load(a_dir.path(), Device::Cpu).expect("A offline"),
        Embedder::load(c_dir.path(), Device::Cpu).expect("C offline"),
    );
    let probe = &people[0].1[1];
    let probe_c = offline_embedding(&embed_c, probe);
    for server in [&one, &two] {
        let found = server
            .client()
            .await
            .identify(pb::IdentifyRequest {
                top_k: 4,
                ..identify("g1", probe)
            })
            .await
            .expect("identify with C")
            .into_inner();
        assert_eq!(found.model_id, c.model_id);
        assert_eq!(found.candidates.len(), 4);
        for candidate in &found.candidates {
            let (_, photos) = people
                .iter()
                .find(|(s, _)| *s == candidate.subject_id)
                .expect("an enrolled subject");
            let template = mapped(&t, &offline_embedding(&embed_a, &photos[0]));
            let want = cosine(&probe_c, &template);
            assert!(
                (candidate.score - want).abs() < 1e-3,
                "{}: score {} vs {want} offline",
                candidate.subject_id,
                candidate.score
            );
        }
    }

    // Audited: three runs, what each derived.
    let runs: Vec<(String, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT outcome, detail->>'derived', model_id FROM audit_log
         WHERE action = 'upgrade_templates' ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .expect("audit rows");
    let want = |n: &str| ("ok".to_owned(), Some(n.to_owned()), Some(c.model_id.clone()));
    assert_eq!(runs, [want("3"), want("3"), want("0")]);
    one.stop().await.expect("one stops");
    two.stop().await.expect("two stops");
}

#[sqlx::test(migrations = false)]
async fn the_upgrade_refuses_what_does_not_fit_stops_resumes_and_runs_twice_at_once(
    _: PgPoolOptions,
    options: PgConnectOptions,
) {
    let (a_dir, a, c_dir, c) = a_and_c();
    let d_dir = tempfile::tempdir().expect("d");
    checkpoint_in(d_dir.path(), 14, None);
    common::capture_logs();
    let server = TestServer::start(settings(&options, a_dir.path())).await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let mut client = server.client().await;
    let mut admin = server.admin().await;
    let people = people(8, 1);
    for (subject, photos) in &people {
        client
            .enroll(enroll("site", subject, photos))
            .await
            .expect("enrol under A");
    }
    let pool = PgPoolOptions::new()
        .connect(&database_url(&options))
        .await
        .expect("pool");
    let store = Store::from_pool(pool.clone());
    let t = transform(&a, &c);
    let never = AtomicBool::new(false);
    let options = |batch_size, limit| UpgradeOptions { batch_size, limit };

    // C was never loaded: refused, naming it.
    let refused = upgrade_templates(&store, &t, &options(3, None), &never, |_| {})
        .await
        .expect_err("C unknown");
    assert!(
        matches!(refused, UpgradeError::UnknownModel { which: "new", .. }),
        "{refused}"
    );
    assert!(refused.to_string().contains(&c.model_id), "{refused}");
    // Staged, then replaced by another staging: retired, refused.
    for dir in [c_dir.path(), d_dir.path()] {
        admin
            .reload_model(reload(dir, pb::ReloadMode::StageMigration))
            .await
            .expect("stage");
    }
    let refused = upgrade_templates(&store, &t, &options(3, None), &never, |_| {})
        .await
        .expect_err("C retired");
    assert!(
        refused.to_string().contains("is retired: stage it first"),
        "{refused}"
    );
    admin
        .reload_model(reload(c_dir.path(), pb::ReloadMode::StageMigration))
        .await
        .expect("stage C again");
    // A transform fitted for other widths, or mapping a model to itself.
    let mut wrong = t.manifest().clone();
    wrong.from_dim += 1;
    let refused = upgrade_templates(
        &store,
        &TemplateTransform::new(wrong, Device::Cpu),
        &options(3, None),
        &never,
        |_| {},
    )
    .await
    .expect_err("other width");
    assert!(
        matches!(refused, UpgradeError::Mismatch { which: "old", .. }),
        "{refused}"
    );
    let mut same = t.manifest().clone();
    same.to_model = same.from_model.clone();
    let refused = upgrade_templates(
        &store,
        &TemplateTransform::new(same, Device::Cpu),
        &options(3, None),
        &never,
        |_| {},
    )
    .await
    .expect_err("same model");
    assert!(matches!(refused, UpgradeError::SameModel(_)), "{refused}");
    // A transform that needs side-information, which this server (without
    // model.side_info) stored for none of the eight templates.
    let mut side = t.manifest().clone();
    side.side_info = Some(handid_model::SideInfo {
        model: "s".repeat(64),
        space: "s".into(),
        dim: 8,
    });
    let refused = upgrade_templates(
        &store,
        &TemplateTransform::new(side, Device::Cpu),
        &options(3, None),
        &never,
        |_| {},
    )
    .await
    .expect_err("side-information");
    assert!(
        matches!(refused, UpgradeError::SideInformation { missing: 8, .. })
            && refused.to_string().contains("model.side_info")
            && refused
                .to_string()
                .contains("fit the transform without --side-info"),
        "{refused}"
    );
    assert!(
        derived_pairs(&pool, &a.model_id, &c.model_id).await.is_empty(),
        "refusals wrote nothing"
    );

    // Stopped after its first batch: two done, six left; nothing half done.
    let stop = AtomicBool::new(false);
    let mut seen = Vec::new();
    let first = upgrade_templates(&store, &t, &options(2, None), &stop, |p| {
        seen.push(p);
        stop.store(true, Ordering::Relaxed);
    })
    .await
    .expect("first run");
    assert!(first.stopped);
    assert_eq!((first.derived, first.batches, first.remaining), (2, 1, 6));
    assert_eq!(seen.len(), 1);
    assert_eq!((seen[0].derived, seen[0].total), (2, 8));

    // A subject whose deletion is in flight while its batch is written (the
    // next template in the walk): the batch waits for it, fails its foreign
    // key, rolls back and is read again without it.
    let mut deleting = pool.begin().await.expect("transaction");
    sqlx::query("DELETE FROM subjects WHERE gallery_id = 'site' AND subject_id = $1")
        .bind(&people[2].0)
        .execute(&mut *deleting)
        .await
        .expect("delete the next subject");
    let commit_later = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        deleting.commit().await.expect("commit the deletion");
    });
    // Two runs at once, one template per batch: each template once.
    let one_by_one = options(1, None);
    let (x, y) = tokio::join!(
        upgrade_templates(&store, &t, &one_by_one, &never, |_| {}),
        upgrade_templates(&store, &t, &one_by_one, &never, |_| {}),
    );
    commit_later.await.expect("deletion committed");
    let (x, y) = (x.expect("run x"), y.expect("run y"));
    assert!(
        common::contains(&common::logs(), b"lost to a concurrent change; reading it again"),
        "the batch holding the deleted subject was retried"
    );
    assert_eq!(
        x.derived + y.derived,
        5,
        "six left, one deleted meanwhile: {x:?} {y:?}"
    );
    // (Each run's own `remaining` may count the other's batch in flight.)
    assert_eq!(
        store
            .count_underived(&a.model_id, &c.model_id)
            .await
            .expect("count"),
        0
    );
    let pairs = derived_pairs(&pool, &a.model_id, &c.model_id).await;
    assert_eq!(pairs.len(), 7, "one derived template per remaining A template");
    let mut sources: Vec<i64> = pairs.iter().map(|p| p.0).collect();
    sources.dedup();
    assert_eq!(sources.len(), 7, "no source derived twice");
    let report = server
        .admin()
        .await
        .get_model(pb::GetModelRequest {})
        .await
        .expect("get model")
        .into_inner();
    let site = &report.coverage[0];
    assert_eq!((site.subjects, site.subjects_with_staged_templates), (7, 7));

    // Deleting a subject takes its derived template with it.
    client
        .delete_subject(pb::DeleteSubjectRequest {
            gallery_id: "site".to_owned(),
            subject_id: people[0].0.clone(),
        })
        .await
        .expect("delete subject");
    assert_eq!(derived_pairs(&pool, &a.model_id, &c.model_id).await.len(), 6);
    server.stop().await.expect("stop");
}

/// Side-information rows: (template id, side model, feature), by
/// enrolment order of their templates.
async fn side_rows(pool: &PgPool, model: &str) -> Vec<(uuid::Uuid, String, Vec<f32>)> {
    sqlx::query_as(
        "SELECT s.template_id, s.side_model, s.feature FROM template_side_info s
         JOIN templates t ON t.template_id = s.template_id WHERE t.model_id = $1 ORDER BY t.seq",
    )
    .bind(model)
    .fetch_all(pool)
    .await
    .expect("side-information rows")
}

#[sqlx::test(migrations = false)]
async fn a_server_with_side_information_stores_it_and_the_upgrade_maps_through_it(
    _: PgPoolOptions,
    options: PgConnectOptions,
) {
    let (a_dir, a, c_dir, c) = a_and_c();
    let s_dir = tempfile::tempdir().expect("side");
    let s = checkpoint_in(s_dir.path(), 17, None);
    let side_model = Embedder::load(s_dir.path(), Device::Cpu).expect("side model");
    let mut config = settings(&options, a_dir.path());
    config.model.side_info = Some(s_dir.path().to_owned());
    let server = TestServer::start(config).await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let mut client = server.client().await;
    let pool = PgPoolOptions::new()
        .connect(&database_url(&options))
        .await
        .expect("pool");
    // GetModel names the side-information model beside the active one.
    let report = model_report(&server).await;
    let side_info = report.side_info.expect("the side-information model is reported");
    assert_eq!(side_info.model_id, s.model_id);
    assert_eq!(side_info.path, s_dir.path().display().to_string());
    assert_eq!(side_info.embedding_dim as usize, side_model.dim());
    assert_eq!(report.active.expect("active").model_id, a.model_id);

    // Three people, two photos each: each template has the side model's
    // feature of its own image beside it.
    let people = people(3, 2);
    for (subject, photos) in &people {
        client
            .enroll(enroll("site", subject, photos))
            .await
            .expect("enrol under A");
    }
    let stored = side_rows(&pool, &a.model_id).await;
    assert_eq!(stored.len(), 6, "one row per template");
    let photos: Vec<&Vec<u8>> = people.iter().flat_map(|(_, photos)| photos).collect();
    for ((_, model, feature), photo) in stored.iter().zip(&photos) {
        assert_eq!(model, &s.model_id);
        let expected = offline_embedding(&side_model, photo);
        assert!(
            cosine(feature, &expected) > 0.9999,
            "the side model's feature of that image"
        );
    }

    // C staged: an enrolment now stores a template of each model, and the
    // side feature beside both.
    server
        .admin()
        .await
        .reload_model(reload(c_dir.path(), pb::ReloadMode::StageMigration))
        .await
        .expect("stage C");
    let late = common::photo(9, 0);
    client
        .enroll(enroll("site", "late", std::slice::from_ref(&late)))
        .await
        .expect("enrol during the migration");
    let staged_rows = side_rows(&pool, &c.model_id).await;
    assert_eq!(staged_rows.len(), 1, "the staged template's side-information");
    assert!(cosine(&staged_rows[0].2, &offline_embedding(&side_model, &late)) > 0.9999);
    assert_eq!(side_rows(&pool, &a.model_id).await.len(), 7);

    // A transform fitted with the side model: every template of A maps
    // through its own image's side feature, and the derived template keeps
    // a copy of it for the next upgrade.
    let mut manifest = transform(&a, &c).manifest().clone();
    manifest.side_info = Some(handid_model::SideInfo {
        model: s.model_id.clone(),
        space: s.embedding_space.clone(),
        dim: s.embedding_dim,
    });
    let t = TemplateTransform::new(manifest, Device::Cpu);
    let store = Store::from_pool(pool.clone());
    let never = AtomicBool::new(false);
    let to_do = store
        .count_underived(&a.model_id, &c.model_id)
        .await
        .expect("count");
    let done = upgrade_templates(
        &store,
        &t,
        &UpgradeOptions {
            batch_size: 2,
            limit: None,
        },
        &never,
        |_| {},
    )
    .await
    .expect("upgrade through side-information");
    assert_eq!((done.derived, done.remaining), (to_do, 0));
    let sources: std::collections::BTreeMap<uuid::Uuid, Vec<f32>> = side_rows(&pool, &a.model_id)
        .await
        .into_iter()
        .map(|(id, _, feature)| (id, feature))
        .collect();
    let derived: Vec<(uuid::Uuid, uuid::Uuid, Vec<u8>, Vec<u8>)> = sqlx::query_as(
        "SELECT s.template_id, d.template_id, s.embedding, d.embedding
         FROM templates s JOIN templates d ON d.derived_from = s.template_id
         WHERE s.model_id = $1 AND d.model_id = $2",
    )
    .bind(&a.model_id)
    .bind(&c.model_id)
    .fetch_all(&pool)
    .await
    .expect("derived templates");
    assert_eq!(derived.len() as u64, to_do);
    let copies: std::collections::BTreeMap<uuid::Uuid, Vec<f32>> = side_rows(&pool, &c.model_id)
        .await
        .into_iter()
        .map(|(id, _, feature)| (id, feature))
        .collect();
    for (source, target, old, new) in &derived {
        let old = embedding_from_bytes(old).expect("source");
        let new = embedding_from_bytes(new).expect("derived");
        let side = &sources[source];
        assert!(
            cosine(&new, &mapped_with(&t, &old, Some(side))) > 0.9999,
            "mapped with its own side feature"
        );
        // Had its side feature been ignored (zeros), the result would differ.
        let ignored = mapped_with(&t, &old, Some(&vec![0.0; side.len()]));
        assert!(
            cosine(&new, &ignored) < 0.9999,
            "the side feature changed the result"
        );
        assert_eq!(
            &copies[target], side,
            "the derived template keeps its source's side feature"
        );
    }

    // Erasing a subject erases its side-information with its templates.
    client
        .delete_subject(pb::DeleteSubjectRequest {
            gallery_id: "site".to_owned(),
            subject_id: people[0].0.clone(),
        })
        .await
        .expect("delete subject");
    assert_eq!(side_rows(&pool, &a.model_id).await.len(), 5);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM template_side_info")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(left as usize, 5 + side_rows(&pool, &c.model_id).await.len());
    server.stop().await.expect("stop");
}

#[sqlx::test(migrations = false)]
async fn a_backward_compatible_model_is_swapped_in_and_searches_the_old_templates(
    _: PgPoolOptions,
    options: PgConnectOptions,
) {
    let (a_dir, b_dir) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
    let a = checkpoint_in(a_dir.path(), 11, None);
    // A BCT model: its own space, A's declared compatible (what the trainer
    // writes for `method.compatibility`).
    let mut b = checkpoint_in(b_dir.path(), 12, None);
    b.compatible_spaces = vec![a.embedding_space.clone()];
    b.write(b_dir.path()).expect("rewrite manifest");
    let server = TestServer::start(settings(&options, a_dir.path())).await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let mut client = server.client().await;
    let people = people(4, 2);
    for (subject, photos) in &people[..3] {
        client
            .enroll(enroll("site", subject, &photos[..1]))
            .await
            .expect("enrol under A");
    }

    // Swapped in directly: no staging, no upgrade.
    let swapped = server
        .admin()
        .await
        .reload_model(reload(b_dir.path(), pb::ReloadMode::Unspecified))
        .await
        .expect("swap in the compatible model")
        .into_inner();
    assert!(!swapped.staged);
    // A new enrolment is stored in B's space only.
    let (newcomer, photos) = &people[3];
    let enrolled = client
        .enroll(enroll("site", newcomer, &photos[..1]))
        .await
        .expect("enrol under B")
        .into_inner();
    assert_eq!(enrolled.model_id, b.model_id);
    let record = client
        .get_subject(pb::GetSubjectRequest {
            gallery_id: "site".to_owned(),
            subject_id: newcomer.clone(),
        })
        .await
        .expect("get subject")
        .into_inner()
        .subject
        .expect("subject");
    let models: Vec<&str> = record.templates.iter().map(|t| t.model_id.as_str()).collect();
    assert_eq!(models, [b.model_id.as_str()]);

    // B's probe is compared with A's templates of the old subjects and B's of
    // the new one: each score is that cosine, computed here offline.
    let (embed_a, embed_b) = (
        Embedder::load(a_dir.path(), Device::Cpu).expect("A offline"),
        Embedder::load(b_dir.path(), Device::Cpu).expect("B offline"),
    );
    let probe = &people[0].1[1];
    let probe_b = offline_embedding(&embed_b, probe);
    let found = client
        .identify(pb::IdentifyRequest {
            top_k: 4,
            ..identify("site", probe)
        })
        .await
        .expect("identify with B")
        .into_inner();
    assert_eq!(found.model_id, b.model_id);
    assert_eq!(found.gallery_size, 4);
    for candidate in &found.candidates {
        let index = people
            .iter()
            .position(|(s, _)| *s == candidate.subject_id)
            .expect("an enrolled subject");
        let embedder = if index < 3 { &embed_a } else { &embed_b };
        let want = cosine(&probe_b, &offline_embedding(embedder, &people[index].1[0]));
        assert!(
            (candidate.score - want).abs() < 1e-3,
            "{}: score {} vs {want} offline",
            candidate.subject_id,
            candidate.score
        );
    }

    // Going back to A is refused: the newcomer has no template A can read.
    let refused = server
        .admin()
        .await
        .rollback_model(pb::RollbackModelRequest::default())
        .await
        .expect_err("rollback past a B-only enrolment");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("site (1 of 4 subjects)"),
        "{}",
        refused.message()
    );
    server.stop().await.expect("stop");
}

#[sqlx::test(migrations = false)]
async fn a_server_without_replication_promotes_an_index_holding_every_upgraded_template(
    _: PgPoolOptions,
    options: PgConnectOptions,
) {
    let (a_dir, a, c_dir, c) = a_and_c();
    let mut config = settings(&options, a_dir.path());
    // Alone: no follower applies the change feed, so the upgrade's
    // templates (another process's writes) reach the staged model's index
    // only through the promotion's catch-up.
    config.replication.enabled = false;
    let server = TestServer::start(config).await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let mut client = server.client().await;
    let people = people(4, 2);
    for (subject, photos) in &people {
        client
            .enroll(enroll("site", subject, &photos[..1]))
            .await
            .expect("enrol under A");
    }
    server
        .admin()
        .await
        .reload_model(reload(c_dir.path(), pb::ReloadMode::StageMigration))
        .await
        .expect("stage C");
    let pool = PgPoolOptions::new()
        .connect(&database_url(&options))
        .await
        .expect("pool");
    let t = transform(&a, &c);
    let never = AtomicBool::new(false);
    let done = upgrade_templates(
        &Store::from_pool(pool),
        &t,
        &UpgradeOptions::default(),
        &never,
        |_| {},
    )
    .await
    .expect("upgrade");
    assert_eq!((done.derived, done.remaining), (4, 0));
    // The database says C covers everyone; the promotion requires it.
    assert_eq!(coverage(&server).await, [("site".to_owned(), 4, 4)]);
    server
        .admin()
        .await
        .promote_model(pb::PromoteModelRequest {
            require_full_coverage: true,
        })
        .await
        .expect("promote with full coverage");

    // Identify with C finds every upgraded subject, each with the cosine of
    // C's probe embedding and the transform of A's enrolled embedding,
    // computed here offline.
    let (embed_a, embed_c) = (
        Embedder::load(a_dir.path(), Device::Cpu).expect("A offline"),
        Embedder::load(c_dir.path(), Device::Cpu).expect("C offline"),
    );
    let probe = &people[0].1[1];
    let probe_c = offline_embedding(&embed_c, probe);
    let found = client
        .identify(pb::IdentifyRequest {
            top_k: 4,
            ..identify("site", probe)
        })
        .await
        .expect("identify with C")
        .into_inner();
    assert_eq!(found.model_id, c.model_id);
    assert_eq!(
        found.gallery_size, 4,
        "the promoted index lacks upgraded subjects"
    );
    assert_eq!(found.candidates.len(), 4);
    for candidate in &found.candidates {
        let (_, photos) = people
            .iter()
            .find(|(s, _)| *s == candidate.subject_id)
            .expect("an enrolled subject");
        let template = mapped(&t, &offline_embedding(&embed_a, &photos[0]));
        let want = cosine(&probe_c, &template);
        assert!(
            (candidate.score - want).abs() < 1e-3,
            "{}: score {} vs {want} offline",
            candidate.subject_id,
            candidate.score
        );
    }
    server.stop().await.expect("clean stop");
}
