//! Two `handid-server serve` processes (the real binary, as deployed) on one
//! database: an enrolment through one is found by Identify on the other
//! within a second, and so is a deletion. `replicas.rs` covers the catch-up
//! after lost notifications with in-process servers.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{checkpoint_in, database_url, free_port, people};
use handid_proto::v1 as pb;
use handid_proto::v1::hand_id_client::HandIdClient;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::transport::Channel;

/// Starts the binary with its own settings file and port; killed on drop.
async fn replica(
    dir: &Path,
    name: &str,
    options: &PgConnectOptions,
    model: &Path,
) -> (tokio::process::Child, HandIdClient<Channel>) {
    let port = free_port();
    let config = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &config,
        format!(
            "server:\n  listen: 127.0.0.1:{port}\n\
             database:\n  url: {}\n  max_connections: 4\n  migrate_on_start: true\n\
             model:\n  path: {}\n\
             replication:\n  poll_interval_ms: 500\n\
             auth:\n  enabled: false\n",
            database_url(options),
            model.display()
        ),
    )
    .expect("settings file");
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_handid-server"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("spawn handid-server");
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..300 {
        if let Ok(client) = HandIdClient::connect(url.clone()).await {
            return (child, client);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("replica {name} never accepted a connection");
}

/// Polls B until `want` holds; the time it took, or `None` after 1 s.
async fn within_a_second(
    client: &mut HandIdClient<Channel>,
    gallery: &str,
    subject: &str,
    probe: &[u8],
    want: bool,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        if common::candidates(client, gallery, probe)
            .await
            .iter()
            .any(|s| s == subject)
            == want
        {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

#[sqlx::test(migrations = false)]
async fn two_server_processes_share_enrolments_and_deletions(_: PgPoolOptions, options: PgConnectOptions) {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).expect("model dir");
    checkpoint_in(&model, 21, None);
    let (_a_process, mut a) = replica(dir.path(), "a", &options, &model).await;
    let (_b_process, mut b) = replica(dir.path(), "b", &options, &model).await;
    let people = people(3, 2);
    let (subject, photos) = &people[0];
    // Another subject first, so the gallery exists on B before the probe.
    a.enroll(pb::EnrollRequest {
        gallery_id: "site".into(),
        subject_id: people[1].0.clone(),
        images: vec![pb::Image {
            data: people[1].1[0].clone(),
        }],
        idempotency_key: String::new(),
    })
    .await
    .expect("enrol on A");
    a.enroll(pb::EnrollRequest {
        gallery_id: "site".into(),
        subject_id: subject.clone(),
        images: vec![pb::Image {
            data: photos[0].clone(),
        }],
        idempotency_key: String::new(),
    })
    .await
    .expect("enrol on A");
    let seen = within_a_second(&mut b, "site", subject, &photos[1], true).await;
    assert!(seen.is_some(), "B did not see A's enrolment within 1 s");
    a.delete_subject(pb::DeleteSubjectRequest {
        gallery_id: "site".into(),
        subject_id: subject.clone(),
    })
    .await
    .expect("delete on A");
    let gone = within_a_second(&mut b, "site", subject, &photos[1], false).await;
    assert!(gone.is_some(), "B still found the deleted subject after 1 s");
    eprintln!("B saw the enrolment after {seen:?} and the deletion after {gone:?}");
}
