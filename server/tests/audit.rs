//! The audit log through the real server: every mutating or identifying
//! call leaves a row saying who (the key id, the peer as extra), what,
//! which gallery / subject, model, outcome and top score; so does every
//! call refused before the core (UNAUTHENTICATED, PERMISSION_DENIED,
//! INVALID_ARGUMENT, RESOURCE_EXHAUSTED) or given up by its client
//! (CANCELLED); the rows never hold an image; and the table refuses UPDATE,
//! DELETE and TRUNCATE.

mod common;

use common::{TestServer, checkpoint, contains, fingerprints, settings, wait_for_health};
use handid_proto::v1 as pb;
use handid_server::auth::{generate_key, hash_key};
use handid_server::settings::{ApiKeySettings, Scope};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Request;
use tonic_health::pb::health_check_response::ServingStatus;

fn keyed<T>(msg: T, key: &str) -> Request<T> {
    let mut request = Request::new(msg);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().expect("ascii"));
    request
}

type Row = (
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
    Option<f32>,
    Option<String>,
);

#[sqlx::test(migrations = false)]
async fn audit_rows_say_who_did_what_and_never_hold_an_image(
    pool_options: PgPoolOptions,
    options: PgConnectOptions,
) {
    let dir = checkpoint();
    let secret = generate_key();
    let mut s = settings(&options, dir.path());
    s.auth.enabled = true;
    s.auth.keys = vec![ApiKeySettings {
        id: "desk-3".to_owned(),
        sha256: hash_key(&secret),
        scopes: vec![Scope::Identify, Scope::Enroll],
        galleries: Vec::new(),
    }];
    let server = TestServer::start(s).await;
    let mut client = server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let photos = common::people(1, 2).remove(0).1;
    let enrolled = client
        .enroll(keyed(
            pb::EnrollRequest {
                gallery_id: "g".to_owned(),
                subject_id: "alice".to_owned(),
                images: vec![pb::Image {
                    data: photos[0].clone(),
                }],
                idempotency_key: String::new(),
            },
            &secret,
        ))
        .await
        .expect("enroll")
        .into_inner();
    let identified = client
        .identify(keyed(
            pb::IdentifyRequest {
                gallery_id: "g".to_owned(),
                image: Some(pb::Image {
                    data: photos[1].clone(),
                }),
                top_k: 1,
                rule: Some(pb::DecisionRule {
                    rule: Some(pb::decision_rule::Rule::Threshold(-1.0)),
                }),
            },
            &secret,
        ))
        .await
        .expect("identify")
        .into_inner();
    client
        .verify(keyed(
            pb::VerifyRequest {
                gallery_id: "g".to_owned(),
                subject_id: "alice".to_owned(),
                image: Some(pb::Image {
                    data: photos[1].clone(),
                }),
                rule: None,
            },
            &secret,
        ))
        .await
        .expect("verify");
    let missing = client
        .delete_subject(keyed(
            pb::DeleteSubjectRequest {
                gallery_id: "g".to_owned(),
                subject_id: "bob".to_owned(),
            },
            &secret,
        ))
        .await
        .expect_err("no bob");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    client
        .delete_gallery(keyed(
            pb::DeleteGalleryRequest {
                gallery_id: "g".to_owned(),
            },
            &secret,
        ))
        .await
        .expect("delete gallery");

    let pool = pool_options.connect_with(options.clone()).await.expect("pool");
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT actor, action, gallery_id, subject_id, model_id, outcome, top_score, peer
         FROM audit_log ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .expect("audit rows");
    let summary: Vec<(&str, &str, Option<&str>, &str)> = rows
        .iter()
        .map(|r| (r.0.as_str(), r.1.as_str(), r.3.as_deref(), r.5.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            ("desk-3", "enroll", Some("alice"), "ok"),
            ("desk-3", "identify", Some("alice"), "ok"),
            ("desk-3", "verify", Some("alice"), "ok"),
            ("desk-3", "delete_subject", None, "NOT_FOUND"),
            ("desk-3", "delete_gallery", None, "ok"),
        ]
    );
    for row in &rows {
        assert_eq!(row.2.as_deref(), Some("g"), "{row:?}");
        assert_eq!(row.4.as_deref(), Some(enrolled.model_id.as_str()), "{row:?}");
        assert!(
            row.7.as_deref().is_some_and(|p| p.starts_with("127.0.0.1:")),
            "{row:?}"
        );
    }
    let top = identified.candidates[0].score;
    assert!((rows[1].6.expect("identify top score") - top).abs() < 1e-6);
    assert!(rows[2].6.is_some(), "verify records its score");

    // No column of any row holds the image, in any spelling.
    let texts: Vec<(String,)> = sqlx::query_as("SELECT row_to_json(a)::text FROM audit_log a")
        .fetch_all(&pool)
        .await
        .expect("rows as json");
    let all: Vec<u8> = texts.iter().flat_map(|(t,)| t.bytes()).collect();
    for photo in &photos {
        for needle in fingerprints(photo) {
            assert!(!contains(&all, &needle), "an audit row holds image bytes");
        }
    }
    assert!(
        texts.iter().all(|(t,)| t.len() < 1_000),
        "an audit row is suspiciously large"
    );

    // Append-only: the database itself refuses to rewrite history.
    for sql in [
        "UPDATE audit_log SET actor = 'someone-else'",
        "UPDATE audit_log SET peer = NULL",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ] {
        let err = sqlx::query(sql).execute(&pool).await.expect_err(sql);
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM audit_log")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(count, 5);
    server.stop().await.expect("graceful stop");
}

#[sqlx::test(migrations = false)]
async fn refused_and_cancelled_calls_leave_rows_too(pool_options: PgPoolOptions, options: PgConnectOptions) {
    let dir = checkpoint();
    let (desk, site, flood, door) = (generate_key(), generate_key(), generate_key(), generate_key());
    let mut s = settings(&options, dir.path());
    s.auth.enabled = true;
    let key = |id: &str, key: &str, scopes: &[Scope], galleries: &[&str]| ApiKeySettings {
        id: id.to_owned(),
        sha256: hash_key(key),
        scopes: scopes.to_vec(),
        galleries: galleries.iter().map(|g| (*g).to_owned()).collect(),
    };
    s.auth.keys = vec![
        key("desk-3", &desk, &[Scope::Identify, Scope::Enroll], &[]),
        key("site-g", &site, &[Scope::Identify, Scope::Embed], &["g"]),
        key("flood", &flood, &[Scope::Identify], &[]),
        key("door", &door, &[Scope::Identify], &[]),
    ];
    // Two calls per key, then RESOURCE_EXHAUSTED for a long while.
    s.server.rate_limit_per_second = 0.01;
    s.server.rate_limit_burst = 2;
    // An image call waits this long for its batch: time to cancel it.
    s.batch.max_wait_ms = 3_000;
    s.batch.wait_when_idle = true;
    s.batch.max_batch_size = 64;
    let server = TestServer::start(s).await;
    let mut client = server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let photo = common::people(1, 1).remove(0).1.remove(0);
    let identify = |gallery: &str| pb::IdentifyRequest {
        gallery_id: gallery.to_owned(),
        image: Some(pb::Image { data: photo.clone() }),
        top_k: 1,
        rule: None,
    };
    let mut expected = Vec::new();
    let mut expect = |got: tonic::Status, code: tonic::Code, actor: &str, action: &str, outcome: &str| {
        assert_eq!(got.code(), code, "{actor} {action}: {got:?}");
        expected.push((actor.to_owned(), action.to_owned(), outcome.to_owned()));
    };

    // No key, an unknown key: UNAUTHENTICATED, nobody named.
    let got = client.identify(identify("g")).await.expect_err("no key");
    expect(
        got,
        tonic::Code::Unauthenticated,
        "unauthenticated",
        "identify",
        "UNAUTHENTICATED",
    );
    let got = client
        .delete_gallery(keyed(
            pb::DeleteGalleryRequest {
                gallery_id: "g".to_owned(),
            },
            &generate_key(),
        ))
        .await
        .expect_err("unknown key");
    expect(
        got,
        tonic::Code::Unauthenticated,
        "unauthenticated",
        "delete_gallery",
        "UNAUTHENTICATED",
    );
    // A scope the key lacks; a gallery outside its list; Embed for a key
    // held to galleries: PERMISSION_DENIED, the key named.
    let got = client
        .embed(keyed(
            pb::EmbedRequest {
                images: vec![pb::Image { data: photo.clone() }],
            },
            &desk,
        ))
        .await
        .expect_err("no embed scope");
    expect(
        got,
        tonic::Code::PermissionDenied,
        "desk-3",
        "embed",
        "PERMISSION_DENIED",
    );
    let got = client
        .identify(keyed(identify("other"), &site))
        .await
        .expect_err("other gallery");
    expect(
        got,
        tonic::Code::PermissionDenied,
        "site-g",
        "identify",
        "PERMISSION_DENIED",
    );
    let got = client
        .embed(keyed(
            pb::EmbedRequest {
                images: vec![pb::Image { data: photo.clone() }],
            },
            &site,
        ))
        .await
        .expect_err("embed held to galleries");
    expect(
        got,
        tonic::Code::PermissionDenied,
        "site-g",
        "embed",
        "PERMISSION_DENIED",
    );
    // Invalid requests: INVALID_ARGUMENT.
    let got = client
        .identify(keyed(identify("no such gallery!"), &desk))
        .await
        .expect_err("bad gallery id");
    expect(
        got,
        tonic::Code::InvalidArgument,
        "desk-3",
        "identify",
        "INVALID_ARGUMENT",
    );
    let got = client
        .enroll(keyed(
            pb::EnrollRequest {
                gallery_id: "g".to_owned(),
                subject_id: "alice".to_owned(),
                images: Vec::new(),
                idempotency_key: String::new(),
            },
            &desk,
        ))
        .await
        .expect_err("no images");
    expect(
        got,
        tonic::Code::InvalidArgument,
        "desk-3",
        "enroll",
        "INVALID_ARGUMENT",
    );
    // Past the rate: RESOURCE_EXHAUSTED (the first two are invalid too).
    for _ in 0..2 {
        let got = client
            .identify(keyed(identify(""), &flood))
            .await
            .expect_err("no gallery id");
        expect(
            got,
            tonic::Code::InvalidArgument,
            "flood",
            "identify",
            "INVALID_ARGUMENT",
        );
    }
    let got = client
        .identify(keyed(identify("g"), &flood))
        .await
        .expect_err("rate");
    expect(
        got,
        tonic::Code::ResourceExhausted,
        "flood",
        "identify",
        "RESOURCE_EXHAUSTED",
    );
    // A call its client gives up on before the answer: CANCELLED.
    let gave_up = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        client.identify(keyed(identify("g"), &door)),
    )
    .await;
    assert!(gave_up.is_err(), "answered before its batch was due: {gave_up:?}");
    expected.push(("door".to_owned(), "identify".to_owned(), "CANCELLED".to_owned()));

    // Stopping writes out the queued rows.
    server.stop().await.expect("graceful stop");
    let pool = pool_options.connect_with(options.clone()).await.expect("pool");
    let rows: Vec<(String, String, String, Option<String>)> =
        sqlx::query_as("SELECT actor, action, outcome, peer FROM audit_log ORDER BY id")
            .fetch_all(&pool)
            .await
            .expect("audit rows");
    assert!(
        rows.iter()
            .all(|(.., peer)| peer.as_deref().is_some_and(|p| p.starts_with("127.0.0.1:"))),
        "{rows:?}"
    );
    let mut got: Vec<(String, String, String)> = rows.into_iter().map(|(a, b, c, _)| (a, b, c)).collect();
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
}

