//! A database outage: calls that need the database answer UNAVAILABLE,
//! health turns NOT_SERVING, and both recover by themselves once Postgres is
//! back. Alone in its test binary because it stops the shared test cluster
//! (cargo runs test binaries one after another).

mod common;

use std::path::Path;
use std::process::Command;

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
    let server = TestServer::start(settings(&options, dir.path())).await;
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
    let found = client
        .identify(identify("g", &first))
        .await
        .expect("identify after recovery");
    assert_eq!(found.into_inner().gallery_size, 2);
    server.stop().await.expect("graceful stop");
}
