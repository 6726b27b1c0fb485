//! Partial failures against a real server, with faults injected through
//! `handid_server::faults` (this crate's tests build it with the
//! `fault-injection` feature): a client that gives up after its write
//! committed, a reload racing deletions, an enrolment racing a rollback, a
//! panic or a device error in the forward thread, a model that cannot run,
//! a follower that dies.
//!
//! The faults are process-wide, so the tests of this binary run one at a
//! time ([`SERIAL`]).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{TestServer, checkpoint, checkpoint_in, settings, wait_for_health};
use handid_proto::v1 as pb;
use handid_proto::v1::admin_client::AdminClient;
use handid_proto::v1::hand_id_client::HandIdClient;
use handid_server::faults;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

/// One fault test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Holds [`SERIAL`] and clears every fault when the test ends.
struct Isolated(#[allow(dead_code)] tokio::sync::MutexGuard<'static, ()>);

async fn isolated() -> Isolated {
    let guard = SERIAL.lock().await;
    faults::clear();
    Isolated(guard)
}

impl Drop for Isolated {
    fn drop(&mut self) {
        faults::clear();
    }
}

fn enroll(gallery: &str, subject: &str, image: &[u8]) -> pb::EnrollRequest {
    pb::EnrollRequest {
        gallery_id: gallery.to_owned(),
        subject_id: subject.to_owned(),
        images: vec![pb::Image { data: image.to_vec() }],
        idempotency_key: String::new(),
    }
}

fn verify(gallery: &str, subject: &str, image: &[u8]) -> pb::VerifyRequest {
    pb::VerifyRequest {
        gallery_id: gallery.to_owned(),
        subject_id: subject.to_owned(),
        image: Some(pb::Image { data: image.to_vec() }),
        rule: Some(pb::DecisionRule {
            rule: Some(pb::decision_rule::Rule::Threshold(0.0)),
        }),
    }
}

async fn audit_rows(options: &PgConnectOptions, action: &str) -> Vec<(Option<String>, String)> {
    let pool = PgPoolOptions::new()
        .connect_with(options.clone())
        .await
        .expect("pool");
    sqlx::query_as("SELECT subject_id, outcome FROM audit_log WHERE action = $1 ORDER BY id")
        .bind(action)
        .fetch_all(&pool)
        .await
        .expect("audit rows")
}

#[sqlx::test(migrations = false)]
async fn a_write_whose_client_gave_up_after_the_commit_completes(
    _: PgPoolOptions,
    options: PgConnectOptions,
) {
    let _one = isolated().await;
    let dir = checkpoint();
    let mut s = settings(&options, dir.path());
    // Alone: no change feed would repair an index update the cancelled call
    // skipped.
    s.replication.enabled = false;
    let server = TestServer::start(s).await;
    let mut client = server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let photos = common::people(2, 1);
    let (alice, bob) = (&photos[0].1[0], &photos[1].1[0]);
    client.enroll(enroll("g", "bob", bob)).await.expect("bob");

    // Each write now waits 600 ms between its commit and its index update;
    // the clients give up after 200 ms, in that gap.
    faults::pause_after_commit(Some(Duration::from_millis(600)));
    let mut request = tonic::Request::new(enroll("g", "alice", alice));
    request.set_timeout(Duration::from_millis(200));
    let status = client.enroll(request).await.expect_err("the client gave up");
    assert!(
        matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{status:?}"
    );
    let mut request = tonic::Request::new(pb::DeleteSubjectRequest {
        gallery_id: "g".to_owned(),
        subject_id: "bob".to_owned(),
    });
    request.set_timeout(Duration::from_millis(200));
    let status = client
        .delete_subject(request)
        .await
        .expect_err("the client gave up");
    assert!(
        matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{status:?}"
    );
    faults::pause_after_commit(None);

    // The writes went on without their callers: alice is searchable, bob
    // is gone from the index, and each has its audit row.
    let started = Instant::now();
    loop {
        let alice_found = client.verify(verify("g", "alice", alice)).await.is_ok();
        let bob_gone = client
            .verify(verify("g", "bob", bob))
            .await
            .is_err_and(|s| s.code() == Code::NotFound);
        if alice_found && bob_gone {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "alice found: {alice_found}, bob gone: {bob_gone}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        audit_rows(&options, "enroll").await,
        [
            (Some("bob".to_owned()), "ok".to_owned()),
            (Some("alice".to_owned()), "ok".to_owned())
        ]
    );
    assert_eq!(
        audit_rows(&options, "delete_subject").await,
        [(Some("bob".to_owned()), "ok".to_owned())]
    );
    server.stop().await.expect("graceful stop");
}

/// A pool on the migrated test database, where `model` is recorded (so
/// templates stored directly may name it).
async fn migrated_with_model(
    pool_options: &PgPoolOptions,
    options: &PgConnectOptions,
    model: &handid_model::Manifest,
) -> sqlx::PgPool {
    let pool = pool_options
        .clone()
        .connect_with(options.clone())
        .await
        .expect("pool");
    handid_server::MIGRATOR.run(&pool).await.expect("migrate");
    sqlx::query(
        "INSERT INTO models (model_id, embedding_space, architecture, embedding_dim)
         VALUES ($1, $2, 'tiny', 16)",
    )
    .bind(&model.model_id)
    .bind(&model.embedding_space)
    .execute(&pool)
    .await
    .expect("model row");
    pool
}

/// Templates are read back in whatever order PostgreSQL returns them (no
/// sort of the vectors): rows of several galleries interleave, past the
/// loader's hold-back limit, and every gallery must still come back whole.
#[sqlx::test(migrations = false)]
async fn galleries_load_whole_from_interleaved_rows(pool_options: PgPoolOptions, options: PgConnectOptions) {
    // Arms nothing, but its Identify calls must not take a forward fault
    // armed by a test running beside it (the faults are process-wide).
    let _isolated = isolated().await;
    let a = tempfile::tempdir().expect("tempdir");
    let model = checkpoint_in(a.path(), 13, None);
    let pool = migrated_with_model(&pool_options, &options, &model).await;
    sqlx::query("INSERT INTO galleries (gallery_id) SELECT 'g' || i FROM generate_series(0, 39) i")
        .execute(&pool)
        .await
        .expect("galleries");
    // 20,001 subjects dealt round robin to 40 galleries; every tenth has a
    // second template, stored after all the first ones.
    sqlx::query(
        "INSERT INTO subjects (gallery_id, subject_id)
         SELECT 'g' || (i % 40), 's-' || i FROM generate_series(0, 20000) i",
    )
    .execute(&pool)
    .await
    .expect("subjects");
    for extra in ["true", "s.id % 10 = 0"] {
        sqlx::query(&format!(
            "INSERT INTO templates (template_id, subject, gallery_id, model_id, dimension, embedding)
             SELECT gen_random_uuid(), s.id, s.gallery_id, $1, 16,
                    (SELECT string_agg(float4send((random() - 0.5)::real), ''::bytea)
                     FROM generate_series(1, 16) WHERE s.id > 0)
             FROM subjects s WHERE {extra} ORDER BY s.id"
        ))
        .bind(&model.model_id)
        .execute(&pool)
        .await
        .expect("templates");
    }
    let server = TestServer::start(settings(&options, a.path())).await;
    let mut client = server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let photo = common::people(1, 1).remove(0).1.remove(0);
    for (gallery, subjects) in [("g0", 501), ("g1", 500), ("g39", 500)] {
        let answer = client
            .identify(pb::IdentifyRequest {
                gallery_id: gallery.to_owned(),
                image: Some(pb::Image { data: photo.clone() }),
                top_k: 5,
                rule: Some(pb::DecisionRule {
                    rule: Some(pb::decision_rule::Rule::Threshold(0.99)),
                }),
            })
            .await
            .expect("identify")
            .into_inner();
        assert_eq!(answer.gallery_size, subjects, "{gallery}");
    }
    let logs = String::from_utf8_lossy(&common::logs()).into_owned();
    assert!(logs.contains("templates=22001"), "every template indexed once");
    server.stop().await.expect("graceful stop");
}

#[sqlx::test(migrations = false)]
async fn a_subject_deleted_during_a_reload_is_never_returned_afterwards(
    pool_options: PgPoolOptions,
    options: PgConnectOptions,
) {
    let _one = isolated().await;
    let a = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    let model_a = checkpoint_in(a.path(), 11, None);
    // B declares A's space compatible but has its own: a swap that loads
    // its own index from the database while the deletions below run.
    let mut model_b = checkpoint_in(b.path(), 12, None);
    model_b.compatible_spaces = vec![model_a.embedding_space.clone()];
    model_b.write(b.path()).expect("rewrite manifest");

    // 3000 subjects of one template each, stored directly: a load that
    // takes a while.
    let pool = migrated_with_model(&pool_options, &options, &model_a).await;
    sqlx::query("INSERT INTO galleries (gallery_id) VALUES ('race')")
        .execute(&pool)
        .await
        .expect("gallery");
    sqlx::query(
        "INSERT INTO subjects (gallery_id, subject_id)
         SELECT 'race', 's-' || lpad(i::text, 4, '0') FROM generate_series(0, 2999) i",
    )
    .execute(&pool)
    .await
    .expect("subjects");
    sqlx::query(
        "INSERT INTO templates (template_id, subject, gallery_id, model_id, dimension, embedding)
         SELECT gen_random_uuid(), s.id, 'race', $1, 16,
                (SELECT string_agg(float4send((random() - 0.5)::real), ''::bytea) FROM generate_series(1, 16) WHERE s.id > 0)
         FROM subjects s",
    )
    .bind(&model_a.model_id)
    .execute(&pool)
    .await
    .expect("templates");

    let mut s = settings(&options, a.path());
    // A load generator from one address: the default per-caller rate limit
    // would refuse some of its calls (that limit is tested in overload.rs).
    s.server.rate_limit_per_second = 0.0;
    let server = TestServer::start(s).await;
    let client = server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let mut admin = AdminClient::connect(format!("http://{}", server.addr))
        .await
        .expect("admin");
    let probe = common::people(1, 1).remove(0).1.remove(0);
    let reloading_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));

    // The reload pauses once the new model's index is loaded; the
    // deletions below commit in that pause, after the load read their
    // subjects, and are acknowledged before the reload publishes.
    faults::pause_after_index_load(Some(Duration::from_millis(800)));
    let reloading = tokio::spawn(async move {
        admin
            .reload_model(pb::ReloadModelRequest {
                path: b.path().display().to_string(),
                mode: 0,
            })
            .await
            .map(|r| r.into_inner().loaded.map(|m| m.model_id))
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let gone: Vec<String> = (0..10).map(|i| format!("s-{i:04}")).collect();
    let mut deleter = client.clone();
    for subject in &gone {
        deleter
            .delete_subject(pb::DeleteSubjectRequest {
                gallery_id: "race".to_owned(),
                subject_id: subject.clone(),
            })
            .await
            .expect("delete");
    }
    assert!(!reloading.is_finished(), "the reload ended before the deletions");
    // From their acknowledgement on, through the reload's catch-up and
    // publication and after, none of them is ever found.
    let checkers: Vec<_> = (0..4)
        .map(|k| {
            let (mut client, gone, probe) = (client.clone(), gone.clone(), probe.clone());
            let reloading_done = Arc::clone(&reloading_flag);
            tokio::spawn(async move {
                let mut checks = 0;
                loop {
                    let done = reloading_done.load(std::sync::atomic::Ordering::SeqCst);
                    for subject in gone.iter().skip(k).step_by(4) {
                        let answer = client.verify(verify("race", subject, &probe)).await;
                        assert!(
                            answer.as_ref().is_err_and(|s| s.code() == Code::NotFound),
                            "{subject} was deleted, yet Verify answered {answer:?}"
                        );
                        checks += 1;
                    }
                    if done {
                        return checks;
                    }
                }
            })
        })
        .collect();
    let loaded = reloading.await.expect("reload task").expect("reload");
    reloading_flag.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut checks = 0;
    for checker in checkers {
        checks += checker.await.expect("checker");
    }
    assert_eq!(loaded, Some(model_b.model_id.clone()));
    eprintln!("[faults] {checks} checks of the 10 subjects deleted during the reload");
    let gone = gone.len();
    // After the reload, on the new model: every deleted subject is gone,
    // every other one still there.
    let mut client = client;
    for i in [0, gone / 2, gone - 1] {
        let status = client
            .verify(verify("race", &format!("s-{i:04}"), &probe))
            .await
            .expect_err("deleted");
        assert_eq!(status.code(), Code::NotFound);
    }
    for i in [gone, 2000, 2999] {
        client
            .verify(verify("race", &format!("s-{i:04}"), &probe))
            .await
            .expect("still enrolled");
    }
    let identified = client
        .identify(pb::IdentifyRequest {
            gallery_id: "race".to_owned(),
            image: Some(pb::Image { data: probe }),
            top_k: 10,
            rule: Some(pb::DecisionRule {
                rule: Some(pb::decision_rule::Rule::Threshold(-1.0)),
            }),
        })
        .await
        .expect("identify")
        .into_inner();
    assert_eq!(identified.gallery_size as usize, 3000 - gone);
    assert_eq!(identified.model_id, model_b.model_id);
    server.stop().await.expect("graceful stop");
}

#[sqlx::test(migrations = false)]
async fn an_enrolment_embedded_before_a_rollback_is_refused_and_its_retry_is_found(
    _: PgPoolOptions,
    options: PgConnectOptions,
) {
    let _one = isolated().await;
    let (a_dir, c_dir) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("c"));
    let a = checkpoint_in(a_dir.path(), 11, None);
    let c = checkpoint_in(c_dir.path(), 13, None);
    let server = TestServer::start(settings(&options, a_dir.path())).await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let mut client = server.client().await;
    let mut admin = AdminClient::connect(format!("http://{}", server.addr))
        .await
        .expect("admin");
    let people = common::people(2, 2);
    let (early, late) = (&people[0], &people[1]);
    // A migration from A to C (another space), the one subject enrolled
    // under both: C serves, and A, the rollback target, compares everyone.
    client
        .enroll(enroll("site", &early.0, &early.1[0]))
        .await
        .expect("enrol under A");
    admin
        .reload_model(common::reload(c_dir.path(), pb::ReloadMode::StageMigration))
        .await
        .expect("stage C");
    client
        .enroll(enroll("site", &early.0, &early.1[1]))
        .await
        .expect("dual enrol");
    admin
        .promote_model(pb::PromoteModelRequest {
            require_full_coverage: true,
        })
        .await
        .expect("promote C");

    // The late subject's images are embedded by C; its commit waits until
    // the rollback has made A serve again.
    faults::pause_before_commit(Some(Duration::from_secs(5)));
    let enrolling = {
        let (mut client, subject, image) = (client.clone(), late.0.clone(), late.1[0].clone());
        tokio::spawn(async move { client.enroll(enroll("site", &subject, &image)).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let back = admin
        .rollback_model(pb::RollbackModelRequest::default())
        .await
        .expect("roll back to A: every subject committed so far has a template of A")
        .into_inner();
    assert_eq!(back.active.expect("active").model_id, a.model_id);
    assert!(
        !enrolling.is_finished(),
        "the enrolment committed before the rollback"
    );
    faults::pause_before_commit(None);
    // Refused, retryably, naming both models; nothing stored.
    let refused = enrolling
        .await
        .expect("task")
        .expect_err("C's templates committed while A serves");
    assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
    for want in [c.model_id.as_str(), a.model_id.as_str(), "retry"] {
        assert!(
            refused.message().contains(want),
            "{want:?} missing from {}",
            refused.message()
        );
    }
    let missing = client
        .get_subject(pb::GetSubjectRequest {
            gallery_id: "site".to_owned(),
            subject_id: late.0.clone(),
        })
        .await
        .expect_err("nothing stored");
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    assert_eq!(
        audit_rows(&options, "enroll").await.last(),
        Some(&(None, "ABORTED".to_owned()))
    );

    // The retry is embedded by A, stored, and found.
    let retried = client
        .enroll(enroll("site", &late.0, &late.1[0]))
        .await
        .expect("the retry")
        .into_inner();
    assert_eq!(retried.model_id, a.model_id);
    let found = client
        .identify(common::identify("site", &late.1[0]))
        .await
        .expect("identify under A")
        .into_inner();
    assert_eq!(found.model_id, a.model_id);
    assert_eq!(found.gallery_size, 2);
    assert_eq!(found.candidates[0].subject_id, late.0);
    assert!(found.candidates[0].score > 0.999, "{:?}", found.candidates[0]);
    // No subject is left with only templates A cannot compare.
    let pool = PgPoolOptions::new()
        .connect_with(options.clone())
        .await
        .expect("pool");
    let uncovered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM subjects s WHERE NOT EXISTS (
             SELECT 1 FROM templates t JOIN models m ON m.model_id = t.model_id
             WHERE t.subject = s.id AND m.embedding_space = $1)",
    )
    .bind(&a.embedding_space)
    .fetch_one(&pool)
    .await
    .expect("coverage");
    assert_eq!(uncovered, 0);
    server.stop().await.expect("graceful stop");
}

#[sqlx::test(migrations = false)]
async fn admin_calls_have_their_own_timeout(_: PgPoolOptions, options: PgConnectOptions) {
    let _one = isolated().await;
    let dir = checkpoint();
    let mut s = settings(&options, dir.path());
    s.server.request_timeout_ms = 1;
    let server = TestServer::start(s).await;
    let mut client: HandIdClient<Channel> = server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let photo = common::people(1, 1).remove(0).1.remove(0);
    let status = client
        .embed(pb::EmbedRequest {
            images: vec![pb::Image { data: photo }],
        })
        .await
        .expect_err("1 ms is too short for an embedding");
    assert_eq!(status.code(), Code::DeadlineExceeded);
    let mut admin = AdminClient::connect(format!("http://{}", server.addr))
        .await
        .expect("admin");
    admin
        .reload_model(pb::ReloadModelRequest::default())
        .await
        .expect("a reload is not held to the request timeout");
    server.stop().await.expect("graceful stop");
}

async fn embed(client: &mut HandIdClient<Channel>, photo: &[u8]) -> Result<(), tonic::Status> {
    client
        .embed(pb::EmbedRequest {
            images: vec![pb::Image { data: photo.to_vec() }],
        })
        .await
        .map(|_| ())
}

#[sqlx::test(migrations = false)]
async fn a_panic_or_a_device_error_in_the_forward_thread_fails_that_batch_only(
    _: PgPoolOptions,
    options: PgConnectOptions,
) {
    let _one = isolated().await;
    let dir = checkpoint();
    let server = TestServer::start(settings(&options, dir.path())).await;
    let mut client = server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let photo = common::people(1, 1).remove(0).1.remove(0);
    embed(&mut client, &photo).await.expect("before");
    for fault in [faults::ForwardFault::Panic, faults::ForwardFault::DeviceError] {
        faults::arm_forward(fault);
        let status = embed(&mut client, &photo).await.expect_err("the faulty batch");
        assert_eq!(status.code(), Code::Internal, "{fault:?}: {status:?}");
        assert_eq!(status.message(), "internal error", "no detail leaks");
        // The next batch runs on the same thread, and health never wavered:
        // the model's self-test passed after the fault.
        embed(&mut client, &photo).await.expect("the batch after");
        wait_for_health(&server, ServingStatus::Serving).await;
    }
    let logs = String::from_utf8_lossy(&common::logs()).into_owned();
    assert!(
        logs.contains("injected forward-pass panic"),
        "the panic is logged"
    );
    assert!(logs.contains("a forward pass failed; its calls fail"));
    server.stop().await.expect("graceful stop");
}

#[sqlx::test(migrations = false)]
async fn health_is_not_serving_while_no_model_can_run(_: PgPoolOptions, options: PgConnectOptions) {
    let _one = isolated().await;
    let dir = checkpoint();
    let server = TestServer::start(settings(&options, dir.path())).await;
    let mut client = server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let photo = common::people(1, 1).remove(0).1.remove(0);
    // The device breaks for good: the batch fails, so does the self-test.
    faults::break_model(true);
    let status = embed(&mut client, &photo).await.expect_err("a broken device");
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    wait_for_health(&server, ServingStatus::NotServing).await;
    // Meanwhile calls are refused at once, as retryable elsewhere.
    let status = embed(&mut client, &photo).await.expect_err("still broken");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("retry on another replica"),
        "{}",
        status.message()
    );
    // Repaired: the forward thread's periodic self-test notices by itself.
    faults::break_model(false);
    wait_for_health(&server, ServingStatus::Serving).await;
    embed(&mut client, &photo).await.expect("runs again");
    server.stop().await.expect("graceful stop");
}

#[sqlx::test(migrations = false)]
async fn a_non_finite_embedding_never_becomes_a_template_or_a_probe(
    pool_options: PgPoolOptions,
    options: PgConnectOptions,
) {
    let _one = isolated().await;
    let dir = checkpoint();
    let server = TestServer::start(settings(&options, dir.path())).await;
    let mut client = server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let photo = common::people(1, 1).remove(0).1.remove(0);
    client.enroll(enroll("g", "known", &photo)).await.expect("enrol");
    faults::arm_forward(faults::ForwardFault::NonFinite);
    let status = client
        .enroll(enroll("g", "poisoned", &photo))
        .await
        .expect_err("a NaN embedding");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("image 0 gives no usable embedding"),
        "{}",
        status.message()
    );
    faults::arm_forward(faults::ForwardFault::NonFinite);
    let status = client
        .verify(verify("g", "known", &photo))
        .await
        .expect_err("a NaN probe");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let pool = pool_options.connect_with(options.clone()).await.expect("pool");
    let (subjects, templates): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM subjects), (SELECT count(*) FROM templates)")
            .fetch_one(&pool)
            .await
            .expect("counts");
    assert_eq!((subjects, templates), (1, 1), "only the good enrolment is stored");
    client
        .verify(verify("g", "known", &photo))
        .await
        .expect("fine again");
    server.stop().await.expect("graceful stop");
}

