//! The PostgreSQL store against a real database: enrolment, replay of
//! idempotent retries, reads, erasure, the change feed and the audit log.
//! Each test gets a fresh database (`#[sqlx::test]`).

use std::time::Duration;

use futures::TryStreamExt;
use handid_server::store::{
    AuditEntry, Coverage, Enrolled, Erased, ModelRecord, NewEnrollment, Role, StagedEmbeddings, Store,
    StoreError, TemplateRow, images_sha256,
};
use sqlx::postgres::{PgPool, PgPoolOptions};
use uuid::Uuid;

const MODEL: &str = "model-a";

/// The audit row every write of these tests appends.
const AUDIT: AuditEntry<'static> = AuditEntry {
    actor: "tester",
    peer: None,
    action: "test",
    gallery_id: None,
    subject_id: None,
    model_id: None,
    outcome: "ok",
    top_score: None,
    detail: None,
};

async fn store(pool: PgPool) -> Store {
    let store = Store::from_pool(pool);
    store
        .record_model(&ModelRecord {
            model_id: MODEL.to_owned(),
            embedding_space: "space-a".to_owned(),
            architecture: "tiny".to_owned(),
            embedding_dim: 2,
            manifest_json: "{}".to_owned(),
        })
        .await
        .expect("record model");
    store
}

fn enrollment<'a>(
    gallery: &'a str,
    subject: &'a str,
    embeddings: &'a [Vec<f32>],
    key: Option<&'a str>,
) -> NewEnrollment<'a> {
    NewEnrollment {
        gallery_id: gallery,
        subject_id: subject,
        model_id: MODEL,
        embeddings,
        idempotency_key: key,
        images_sha256: digest_of(embeddings),
        caller: "tester",
        max_galleries: 1_000,
        staged: None,
        side: None,
    }
}

/// A stand-in for the digest of the images these embeddings came from.
fn digest_of(embeddings: &[Vec<f32>]) -> &'static str {
    let digest = images_sha256(&[format!("{embeddings:?}").into_bytes()]);
    Box::leak(digest.into_boxed_str())
}

#[sqlx::test(migrations = "../migrations")]
async fn enroll_get_list_delete_round_trip(pool: PgPool) {
    let store = store(pool).await;
    let two = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
    let first = store
        .enroll(&enrollment("g1", "bob", &two, None), &AUDIT)
        .await
        .expect("enroll");
    assert_eq!(first.templates.len(), 2);
    assert_eq!(first.template_count, 2);
    assert!(first.templates[0].seq < first.templates[1].seq);
    let again = store
        .enroll(&enrollment("g1", "bob", &two[..1], None), &AUDIT)
        .await
        .expect("enroll");
    assert_eq!(again.template_count, 3, "templates accumulate per subject");
    store
        .enroll(&enrollment("g1", "alice", &two[..1], None), &AUDIT)
        .await
        .expect("enroll");
    store
        .enroll(&enrollment("g2", "bob", &two[..1], None), &AUDIT)
        .await
        .expect("enroll");

    let bob = store.get_subject("g1", "bob").await.expect("get");
    let ids: Vec<Uuid> = bob.templates.iter().map(|t| t.template_id).collect();
    assert_eq!(
        ids[..2],
        [first.templates[0].template_id, first.templates[1].template_id]
    );
    assert_eq!(bob.templates.len(), 3);

    let page = store.list_subjects("g1", None, 1).await.expect("list");
    assert_eq!(
        page.iter().map(|s| s.subject_id.as_str()).collect::<Vec<_>>(),
        ["alice"]
    );
    let page = store.list_subjects("g1", Some("alice"), 10).await.expect("list");
    assert_eq!(
        page.iter().map(|s| s.subject_id.as_str()).collect::<Vec<_>>(),
        ["bob"]
    );
    assert_eq!(page[0].templates.len(), 3);

    let rows: Vec<TemplateRow> = store
        .templates_of_model(MODEL)
        .try_collect()
        .await
        .expect("stream");
    assert_eq!(rows.len(), 5);
    assert!(
        rows.windows(2)
            .all(|w| (w[0].gallery_id.as_str(), w[0].seq) < (w[1].gallery_id.as_str(), w[1].seq))
    );

    assert_eq!(
        store.delete_subject("g1", "bob", &AUDIT).await.expect("delete"),
        3
    );
    assert!(matches!(
        store.get_subject("g1", "bob").await,
        Err(StoreError::SubjectNotFound { .. })
    ));
    assert!(matches!(
        store.delete_subject("g1", "bob", &AUDIT).await,
        Err(StoreError::SubjectNotFound { .. })
    ));
    assert!(matches!(
        store.delete_subject("nope", "bob", &AUDIT).await,
        Err(StoreError::GalleryNotFound(_))
    ));
    assert!(matches!(
        store.list_subjects("nope", None, 5).await,
        Err(StoreError::GalleryNotFound(_))
    ));

    let erased = store.delete_gallery("g1", &AUDIT).await.expect("delete gallery");
    assert_eq!(
        erased,
        Erased {
            subjects: 1,
            templates: 1
        }
    );
    assert!(!store.gallery_exists("g1").await.expect("exists"));
    assert!(store.gallery_exists("g2").await.expect("exists"));
    assert!(matches!(
        store.delete_gallery("g1", &AUDIT).await,
        Err(StoreError::GalleryNotFound(_))
    ));
}

