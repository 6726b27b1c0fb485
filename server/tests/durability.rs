//! The built `handid-server` binary: an acknowledged enrolment survives
//! SIGKILL (it was committed before the answer), and SIGTERM stops the
//! server cleanly.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{checkpoint, database_url};
use handid_proto::v1::{self as pb, hand_id_client::HandIdClient};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// `handid-server serve` configured by the committed example file plus
/// environment overrides (exercising both).
fn spawn(options: &PgConnectOptions, model: &std::path::Path, port: u16) -> Child {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/server.yaml");
    Command::new(env!("CARGO_BIN_EXE_handid-server"))
        .args(["serve", "--config", config])
        .env("HANDID__SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("HANDID__DATABASE__URL", database_url(options))
        .env("HANDID__DATABASE__MIGRATE_ON_START", "true")
        .env("HANDID__MODEL__PATH", model)
        // The example file requires API keys; this test is about durability.
        .env("HANDID__AUTH__ENABLED", "false")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn handid-server")
}

async fn connect(port: u16) -> HandIdClient<Channel> {
    for _ in 0..300 {
        if let Ok(client) = HandIdClient::connect(format!("http://127.0.0.1:{port}")).await {
            return client;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("handid-server never listened on {port}");
}

#[sqlx::test(migrations = false)]
async fn acknowledged_enrolments_survive_sigkill(_: PgPoolOptions, options: PgConnectOptions) {
    let dir = checkpoint();
    let photos: Vec<Vec<u8>> = common::people(40, 1).into_iter().flat_map(|(_, p)| p).collect();
    let port = free_port();
    let mut server = spawn(&options, dir.path(), port);
    let mut client = connect(port).await;

    // Enrol one subject per call; kill -9 the server while calls are going.
    let mut acknowledged: Vec<(String, Vec<String>)> = Vec::new();
    let mut refused = 0;
    for (i, photo) in photos.iter().enumerate() {
        if i == 20 {
            server.start_kill().expect("SIGKILL");
        }
        let subject = format!("s{i:02}");
        let call = client.enroll(pb::EnrollRequest {
            gallery_id: "door-1".to_owned(),
            subject_id: subject.clone(),
            images: vec![pb::Image { data: photo.clone() }],
            idempotency_key: String::new(),
        });
        match call.await {
            Ok(r) => acknowledged.push((subject, r.into_inner().template_ids)),
            Err(_) => refused += 1,
        }
    }
    server.wait().await.expect("killed server reaped");
    assert!(
        acknowledged.len() >= 20,
        "only {} acknowledged before the kill",
        acknowledged.len()
    );
    assert!(refused > 0, "the kill did not interrupt anything");

    // Restart: every acknowledged template is there, in the index too.
    let mut server = spawn(&options, dir.path(), port);
    let mut client = connect(port).await;
    for (subject, template_ids) in &acknowledged {
        let record = client
            .get_subject(pb::GetSubjectRequest {
                gallery_id: "door-1".to_owned(),
                subject_id: subject.clone(),
            })
            .await
            .expect("acknowledged subject survived")
            .into_inner();
        let stored: Vec<String> = record
            .subject
            .expect("subject")
            .templates
            .into_iter()
            .map(|t| t.template_id)
            .collect();
        assert_eq!(&stored, template_ids, "{subject}");
    }
    let search = client
        .identify(pb::IdentifyRequest {
            gallery_id: "door-1".to_owned(),
            image: Some(pb::Image {
                data: photos[0].clone(),
            }),
            top_k: 1,
            rule: Some(pb::DecisionRule {
                rule: Some(pb::decision_rule::Rule::Threshold(0.0)),
            }),
        })
        .await
        .expect("identify after restart")
        .into_inner();
    assert!(search.gallery_size as usize >= acknowledged.len());

    // The container HEALTHCHECK command: SERVING while up, failure once stopped.
    let health = |port: u16| {
        std::process::Command::new(env!("CARGO_BIN_EXE_handid-server"))
            .args(["health", "--addr", &format!("http://127.0.0.1:{port}")])
            .output()
            .expect("run handid-server health")
    };
    let up = health(port);
    assert!(up.status.success(), "health while serving: {up:?}");
    assert_eq!(String::from_utf8_lossy(&up.stdout).trim(), "SERVING");

    // SIGTERM: graceful shutdown, exit status 0.
    let pid = server.id().expect("running").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill -TERM");
    assert!(sent.success());
    let status = tokio::time::timeout(Duration::from_secs(30), server.wait())
        .await
        .expect("stopped within 30 s")
        .expect("exit status");
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert!(
        !health(port).status.success(),
        "health passed with the server stopped"
    );
}
