//! Insiders: the two database roles. The schema's owner migrates; the
//! service connects as a member of `handid_app`, serves every call with it,
//! and cannot rewrite history: as that role, disabling the audit log's
//! triggers, deleting, truncating, updating or even reading its rows all
//! fail. A `serve` without migrations refuses a schema it does not know.

mod common;

use common::{TestServer, checkpoint, settings, wait_for_health};
use handid_proto::v1 as pb;
use handid_proto::v1::admin_client::AdminClient;
use handid_server::ServeError;
use handid_server::store::StoreError;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic_health::pb::health_check_response::ServingStatus;

fn image(data: &[u8]) -> pb::Image {
    pb::Image { data: data.to_vec() }
}

#[sqlx::test(migrations = false)]
async fn the_service_role_serves_but_cannot_rewrite_the_audit_log(
    pool_options: PgPoolOptions,
    options: PgConnectOptions,
) {
    let dir = checkpoint();
    let owner = pool_options
        .clone()
        .connect_with(options.clone())
        .await
        .expect("owner pool");

    // Not migrated yet: `serve` (without migrate_on_start) refuses, saying
    // what to do.
    let mut unmigrated = settings(&options, dir.path());
    unmigrated.database.migrate_on_start = false;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let refused = handid_server::run(listener, unmigrated, std::future::pending())
        .await
        .expect_err("an unmigrated database");
    assert!(
        matches!(refused, ServeError::Store(StoreError::SchemaBehind { .. })),
        "{refused:?}"
    );
    assert!(refused.to_string().contains("handid-server migrate"), "{refused}");

    // The owner migrates; the operator makes the service's login role.
    handid_server::MIGRATOR
        .run(&owner)
        .await
        .expect("migrate as the owner");
    let role = format!("handid_server_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE ROLE {role} LOGIN IN ROLE handid_app"))
        .execute(&owner)
        .await
        .expect("create the service's role");
    let service = options.clone().username(&role);
    let mut s = settings(&service, dir.path());
    s.database.migrate_on_start = false;
    let server = TestServer::start(s).await;
    let mut client = server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;

    // Every call works with the service's rights.
    let photos = common::people(2, 2);
    let (alice, bob) = (&photos[0].1, &photos[1].1);
    for (subject, images, key) in [("alice", alice, "k-1"), ("bob", bob, ""), ("alice", alice, "k-1")] {
        client
            .enroll(pb::EnrollRequest {
                gallery_id: "site".to_owned(),
                subject_id: subject.to_owned(),
                images: images.iter().map(|i| image(i)).collect(),
                idempotency_key: key.to_owned(),
            })
            .await
            .expect("enroll");
    }
    client
        .identify(pb::IdentifyRequest {
            gallery_id: "site".to_owned(),
            image: Some(image(&alice[1])),
            top_k: 2,
            rule: None,
        })
        .await
        .expect("identify");
    client
        .verify(pb::VerifyRequest {
            gallery_id: "site".to_owned(),
            subject_id: "bob".to_owned(),
            image: Some(image(&bob[0])),
            rule: None,
        })
        .await
        .expect("verify");
    client
        .embed(pb::EmbedRequest {
            images: vec![image(&bob[1])],
        })
        .await
        .expect("embed");
    client
        .list_subjects(pb::ListSubjectsRequest {
            gallery_id: "site".to_owned(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .expect("list");
    client
        .delete_subject(pb::DeleteSubjectRequest {
            gallery_id: "site".to_owned(),
            subject_id: "bob".to_owned(),
        })
        .await
        .expect("delete subject");
    let mut admin = AdminClient::connect(format!("http://{}", server.addr))
        .await
        .expect("admin");
    admin
        .reload_model(pb::ReloadModelRequest::default())
        .await
        .expect("reload");
    client
        .delete_gallery(pb::DeleteGalleryRequest {
            gallery_id: "site".to_owned(),
        })
        .await
        .expect("delete gallery");
    server.stop().await.expect("graceful stop");

    // The same role, by hand: history stays written.
    let insider = pool_options.connect_with(service).await.expect("service pool");
    let (rows_before,): (i64,) = sqlx::query_as("SELECT count(*) FROM audit_log")
        .fetch_one(&owner)
        .await
        .expect("count");
    assert!(rows_before >= 8, "{rows_before} audit rows");
    for sql in [
        "ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update_delete",
        "ALTER TABLE audit_log DISABLE TRIGGER ALL",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
        "UPDATE audit_log SET outcome = 'ok'",
        "SELECT actor FROM audit_log",
        "DROP TABLE audit_log",
        "ALTER TABLE audit_log DROP COLUMN actor",
        "DROP TRIGGER audit_log_no_truncate ON audit_log",
        "CREATE OR REPLACE FUNCTION audit_log_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$",
        "DELETE FROM changes",
        "ALTER TABLE templates DROP CONSTRAINT templates_embedding_finite",
        "CREATE TABLE shadow (x int)",
        // Rows are timed and numbered by the database, not back-dated.
        "INSERT INTO audit_log (actor, action, outcome, at) VALUES ('insider', 'note', 'ok', '2001-01-01')",
        "INSERT INTO audit_log (id, actor, action, outcome) OVERRIDING SYSTEM VALUE VALUES (1, 'insider', 'note', 'ok')",
    ] {
        let err = sqlx::query(sql).execute(&insider).await.expect_err(sql);
        let code = err
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.into_owned());
        assert_eq!(code.as_deref(), Some("42501"), "{sql}: {err}");
    }
    // What it may do: append.
    sqlx::query("INSERT INTO audit_log (actor, action, outcome) VALUES ('insider', 'note', 'ok')")
        .execute(&insider)
        .await
        .expect("append");
    let (rows_after,): (i64,) = sqlx::query_as("SELECT count(*) FROM audit_log")
        .fetch_one(&owner)
        .await
        .expect("count");
    assert_eq!(rows_after, rows_before + 1, "nothing was removed");
}