#[sqlx::test(migrations = false)]
async fn a_follower_that_dies_is_restarted_and_its_lag_shows_in_health(
    _: PgPoolOptions,
    options: PgConnectOptions,
) {
    let _one = isolated().await;
    let dir = checkpoint();
    // A writes and follows nothing; B follows A's writes.
    let mut a_settings = settings(&options, dir.path());
    a_settings.replication.enabled = false;
    let mut b_settings = settings(&options, dir.path());
    b_settings.replication.poll_interval_ms = 200;
    b_settings.replication.max_lag_ms = 1_000;
    let a = TestServer::start(a_settings).await;
    let b = TestServer::start(b_settings).await;
    let (mut on_a, mut on_b) = (a.client().await, b.client().await);
    wait_for_health(&a, ServingStatus::Serving).await;
    wait_for_health(&b, ServingStatus::Serving).await;
    let photos = common::people(2, 1);
    let (first, second) = (&photos[0].1[0], &photos[1].1[0]);
    on_a.enroll(enroll("g", "first", first))
        .await
        .expect("enrol on A");
    let seen = |client: HandIdClient<Channel>, subject: &'static str, photo: Vec<u8>| async move {
        let mut client = client;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if client.verify(verify("g", subject, &photo)).await.is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    assert!(seen(on_b.clone(), "first", first.clone()).await, "B follows A");

    // B's follower dies at every step until allowed to live: A's next
    // enrolment does not reach B, B's lag grows past max_lag_ms, and its
    // health says so.
    faults::kill_follower(usize::MAX);
    tokio::time::sleep(Duration::from_millis(400)).await;
    on_a.enroll(enroll("g", "second", second))
        .await
        .expect("enrol on A");
    wait_for_health(&b, ServingStatus::NotServing).await;
    assert!(
        on_b.verify(verify("g", "second", second)).await.is_err(),
        "B cannot know of it yet"
    );
    // Allowed to live: the supervisor's next start catches up.
    faults::kill_follower(0);
    assert!(
        seen(on_b.clone(), "second", second.clone()).await,
        "the restarted follower caught up"
    );
    wait_for_health(&b, ServingStatus::Serving).await;
    let logs = String::from_utf8_lossy(&common::logs()).into_owned();
    assert!(logs.contains("the change-feed follower died; starting it again"));
    assert!(logs.contains("replication lags"), "health says why");
    b.stop().await.expect("graceful stop");
    a.stop().await.expect("graceful stop");
}

