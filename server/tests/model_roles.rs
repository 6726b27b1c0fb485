//! The serving model is the database's, not the folder's: a promotion
//! survives a restart, a server (or a replica starting later) whose
//! `model.path` holds another model than the recorded active one refuses to
//! start with a message naming both and how to choose, adopting the folder
//! deliberately is recorded, `models.role` keeps one active and one staged
//! model at most, and a staged migration survives a restart. Real servers
//! over a real Postgres.

mod common;

use std::path::Path;

use common::{
    TestServer, checkpoint_in, database_url, enroll, identify, logs, people, reload, report, settings,
    wait_for_health,
};
use handid_model::{ClipVisionConfig, create_random_checkpoint};
use handid_proto::v1 as pb;
use handid_proto::v1::admin_client::AdminClient;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

/// `(model_id, role, path)` of every recorded model, by model id.
async fn roles(pool: &PgPool) -> Vec<(String, String, Option<String>)> {
    sqlx::query_as("SELECT model_id, role, path FROM models ORDER BY model_id")
        .fetch_all(pool)
        .await
        .expect("models rows")
}

async fn role_of(pool: &PgPool, model_id: &str) -> (String, Option<String>) {
    sqlx::query_as("SELECT role, path FROM models WHERE model_id = $1")
        .bind(model_id)
        .fetch_one(pool)
        .await
        .expect("models row")
}

async fn count_role(pool: &PgPool, role: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM models WHERE role = $1")
        .bind(role)
        .fetch_one(pool)
        .await
        .expect("count")
}

