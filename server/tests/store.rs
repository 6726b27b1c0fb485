//! The PostgreSQL store against a real database: enrolment, replay of
//! idempotent retries, reads, erasure, the change feed and the audit log.
//! Each test gets a fresh database (`#[sqlx::test]`).

use std::time::Duration;

use futures::TryStreamExt;
use handid_server::store::{
    AuditEntry, Coverage, Enrolled, Erased, ModelRecord, NewEnrollment, Promotion, Role, Rollback,
    StagedEmbeddings, Store, StoreError, TemplateRow, images_sha256,
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
        max_templates: 100,
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

/// Records `model_id` of `space` and `dim`, its manifest declaring
/// `compatible` spaces.
async fn record(store: &Store, model_id: &str, space: &str, dim: usize, compatible: &[&str]) {
    store
        .record_model(&ModelRecord {
            model_id: model_id.to_owned(),
            embedding_space: space.to_owned(),
            architecture: "tiny".to_owned(),
            embedding_dim: dim,
            manifest_json: serde_json::json!({ "compatible_spaces": compatible }).to_string(),
        })
        .await
        .expect("record model");
}

#[sqlx::test(migrations = "../migrations")]
async fn an_enrolment_the_active_model_cannot_compare_is_refused_and_stores_nothing(pool: PgPool) {
    let store = store(pool.clone()).await;
    record(&store, "model-c", "space-c", 2, &[]).await;
    record(&store, "model-d", "space-d", 2, &["space-a"]).await;
    record(&store, "model-w", "space-a", 3, &[]).await;
    let one = vec![vec![1.0, 0.0]];
    // No model recorded as active (no server started on this database):
    // nothing to check against.
    store
        .enroll(&enrollment("g", "first", &one, None), &AUDIT)
        .await
        .expect("no active model");

    // C is active: A's embeddings (made before C replaced A) are refused,
    // retryably, and leave nothing behind.
    store
        .assign_role("model-c", Role::Active, "/models/c")
        .await
        .expect("C active");
    let (rows, last) = (audit_count(&pool).await, store.last_change().await.expect("last"));
    let err = store
        .enroll(&enrollment("g2", "s", &one, None), &AUDIT)
        .await
        .expect_err("C cannot compare A's templates");
    assert!(
        matches!(&err, StoreError::ModelChanged { model_id, active } if model_id == MODEL && active == "model-c"),
        "{err:?}"
    );
    let status = tonic::Status::from(handid_server::ServiceError::from(err));
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
    for want in [MODEL, "model-c", "retry"] {
        assert!(
            status.message().contains(want),
            "{want:?} missing from {}",
            status.message()
        );
    }
    assert!(!store.gallery_exists("g2").await.expect("exists"));
    assert_eq!(audit_count(&pool).await, rows);
    assert_eq!(store.last_change().await.expect("last"), last);
    // A dual enrolment whose staged model became the active one (a
    // promotion in between) is stored: C compares its staged templates.
    let mut dual = enrollment("g", "dual", &one, None);
    dual.staged = Some(StagedEmbeddings {
        model_id: "model-c",
        embeddings: &one,
    });
    let stored = store.enroll(&dual, &AUDIT).await.expect("dual enrolment");
    assert_eq!((stored.templates.len(), stored.staged_templates.len()), (1, 1));

    // A model declaring A's space compatible compares them; one of A's
    // space but another width does not.
    store
        .assign_role("model-d", Role::Active, "/models/d")
        .await
        .expect("D active");
    store
        .enroll(&enrollment("g", "under-d", &one, None), &AUDIT)
        .await
        .expect("D compares space-a");
    store
        .assign_role("model-w", Role::Active, "/models/w")
        .await
        .expect("W active");
    let err = store
        .enroll(&enrollment("g", "under-w", &one, None), &AUDIT)
        .await
        .expect_err("W is of another width");
    assert!(matches!(err, StoreError::ModelChanged { .. }), "{err:?}");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_rollback_and_the_enrolments_of_the_model_it_replaces_wait_for_each_other(pool: PgPool) {
    let store = store(pool.clone()).await;
    record(&store, "model-c", "space-c", 2, &[]).await;
    let one = vec![vec![1.0, 0.0]];
    // A served, then C: A is the rollback target, "early" has its template.
    store
        .assign_role(MODEL, Role::Active, "/models/a")
        .await
        .expect("A active");
    store
        .enroll(&enrollment("g", "early", &one, None), &AUDIT)
        .await
        .expect("enrol under A");
    store
        .assign_role("model-c", Role::Active, "/models/c")
        .await
        .expect("C active");
    let spaces_a = vec!["space-a".to_owned()];

    // An enrolment of C on another replica, in flight: it holds the active
    // model's row as `Store::enroll` does, and commits its subject (C's
    // template only) while the rollback waits. The rollback's check runs
    // after it and refuses.
    let mut replica = pool.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM models WHERE role = 'active' FOR SHARE")
        .execute(&mut *replica)
        .await
        .expect("lock the active model");
    let rolling = {
        let (store, spaces) = (store.clone(), spaces_a.clone());
        tokio::spawn(async move { store.roll_back_to(MODEL, "/models/a", &spaces, None).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !rolling.is_finished(),
        "the rollback did not wait for the enrolment holding the active model"
    );
    sqlx::query(
        "WITH s AS (INSERT INTO subjects (gallery_id, subject_id) VALUES ('g', 'late') RETURNING id)
         INSERT INTO templates (template_id, subject, gallery_id, model_id, dimension, embedding)
         SELECT gen_random_uuid(), s.id, 'g', 'model-c', 2, decode('3f80000000000000', 'hex') FROM s",
    )
    .execute(&mut *replica)
    .await
    .expect("C's template");
    replica.commit().await.expect("commit");
    let refused = rolling.await.expect("task").expect("rollback");
    assert_eq!(
        refused,
        Rollback::Uncovered(vec![Coverage {
            gallery_id: "g".to_owned(),
            subjects: 2,
            covered: 1
        }])
    );
    assert_eq!(
        store
            .model_roles()
            .await
            .expect("roles")
            .active
            .map(|m| m.model_id),
        Some("model-c".to_owned()),
        "a refused rollback changes nothing"
    );

    // Once that subject is gone the rollback goes through.
    store.delete_subject("g", "late", &AUDIT).await.expect("delete");
    assert_eq!(
        store
            .roll_back_to(MODEL, "/models/a", &spaces_a, None)
            .await
            .expect("rollback"),
        Rollback::Recorded
    );
    let roles = store.model_roles().await.expect("roles");
    assert_eq!(roles.active.map(|m| m.model_id), Some(MODEL.to_owned()));

    // C active again, then a role change back to A in flight (a transaction
    // holding the rows as the rollback's does): an enrolment of C that
    // reaches the active row meanwhile waits for the change, then finds A
    // active and is refused.
    store
        .assign_role("model-c", Role::Active, "/models/c")
        .await
        .expect("C active");
    let mut change = pool.begin().await.expect("begin");
    sqlx::query("UPDATE models SET role = 'retired', active_until = now() WHERE model_id = 'model-c'")
        .execute(&mut *change)
        .await
        .expect("retire C");
    sqlx::query("UPDATE models SET role = 'active', active_until = NULL WHERE model_id = $1")
        .bind(MODEL)
        .execute(&mut *change)
        .await
        .expect("A active again");
    let enrolling = {
        let store = store.clone();
        tokio::spawn(async move {
            let one = vec![vec![1.0, 0.0]];
            let mut new = enrollment("g", "during", &one, None);
            new.model_id = "model-c";
            store.enroll(&new, &AUDIT).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !enrolling.is_finished(),
        "the enrolment did not wait for the role change"
    );
    change.commit().await.expect("commit the role change");
    let err = enrolling
        .await
        .expect("task")
        .expect_err("A cannot compare C's templates");
    assert!(
        matches!(&err, StoreError::ModelChanged { model_id, active } if model_id == "model-c" && active == MODEL),
        "{err:?}"
    );
    store
        .get_subject("g", "during")
        .await
        .expect_err("nothing stored");
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
        max_templates: 100,
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
                        max_templates: 100,
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

#[sqlx::test(migrations = "../migrations")]
async fn a_covered_promotion_and_a_conditional_rollback_decide_in_their_transaction(pool: PgPool) {
    let store = store(pool.clone()).await;
    record(&store, "model-c", "space-c", 2, &[]).await;
    let one = vec![vec![1.0, 0.0]];
    store
        .assign_role(MODEL, Role::Active, "/models/a")
        .await
        .expect("A active");
    store
        .enroll(&enrollment("g", "early", &one, None), &AUDIT)
        .await
        .expect("enrol under A");
    store
        .assign_role("model-c", Role::Staged, "/models/c")
        .await
        .expect("C staged");
    let spaces_c = vec!["space-c".to_owned()];
    let roles = |store: Store| async move {
        let roles = store.model_roles().await.expect("roles");
        (roles.active.map(|m| m.model_id), roles.staged.map(|m| m.model_id))
    };
    let (a, c) = (Some(MODEL.to_owned()), Some("model-c".to_owned()));
    // "early" has no template of C: a promotion requiring coverage is
    // refused and changes nothing.
    assert_eq!(
        store
            .promote_staged("model-c", "/models/c", Some(&spaces_c))
            .await
            .expect("promote"),
        Promotion::Uncovered(vec![Coverage {
            gallery_id: "g".to_owned(),
            subjects: 1,
            covered: 0
        }])
    );
    assert_eq!(roles(store.clone()).await, (a.clone(), c.clone()));

    // Another replica, which has not followed the staging, enrols "late"
    // with A alone while "early" gets its template of C (upgrade-templates):
    // the promotion waits for that transaction, holding the active model's
    // row as `Store::enroll` does, and its check then sees "late".
    let mut replica = pool.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM models WHERE role = 'active' FOR SHARE")
        .execute(&mut *replica)
        .await
        .expect("lock the active model");
    let promoting = {
        let (store, spaces) = (store.clone(), spaces_c.clone());
        tokio::spawn(async move { store.promote_staged("model-c", "/models/c", Some(&spaces)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !promoting.is_finished(),
        "the promotion did not wait for the enrolment holding the active model"
    );
    sqlx::query(
        "INSERT INTO templates (template_id, subject, gallery_id, model_id, dimension, embedding)
         SELECT gen_random_uuid(), s.id, 'g', 'model-c', 2, decode('3f80000000000000', 'hex')
         FROM subjects s WHERE s.gallery_id = 'g' AND s.subject_id = 'early'",
    )
    .execute(&mut *replica)
    .await
    .expect("early's template of C");
    sqlx::query(
        "WITH s AS (INSERT INTO subjects (gallery_id, subject_id) VALUES ('g', 'late') RETURNING id)
         INSERT INTO templates (template_id, subject, gallery_id, model_id, dimension, embedding)
         SELECT gen_random_uuid(), s.id, 'g', $1, 2, decode('3f80000000000000', 'hex') FROM s",
    )
    .bind(MODEL)
    .execute(&mut *replica)
    .await
    .expect("late's template of A");
    replica.commit().await.expect("commit");
    assert_eq!(
        promoting.await.expect("task").expect("promote"),
        Promotion::Uncovered(vec![Coverage {
            gallery_id: "g".to_owned(),
            subjects: 2,
            covered: 1
        }])
    );
    assert_eq!(roles(store.clone()).await, (a.clone(), c.clone()));
    // Without "late" it goes through; without the requirement it would
    // have anyway.
    store.delete_subject("g", "late", &AUDIT).await.expect("delete");
    assert_eq!(
        store
            .promote_staged("model-c", "/models/c", Some(&spaces_c))
            .await
            .expect("promote"),
        Promotion::Recorded
    );
    assert_eq!(roles(store.clone()).await, (c.clone(), None));
    assert_eq!(
        store
            .promote_staged("model-c", "/models/c", None)
            .await
            .expect("promote again"),
        Promotion::NotStaged
    );

    // A rollback conditional on a model that is not the active one changes
    // nothing and names the active one; conditional on C it goes back to A,
    // and the same call again (a retry) then changes nothing.
    let spaces_a = vec!["space-a".to_owned()];
    assert_eq!(
        store
            .roll_back_to(MODEL, "/models/a", &spaces_a, Some(MODEL))
            .await
            .expect("rollback"),
        Rollback::NotActive(c.clone())
    );
    assert_eq!(roles(store.clone()).await, (c.clone(), None));
    for expected in [Rollback::Recorded, Rollback::NotActive(a.clone())] {
        assert_eq!(
            store
                .roll_back_to(MODEL, "/models/a", &spaces_a, Some("model-c"))
                .await
                .expect("rollback"),
            expected
        );
        assert_eq!(roles(store.clone()).await, (a.clone(), None));
    }
}