#[sqlx::test(migrations = "../migrations")]
async fn a_retried_enroll_returns_the_first_result(pool: PgPool) {
    let store = store(pool).await;
    let two = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
    let first = store
        .enroll(&enrollment("g", "s", &two, Some("k1")), &AUDIT)
        .await
        .expect("enroll");
    let retry = store
        .enroll(&enrollment("g", "s", &two, Some("k1")), &AUDIT)
        .await
        .expect("retry");
    assert!(!first.replayed);
    assert!(retry.replayed);
    assert_eq!(retry.templates, first.templates);
    assert_eq!(retry.template_count, 2, "the retry added nothing");
    // The same key for another subject, other images, or fewer of them:
    // refused, in the key's scope.
    let swapped = vec![vec![0.0, 1.0], vec![1.0, 0.0]];
    for other in [
        enrollment("g", "someone-else", &two, Some("k1")),
        enrollment("g", "s", &two[..1], Some("k1")),
        NewEnrollment {
            images_sha256: digest_of(&swapped),
            ..enrollment("g", "s", &two, Some("k1"))
        },
    ] {
        assert!(matches!(
            store.enroll(&other, &AUDIT).await,
            Err(StoreError::IdempotencyKeyReused)
        ));
    }
    // Another gallery, or another caller, is another scope: the same key
    // enrols anew there.
    for other in [
        enrollment("other", "s", &two, Some("k1")),
        NewEnrollment {
            caller: "someone",
            ..enrollment("g", "s", &two, Some("k1"))
        },
    ] {
        let stored = store.enroll(&other, &AUDIT).await.expect("a new enrolment");
        assert!(!stored.replayed);
        assert_ne!(stored.templates, first.templates);
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_migration_enrolment_stores_both_models_and_replays_the_active_ones(pool: PgPool) {
    let store = store(pool.clone()).await;
    store
        .record_model(&ModelRecord {
            model_id: "model-b".to_owned(),
            embedding_space: "space-b".to_owned(),
            architecture: "tiny".to_owned(),
            embedding_dim: 3,
            manifest_json: "{}".to_owned(),
        })
        .await
        .expect("record model b");
    // Staged: a dual enrolment stores templates only for a model the
    // database still records as staged (or active).
    store
        .assign_role("model-b", Role::Staged, "/models/b")
        .await
        .expect("stage model b");
    let active = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
    let staged = vec![vec![1.0, 0.0, 0.0], vec![0.0, 0.0, 1.0]];
    let mut new = enrollment("g", "s", &active, Some("k"));
    new.staged = Some(StagedEmbeddings {
        model_id: "model-b",
        embeddings: &staged,
    });
    let first = store.enroll(&new, &AUDIT).await.expect("dual enrolment");
    assert_eq!((first.templates.len(), first.staged_templates.len()), (2, 2));
    assert_eq!(first.template_count, 2, "counted for the active model");
    let retry = store.enroll(&new, &AUDIT).await.expect("replay");
    assert!(retry.replayed);
    assert_eq!(retry.templates, first.templates);
    assert_eq!(retry.model_id, MODEL);
    let coverage = store.coverage(&["space-b".to_owned()]).await.expect("coverage");
    assert_eq!(
        coverage,
        [Coverage {
            gallery_id: "g".to_owned(),
            subjects: 1,
            covered: 1
        }]
    );
    // One change per subject and statement, numbered in order.
    let changes = store.changes_after(0, 10).await.expect("changes");
    assert_eq!(changes.len(), 4, "two template inserts per model: {changes:?}");
    assert!(changes.windows(2).all(|w| w[0].seq < w[1].seq));
    assert!(changes.iter().all(|c| c.subject_id.as_deref() == Some("s")));
    assert_eq!(store.last_change().await.expect("last"), changes[3].seq);
    store.delete_gallery("g", &AUDIT).await.expect("delete");
    let mut kinds: Vec<String> = store
        .changes_after(changes[3].seq, 10)
        .await
        .expect("changes")
        .into_iter()
        .map(|c| c.kind)
        .collect();
    // The gallery's own row and its cascade to the subjects (in either
    // order, applying both leaves the index empty).
    kinds.sort();
    assert_eq!(kinds, ["gallery", "subject"]);
}

#[sqlx::test(migrations = "../migrations")]
async fn concurrent_retries_store_once(pool: PgPool) {
    let store = store(pool).await;
    let one = vec![vec![0.6, 0.8]];
    let calls = (0..8).map(|_| {
        let store = store.clone();
        let one = one.clone();
        tokio::spawn(async move {
            store
                .enroll(&enrollment("g", "s", &one, Some("same-key")), &AUDIT)
                .await
        })
    });
    let results: Vec<Enrolled> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.expect("task").expect("enroll"))
        .collect();
    assert_eq!(
        results.iter().filter(|r| !r.replayed).count(),
        1,
        "exactly one call stored"
    );
    assert!(results.iter().all(|r| r.templates == results[0].templates));
    let subject = store.get_subject("g", "s").await.expect("get");
    assert_eq!(subject.templates.len(), 1);
}

#[sqlx::test(migrations = "../migrations")]
async fn an_unknown_model_is_a_server_fault_not_a_conflict(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    let one = vec![vec![1.0, 0.0]];
    let err = store
        .enroll(&enrollment("g", "s", &one, None), &AUDIT)
        .await
        .expect_err("no model row");
    assert!(matches!(err, StoreError::Database(_)), "{err:?}");
    // The failed transaction left nothing behind, its audit row included.
    assert!(!store.gallery_exists("g").await.expect("exists"));
    assert_eq!(audit_count(&pool).await, 0);
}

async fn audit_count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM audit_log")
        .fetch_one(pool)
        .await
        .expect("count")
}

