//! Model hot reload and staged migration, end to end on a real server and
//! real Postgres: a compatible swap under concurrent Identify load, refused
//! checkpoints (damaged weights, wrong shapes, another embedding space), a
//! staged migration with dual enrolment, coverage and promotion, and SIGHUP
//! on the real `handid-server` binary.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{
    Binary, TestServer, checkpoint_in, database_url, enroll, free_port, identify, people, reload, settings,
    wait_for_health,
};
use handid_proto::v1 as pb;
use handid_proto::v1::admin_client::AdminClient;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

async fn active_id(admin: &mut AdminClient<Channel>) -> String {
    admin
        .get_model(pb::GetModelRequest {})
        .await
        .expect("get model")
        .into_inner()
        .active
        .expect("active")
        .model_id
}

/// Copies a checkpoint folder (its two files).
fn copy_checkpoint(from: &Path, to: &Path) {
    for file in ["model.safetensors", "handid.yaml"] {
        std::fs::copy(from.join(file), to.join(file)).expect("copy checkpoint file");
    }
}

#[sqlx::test(migrations = false)]
async fn a_compatible_swap_under_load_fails_no_request_and_bad_checkpoints_are_refused(
    _: PgPoolOptions,
    options: PgConnectOptions,
) {
    let (a_dir, b_dir) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
    let a = checkpoint_in(a_dir.path(), 11, None);
    // Retrained weights declared to be of A's embedding space.
    let b = checkpoint_in(b_dir.path(), 12, Some(&a.embedding_space));
    assert_ne!(a.model_id, b.model_id);
    let mut s = settings(&options, a_dir.path());
    // A load generator from one address: the default per-caller rate limit
    // would refuse some of its calls (that limit is tested in overload.rs).
    s.server.rate_limit_per_second = 0.0;
    let server = TestServer::start(s).await;
    let mut client = server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let mut admin = server.admin().await;

    let people = people(3, 2);
    for (person, photos) in &people {
        client
            .enroll(enroll("site", person, &photos[..1]))
            .await
            .expect("enroll");
    }

    // Four clients call Identify in a loop while the model is swapped.
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..4 {
        let mut client = client.clone();
        let stop = Arc::clone(&stop);
        let probe = people[w % people.len()].1[1].clone();
        workers.push(tokio::spawn(async move {
            let mut seen: Vec<String> = Vec::new();
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match client.identify(identify("site", &probe)).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        assert_eq!(r.gallery_size, 3, "the swap kept every enrolled subject");
                        seen.push(r.model_id);
                    }
                    Err(status) => failures.push(status),
                }
            }
            (seen, failures)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let swapped = admin
        .reload_model(reload(b_dir.path(), pb::ReloadMode::Unspecified))
        .await
        .expect("compatible reload")
        .into_inner();
    let swap_seconds = started.elapsed().as_secs_f32();
    assert!(!swapped.staged);
    assert_eq!(swapped.previous.expect("previous").model_id, a.model_id);
    assert_eq!(swapped.loaded.expect("loaded").model_id, b.model_id);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut calls = 0;
    for worker in workers {
        let (seen, failures) = worker.await.expect("worker");
        assert!(failures.is_empty(), "failed calls during the swap: {failures:?}");
        calls += seen.len();
        // Sequential calls of one client: once on B, never back on A.
        let first_b = seen
            .iter()
            .position(|m| *m == b.model_id)
            .expect("answers switch to B");
        assert!(first_b > 0, "the worker never saw A before the swap");
        assert!(seen[..first_b].iter().all(|m| *m == a.model_id));
        assert!(
            seen[first_b..].iter().all(|m| *m == b.model_id),
            "an answer went back to A"
        );
    }
    println!("reload under load: {calls} Identify calls, 0 failed, swap took {swap_seconds:.2} s");
    // Templates enrolled under A are still searched under B (same declared
    // space). A and B are two random models, so no ranking is promised:
    // every enrolled subject (3, top_k 5) must still come back.
    let probe = people[0].1[0].clone();
    let found = client
        .identify(identify("site", &probe))
        .await
        .expect("identify")
        .into_inner();
    assert_eq!(found.model_id, b.model_id);
    let mut ids: Vec<&str> = found.candidates.iter().map(|c| c.subject_id.as_str()).collect();
    ids.sort_unstable();
    let mut enrolled: Vec<&str> = people.iter().map(|p| p.0.as_str()).collect();
    enrolled.sort_unstable();
    assert_eq!(ids, enrolled);

    // A damaged weights file: refused, naming the file; B keeps serving.
    let damaged = tempfile::tempdir().expect("damaged");
    copy_checkpoint(a_dir.path(), damaged.path());
    let weights = damaged.path().join("model.safetensors");
    let mut bytes = std::fs::read(&weights).expect("read weights");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&weights, bytes).expect("write weights");
    let refused = admin
        .reload_model(reload(damaged.path(), pb::ReloadMode::Unspecified))
        .await
        .expect_err("damaged weights");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("model.safetensors"),
        "{}",
        refused.message()
    );
    assert!(refused.message().contains("hash"), "{}", refused.message());

    // A manifest whose shapes disagree with the weights (a wider projection).
    let reshaped = tempfile::tempdir().expect("reshaped");
    copy_checkpoint(a_dir.path(), reshaped.path());
    let mut manifest = handid_model::Manifest::read(reshaped.path()).expect("manifest");
    manifest.vision.output_dim = 24;
    manifest.embedding_dim = 24;
    manifest.write(reshaped.path()).expect("write manifest");
    let refused = admin
        .reload_model(reload(reshaped.path(), pb::ReloadMode::Unspecified))
        .await
        .expect_err("wrong shapes");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("shape"), "{}", refused.message());

    // No checkpoint at all.
    let refused = admin
        .reload_model(reload(
            Path::new("/nonexistent/checkpoint"),
            pb::ReloadMode::Unspecified,
        ))
        .await
        .expect_err("missing folder");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("/nonexistent/checkpoint"),
        "{}",
        refused.message()
    );

    // Another embedding space without staging: FAILED_PRECONDITION.
    let other = tempfile::tempdir().expect("other");
    checkpoint_in(other.path(), 13, None);
    let refused = admin
        .reload_model(reload(other.path(), pb::ReloadMode::Unspecified))
        .await
        .expect_err("incompatible");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("embedding space"),
        "{}",
        refused.message()
    );
    assert!(
        refused.message().contains("RELOAD_MODE_STAGE_MIGRATION"),
        "{}",
        refused.message()
    );

    // Still B, still serving.
    assert_eq!(active_id(&mut admin).await, b.model_id);
    let after = client
        .identify(identify("site", &probe))
        .await
        .expect("identify")
        .into_inner();
    assert_eq!(after.model_id, b.model_id);

    // Recorded: the audit log has every reload with its outcome, the models
    // table the loads.
    let pool = PgPoolOptions::new()
        .connect(&database_url(&options))
        .await
        .expect("pool");
    let outcomes: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT outcome, model_id FROM audit_log WHERE action = 'reload' ORDER BY id")
            .fetch_all(&pool)
            .await
            .expect("audit rows");
    let codes: Vec<&str> = outcomes.iter().map(|(o, _)| o.as_str()).collect();
    assert_eq!(
        codes,
        [
            "ok",
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
            "FAILED_PRECONDITION"
        ]
    );
    assert_eq!(outcomes[0].1.as_deref(), Some(b.model_id.as_str()));
    let (role, loads): (String, i64) =
        sqlx::query_as("SELECT role, load_count FROM models WHERE model_id = $1")
            .bind(&b.model_id)
            .fetch_one(&pool)
            .await
            .expect("models row of B");
    assert_eq!((role.as_str(), loads), ("active", 1));
    server.stop().await.expect("clean stop");
}