/// `(action, outcome, model_id, detail)` of every reload and promotion
/// audit row, in order.
async fn changes(pool: &PgPool) -> Vec<(String, String, Option<String>, serde_json::Value)> {
    let rows: Vec<(String, String, Option<String>, String)> = sqlx::query_as(
        "SELECT action, outcome, model_id, detail::text FROM audit_log
         WHERE action IN ('reload', 'promote') ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .expect("audit rows");
    rows.into_iter()
        .map(|(action, outcome, model, detail)| {
            (
                action,
                outcome,
                model,
                serde_json::from_str(&detail).expect("detail is JSON"),
            )
        })
        .collect()
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

#[sqlx::test(migrations = false)]
async fn a_promotion_survives_a_restart_and_a_disagreeing_folder_is_refused(
    _: PgPoolOptions,
    options: PgConnectOptions,
) {
    let (a_dir, c_dir) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("c"));
    let a = checkpoint_in(a_dir.path(), 11, None);
    let c = checkpoint_in(c_dir.path(), 13, None);
    let server = TestServer::start(settings(&options, a_dir.path())).await;
    let mut client = server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let pool = PgPoolOptions::new()
        .connect(&database_url(&options))
        .await
        .expect("pool");
    // First start on an empty database: the folder's model is recorded
    // as active, with its folder.
    assert_eq!(
        role_of(&pool, &a.model_id).await,
        ("active".to_owned(), Some(display(a_dir.path())))
    );

    let people = people(3, 2);
    let (early, late) = (&people[0], &people[2]);
    client
        .enroll(enroll("site", &early.0, &early.1[..1]))
        .await
        .expect("enrol under A");
    let mut admin = server.admin().await;
    admin
        .reload_model(reload(c_dir.path(), pb::ReloadMode::StageMigration))
        .await
        .expect("stage C");
    assert_eq!(
        role_of(&pool, &c.model_id).await,
        ("staged".to_owned(), Some(display(c_dir.path())))
    );
    // Re-enrolled during the migration: a template of C too.
    client
        .enroll(enroll("site", &early.0, &early.1[1..2]))
        .await
        .expect("dual enrol");
    admin
        .promote_model(pb::PromoteModelRequest {
            require_full_coverage: true,
        })
        .await
        .expect("promote C");
    // Enrolled after the promotion: templates of C only.
    client
        .enroll(enroll("site", &late.0, &late.1[..1]))
        .await
        .expect("enrol under C");
    assert_eq!(roles(&pool).await.iter().filter(|r| r.1 == "active").count(), 1);
    assert_eq!(role_of(&pool, &a.model_id).await.0, "retired");
    assert_eq!(role_of(&pool, &c.model_id).await.0, "active");
    // The audit rows say what was attempted: folder, mode, from and to.
    let rows = changes(&pool).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    let (action, outcome, model, detail) = &rows[0];
    assert_eq!((action.as_str(), outcome.as_str()), ("reload", "ok"));
    assert_eq!(model.as_deref(), Some(c.model_id.as_str()));
    assert_eq!(detail["path"], display(c_dir.path()));
    assert_eq!(detail["mode"], "stage_migration");
    assert_eq!(detail["from_model"], a.model_id);
    assert_eq!(detail["to_model"], c.model_id);
    assert_eq!(detail["staged"], true);
    let (action, outcome, model, detail) = &rows[1];
    assert_eq!((action.as_str(), outcome.as_str()), ("promote", "ok"));
    assert_eq!(model.as_deref(), Some(c.model_id.as_str()));
    assert_eq!(detail["from_model"], a.model_id);
    assert_eq!(detail["to_model"], c.model_id);
    assert_eq!(detail["path"], display(c_dir.path()));
    assert_eq!(detail["require_full_coverage"], true);

    // A replica starting now with the old folder: refused, the message
    // names both models, both folders and how to choose.
    let refused = TestServer::start(settings(&options, a_dir.path()))
        .await
        .stop()
        .await
        .expect_err("a replica on the old folder starts");
    let message = refused.to_string();
    for want in [
        a.model_id.as_str(),
        c.model_id.as_str(),
        &display(a_dir.path()),
        &display(c_dir.path()),
        "model.adopt: true",
        "--adopt-model",
    ] {
        assert!(message.contains(want), "{want:?} missing from: {message}");
    }
    server.stop().await.expect("clean stop");

    // Restarted with the same settings (model.path still A's folder):
    // the same refusal, nothing changed.
    let refused = TestServer::start(settings(&options, a_dir.path()))
        .await
        .stop()
        .await
        .expect_err("a restart on the old folder");
    assert!(
        matches!(refused, handid_server::ServeError::ModelDisagrees { .. }),
        "{refused}"
    );
    assert_eq!(role_of(&pool, &c.model_id).await.0, "active");

    // Settings naming the active model's folder: it serves, and the subject
    // enrolled after the promotion is found.
    let server = TestServer::start(settings(&options, c_dir.path())).await;
    let mut client = server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let found = client
        .identify(identify("site", &late.1[0]))
        .await
        .expect("identify after the restart")
        .into_inner();
    assert_eq!(found.model_id, c.model_id);
    assert_eq!(found.gallery_size, 2, "both subjects have templates of C");
    assert_eq!(found.candidates[0].subject_id, late.0);
    assert!(found.candidates[0].score > 0.999, "{:?}", found.candidates[0]);
    server.stop().await.expect("clean stop");

    // Adopting the old folder deliberately: it serves and is recorded as
    // active, the promoted model retired.
    let mut adopt = settings(&options, a_dir.path());
    adopt.model.adopt = true;
    let server = TestServer::start(adopt).await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let mut admin = server.admin().await;
    assert_eq!(
        report(&mut admin).await.active.expect("active").model_id,
        a.model_id
    );
    assert_eq!(
        role_of(&pool, &a.model_id).await,
        ("active".to_owned(), Some(display(a_dir.path())))
    );
    assert_eq!(role_of(&pool, &c.model_id).await.0, "retired");
    assert_eq!(count_role(&pool, "active").await, 1);
    server.stop().await.expect("clean stop");
}

#[sqlx::test(migrations = false)]
async fn swaps_retire_the_model_they_replace_and_a_staged_migration_survives_a_restart(
    _: PgPoolOptions,
    options: PgConnectOptions,
) {
    let (a_dir, b_dir, c_dir) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
        tempfile::tempdir().expect("c"),
    );
    let a = checkpoint_in(a_dir.path(), 11, None);
    let b = checkpoint_in(b_dir.path(), 12, Some(&a.embedding_space));
    let c = checkpoint_in(c_dir.path(), 13, None);
    let server = TestServer::start(settings(&options, a_dir.path())).await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let mut admin = server.admin().await;
    let pool = PgPoolOptions::new()
        .connect(&database_url(&options))
        .await
        .expect("pool");

    // A -> B -> A: each swap retires the model it replaces.
    for (dir, now, then) in [(&b_dir, &b, &a), (&a_dir, &a, &b)] {
        admin
            .reload_model(reload(dir.path(), pb::ReloadMode::Unspecified))
            .await
            .expect("compatible swap");
        assert_eq!(role_of(&pool, &now.model_id).await.0, "active");
        assert_eq!(role_of(&pool, &then.model_id).await.0, "retired");
        assert_eq!(count_role(&pool, "active").await, 1);
    }
    // A refused reload says what was attempted and why.
    let missing = Path::new("/nonexistent/checkpoint");
    admin
        .reload_model(reload(missing, pb::ReloadMode::Unspecified))
        .await
        .expect_err("no checkpoint there");
    let rows = changes(&pool).await;
    let (action, outcome, model, detail) = rows.last().expect("a row");
    assert_eq!(
        (action.as_str(), outcome.as_str()),
        ("reload", "INVALID_ARGUMENT")
    );
    assert_eq!(model.as_deref(), Some(a.model_id.as_str()));
    assert_eq!(detail["path"], "/nonexistent/checkpoint");
    assert_eq!(detail["mode"], "swap");
    assert_eq!(detail["from_model"], a.model_id);
    assert!(detail["to_model"].is_null(), "{detail}");
    assert!(
        detail["reason"]
            .as_str()
            .is_some_and(|r| r.contains("/nonexistent/checkpoint")),
        "{detail}"
    );
    // Staging C, then staging it again: one staged row.
    for _ in 0..2 {
        admin
            .reload_model(reload(c_dir.path(), pb::ReloadMode::StageMigration))
            .await
            .expect("stage C");
    }
    assert_eq!(count_role(&pool, "staged").await, 1);
    assert_eq!(role_of(&pool, &c.model_id).await.0, "staged");
    // The unique index holds even against a direct write.
    let second = sqlx::query("UPDATE models SET role = 'active' WHERE model_id = $1")
        .bind(&b.model_id)
        .execute(&pool)
        .await;
    assert!(second.is_err(), "a second active model was recorded");
    server.stop().await.expect("clean stop");

    // Restarted: A serves and C is staged again from its recorded folder.
    let server = TestServer::start(settings(&options, a_dir.path())).await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let mut admin = server.admin().await;
    let model = report(&mut admin).await;
    assert_eq!(model.active.expect("active").model_id, a.model_id);
    let staged = model.staged.expect("the staged model was restored");
    assert_eq!(staged.model_id, c.model_id);
    assert_eq!(staged.path, display(c_dir.path()));
    let restored: (String, String, String) = sqlx::query_as(
        "SELECT actor, outcome, detail::text FROM audit_log WHERE action = 'reload' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .expect("the restore's audit row");
    assert_eq!((restored.0.as_str(), restored.1.as_str()), ("startup", "ok"));
    let detail: serde_json::Value = serde_json::from_str(&restored.2).expect("detail is JSON");
    assert_eq!(detail["to_model"], c.model_id);
    let promoted = admin
        .promote_model(pb::PromoteModelRequest {
            require_full_coverage: false,
        })
        .await
        .expect("promote the restored staging")
        .into_inner();
    assert_eq!(promoted.active.expect("active").model_id, c.model_id);
    let recorded = roles(&pool).await;
    let active: Vec<&str> = recorded
        .iter()
        .filter(|r| r.1 == "active")
        .map(|r| r.0.as_str())
        .collect();
    assert_eq!(active, [c.model_id.as_str()], "{recorded:?}");
    assert_eq!(count_role(&pool, "staged").await, 0);
    server.stop().await.expect("clean stop");
}

#[sqlx::test(migrations = false)]
async fn a_model_without_thresholds_is_reported_and_warned_about(
    _: PgPoolOptions,
    options: PgConnectOptions,
) {
    let dir = tempfile::tempdir().expect("checkpoint");
    let manifest =
        create_random_checkpoint(dir.path(), &ClipVisionConfig::tiny_vit(), 21).expect("checkpoint");
    assert!(manifest.thresholds.is_empty());
    let server = TestServer::start(settings(&options, dir.path())).await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let mut admin = server.admin().await;
    let active = report(&mut admin).await.active.expect("active");
    assert!(!active.calibrated);
    assert!(active.operating_points.is_empty());
    // Identify with the default rule: refused, saying why; an explicit
    // threshold still works.
    let probe = people(1, 1).remove(0).1.remove(0);
    let mut client = server.client().await;
    client
        .enroll(pb::EnrollRequest {
            gallery_id: "site".to_owned(),
            subject_id: "s".to_owned(),
            images: vec![pb::Image { data: probe.clone() }],
            idempotency_key: String::new(),
        })
        .await
        .expect("enrol");
    let identify = |rule: Option<pb::DecisionRule>| pb::IdentifyRequest {
        gallery_id: "site".to_owned(),
        image: Some(pb::Image { data: probe.clone() }),
        top_k: 1,
        rule,
    };
    let refused = client
        .identify(identify(None))
        .await
        .expect_err("no calibrated default threshold");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("calibrat"), "{}", refused.message());
    client
        .identify(identify(Some(pb::DecisionRule {
            rule: Some(pb::decision_rule::Rule::Threshold(0.5)),
        })))
        .await
        .expect("an explicit threshold");
    let logs = String::from_utf8_lossy(&logs()).into_owned();
    assert!(
        logs.lines().any(|l| l.contains("WARN")
            && l.contains("no calibrated thresholds")
            && l.contains(&manifest.model_id)),
        "no start warning in the logs"
    );
    // A calibrated checkpoint says so.
    let calibrated = tempfile::tempdir().expect("calibrated");
    let next = checkpoint_in(calibrated.path(), 22, Some(&manifest.embedding_space));
    admin
        .reload_model(reload(calibrated.path(), pb::ReloadMode::Unspecified))
        .await
        .expect("swap");
    let active = report(&mut admin).await.active.expect("active");
    assert_eq!(active.model_id, next.model_id);
    assert!(active.calibrated);
    server.stop().await.expect("clean stop");
}