#[sqlx::test(migrations = "../migrations")]
async fn a_write_and_its_audit_row_commit_together(pool: PgPool) {
    let store = store(pool.clone()).await;
    let one = vec![vec![1.0, 0.0]];
    store
        .enroll(&enrollment("g", "s", &one, Some("k")), &AUDIT)
        .await
        .expect("enroll");
    // A replay stores nothing, and appends no row here.
    let replay = store
        .enroll(&enrollment("g", "s", &one, Some("k")), &AUDIT)
        .await
        .expect("replay");
    assert!(replay.replayed);
    assert_eq!(audit_count(&pool).await, 1);
    store.delete_subject("g", "s", &AUDIT).await.expect("delete");
    assert_eq!(audit_count(&pool).await, 2);
    // A deletion that finds nothing rolls its row back with it.
    assert!(store.delete_subject("g", "s", &AUDIT).await.is_err());
    assert!(store.delete_gallery("nope", &AUDIT).await.is_err());
    assert_eq!(audit_count(&pool).await, 2);
    store.delete_gallery("g", &AUDIT).await.expect("delete gallery");
    assert_eq!(audit_count(&pool).await, 3);
}

#[sqlx::test(migrations = "../migrations")]
async fn audit_rows_are_written(pool: PgPool) {
    let store = store(pool.clone()).await;
    store
        .audit(&AuditEntry {
            actor: "anonymous",
            peer: Some("127.0.0.1:1"),
            action: "identify",
            gallery_id: Some("g"),
            subject_id: None,
            model_id: Some(MODEL),
            outcome: "ok",
            top_score: Some(0.5),
            detail: None,
        })
        .await
        .expect("audit");
    let (action, score): (String, Option<f32>) = sqlx::query_as("SELECT action, top_score FROM audit_log")
        .fetch_one(&pool)
        .await
        .expect("row");
    assert_eq!((action.as_str(), score), ("identify", Some(0.5)));
}

