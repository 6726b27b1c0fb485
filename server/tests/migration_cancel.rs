//! CancelMigration: a staged migration abandoned without serving the staged
//! model. The active model keeps answering on both replicas, the staged
//! model's templates (dual enrolments and upgraded ones) are deleted in the
//! transaction that retires it, a second replica follows, a restart does not
//! stage it again, and staging it again starts from zero coverage. Templates
//! a subject cannot lose are kept: those of the rollback target, and those
//! of subjects the active model cannot compare. A replica that has not
//! followed yet stores no template of the cancelled model. Real servers over
//! a real Postgres, tiny random models.

mod common;

use std::sync::atomic::AtomicBool;

use common::{
    TestServer, checkpoint_in, database_url, enroll, identify, people, reload, report, settings, transform,
    until_models, wait_for_health,
};
use handid_proto::v1 as pb;
use handid_proto::v1::admin_client::AdminClient;
use handid_server::store::{AuditEntry, NewEnrollment, StagedEmbeddings, Store, StoreError};
use handid_server::upgrade::{UpgradeError, UpgradeOptions, upgrade_templates};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

async fn cancel(admin: &mut AdminClient<Channel>) -> Result<pb::CancelMigrationResponse, tonic::Status> {
    admin
        .cancel_migration(pb::CancelMigrationRequest {})
        .await
        .map(tonic::Response::into_inner)
}

async fn templates_of(pool: &PgPool, model_id: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM templates WHERE model_id = $1")
        .bind(model_id)
        .fetch_one(pool)
        .await
        .expect("count")
}

async fn role_of(pool: &PgPool, model_id: &str) -> String {
    sqlx::query_scalar("SELECT role FROM models WHERE model_id = $1")
        .bind(model_id)
        .fetch_one(pool)
        .await
        .expect("models row")
}

