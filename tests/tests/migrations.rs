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
    .bind(handid_server::store::embedding_bytes(&embedding))
    .execute(&pool)
    .await?;

    let row = sqlx::query(
        "SELECT t.embedding, t.dimension, t.model_id, s.subject_id
         FROM templates t JOIN subjects s ON s.id = t.subject WHERE t.template_id = $1",
    )
    .bind(template_id)
    .fetch_one(&pool)
    .await?;
    // The column's format: each value's float4 binary form, big-endian.
    assert_eq!(
        row.get::<Vec<u8>, _>("embedding"),
        [0x3f, 0, 0, 0, 0xbf, 0, 0, 0, 0x3f, 0, 0, 0, 0xbf, 0, 0, 0]
    );
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
    .bind(handid_server::store::embedding_bytes(&[1.0, 0.0]))
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
    // The one binary column holds a template's float4 values, held by the
    // schema to `dimension` finite values (see the test below).
    assert_eq!(
        binary,
        [("templates".to_owned(), "embedding".to_owned())],
        "columns that could hold images"
    );
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

/// A gallery, a model of `dimension` and a subject to hang templates on.
async fn one_subject(pool: &PgPool, dimension: i32) -> sqlx::Result<i64> {
    sqlx::query("INSERT INTO models (model_id, embedding_space, architecture, embedding_dim) VALUES ('m1', 's', 'tiny', $1)")
        .bind(dimension)
        .execute(pool)
        .await?;
    sqlx::query("INSERT INTO galleries (gallery_id) VALUES ('g')")
        .execute(pool)
        .await?;
    sqlx::query_scalar("INSERT INTO subjects (gallery_id, subject_id) VALUES ('g', 's') RETURNING id")
        .fetch_one(pool)
        .await
}

/// Stores `bytes` as a template of `dimension` values.
async fn store_template(pool: &PgPool, subject: i64, dimension: i32, bytes: &[u8]) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO templates (template_id, subject, gallery_id, model_id, dimension, embedding)
         VALUES ($1, $2, 'g', 'm1', $3, $4)",
    )
    .bind(uuid::Uuid::new_v4())
    .bind(subject)
    .bind(dimension)
    .bind(bytes)
    .execute(pool)
    .await
    .map(drop)
}

