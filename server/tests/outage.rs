//! A database outage: calls that need the database answer UNAVAILABLE,
//! health turns NOT_SERVING, and both recover by themselves once Postgres is
//! back, under a steady load of enrolments none of whose acknowledged ones
//! is lost. Alone in its test binary because it stops the shared test cluster
//! (cargo runs test binaries one after another).

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{TestServer, checkpoint, settings, wait_for_health};
use handid_proto::v1 as pb;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

/// `scripts/pg.sh stop|start` on the cluster scripts/with-postgres.sh made.
fn pg(action: &str, port: u16) {
    let dir = std::env::var("HANDID_PG_DIR").expect("HANDID_PG_DIR: run through scripts/with-postgres.sh");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/pg.sh");
    let status = Command::new(script)
        .args([action, &dir])
        // Restart on the same port, so existing URLs stay valid.
        .env("PGPORT_HANDID", port.to_string())
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run pg.sh");
    assert!(status.success(), "pg.sh {action} failed");
    let running = Path::new(&dir).join("data/postmaster.pid").exists();
    assert_eq!(
        running,
        action == "start",
        "pg.sh {action} left the cluster in the wrong state"
    );
}

fn identify(gallery: &str, probe: &[u8]) -> pb::IdentifyRequest {
    pb::IdentifyRequest {
        gallery_id: gallery.to_owned(),
        image: Some(pb::Image { data: probe.to_vec() }),
        top_k: 1,
        rule: Some(pb::DecisionRule {
            rule: Some(pb::decision_rule::Rule::Threshold(0.0)),
        }),
    }
}

#[sqlx::test(migrations = false)]
async fn an_outage_is_unavailable_and_recovers_by_itself(_: PgPoolOptions, options: PgConnectOptions) {
    let dir = checkpoint();
    let mut s = settings(&options, dir.path());
    // A load generator from one address: the default per-caller rate limit
    // would refuse some of its calls (that limit is tested in overload.rs).
    s.server.rate_limit_per_second = 0.0;
    let server = TestServer::start(s).await;
    let mut client = server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let photos = common::people(1, 2).remove(0).1;
    let (first, second) = (photos[0].clone(), photos[1].clone());
    let enroll = |subject: &str, bytes: &[u8]| pb::EnrollRequest {
        gallery_id: "g".to_owned(),
        subject_id: subject.to_owned(),
        images: vec![pb::Image { data: bytes.to_vec() }],
        idempotency_key: String::new(),
    };
    client.enroll(enroll("before", &first)).await.expect("enroll");

    // Load: four clients enrolling new subjects without pause, through the
    // outage and after it. Each records what was acknowledged and every
    // status it got.
    let stop_load = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|worker| {
            let mut client = client.clone();
            let stop = Arc::clone(&stop_load);
            let photo = first.clone();
            tokio::spawn(async move {
                let (mut acked, mut codes) = (Vec::new(), Vec::new());
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let subject = format!("load-{worker}-{i}");
                    i += 1;
                    match client
                        .enroll(pb::EnrollRequest {
                            gallery_id: "g".to_owned(),
                            subject_id: subject.clone(),
                            images: vec![pb::Image { data: photo.clone() }],
                            idempotency_key: String::new(),
                        })
                        .await
                    {
                        Ok(_) => {
                            acked.push(subject);
                            codes.push(Code::Ok);
                        }
                        Err(status) => {
                            codes.push(status.code());
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
                (acked, codes)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    pg("stop", options.get_port());
    let down = client
        .enroll(enroll("during", &second))
        .await
        .expect_err("database down");
    assert_eq!(down.code(), Code::Unavailable, "{down:?}");
    assert!(
        !down.message().contains("Connection refused"),
        "database text leaked: {}",
        down.message()
    );
    // The index is in memory, but an unaudited identification is refused.
    let down = client
        .identify(identify("g", &second))
        .await
        .expect_err("database down");
    assert_eq!(down.code(), Code::Unavailable, "{down:?}");
    wait_for_health(&server, ServingStatus::NotServing).await;

    pg("start", options.get_port());
    wait_for_health(&server, ServingStatus::Serving).await;
    client
        .enroll(enroll("after", &second))
        .await
        .expect("enroll after recovery");
    // Let the load run on the recovered database, then collect it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_load.store(true, Ordering::Relaxed);
    let (mut acked, mut codes) = (Vec::new(), Vec::new());
    for worker in load {
        let (a, c) = worker.await.expect("load task");
        acked.extend(a);
        codes.extend(c);
    }
    let count = |code| codes.iter().filter(|c| **c == code).count();
    eprintln!(
        "[outage] load: {} acknowledged, {} UNAVAILABLE, {} calls",
        count(Code::Ok),
        count(Code::Unavailable),
        codes.len()
    );
    assert!(
        codes.iter().all(|c| matches!(c, Code::Ok | Code::Unavailable)),
        "only OK or UNAVAILABLE under an outage: {codes:?}"
    );
    assert!(count(Code::Unavailable) > 0, "the load saw the outage");
    // The last calls of every worker came after recovery and succeeded.
    assert!(codes.len() > count(Code::Unavailable) + 4);

    // No acknowledged enrolment was lost: all are in the database and in
    // the index Identify searches.
    let pool = sqlx::PgPool::connect_with(options.clone()).await.expect("pool");
    let stored: Vec<(String,)> = sqlx::query_as("SELECT subject_id FROM subjects WHERE gallery_id = 'g'")
        .fetch_all(&pool)
        .await
        .expect("subjects");
    let stored: std::collections::HashSet<String> = stored.into_iter().map(|(s,)| s).collect();
    for subject in acked
        .iter()
        .chain(["before".to_owned(), "after".to_owned()].iter())
    {
        assert!(stored.contains(subject), "acknowledged enrolment {subject} lost");
    }
    let found = client
        .identify(identify("g", &first))
        .await
        .expect("identify after recovery");
    assert!(found.into_inner().gallery_size as usize >= acked.len() + 2);
    server.stop().await.expect("graceful stop");
}