#[sqlx::test(migrations = false)]
async fn a_change_that_keeps_failing_is_reported_and_does_not_hold_back_the_others(
    pool_options: PgPoolOptions,
    options: PgConnectOptions,
) {
    let _one = isolated().await;
    let dir = checkpoint();
    let mut s = settings(&options, dir.path());
    s.replication.poll_interval_ms = 200;
    let server = TestServer::start(s).await;
    let mut client = server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let photo = common::people(1, 1).remove(0).1.remove(0);
    client.enroll(enroll("g", "good", &photo)).await.expect("enrol");
    // An insider (or a bug elsewhere) stores a template no index can hold,
    // past the schema's own check.
    let pool = pool_options.connect_with(options.clone()).await.expect("pool");
    sqlx::query("ALTER TABLE templates DROP CONSTRAINT templates_embedding_finite")
        .execute(&pool)
        .await
        .expect("drop the check");
    sqlx::query(
        "WITH s AS (INSERT INTO subjects (gallery_id, subject_id) VALUES ('g', 'poison') RETURNING id)
         INSERT INTO templates (template_id, subject, gallery_id, model_id, dimension, embedding)
         SELECT gen_random_uuid(), s.id, 'g', m.model_id, 16, decode(repeat('7fc00000', 16), 'hex')
         FROM s, models m",
    )
    .execute(&pool)
    .await
    .expect("poisoned template");
    // A later enrolment, made by another writer, must still arrive.
    sqlx::query(
        "WITH s AS (INSERT INTO subjects (gallery_id, subject_id) VALUES ('g', 'later') RETURNING id)
         INSERT INTO templates (template_id, subject, gallery_id, model_id, dimension, embedding)
         SELECT gen_random_uuid(), s.id, 'g', m.model_id, 16, decode(repeat('3e800000', 16), 'hex')
         FROM s, models m",
    )
    .execute(&pool)
    .await
    .expect("a later template");
    let started = Instant::now();
    while client.verify(verify("g", "later", &photo)).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the change after the poisoned one never arrived"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let logs = String::from_utf8_lossy(&common::logs()).into_owned();
    assert!(
        logs.contains("a change keeps failing to apply; passed over"),
        "the failing change is reported"
    );
    let status = client
        .verify(verify("g", "poison", &photo))
        .await
        .expect_err("never searchable");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    client
        .verify(verify("g", "good", &photo))
        .await
        .expect("still there");
    server.stop().await.expect("graceful stop");
}