#[sqlx::test(migrations = "../migrations")]
async fn concurrent_audit_rows_share_commits_and_a_bad_row_fails_alone(pool: PgPool) {
    let store = store(pool.clone()).await;
    let subjects: Vec<String> = (0..64).map(|i| format!("s{i}")).collect();
    // Past the column's 128 characters, with a two-byte one across the cut.
    let long_peer = format!("{}é{}", "p".repeat(127), "q".repeat(50));
    let detail = serde_json::json!({"path": "/models/m"});
    let entry = |i: usize| AuditEntry {
        actor: "anonymous",
        peer: Some(&long_peer),
        action: "identify",
        gallery_id: Some("g"),
        subject_id: Some(&subjects[i]),
        model_id: Some(MODEL),
        outcome: "ok",
        top_score: Some(i as f32),
        detail: i.is_multiple_of(2).then_some(&detail),
    };
    let store = &store;
    let written =
        futures::future::join_all((0..64).map(|i| async move { store.audit(&entry(i)).await })).await;
    assert!(written.iter().all(Result::is_ok), "{written:?}");
    assert!(
        store.audit_groups() <= 32,
        "64 concurrent rows took {} INSERTs",
        store.audit_groups()
    );
    let rows: Vec<(String, Option<f32>, String, String)> =
        sqlx::query_as("SELECT subject_id, top_score, peer, detail::text FROM audit_log ORDER BY id")
            .fetch_all(&pool)
            .await
            .expect("rows");
    assert_eq!(rows.len(), 64);
    for (i, (subject, score, peer, stored_detail)) in rows.iter().enumerate() {
        // In the order the calls queued them, each with its own values.
        assert_eq!((subject.as_str(), *score), (subjects[i].as_str(), Some(i as f32)));
        assert_eq!(peer, &"p".repeat(127), "cut at the character boundary");
        let expected = if i.is_multiple_of(2) {
            r#"{"path": "/models/m"}"#
        } else {
            "{}"
        };
        assert_eq!(stored_detail, expected);
    }

    // A row the database refuses (a NUL in text) fails its own call only.
    let bad = AuditEntry {
        subject_id: Some("bad\0"),
        ..entry(0)
    };
    let written = futures::future::join_all((0..8).map(|i| {
        let bad = bad.clone();
        async move {
            if i == 3 {
                store.audit(&bad).await
            } else {
                store.audit(&entry(i)).await
            }
        }
    }))
    .await;
    for (i, result) in written.iter().enumerate() {
        assert_eq!(result.is_err(), i == 3, "call {i}: {result:?}");
    }
    let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM audit_log")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(count, 64 + 7);
}

