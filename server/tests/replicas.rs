//! Two replicas on one database: two real servers, each with its own pool,
//! indexes and change listener, over one Postgres database. A write on one is
//! visible to Identify on the other within a second, and a replica whose
//! notifications were lost catches up from the change table.

mod common;

use std::time::{Duration, Instant};

use common::{TestServer, checkpoint, database_url, enroll, identify, people, settings, wait_for_health};
use handid_proto::v1 as pb;
use handid_proto::v1::hand_id_client::HandIdClient;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

/// Polls until `present` says whether `subject` is among the candidates;
/// returns how long that took, or `None` after `limit`.
async fn until(
    client: &mut HandIdClient<Channel>,
    gallery: &str,
    probe: &[u8],
    subject: &str,
    present: bool,
    limit: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if common::candidates(client, gallery, probe)
            .await
            .iter()
            .any(|s| s == subject)
            == present
        {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

#[sqlx::test(migrations = false)]
async fn writes_on_one_replica_reach_the_other_and_missed_notifications_are_caught_up(
    _: PgPoolOptions,
    options: PgConnectOptions,
) {
    let dir = checkpoint();
    let mut config = settings(&options, dir.path());
    // The periodic read is the only path left for a lost notification.
    config.replication.poll_interval_ms = 300;
    let a = TestServer::start(config.clone()).await;
    wait_for_health(&a, ServingStatus::Serving).await;
    let b = TestServer::start(config).await;
    wait_for_health(&b, ServingStatus::Serving).await;
    let (mut on_a, mut on_b) = (a.client().await, b.client().await);
    let people = people(4, 2);
    let second = Duration::from_secs(1);

    // Enrol on A: Identify on B finds it within a second.
    let (s0, s1) = (&people[0], &people[1]);
    on_a.enroll(enroll("site", &s0.0, &s0.1[..1]))
        .await
        .expect("enroll on A");
    let seen = until(&mut on_b, "site", &s0.1[1], &s0.0, true, second)
        .await
        .expect("B never saw A's enrolment within 1 s");
    on_a.enroll(enroll("site", &s1.0, &s1.1[..1]))
        .await
        .expect("enroll on A");
    until(&mut on_b, "site", &s1.1[1], &s1.0, true, second)
        .await
        .expect("B never saw the second enrolment");
    // And the other way round.
    let s2 = &people[2];
    on_b.enroll(enroll("site", &s2.0, &s2.1[..1]))
        .await
        .expect("enroll on B");
    until(&mut on_a, "site", &s2.1[1], &s2.0, true, second)
        .await
        .expect("A never saw B's enrolment");

    // Delete on A: gone from B within a second.
    on_a.delete_subject(pb::DeleteSubjectRequest {
        gallery_id: "site".to_owned(),
        subject_id: s0.0.clone(),
    })
    .await
    .expect("delete on A");
    let gone = until(&mut on_b, "site", &s0.1[1], &s0.0, false, second)
        .await
        .expect("B still found the deleted subject after 1 s");
    println!(
        "replication: enrolment visible on B after {} ms, deletion after {} ms",
        seen.as_millis(),
        gone.as_millis()
    );
    assert_eq!(common::candidates(&mut on_b, "site", &s1.1[1]).await.len(), 2);

    let pool = PgPoolOptions::new()
        .connect(&database_url(&options))
        .await
        .expect("pool");

    // A write whose notification never comes: the trigger is switched off
    // for one enrolment and its change row is written by hand, without
    // NOTIFY. Only B's periodic read of the change table can find it.
    let s3 = &people[3];
    sqlx::query("ALTER TABLE templates DISABLE TRIGGER templates_changes")
        .execute(&pool)
        .await
        .expect("disable trigger");
    on_a.enroll(enroll("site", &s3.0, &s3.1[..1]))
        .await
        .expect("enroll on A");
    sqlx::query("ALTER TABLE templates ENABLE TRIGGER templates_changes")
        .execute(&pool)
        .await
        .expect("enable trigger");
    sqlx::query("INSERT INTO changes (kind, gallery_id, subject_id) VALUES ('subject', 'site', $1)")
        .bind(&s3.0)
        .execute(&pool)
        .await
        .expect("silent change row");
    let caught_up = until(&mut on_b, "site", &s3.1[1], &s3.0, true, Duration::from_secs(3))
        .await
        .expect("B never caught up with the unannounced change");
    println!(
        "replication: unannounced change applied on B after {} ms",
        caught_up.as_millis()
    );

    // Listener connections dropped (as when the database restarts them):
    // writes made meanwhile still reach B.
    let killed: Vec<(bool,)> = sqlx::query_as(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND query ILIKE 'LISTEN%handid_changes%'",
    )
    .fetch_all(&pool)
    .await
    .expect("terminate listeners");
    assert_eq!(killed.len(), 2, "each replica holds one listener connection");
    on_a.delete_subject(pb::DeleteSubjectRequest {
        gallery_id: "site".to_owned(),
        subject_id: s1.0.clone(),
    })
    .await
    .expect("delete on A");
    until(&mut on_b, "site", &s1.1[1], &s1.0, false, Duration::from_secs(3))
        .await
        .expect("B never caught up with the deletion made while its listener was down");
    // The listeners are back.
    let mut listening = 0;
    for _ in 0..50 {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND query ILIKE 'LISTEN%handid_changes%'",
        )
        .fetch_one(&pool)
        .await
        .expect("count listeners");
        listening = n;
        if n == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(listening, 2, "the listeners reconnected");

    // A bulk load by SQL (one statement, 150 subjects: one notification for
    // the range of changes) reaches both replicas.
    let model_id = handid_model::Manifest::read(dir.path())
        .expect("manifest")
        .model_id;
    sqlx::query(
        "INSERT INTO subjects (gallery_id, subject_id) SELECT 'site', 'bulk-' || g FROM generate_series(1, 150) g",
    )
    .execute(&pool)
    .await
    .expect("bulk subjects");
    sqlx::query(
        "INSERT INTO templates (template_id, subject, gallery_id, model_id, dimension, embedding)
         SELECT gen_random_uuid(), s.id, 'site', $1, 16,
                (SELECT string_agg(float4send((random() - 0.5)::real), ''::bytea) FROM generate_series(1, 16) WHERE s.id > 0)
         FROM subjects s WHERE s.subject_id LIKE 'bulk-%'",
    )
    .bind(&model_id)
    .execute(&pool)
    .await
    .expect("bulk templates");
    let started = Instant::now();
    for client in [&mut on_a, &mut on_b] {
        let mut size = 0;
        while started.elapsed() < second {
            size = client
                .identify(pb::IdentifyRequest {
                    gallery_id: "site".to_owned(),
                    image: Some(pb::Image {
                        data: s2.1[1].clone(),
                    }),
                    top_k: 1,
                    rule: None,
                })
                .await
                .expect("identify")
                .into_inner()
                .gallery_size;
            if size == 152 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(size, 152, "s2, s3 and the 150 bulk subjects");
    }

    // A deleted gallery disappears from B too.
    on_a.delete_gallery(pb::DeleteGalleryRequest {
        gallery_id: "site".to_owned(),
    })
    .await
    .expect("delete gallery on A");
    until(&mut on_b, "site", &s2.1[1], &s2.0, false, second)
        .await
        .expect("B still searched the deleted gallery");

    a.stop().await.expect("A stops");
    b.stop().await.expect("B stops");
}

#[sqlx::test(migrations = false)]
async fn model_changes_on_one_replica_are_followed_by_the_other(_: PgPoolOptions, options: PgConnectOptions) {
    let (x_dir, y_dir, z_dir) = (
        tempfile::tempdir().expect("x"),
        tempfile::tempdir().expect("y"),
        tempfile::tempdir().expect("z"),
    );
    let x = common::checkpoint_in(x_dir.path(), 11, None);
    let y = common::checkpoint_in(y_dir.path(), 13, None);
    let z = common::checkpoint_in(z_dir.path(), 14, Some(&y.embedding_space));
    let mut config = settings(&options, x_dir.path());
    config.replication.poll_interval_ms = 300;
    let a = TestServer::start(config.clone()).await;
    wait_for_health(&a, ServingStatus::Serving).await;
    let b = TestServer::start(config).await;
    wait_for_health(&b, ServingStatus::Serving).await;
    let (mut on_a, mut on_b) = (a.client().await, b.client().await);
    let mut admin_a = a.admin().await;
    let people = people(2, 2);
    let (early, late) = (&people[0], &people[1]);
    on_a.enroll(enroll("site", &early.0, &early.1[..1]))
        .await
        .expect("enrol under X");

    // A migration staged on A: B stages it too, so an enrolment on B is
    // dual and counts towards the coverage A reports.
    admin_a
        .reload_model(pb::ReloadModelRequest {
            path: y_dir.path().display().to_string(),
            mode: pb::ReloadMode::StageMigration as i32,
        })
        .await
        .expect("stage Y on A");
    let staged_after = common::until_models(&b, (&x.model_id, Some(&y.model_id))).await;
    on_b.enroll(enroll("site", &early.0, &early.1[1..2]))
        .await
        .expect("dual enrolment on B");
    let coverage = admin_a
        .get_model(pb::GetModelRequest {})
        .await
        .expect("get model")
        .into_inner()
        .coverage;
    assert_eq!(coverage.len(), 1);
    assert_eq!(
        (coverage[0].subjects, coverage[0].subjects_with_staged_templates),
        (1, 1),
        "B's enrolment did not embed with the staged model"
    );

    // Promoted on A: B serves Y, and finds a subject enrolled on A under Y.
    admin_a
        .promote_model(pb::PromoteModelRequest {
            require_full_coverage: true,
        })
        .await
        .expect("promote Y on A");
    let promoted_after = common::until_models(&b, (&y.model_id, None)).await;
    on_a.enroll(enroll("site", &late.0, &late.1[..1]))
        .await
        .expect("enrol under Y on A");
    until(
        &mut on_b,
        "site",
        &late.1[1],
        &late.0,
        true,
        Duration::from_secs(2),
    )
    .await
    .expect("B does not find under Y the subject enrolled on A");
    let found = on_b
        .identify(identify("site", &early.1[1]))
        .await
        .expect("identify on B")
        .into_inner();
    assert_eq!(found.model_id, y.model_id);
    assert_eq!(found.gallery_size, 2);

    // A compatible swap on A: B swaps too.
    admin_a
        .reload_model(pb::ReloadModelRequest {
            path: z_dir.path().display().to_string(),
            mode: pb::ReloadMode::Unspecified as i32,
        })
        .await
        .expect("swap in Z on A");
    let swapped_after = common::until_models(&b, (&z.model_id, None)).await;
    println!(
        "replication of model changes: staging seen on B after {} ms, promotion {} ms, swap {} ms",
        staged_after.as_millis(),
        promoted_after.as_millis(),
        swapped_after.as_millis()
    );

    // A recorded model that does not load here (its folder is gone from
    // this host): the replica keeps what it serves, says NOT_SERVING with
    // the reason until the record and the folder agree again.
    let pool = PgPoolOptions::new()
        .connect(&database_url(&options))
        .await
        .expect("pool");
    let record = |model: String, path: String| {
        let pool = pool.clone();
        async move {
            let mut tx = pool.begin().await.expect("tx");
            sqlx::query("UPDATE models SET role = 'retired' WHERE role = 'active'")
                .execute(&mut *tx)
                .await
                .expect("retire");
            sqlx::query("UPDATE models SET role = 'active', path = $2 WHERE model_id = $1")
                .bind(model)
                .bind(path)
                .execute(&mut *tx)
                .await
                .expect("record");
            sqlx::query("SELECT pg_notify('handid_changes', 'models')")
                .execute(&mut *tx)
                .await
                .expect("notify");
            tx.commit().await.expect("commit");
        }
    };
    record(y.model_id.clone(), "/nonexistent/y".to_owned()).await;
    wait_for_health(&b, ServingStatus::NotServing).await;
    assert_eq!(common::models_of(&b).await, (z.model_id.clone(), None));
    record(y.model_id.clone(), y_dir.path().display().to_string()).await;
    wait_for_health(&b, ServingStatus::Serving).await;
    assert_eq!(common::models_of(&b).await, (y.model_id.clone(), None));
    b.stop().await.expect("stop B");
    a.stop().await.expect("stop A");
}
