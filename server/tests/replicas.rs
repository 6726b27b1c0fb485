//! Two replicas on one database: two real servers, each with its own pool,
//! indexes and change listener, over one Postgres database. A write on one is
//! visible to Identify on the other within a second, and a replica whose
//! notifications were lost catches up from the change table.

mod common;

use std::time::{Duration, Instant};

use common::{TestServer, checkpoint, database_url, people, settings, wait_for_health};
use handid_proto::v1 as pb;
use handid_proto::v1::hand_id_client::HandIdClient;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

fn enroll(gallery: &str, subject: &str, images: &[Vec<u8>]) -> pb::EnrollRequest {
    pb::EnrollRequest {
        gallery_id: gallery.to_owned(),
        subject_id: subject.to_owned(),
        images: images.iter().map(|d| pb::Image { data: d.clone() }).collect(),
        idempotency_key: String::new(),
    }
}

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
                (SELECT array_agg(random()::real - 0.5) FROM generate_series(1, 16) WHERE s.id > 0)
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