async fn rollback(admin: &mut AdminClient<Channel>) -> Result<pb::RollbackModelResponse, tonic::Status> {
    admin
        .rollback_model(pb::RollbackModelRequest::default())
        .await
        .map(tonic::Response::into_inner)
}

async fn rollback_from(
    admin: &mut AdminClient<Channel>,
    expected_active: &str,
) -> Result<pb::RollbackModelResponse, tonic::Status> {
    admin
        .rollback_model(pb::RollbackModelRequest {
            expected_active: expected_active.to_owned(),
        })
        .await
        .map(tonic::Response::into_inner)
}

fn refused_with(result: Result<pb::RollbackModelResponse, tonic::Status>, wants: &[&str]) {
    let status = result.expect_err("the rollback should be refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    for want in wants {
        assert!(
            status.message().contains(want),
            "{want:?} missing from: {}",
            status.message()
        );
    }
}

/// `(outcome, model_id, detail)` of every rollback audit row, in order.
async fn rollbacks(pool: &PgPool) -> Vec<(String, Option<String>, serde_json::Value)> {
    let rows: Vec<(String, Option<String>, String)> = sqlx::query_as(
        "SELECT outcome, model_id, detail::text FROM audit_log WHERE action = 'rollback' ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .expect("audit rows");
    rows.into_iter()
        .map(|(outcome, model, detail)| (outcome, model, serde_json::from_str(&detail).expect("JSON")))
        .collect()
}

#[sqlx::test(migrations = false)]
async fn rollback_returns_to_the_previous_model_while_its_templates_cover_every_subject(
    _: PgPoolOptions,
    options: PgConnectOptions,
) {
    let (a_dir, c_dir) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("c"));
    let a = checkpoint_in(a_dir.path(), 11, None);
    let c = checkpoint_in(c_dir.path(), 13, None);
    let pool = PgPoolOptions::new()
        .connect(&database_url(&options))
        .await
        .expect("pool");
    let server = TestServer::start(settings(&options, a_dir.path())).await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let (mut client, mut admin) = (server.client().await, server.admin().await);
    let people = people(2, 2);
    let (early, late) = (&people[0], &people[1]);
    client
        .enroll(enroll("site", &early.0, &early.1[..1]))
        .await
        .expect("enrol under A");

    // Nothing replaced yet: nothing to go back to.
    assert!(report(&mut admin).await.rollback_target.is_none());
    refused_with(
        rollback(&mut admin).await,
        &["nothing to roll back to", &a.model_id],
    );

    // A migration to C (another space), the subject re-enrolled during it.
    admin
        .reload_model(reload(c_dir.path(), pb::ReloadMode::StageMigration))
        .await
        .expect("stage C");
    refused_with(rollback(&mut admin).await, &["is staged", &c.model_id]);
    client
        .enroll(enroll("site", &early.0, &early.1[1..2]))
        .await
        .expect("dual enrol");
    admin
        .promote_model(pb::PromoteModelRequest {
            require_full_coverage: true,
        })
        .await
        .expect("promote C");
    let target = report(&mut admin).await.rollback_target.expect("A is the target");
    assert_eq!(target.model_id, a.model_id);
    assert_eq!(target.embedding_space, a.embedding_space);
    assert_eq!(target.path, display(a_dir.path()));
    assert!(target.active_until.is_some());

    // A subject enrolled after the promotion has no template of A: refused,
    // naming the gallery with its counts and the way out; C keeps serving.
    client
        .enroll(enroll("site", &late.0, &late.1[..1]))
        .await
        .expect("enrol under C");
    refused_with(
        rollback(&mut admin).await,
        &[
            &a.model_id,
            "site (1 of 2 subjects)",
            "RELOAD_MODE_STAGE_MIGRATION",
        ],
    );
    assert_eq!(
        report(&mut admin).await.active.expect("active").model_id,
        c.model_id
    );

    // Once every subject has a template of A again, the rollback goes
    // through, whatever the direction of compatibility.
    client
        .delete_subject(pb::DeleteSubjectRequest {
            gallery_id: "site".to_owned(),
            subject_id: late.0.clone(),
        })
        .await
        .expect("delete the late subject");
    let back = rollback(&mut admin).await.expect("roll back to A");
    assert_eq!(back.active.expect("active").model_id, a.model_id);
    assert_eq!(back.previous.expect("previous").model_id, c.model_id);
    let found = client
        .identify(identify("site", &early.1[0]))
        .await
        .expect("identify under A")
        .into_inner();
    assert_eq!(found.model_id, a.model_id);
    assert_eq!(found.candidates[0].subject_id, early.0);
    assert!(found.candidates[0].score > 0.999);
    assert_eq!(role_of(&pool, &a.model_id).await.0, "active");
    assert_eq!(role_of(&pool, &c.model_id).await.0, "retired");
    assert_eq!(
        report(&mut admin).await.rollback_target.expect("C").model_id,
        c.model_id
    );
    let rows = rollbacks(&pool).await;
    let outcomes: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        outcomes,
        [
            "FAILED_PRECONDITION",
            "FAILED_PRECONDITION",
            "FAILED_PRECONDITION",
            "ok"
        ]
    );
    let (_, model, detail) = &rows[2];
    assert_eq!(model.as_deref(), Some(c.model_id.as_str()));
    assert_eq!(detail["to_model"], a.model_id);
    assert!(
        detail["reason"].as_str().is_some_and(|r| r.contains("1 of 2")),
        "{detail}"
    );
    let (_, model, detail) = &rows[3];
    assert_eq!(model.as_deref(), Some(a.model_id.as_str()));
    assert_eq!(detail["from_model"], c.model_id);
    assert_eq!(detail["to_model"], a.model_id);
    assert_eq!(detail["path"], display(a_dir.path()));
    // A retry of that rollback (its answer lost), conditional on the model
    // it rolled back from, changes nothing: a bare retry would roll
    // forward to C.
    refused_with(
        rollback_from(&mut admin, &c.model_id).await,
        &[&c.model_id, &a.model_id, "nothing changed"],
    );
    assert_eq!(role_of(&pool, &a.model_id).await.0, "active");
    assert_eq!(
        report(&mut admin).await.active.expect("active").model_id,
        a.model_id
    );
    server.stop().await.expect("clean stop");

    // The rollback is the database's: a restart on A's folder serves A.
    let server = TestServer::start(settings(&options, a_dir.path())).await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let (mut client, mut admin) = (server.client().await, server.admin().await);
    assert_eq!(
        report(&mut admin).await.active.expect("active").model_id,
        a.model_id
    );

    // Rolling back again returns to C: the subject has its template of C
    // (conditional on A, which is active).
    let forward = rollback_from(&mut admin, &a.model_id)
        .await
        .expect("roll forward to C");
    assert_eq!(forward.active.expect("active").model_id, c.model_id);
    let found = client
        .identify(identify("site", &early.1[1]))
        .await
        .expect("identify under C")
        .into_inner();
    assert_eq!(found.model_id, c.model_id);
    assert_eq!(found.candidates[0].subject_id, early.0);

    // A's folder now holds another model: refused, naming both.
    let other = checkpoint_in(a_dir.path(), 14, None);
    refused_with(
        rollback(&mut admin).await,
        &[&other.model_id, &a.model_id, &display(a_dir.path())],
    );
    assert_eq!(
        report(&mut admin).await.active.expect("active").model_id,
        c.model_id
    );
    assert_eq!(count_role(&pool, "active").await, 1);
    server.stop().await.expect("clean stop");
}