#[sqlx::test(migrations = false)]
async fn a_staged_migration_dual_enrols_reports_coverage_and_promotes(
    _: PgPoolOptions,
    options: PgConnectOptions,
) {
    let (a_dir, c_dir) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("c"));
    let a = checkpoint_in(a_dir.path(), 11, None);
    let c = checkpoint_in(c_dir.path(), 13, None);
    assert_ne!(a.embedding_space, c.embedding_space);
    let server = TestServer::start(settings(&options, a_dir.path())).await;
    let mut client = server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let mut admin = server.admin().await;

    let people = people(4, 2);
    let (s1, s2, s3, s4) = (&people[0], &people[1], &people[2], &people[3]);
    for (gallery, (subject, photos)) in [("g1", s1), ("g1", s2), ("g2", s3)] {
        client
            .enroll(enroll(gallery, subject, &photos[..1]))
            .await
            .expect("enroll under A");
    }

    // Promoting with nothing staged is refused.
    let refused = admin
        .promote_model(pb::PromoteModelRequest {
            require_full_coverage: false,
        })
        .await
        .expect_err("nothing staged");
    assert_eq!(refused.code(), Code::FailedPrecondition);

    let staged = admin
        .reload_model(reload(c_dir.path(), pb::ReloadMode::StageMigration))
        .await
        .expect("stage C")
        .into_inner();
    assert!(staged.staged);
    assert_eq!(staged.loaded.expect("loaded").model_id, c.model_id);
    let coverage = |report: &pb::GetModelResponse| -> Vec<(String, u32, u32)> {
        report
            .coverage
            .iter()
            .map(|c| (c.gallery_id.clone(), c.subjects, c.subjects_with_staged_templates))
            .collect()
    };
    let report = admin
        .get_model(pb::GetModelRequest {})
        .await
        .expect("get model")
        .into_inner();
    assert_eq!(report.active.as_ref().expect("active").model_id, a.model_id);
    assert!(report.side_info.is_none(), "no model.side_info configured");
    let staged_info = report.staged.as_ref().expect("staged");
    assert_eq!(staged_info.model_id, c.model_id);
    assert_eq!(staged_info.embedding_space, c.embedding_space);
    assert_eq!(
        coverage(&report),
        [("g1".to_owned(), 2, 0), ("g2".to_owned(), 1, 0)]
    );

    // A new enrolment stores templates of both models in one call.
    let enrolled = client
        .enroll(enroll("g1", &s4.0, &s4.1[..1]))
        .await
        .expect("dual enrol")
        .into_inner();
    assert_eq!(enrolled.model_id, a.model_id);
    let record = client
        .get_subject(pb::GetSubjectRequest {
            gallery_id: "g1".to_owned(),
            subject_id: s4.0.clone(),
        })
        .await
        .expect("get subject")
        .into_inner()
        .subject
        .expect("subject");
    let mut models: Vec<String> = record.templates.iter().map(|t| t.model_id.clone()).collect();
    models.sort();
    let mut want = vec![a.model_id.clone(), c.model_id.clone()];
    want.sort();
    assert_eq!(models, want, "one template per model");
    let report = admin
        .get_model(pb::GetModelRequest {})
        .await
        .expect("get model")
        .into_inner();
    assert_eq!(
        coverage(&report),
        [("g1".to_owned(), 3, 1), ("g2".to_owned(), 1, 0)]
    );

    // Identify keeps using the active model and its templates.
    let found = client
        .identify(identify("g1", &s4.1[0]))
        .await
        .expect("identify")
        .into_inner();
    assert_eq!(found.model_id, a.model_id);
    assert_eq!(found.gallery_size, 3);

    // Full coverage required and missing: refused, naming both galleries.
    let refused = admin
        .promote_model(pb::PromoteModelRequest {
            require_full_coverage: true,
        })
        .await
        .expect_err("coverage incomplete");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("g1 (1 of 3"), "{}", refused.message());
    assert!(refused.message().contains("g2 (0 of 1"), "{}", refused.message());
    assert_eq!(
        active_id(&mut admin).await,
        a.model_id,
        "the refusal changed nothing"
    );

    // Re-enrol the others; coverage becomes complete and promotion succeeds.
    for (gallery, (subject, photos)) in [("g1", s1), ("g1", s2), ("g2", s3)] {
        client
            .enroll(enroll(gallery, subject, &photos[1..2]))
            .await
            .expect("re-enrol");
    }
    let report = admin
        .get_model(pb::GetModelRequest {})
        .await
        .expect("get model")
        .into_inner();
    assert_eq!(
        coverage(&report),
        [("g1".to_owned(), 3, 3), ("g2".to_owned(), 1, 1)]
    );
    let promoted = admin
        .promote_model(pb::PromoteModelRequest {
            require_full_coverage: true,
        })
        .await
        .expect("promote")
        .into_inner();
    assert_eq!(promoted.active.expect("active").model_id, c.model_id);
    assert_eq!(promoted.previous.expect("previous").model_id, a.model_id);

    let report = admin
        .get_model(pb::GetModelRequest {})
        .await
        .expect("get model")
        .into_inner();
    assert_eq!(report.active.expect("active").model_id, c.model_id);
    assert!(report.staged.is_none() && report.coverage.is_empty());
    // Identify now answers with C, over C's templates only.
    let found = client
        .identify(identify("g1", &s4.1[0]))
        .await
        .expect("identify")
        .into_inner();
    assert_eq!(found.model_id, c.model_id);
    assert_eq!(found.gallery_size, 3);
    assert_eq!(found.candidates[0].subject_id, s4.0);
    assert!(found.candidates[0].score > 0.999, "{:?}", found.candidates[0]);
    // s1 was re-enrolled with its second photo: that photo is its C template.
    let found = client
        .identify(identify("g1", &s1.1[1]))
        .await
        .expect("identify")
        .into_inner();
    assert_eq!(found.candidates[0].subject_id, s1.0);
    let verified = client
        .verify(pb::VerifyRequest {
            gallery_id: "g2".to_owned(),
            subject_id: s3.0.clone(),
            image: Some(pb::Image {
                data: s3.1[1].clone(),
            }),
            rule: None,
        })
        .await
        .expect("verify")
        .into_inner();
    assert_eq!(verified.model_id, c.model_id);
    assert!(verified.score > 0.999);
    server.stop().await.expect("clean stop");
}