#[sqlx::test(migrations = false)]
async fn refusals_past_their_budget_are_counted_not_recorded(
    pool_options: PgPoolOptions,
    options: PgConnectOptions,
) {
    let dir = checkpoint();
    let desk = generate_key();
    let mut s = settings(&options, dir.path());
    s.auth.enabled = true;
    s.auth.keys = vec![ApiKeySettings {
        id: "desk".to_owned(),
        sha256: hash_key(&desk),
        scopes: vec![Scope::Identify],
        galleries: Vec::new(),
    }];
    // Three refusals per address (or key), then one every 100 s.
    s.server.rate_limit_per_second = 0.01;
    s.server.rate_limit_burst = 3;
    let server = TestServer::start(s).await;
    let mut client = server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let get = || pb::GetSubjectRequest {
        gallery_id: "g".to_owned(),
        subject_id: "s".to_owned(),
    };
    // A caller without a key: three rows, then refusals that leave none,
    // so a flood cannot fill the log or crowd out other rows.
    let mut codes = Vec::new();
    for _ in 0..8 {
        let status = client.get_subject(get()).await.expect_err("no key");
        if status.code() == tonic::Code::ResourceExhausted {
            assert!(
                status.message().contains("too many refused calls from 127.0.0.1"),
                "{}",
                status.message()
            );
        }
        codes.push(status.code());
    }
    assert_eq!(codes[..3], [tonic::Code::Unauthenticated; 3]);
    assert_eq!(codes[3..], [tonic::Code::ResourceExhausted; 5]);
    // A valid key from the same address is not held by them.
    let status = client
        .get_subject(keyed(get(), &desk))
        .await
        .expect_err("no such gallery, or no scope for it");
    assert!(
        !matches!(
            status.code(),
            tonic::Code::ResourceExhausted | tonic::Code::Unauthenticated
        ),
        "{status:?}"
    );
    server.stop().await.expect("graceful stop");
    let pool = pool_options.connect_with(options.clone()).await.expect("pool");
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT actor, outcome FROM audit_log ORDER BY id")
        .fetch_all(&pool)
        .await
        .expect("audit rows");
    let unauthenticated = rows
        .iter()
        .filter(|(actor, _)| actor == "unauthenticated")
        .count();
    assert_eq!(unauthenticated, 3, "{rows:?}");
    assert!(
        rows.iter().all(|(_, outcome)| outcome != "RESOURCE_EXHAUSTED"),
        "{rows:?}"
    );
}