#[sqlx::test(migrations = "../migrations")]
async fn the_template_column_holds_only_finite_float4_values(pool: PgPool) -> sqlx::Result<()> {
    let subject = one_subject(&pool, 3).await?;
    let bytes = |values: [u32; 3]| values.iter().flat_map(|v| v.to_be_bytes()).collect::<Vec<u8>>();
    // Finite values, among them the largest, a subnormal and bit patterns
    // that look like a NaN's when read from the wrong offset.
    for finite in [
        [0x7f7f_ffff, 0x0000_0001, 0x8000_0000],
        [0x007f_f800, 0x00ff_ff80, 0x3e80_0000],
        [0xff7f_ffff, 0x7f7f_ff7f, 0xf0ff_c000],
    ] {
        store_template(&pool, subject, 3, &bytes(finite)).await?;
    }
    // A NaN (quiet, signalling, negative) or an infinity anywhere.
    for (at, bad) in [0x7fc0_0000u32, 0x7f80_0001, 0xffc0_0000, 0x7f80_0000, 0xff80_0000]
        .into_iter()
        .enumerate()
    {
        let mut values = [0x3e80_0000; 3];
        values[at % 3] = bad;
        let err = store_template(&pool, subject, 3, &bytes(values))
            .await
            .expect_err("a non-finite value");
        assert!(
            err.to_string().contains("templates_embedding_finite"),
            "{bad:#x}: {err}"
        );
    }
    // Anything but exactly 4 x dimension bytes: a JPEG's first bytes, a
    // value short, one value too many.
    for wrong in [
        vec![0xff, 0xd8, 0xff, 0xe0, 0x00, 0x10, 0x4a, 0x46],
        bytes([0x3e80_0000; 3])[..11].to_vec(),
        [bytes([0x3e80_0000; 3]), vec![0x3e, 0x80, 0, 0]].concat(),
    ] {
        let err = store_template(&pool, subject, 3, &wrong)
            .await
            .expect_err("a wrong length");
        assert!(err.to_string().contains("templates_embedding_dimension"), "{err}");
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM templates")
        .fetch_one(&pool)
        .await?;
    assert_eq!(stored, 3);
    Ok(())
}

#[sqlx::test(migrations = "../migrations")]
async fn side_information_holds_finite_features_of_its_width_and_goes_with_its_template(
    pool: PgPool,
) -> sqlx::Result<()> {
    let subject = one_subject(&pool, 3).await?;
    let one = [0x3e80_0000u32; 3]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect::<Vec<u8>>();
    store_template(&pool, subject, 3, &one).await?;
    let template: uuid::Uuid = sqlx::query_scalar("SELECT template_id FROM templates")
        .fetch_one(&pool)
        .await?;
    let side = |model: String, dimension: i32, feature: Vec<f32>| {
        sqlx::query(
            "INSERT INTO template_side_info (template_id, side_model, dimension, feature)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(template)
        .bind(model)
        .bind(dimension)
        .bind(feature)
        .execute(&pool)
    };
    let model = "a".repeat(64);
    for (feature, dimension, constraint) in [
        (vec![0.5, f32::NAN], 2, "template_side_info_finite"),
        (vec![0.5, f32::INFINITY], 2, "template_side_info_finite"),
        (vec![0.5, 0.25, 0.125], 2, "template_side_info_dimension"),
    ] {
        let err = side(model.clone(), dimension, feature)
            .await
            .expect_err(constraint);
        assert!(err.to_string().contains(constraint), "{err}");
    }
    let err = side("not a model id".to_owned(), 2, vec![0.5, 0.25])
        .await
        .expect_err("a model id");
    assert!(err.to_string().contains("side_model"), "{err}");
    side(model, 2, vec![0.5, 0.25]).await?;
    // The template's deletion (its subject's) takes its side row along.
    sqlx::query("DELETE FROM subjects WHERE id = $1")
        .bind(subject)
        .execute(&pool)
        .await?;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM template_side_info")
        .fetch_one(&pool)
        .await?;
    assert_eq!(left, 0);
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn templates_stored_as_arrays_survive_the_change_to_bytes(pool: PgPool) -> sqlx::Result<()> {
    migrate_before(&pool, 20261202000003).await?;
    let subject = one_subject(&pool, 4).await?;
    let vectors = [
        [0.5f32, -0.25, 1e-40, -0.0],
        [f32::MAX, f32::MIN_POSITIVE, -1.0, 3.0e-39],
        // A value whose bytes read 00000004, the array format's length field.
        [
            f32::from_bits(4),
            f32::from_bits(0x0000_0004_u32.rotate_left(8)),
            0.1,
            0.2,
        ],
    ];
    for vector in &vectors {
        sqlx::query(
            "INSERT INTO templates (template_id, subject, gallery_id, model_id, dimension, embedding)
             VALUES ($1, $2, 'g', 'm1', 4, $3)",
        )
        .bind(uuid::Uuid::new_v4())
        .bind(subject)
        .bind(&vector[..])
        .execute(&pool)
        .await?;
    }
    sqlx::migrate!("../migrations").run(&pool).await?;
    let stored: Vec<Vec<u8>> = sqlx::query_scalar("SELECT embedding FROM templates ORDER BY seq")
        .fetch_all(&pool)
        .await?;
    let expected: Vec<Vec<u8>> = vectors
        .iter()
        .map(|v| handid_server::store::embedding_bytes(v))
        .collect();
    assert_eq!(stored, expected, "every bit of every value kept, in order");
    // The vectors stay in the table's own pages (no TOAST lookups on load),
    // even at the widest embedding the trainer makes (RN50: 1024 values).
    sqlx::query("UPDATE models SET embedding_dim = 1024")
        .execute(&pool)
        .await?;
    store_template(&pool, subject, 1024, &vec![0x3c; 4096]).await?;
    let toast: String = sqlx::query_scalar(
        "SELECT toast.oid::regclass::text FROM pg_class t JOIN pg_class toast ON toast.oid = t.reltoastrelid
         WHERE t.relname = 'templates'",
    )
    .fetch_one(&pool)
    .await?;
    let out_of_line: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {toast}"))
        .fetch_one(&pool)
        .await?;
    assert_eq!(out_of_line, 0, "template values were moved out of line");
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