/// `(outcome, model_id, detail)` of every `cancel_migration` audit row.
async fn cancellations(pool: &PgPool) -> Vec<(String, Option<String>, serde_json::Value)> {
    let rows: Vec<(String, Option<String>, String)> = sqlx::query_as(
        "SELECT outcome, model_id, detail::text FROM audit_log WHERE action = 'cancel_migration' ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .expect("audit rows");
    rows.into_iter()
        .map(|(outcome, model, detail)| (outcome, model, serde_json::from_str(&detail).expect("JSON")))
        .collect()
}

async fn pool(options: &PgConnectOptions) -> PgPool {
    PgPoolOptions::new()
        .connect(&database_url(options))
        .await
        .expect("pool")
}

#[sqlx::test(migrations = false)]
async fn a_cancelled_migration_leaves_the_active_model_and_no_staged_template_on_every_replica(
    _: PgPoolOptions,
    options: PgConnectOptions,
) {
    let (a_dir, c_dir) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("c"));
    let a = checkpoint_in(a_dir.path(), 11, None);
    let c = checkpoint_in(c_dir.path(), 13, None);
    let mut config = settings(&options, a_dir.path());
    config.replication.poll_interval_ms = 300;
    let one = TestServer::start(config.clone()).await;
    wait_for_health(&one, ServingStatus::Serving).await;
    let two = TestServer::start(config.clone()).await;
    wait_for_health(&two, ServingStatus::Serving).await;
    let (mut on_one, mut on_two) = (one.client().await, two.client().await);
    let mut admin = one.admin().await;
    let pool = pool(&options).await;

    // Nothing staged: refused, saying so, and audited.
    let refused = cancel(&mut admin).await.expect_err("nothing to cancel");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("no model is staged"),
        "{}",
        refused.message()
    );

    let people = people(4, 2);
    let (early, during, after) = (&people[0], &people[1], &people[2]);
    on_one
        .enroll(enroll("site", &early.0, &early.1[..1]))
        .await
        .expect("enrol under A");

    // C staged on one replica, followed by the other; enrolments are dual
    // on both, and the upgrade derives C's templates from A's.
    admin
        .reload_model(reload(c_dir.path(), pb::ReloadMode::StageMigration))
        .await
        .expect("stage C");
    until_models(&two, (&a.model_id, Some(&c.model_id))).await;
    on_two
        .enroll(enroll("site", &during.0, &during.1[..1]))
        .await
        .expect("dual enrolment on the second replica");
    let store = Store::from_pool(pool.clone());
    let upgraded = upgrade_templates(
        &store,
        &transform(&a, &c),
        &UpgradeOptions::default(),
        &AtomicBool::new(false),
        |_| {},
    )
    .await
    .expect("upgrade A's templates");
    // early's A template, and during's (whose dual C template is not
    // derived: the upgrade maps every A template without a derived one).
    assert_eq!(upgraded.derived, 2);
    assert_eq!(templates_of(&pool, &c.model_id).await, 3);
    let derived: i64 = sqlx::query_scalar("SELECT count(*) FROM templates WHERE derived_from IS NOT NULL")
        .fetch_one(&pool)
        .await
        .expect("derived");
    assert_eq!(derived, 2);
    let coverage = report(&mut admin).await.coverage;
    assert_eq!(
        (coverage[0].subjects, coverage[0].subjects_with_staged_templates),
        (2, 2)
    );

    // Cancelled on the first replica: every C template goes, A's stay.
    let a_templates = templates_of(&pool, &a.model_id).await;
    let cancelled = cancel(&mut admin).await.expect("cancel the migration");
    assert_eq!(cancelled.active.expect("active").model_id, a.model_id);
    let staged = cancelled.cancelled.expect("cancelled");
    assert_eq!(staged.model_id, c.model_id);
    assert_eq!(staged.path, c_dir.path().display().to_string());
    assert_eq!(cancelled.templates_deleted, 3);
    assert_eq!(cancelled.templates_kept, 0);
    assert_eq!(cancelled.subjects_without_active_templates, 0);
    assert!(!cancelled.rollback_target);
    assert_eq!(templates_of(&pool, &c.model_id).await, 0);
    assert_eq!(templates_of(&pool, &a.model_id).await, a_templates);
    assert_eq!(role_of(&pool, &c.model_id).await, "retired");
    assert_eq!(role_of(&pool, &a.model_id).await, "active");
    let model = report(&mut admin).await;
    assert!(model.staged.is_none(), "{model:?}");
    assert!(model.coverage.is_empty());
    assert!(
        model.rollback_target.is_none(),
        "a model that never served is no rollback target"
    );
    let followed = until_models(&two, (&a.model_id, None)).await;
    println!("cancellation followed after {} ms", followed.as_millis());

    // Both replicas answer with A, the subject enrolled during the staging
    // included; a new enrolment stores A's template only.
    for client in [&mut on_one, &mut on_two] {
        let found = client
            .identify(identify("site", &during.1[0]))
            .await
            .expect("identify")
            .into_inner();
        assert_eq!(found.model_id, a.model_id);
        assert_eq!(found.gallery_size, 2);
        assert_eq!(found.candidates[0].subject_id, during.0);
        assert!(found.candidates[0].score > 0.999, "{:?}", found.candidates[0]);
    }
    on_two
        .enroll(enroll("site", &after.0, &after.1[..1]))
        .await
        .expect("enrol after the cancellation");
    assert_eq!(templates_of(&pool, &c.model_id).await, 0);
    assert_eq!(templates_of(&pool, &a.model_id).await, a_templates + 1);

    // Audited: the refusal with its reason, the cancellation with the model
    // and its counts.
    let rows = cancellations(&pool).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0].0, "FAILED_PRECONDITION");
    assert!(
        rows[0].2["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no model is staged")),
        "{:?}",
        rows[0].2
    );
    let (outcome, model_id, detail) = &rows[1];
    assert_eq!(outcome, "ok");
    assert_eq!(model_id.as_deref(), Some(a.model_id.as_str()));
    assert_eq!(detail["cancelled_model"], c.model_id);
    assert_eq!(detail["templates_deleted"], 3);
    assert_eq!(detail["templates_kept"], 0);
    assert_eq!(detail["rollback_target"], false);

    // A replica that had not followed yet: neither an enrolment nor an
    // upgrade stores a template of the cancelled model any more.
    let probe = vec![0.25f32; c.embedding_dim];
    let stored = store
        .enroll(
            &NewEnrollment {
                gallery_id: "site",
                subject_id: &after.0,
                model_id: &a.model_id,
                embeddings: std::slice::from_ref(&probe),
                idempotency_key: None,
                images_sha256: "",
                caller: "test",
                max_galleries: 10,
                max_templates: 100,
                staged: Some(StagedEmbeddings {
                    model_id: &c.model_id,
                    embeddings: std::slice::from_ref(&probe),
                }),
                side: None,
            },
            &AuditEntry {
                actor: "test",
                peer: None,
                action: "enroll",
                gallery_id: Some("site"),
                subject_id: Some(&after.0),
                model_id: Some(&a.model_id),
                outcome: "ok",
                top_score: None,
                detail: None,
            },
        )
        .await
        .expect("a late dual enrolment");
    assert!(stored.staged_templates.is_empty());
    let source: uuid::Uuid =
        sqlx::query_scalar("SELECT template_id FROM templates WHERE model_id = $1 LIMIT 1")
            .bind(&a.model_id)
            .fetch_one(&pool)
            .await
            .expect("a template of A");
    let late = store
        .insert_derived(&c.model_id, &[(source, probe.clone())])
        .await;
    assert!(matches!(late, Err(StoreError::ModelRetired(_))), "{late:?}");
    let again = upgrade_templates(
        &store,
        &transform(&a, &c),
        &UpgradeOptions::default(),
        &AtomicBool::new(false),
        |_| {},
    )
    .await;
    assert!(matches!(again, Err(UpgradeError::NotStaged { .. })), "{again:?}");
    assert_eq!(templates_of(&pool, &c.model_id).await, 0);
    two.stop().await.expect("stop the second replica");
    one.stop().await.expect("stop the first replica");

    // Restarted: A serves, nothing is staged.
    let one = TestServer::start(config).await;
    wait_for_health(&one, ServingStatus::Serving).await;
    let mut admin = one.admin().await;
    let model = report(&mut admin).await;
    assert_eq!(model.active.expect("active").model_id, a.model_id);
    assert!(
        model.staged.is_none(),
        "the cancelled model was staged again at start"
    );

    // Staged again: from zero coverage, and dual again.
    admin
        .reload_model(reload(c_dir.path(), pb::ReloadMode::StageMigration))
        .await
        .expect("stage C again");
    let model = report(&mut admin).await;
    assert_eq!(model.staged.expect("staged").model_id, c.model_id);
    assert_eq!(
        (
            model.coverage[0].subjects,
            model.coverage[0].subjects_with_staged_templates
        ),
        (3, 0)
    );
    one.client()
        .await
        .enroll(enroll("site", &early.0, &early.1[1..2]))
        .await
        .expect("dual enrolment");
    assert_eq!(templates_of(&pool, &c.model_id).await, 1);
    one.stop().await.expect("clean stop");
}