#[tokio::test]
async fn an_unreachable_database_is_unavailable() {
    // Port 9 (discard) on loopback: nothing listens; connect fails fast.
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy("postgres://handid@127.0.0.1:9/handid")
        .expect("lazy pool");
    let err = Store::from_pool(pool).ping().await.expect_err("nothing listens");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_deadlock_is_a_conflict_the_client_may_retry(pool: PgPool) {
    let store = store(pool.clone()).await;
    let one = vec![vec![1.0, 0.0]];
    store
        .enroll(&enrollment("g", "s", &one, None), &AUDIT)
        .await
        .expect("enroll");
    // An operator's transaction locks the subject, then (while the
    // DeleteGallery below holds the gallery and waits for the subject)
    // asks for the gallery: a deadlock. Its own deadlock_timeout is long, so
    // the store's transaction, waiting since before, is the one rolled back.
    let mut operator = pool.begin().await.expect("begin");
    sqlx::query("SET LOCAL deadlock_timeout = '10s'")
        .execute(&mut *operator)
        .await
        .expect("set");
    sqlx::query("SELECT 1 FROM subjects WHERE gallery_id = 'g' FOR UPDATE")
        .execute(&mut *operator)
        .await
        .expect("lock the subject");
    let deleting = {
        let store = store.clone();
        tokio::spawn(async move { store.delete_gallery("g", &AUDIT).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let operator_side =
        sqlx::query("SELECT 1 FROM galleries WHERE gallery_id = 'g' FOR UPDATE").execute(&mut *operator);
    let (operator_result, deleted) = tokio::join!(operator_side, deleting);
    operator_result.expect("the operator's transaction survives");
    operator.rollback().await.expect("rollback");
    let err = deleted
        .expect("task")
        .expect_err("rolled back by the deadlock detector");
    assert!(
        matches!(&err, StoreError::Conflict(reason) if reason == "deadlock_detected"),
        "{err:?}"
    );
    let status = tonic::Status::from(handid_server::ServiceError::from(err));
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
    assert!(status.message().contains("retry"), "{}", status.message());
    // Nothing was deleted, and a retry now succeeds.
    store.delete_gallery("g", &AUDIT).await.expect("the retry");
}

#[sqlx::test(migrations = "../migrations")]
async fn the_schema_refuses_non_finite_templates(pool: PgPool) {
    let store = store(pool.clone()).await;
    for value in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let poisoned = vec![vec![1.0, value]];
        let err = store
            .enroll(&enrollment("g", "s", &poisoned, None), &AUDIT)
            .await
            .expect_err("refused by the CHECK");
        assert!(
            err.to_string().contains("templates_embedding_finite")
                || format!("{err:?}").contains("templates_embedding_finite"),
            "{err:?}"
        );
    }
    let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM templates")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(count, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn each_caller_creates_at_most_its_quota_of_galleries(pool: PgPool) {
    let store = store(pool).await;
    let one = vec![vec![1.0, 0.0]];
    let by = |gallery: &'static str, creator: &'static str| NewEnrollment {
        caller: creator,
        max_galleries: 2,
        ..enrollment(gallery, "s", &one, None)
    };
    store.enroll(&by("a1", "alice"), &AUDIT).await.expect("first");
    store.enroll(&by("a2", "alice"), &AUDIT).await.expect("second");
    let err = store.enroll(&by("a3", "alice"), &AUDIT).await.expect_err("third");
    assert!(
        matches!(&err, StoreError::GalleryQuota { caller, max: 2 } if caller == "alice"),
        "{err:?}"
    );
    assert!(!store.gallery_exists("a3").await.expect("exists"));
    // Enrolling into a gallery that exists creates nothing: always allowed,
    // whoever created it.
    store
        .enroll(&by("a1", "alice"), &AUDIT)
        .await
        .expect("existing gallery");
    store
        .enroll(&by("a1", "bob"), &AUDIT)
        .await
        .expect("someone else's gallery");
    // Another caller has its own quota; a deletion gives one back.
    store.enroll(&by("b1", "bob"), &AUDIT).await.expect("bob's first");
    store.delete_gallery("a2", &AUDIT).await.expect("delete");
    store
        .enroll(&by("a3", "alice"), &AUDIT)
        .await
        .expect("room again");
    // Concurrent creations cannot both pass the count.
    let calls = ["c1", "c2", "c3", "c4"].map(|g| {
        let store = store.clone();
        let one = one.clone();
        tokio::spawn(async move {
            store
                .enroll(
                    &NewEnrollment {
                        caller: "carol",
                        max_galleries: 2,
                        ..enrollment(g, "s", &one, None)
                    },
                    &AUDIT,
                )
                .await
        })
    });
    let mut created = 0;
    for call in calls {
        match call.await.expect("task") {
            Ok(_) => created += 1,
            Err(StoreError::GalleryQuota { .. }) => {}
            Err(other) => panic!("{other:?}"),
        }
    }
    assert_eq!(created, 2);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_changed_migration_is_refused_by_the_schema_check(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    store
        .check_schema()
        .await
        .expect("the embedded migrations, unchanged");
    let version: i64 = sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .expect("latest migration");
    sqlx::query("UPDATE _sqlx_migrations SET checksum = sha384('edited'::bytea) WHERE version = $1")
        .bind(version)
        .execute(&pool)
        .await
        .expect("edit the recorded checksum");
    let refused = store.check_schema().await.expect_err("an edited migration");
    assert!(
        matches!(refused, StoreError::SchemaModified { version: v } if v == version),
        "{refused:?}"
    );
    assert!(refused.to_string().contains(&version.to_string()), "{refused}");
}