#[sqlx::test(migrations = false)]
async fn sighup_reloads_the_real_binary(_: PgPoolOptions, options: PgConnectOptions) {
    let serving = tempfile::tempdir().expect("serving folder");
    let a = checkpoint_in(serving.path(), 11, None);
    let next = tempfile::tempdir().expect("next");
    let b = checkpoint_in(next.path(), 12, Some(&a.embedding_space));
    let port = free_port();
    let config = serving.path().join("server.yaml");
    std::fs::write(
        &config,
        format!(
            "server:\n  listen: 127.0.0.1:{port}\n  health_check_interval_ms: 200\n\
             database:\n  url: {}\n  max_connections: 4\n  migrate_on_start: true\n\
             model:\n  path: {}\n\
             auth:\n  enabled: false\n",
            database_url(&options),
            serving.path().display()
        ),
    )
    .expect("settings file");
    let mut server = Binary::serve(&config, port).await;
    let mut admin = AdminClient::new(server.channel.clone());
    assert_eq!(active_id(&mut admin).await, a.model_id);
    let wait_for = |want: String| {
        let mut admin = admin.clone();
        async move {
            for _ in 0..100 {
                if active_id(&mut admin).await == want {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        }
    };

    // The operator replaces the folder's checkpoint, then sends SIGHUP.
    copy_checkpoint(next.path(), serving.path());
    server.signal("-HUP");
    assert!(wait_for(b.model_id.clone()).await, "SIGHUP did not swap in B");

    // A damaged checkpoint in the folder: SIGHUP is refused, B keeps serving.
    let weights = serving.path().join("model.safetensors");
    let mut bytes = std::fs::read(&weights).expect("read weights");
    let end = bytes.len() - 1;
    bytes[end] ^= 0xff;
    std::fs::write(&weights, bytes).expect("write weights");
    server.signal("-HUP");
    let pool = PgPoolOptions::new()
        .connect(&database_url(&options))
        .await
        .expect("pool");
    let mut refused = false;
    for _ in 0..100 {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT actor, outcome FROM audit_log WHERE action = 'reload' ORDER BY id")
                .fetch_all(&pool)
                .await
                .expect("audit");
        if rows.len() == 2 {
            assert_eq!(rows[0], ("signal:SIGHUP".to_owned(), "ok".to_owned()));
            assert_eq!(
                rows[1],
                ("signal:SIGHUP".to_owned(), "INVALID_ARGUMENT".to_owned())
            );
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused, "the second SIGHUP left no audit row");
    assert_eq!(active_id(&mut admin).await, b.model_id);
    assert!(server.running(), "the server died");
    server.terminate().await;
}

/// A settings file for the real binary with auth on and these `(id, key,
/// scopes)` keys, plus `extra` YAML lines at the top level.
fn keyed_settings(
    port: u16,
    options: &PgConnectOptions,
    model: &Path,
    keys: &[(&str, &str, &str)],
    extra: &str,
) -> String {
    let mut text = format!(
        "server:\n  listen: 127.0.0.1:{port}\n  health_check_interval_ms: 200\n\
         database:\n  url: {}\n  max_connections: 4\n  migrate_on_start: true\n\
         model:\n  path: {}\n{extra}\
         auth:\n  enabled: true\n  keys:\n",
        database_url(options),
        model.display()
    );
    for (id, key, scopes) in keys {
        text.push_str(&format!(
            "    - id: {id}\n      sha256: {}\n      scopes: [{scopes}]\n",
            handid_server::auth::hash_key(key)
        ));
    }
    text
}

/// ListSubjects of an unknown gallery with `key`: NOT_FOUND once the key
/// is admitted, UNAUTHENTICATED while it is not.
async fn list_with(channel: &Channel, key: &str) -> Code {
    let mut client = handid_proto::v1::hand_id_client::HandIdClient::new(channel.clone());
    let mut request = tonic::Request::new(pb::ListSubjectsRequest {
        gallery_id: "nowhere".to_owned(),
        page_size: 10,
        page_token: String::new(),
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("metadata"),
    );
    match client.list_subjects(request).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

fn with_key<T>(key: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("metadata"),
    );
    request
}

#[sqlx::test(migrations = false)]
async fn keys_reload_on_sighup_and_reload_settings_and_a_bad_file_keeps_the_old_ones(
    _: PgPoolOptions,
    options: PgConnectOptions,
) {
    let serving = tempfile::tempdir().expect("serving folder");
    checkpoint_in(serving.path(), 11, None);
    let (ops, desk) = (
        handid_server::auth::generate_key(),
        handid_server::auth::generate_key(),
    );
    let port = free_port();
    let config = serving.path().join("server.yaml");
    let write = |keys: &[(&str, &str, &str)], extra: &str| {
        std::fs::write(
            &config,
            keyed_settings(port, &options, serving.path(), keys, extra),
        )
        .expect("settings file");
    };
    write(&[("ops", &ops, "admin")], "");
    let mut server = Binary::serve(&config, port).await;
    let channel = server.channel.clone();
    let until = |want: Code| {
        let (channel, desk) = (channel.clone(), desk.clone());
        async move {
            for _ in 0..100 {
                if list_with(&channel, &desk).await == want {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        }
    };
    assert_eq!(list_with(&channel, &desk).await, Code::Unauthenticated);

    // Added to the file, SIGHUP: the key works.
    write(&[("ops", &ops, "admin"), ("desk", &desk, "identify")], "");
    server.signal("-HUP");
    assert!(
        until(Code::NotFound).await,
        "the added key was not admitted after SIGHUP"
    );

    // Removed, SIGHUP: refused again.
    write(&[("ops", &ops, "admin")], "");
    server.signal("-HUP");
    assert!(
        until(Code::Unauthenticated).await,
        "the removed key still works after SIGHUP"
    );

    // A file that does not validate: SIGHUP keeps the keys in force.
    std::fs::write(
        &config,
        "auth:\n  keys: [{id: desk, sha256: nothex, scopes: [identify]}]\n",
    )
    .expect("bad file");
    server.signal("-HUP");
    let pool = PgPoolOptions::new()
        .connect(&database_url(&options))
        .await
        .expect("pool");
    let settings_rows = || {
        let pool = pool.clone();
        async move {
            let rows: Vec<(String, String, String)> = sqlx::query_as(
                "SELECT actor, outcome, detail::text FROM audit_log WHERE action = 'reload_settings' ORDER BY id",
            )
            .fetch_all(&pool)
            .await
            .expect("audit");
            rows
        }
    };
    let mut refused = None;
    for _ in 0..100 {
        let rows = settings_rows().await;
        if rows.len() == 3 {
            refused = Some(rows[2].clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (actor, outcome, detail) = refused.expect("the third SIGHUP left no reload_settings row");
    assert_eq!(
        (actor.as_str(), outcome.as_str()),
        ("signal:SIGHUP", "FAILED_PRECONDITION")
    );
    assert!(
        detail.contains("server.yaml") && detail.contains("auth.keys.sha256"),
        "{detail}"
    );
    let mut admin = AdminClient::new(channel.clone());
    admin
        .get_model(with_key(&ops, pb::GetModelRequest {}))
        .await
        .expect("the old admin key still works");
    assert_eq!(list_with(&channel, &desk).await, Code::Unauthenticated);

    // The Admin call: applied before it answers, with what changed and
    // what waits for a restart.
    write(
        &[("ops", &ops, "admin"), ("desk", &desk, "identify")],
        "limits:\n  max_image_bytes: 1234567\n",
    );
    let applied = admin
        .reload_settings(with_key(&ops, pb::ReloadSettingsRequest {}))
        .await
        .expect("reload settings")
        .into_inner();
    assert_eq!(applied.path, config.display().to_string());
    assert_eq!((applied.keys, applied.certificate_grants), (2, 0));
    assert_eq!(applied.added, ["desk"]);
    assert!(
        applied.removed.is_empty() && applied.changed.is_empty(),
        "{applied:?}"
    );
    assert_eq!(applied.restart_required, ["limits.max_image_bytes"]);
    assert_eq!(list_with(&channel, &desk).await, Code::NotFound);
    // Only the admin scope may reload.
    let denied = admin
        .reload_settings(with_key(&desk, pb::ReloadSettingsRequest {}))
        .await
        .expect_err("identify scope");
    assert_eq!(denied.code(), Code::PermissionDenied);
    // A bad file through the Admin call: refused with the reason, nothing
    // changed.
    std::fs::write(&config, "auth: [not, a, mapping]\n").expect("bad file");
    let refused = admin
        .reload_settings(with_key(&ops, pb::ReloadSettingsRequest {}))
        .await
        .expect_err("bad file");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("server.yaml"), "{}", refused.message());
    assert_eq!(list_with(&channel, &desk).await, Code::NotFound);
    assert!(server.running(), "the server died");
    server.terminate().await;
}