#[sqlx::test(migrations = false)]
async fn cancelling_keeps_the_templates_a_subject_or_a_rollback_needs(
    _: PgPoolOptions,
    options: PgConnectOptions,
) {
    let (a_dir, c_dir, d_dir) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("c"),
        tempfile::tempdir().expect("d"),
    );
    let a = checkpoint_in(a_dir.path(), 11, None);
    let c = checkpoint_in(c_dir.path(), 13, None);
    let d = checkpoint_in(d_dir.path(), 14, None);
    let server = TestServer::start(settings(&options, a_dir.path())).await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let (mut client, mut admin) = (server.client().await, server.admin().await);
    let pool = pool(&options).await;
    let people = people(4, 2);
    let (early, late, again, last) = (&people[0], &people[1], &people[2], &people[3]);
    let promote = |admin: &mut AdminClient<Channel>| {
        let mut admin = admin.clone();
        async move {
            admin
                .promote_model(pb::PromoteModelRequest {
                    require_full_coverage: false,
                })
                .await
                .expect("promote");
        }
    };

    // A -> C: early has templates of A and C; late, enrolled after, of C
    // only.
    client
        .enroll(enroll("site", &early.0, &early.1[..1]))
        .await
        .expect("enrol under A");
    admin
        .reload_model(reload(c_dir.path(), pb::ReloadMode::StageMigration))
        .await
        .expect("stage C");
    client
        .enroll(enroll("site", &early.0, &early.1[1..2]))
        .await
        .expect("dual enrolment");
    promote(&mut admin).await;
    client
        .enroll(enroll("site", &late.0, &late.1[..1]))
        .await
        .expect("enrol under C");

    // A, the rollback target, staged again (to re-enrol late, as the
    // refused rollback says) and cancelled: its templates are what a
    // rollback needs, none is deleted.
    admin
        .reload_model(reload(a_dir.path(), pb::ReloadMode::StageMigration))
        .await
        .expect("stage A again");
    client
        .enroll(enroll("site", &late.0, &late.1[1..2]))
        .await
        .expect("dual enrolment under C and A");
    assert_eq!(templates_of(&pool, &a.model_id).await, 3, "early's two, late's");
    let cancelled = cancel(&mut admin).await.expect("cancel the staging of A");
    assert_eq!(cancelled.active.expect("active").model_id, c.model_id);
    assert!(cancelled.rollback_target);
    assert_eq!((cancelled.templates_deleted, cancelled.templates_kept), (0, 3));
    assert_eq!(templates_of(&pool, &a.model_id).await, 3);
    let model = report(&mut admin).await;
    assert!(model.staged.is_none());
    assert_eq!(model.rollback_target.expect("A").model_id, a.model_id);

    // C -> D: C is the rollback target now. early has no template of D.
    admin
        .reload_model(reload(d_dir.path(), pb::ReloadMode::StageMigration))
        .await
        .expect("stage D");
    client
        .enroll(enroll("site", &again.0, &again.1[..1]))
        .await
        .expect("dual enrolment under C and D");
    promote(&mut admin).await;
    client
        .enroll(enroll("site", &last.0, &last.1[..1]))
        .await
        .expect("enrol under D");

    // A staged again, no rollback target: last's dual template of A goes;
    // early and late hold no template D compares, their templates of A are
    // their whole enrolment and stay (D could not identify them before the
    // staging either).
    admin
        .reload_model(reload(a_dir.path(), pb::ReloadMode::StageMigration))
        .await
        .expect("stage A once more");
    client
        .enroll(enroll("site", &last.0, &last.1[1..2]))
        .await
        .expect("dual enrolment under D and A");
    let before = templates_of(&pool, &a.model_id).await;
    assert_eq!(before, 4, "early's two, late's, last's");
    let cancelled = cancel(&mut admin).await.expect("cancel the staging of A");
    assert_eq!(cancelled.active.expect("active").model_id, d.model_id);
    assert!(!cancelled.rollback_target);
    assert_eq!(
        (
            cancelled.templates_deleted,
            cancelled.templates_kept,
            cancelled.subjects_without_active_templates
        ),
        (1, 3, 2),
        "early and late have no template of D"
    );
    let kept: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT s.subject_id FROM templates t JOIN subjects s ON s.id = t.subject
         WHERE t.model_id = $1 ORDER BY s.subject_id",
    )
    .bind(&a.model_id)
    .fetch_all(&pool)
    .await
    .expect("kept templates");
    let mut want = vec![early.0.clone(), late.0.clone()];
    want.sort();
    assert_eq!(kept, want);
    let rows = cancellations(&pool).await;
    let detail = &rows.last().expect("audit row").2;
    assert_eq!(detail["subjects_without_active_templates"], 2);
    assert_eq!(detail["templates_kept"], 3);
    server.stop().await.expect("clean stop");
}
