//! The initial migration applies on a real PostgreSQL and its schema does what
//! it promises: templates round-trip, no column can hold an image, the audit
//! log is append-only. Each test gets a fresh database (`#[sqlx::test]`).

use sqlx::{PgPool, Row};

#[sqlx::test(migrations = "../migrations")]
async fn a_template_row_round_trips(pool: PgPool) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO models (model_id, embedding_space, architecture, embedding_dim) VALUES ('m1', 'space-a', 'ViT-B/16', 4)")
        .execute(&pool)
        .await?;
    sqlx::query("INSERT INTO galleries (gallery_id) VALUES ('site-1')")
        .execute(&pool)
        .await?;
    let subject: i64 = sqlx::query_scalar(
        "INSERT INTO subjects (gallery_id, subject_id) VALUES ('site-1', 'alice') RETURNING id",
    )
    .fetch_one(&pool)
    .await?;
    let embedding = vec![0.5f32, -0.5, 0.5, -0.5];
    let template_id = uuid::Uuid::new_v4();
    sqlx::query(
        "INSERT INTO templates (template_id, subject, gallery_id, model_id, dimension, embedding)
         VALUES ($1, $2, 'site-1', 'm1', 4, $3)",
    )
    .bind(template_id)
    .bind(subject)
    .bind(&embedding)
    .execute(&pool)
    .await?;

    let row = sqlx::query(
        "SELECT t.embedding, t.dimension, t.model_id, s.subject_id
         FROM templates t JOIN subjects s ON s.id = t.subject WHERE t.template_id = $1",
    )
    .bind(template_id)
    .fetch_one(&pool)
    .await?;
    assert_eq!(row.get::<Vec<f32>, _>("embedding"), embedding);
    assert_eq!(row.get::<i32, _>("dimension"), 4);
    assert_eq!(row.get::<String, _>("model_id"), "m1");
    assert_eq!(row.get::<String, _>("subject_id"), "alice");

    // A vector whose length disagrees with its declared dimension is refused.
    let wrong = sqlx::query(
        "INSERT INTO templates (template_id, subject, gallery_id, model_id, dimension, embedding)
         VALUES ($1, $2, 'site-1', 'm1', 4, $3)",
    )
    .bind(uuid::Uuid::new_v4())
    .bind(subject)
    .bind(vec![1.0f32, 0.0])
    .execute(&pool)
    .await;
    assert!(wrong.is_err(), "a 2-d vector was stored as 4-d");

    // Deleting the subject erases its templates.
    sqlx::query("DELETE FROM subjects WHERE id = $1")
        .bind(subject)
        .execute(&pool)
        .await?;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM templates")
        .fetch_one(&pool)
        .await?;
    assert_eq!(left, 0);
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn no_column_can_hold_image_bytes(pool: PgPool) -> sqlx::Result<()> {
    let binary: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text FROM information_schema.columns
         WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations'
           AND (data_type = 'bytea' OR column_name ILIKE '%image%')",
    )
    .fetch_all(&pool)
    .await?;
    assert!(binary.is_empty(), "columns that could hold images: {binary:?}");
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await?;
    for expected in [
        "audit_log",
        "enrollments",
        "galleries",
        "models",
        "subjects",
        "templates",
    ] {
        assert!(
            tables.iter().any(|t| t == expected),
            "table {expected} missing: {tables:?}"
        );
    }
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn the_audit_log_is_append_only(pool: PgPool) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO audit_log (actor, action, gallery_id, outcome, top_score) VALUES ('key-1', 'identify', 'g', 'ok', 0.9)")
        .execute(&pool)
        .await?;
    for statement in [
        "UPDATE audit_log SET outcome = 'forged'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ] {
        let err = sqlx::query(statement).execute(&pool).await.expect_err(statement);
        assert!(err.to_string().contains("append-only"), "{statement}: {err}");
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log")
        .fetch_one(&pool)
        .await?;
    assert_eq!(rows, 1);
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn ids_are_validated_by_the_schema(pool: PgPool) -> sqlx::Result<()> {
    for bad in ["", "has space", "semi;colon"] {
        let r = sqlx::query("INSERT INTO galleries (gallery_id) VALUES ($1)")
            .bind(bad)
            .execute(&pool)
            .await;
        assert!(r.is_err(), "gallery id {bad:?} accepted");
    }
    Ok(())
}

/// Applies the migrations older than `before` (a version) from a copy of
/// the folder, as a database created by an earlier release has them.
async fn migrate_before(pool: &PgPool, before: i64) -> sqlx::Result<()> {
    let all = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(&all).expect("migrations") {
        let path = entry.expect("entry").path();
        let name = path.file_name().expect("name").to_string_lossy().into_owned();
        let version: i64 = name
            .split('_')
            .next()
            .and_then(|v| v.parse().ok())
            .expect("version");
        if version < before {
            std::fs::copy(&path, dir.path().join(&name)).expect("copy");
        }
    }
    sqlx::migrate::Migrator::new(dir.path()).await?.run(pool).await?;
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn enrolments_stored_before_keys_were_scoped_survive_the_migration(pool: PgPool) -> sqlx::Result<()> {
    migrate_before(&pool, 20261201000004).await?;
    sqlx::query("INSERT INTO models (model_id, embedding_space, architecture, embedding_dim) VALUES ('m1', 's', 'tiny', 2)")
        .execute(&pool)
        .await?;
    sqlx::query("INSERT INTO galleries (gallery_id) VALUES ('g')")
        .execute(&pool)
        .await?;
    let subject: i64 =
        sqlx::query_scalar("INSERT INTO subjects (gallery_id, subject_id) VALUES ('g', 's') RETURNING id")
            .fetch_one(&pool)
            .await?;
    sqlx::query("INSERT INTO enrollments (idempotency_key, subject) VALUES ('old-key', $1)")
        .bind(subject)
        .execute(&pool)
        .await?;
    sqlx::query(
        "INSERT INTO templates (template_id, subject, gallery_id, model_id, dimension, embedding, idempotency_key)
         VALUES ($1, $2, 'g', 'm1', 2, '{0.6,0.8}', 'old-key')",
    )
    .bind(uuid::Uuid::new_v4())
    .bind(subject)
    .execute(&pool)
    .await?;
    // The rest, as the new release applies it.
    sqlx::migrate!("../migrations").run(&pool).await?;
    let (caller, gallery, digest): (String, String, Option<String>) =
        sqlx::query_as("SELECT caller, gallery_id, content_sha256 FROM enrollments")
            .fetch_one(&pool)
            .await?;
    assert_eq!((caller.as_str(), gallery.as_str(), digest), ("", "g", None));
    let linked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM templates t JOIN enrollments e ON e.id = t.enrollment WHERE e.idempotency_key = 'old-key'",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(linked, 1, "the template still belongs to its enrolment");
    // Erasing the subject still erases both.
    sqlx::query("DELETE FROM subjects").execute(&pool).await?;
    let left: (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM enrollments), (SELECT count(*) FROM templates)")
            .fetch_one(&pool)
            .await?;
    assert_eq!(left, (0, 0));
    Ok(())
}
