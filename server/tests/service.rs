//! The gRPC service end to end: a real server (`handid_server::run` on
//! 127.0.0.1:0), a fresh Postgres database per test, a tiny random
//! checkpoint and synthetic JPEG photos.

mod common;

use std::collections::HashMap;

use common::{
    TestServer, checkpoint, contains, fingerprints, logs, offline_embedding, pg_dump, settings,
    wait_for_health,
};
use handid_model::{Device, Embedder};
use handid_proto::v1::admin_client::AdminClient;
use handid_proto::v1::{self as pb, decision_rule::Rule};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

fn image(data: Vec<u8>) -> pb::Image {
    pb::Image { data }
}

fn enroll_request(gallery: &str, subject: &str, images: &[Vec<u8>], key: &str) -> pb::EnrollRequest {
    pb::EnrollRequest {
        gallery_id: gallery.to_owned(),
        subject_id: subject.to_owned(),
        images: images.iter().cloned().map(image).collect(),
        idempotency_key: key.to_owned(),
    }
}

fn identify_request(gallery: &str, probe: &[u8], top_k: u32, rule: Option<Rule>) -> pb::IdentifyRequest {
    pb::IdentifyRequest {
        gallery_id: gallery.to_owned(),
        image: Some(image(probe.to_vec())),
        top_k,
        rule: rule.map(|r| pb::DecisionRule { rule: Some(r) }),
    }
}

/// Six people with four photos each: three enrolled, one held out as a probe.
fn people() -> Vec<(String, Vec<Vec<u8>>)> {
    common::people(6, 4)
}

/// The offline Identify: every template scored by one matrix product,
/// best per subject, ties by enrolment order.
fn offline_identify(
    gallery: &[(String, Vec<f32>)], // (subject, embedding) in enrolment order
    probe: &[f32],
    k: usize,
) -> Vec<(String, f32)> {
    let dim = probe.len() as i64;
    let flat: Vec<f32> = gallery.iter().flat_map(|(_, e)| e.iter().copied()).collect();
    // [n, dim] @ [dim] -> [n]
    let matrix = tch::Tensor::from_slice(&flat).view([gallery.len() as i64, dim]);
    let scores: Vec<f32> = Vec::try_from(&matrix.mv(&tch::Tensor::from_slice(probe))).expect("scores");
    let mut best: Vec<(String, f32, usize)> = Vec::new();
    for (i, ((subject, _), score)) in gallery.iter().zip(scores).enumerate() {
        match best.iter_mut().find(|b| &b.0 == subject) {
            Some(b) => b.1 = b.1.max(score),
            None => best.push((subject.clone(), score, i)),
        }
    }
    best.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.2.cmp(&b.2)));
    best.into_iter().take(k).map(|(s, score, _)| (s, score)).collect()
}

#[sqlx::test(migrations = false)]
async fn round_trips_match_the_offline_computation(_: PgPoolOptions, options: PgConnectOptions) {
    let dir = checkpoint();
    let mut config = settings(&options, dir.path());
    // One image per forward pass, as the offline reference computes it, so
    // the comparison below can be exact to 1e-6 (batching changes the float
    // summation order at that level; the batcher's own tests cover it).
    config.batch.max_batch_size = 1;
    let server = TestServer::start(config.clone()).await;
    let mut client = server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let embedder = Embedder::load(dir.path(), Device::Cpu).expect("offline embedder");
    let model_id = embedder.model_id().to_owned();

    let mut admin = AdminClient::connect(format!("http://{}", server.addr))
        .await
        .expect("admin");
    let model = admin
        .get_model(pb::GetModelRequest {})
        .await
        .expect("get model")
        .into_inner();
    let active = model.active.expect("active model");
    assert_eq!(active.model_id, model_id);
    assert_eq!(active.embedding_dim, 16);
    assert_eq!(active.device, "cpu");
    assert_eq!(active.operating_points.len(), 3);
    // An empty path reloads the active model's own folder: same model.
    let reload = admin
        .reload_model(pb::ReloadModelRequest::default())
        .await
        .expect("reload of the same folder")
        .into_inner();
    assert_eq!(reload.loaded.expect("loaded").model_id, model_id);
    assert!(!reload.staged);

    // Gallery "site-a": six people, three photos each, enrolled in two calls
    // (2 + 1) to check templates accumulate. "site-b": two of them again.
    let people = people();
    assert_eq!(people.len(), 6, "the sample has six people with four photos");
    let mut payloads: Vec<Vec<u8>> = Vec::new();
    let mut site_a: Vec<(String, Vec<f32>)> = Vec::new();
    let mut enrolled_ids: HashMap<String, Vec<String>> = HashMap::new();
    for (i, (person, photos)) in people.iter().enumerate() {
        let subject = format!("person-{person}");
        let images: Vec<Vec<u8>> = photos[..3].to_vec();
        let first = client
            .enroll(enroll_request("site-a", &subject, &images[..2], ""))
            .await
            .expect("enroll")
            .into_inner();
        assert_eq!(first.template_ids.len(), 2);
        assert_eq!(first.template_count, 2);
        assert_eq!(first.model_id, model_id);
        assert!(!first.replayed);
        let second = client
            .enroll(enroll_request("site-a", &subject, &images[2..], ""))
            .await
            .expect("enroll")
            .into_inner();
        assert_eq!(second.template_count, 3);
        enrolled_ids.insert(
            subject.clone(),
            [first.template_ids, second.template_ids].concat(),
        );
        for bytes in &images {
            site_a.push((subject.clone(), offline_embedding(&embedder, bytes)));
        }
        if i < 2 {
            client
                .enroll(enroll_request("site-b", &subject, &images[..1], ""))
                .await
                .expect("enroll site-b");
        }
        payloads.extend(images);
    }

    // Identify: the held-out photo of each person, against the offline search.
    let mut matched_self = 0;
    for (person, photos) in &people {
        let probe = photos[3].clone();
        let reference = offline_identify(&site_a, &offline_embedding(&embedder, &probe), 4);
        let got = client
            .identify(identify_request("site-a", &probe, 4, Some(Rule::Threshold(-1.0))))
            .await
            .expect("identify")
            .into_inner();
        assert_eq!(got.model_id, model_id);
        assert_eq!(got.gallery_size, 6);
        assert_eq!(got.candidates.len(), 4);
        for (rank, (c, (subject, score))) in got.candidates.iter().zip(&reference).enumerate() {
            assert_eq!(&c.subject_id, subject, "rank {rank}");
            assert_eq!(c.rank as usize, rank + 1);
            assert!((c.score - score).abs() <= 1e-6, "{} vs {score}", c.score);
        }
        let decision = got.decision.expect("decision");
        assert!(decision.is_match, "threshold -1 always matches");
        assert_eq!(got.matched_subject_id, got.candidates[0].subject_id);
        matched_self += usize::from(got.candidates[0].subject_id == format!("person-{person}"));
        payloads.push(probe);
    }
    // Random weights identify nobody reliably; the count only shows up in
    // the log for whoever runs this with a trained checkpoint.
    eprintln!("random model, rank-1 hits: {matched_self}/6");

    // Decision rules: the manifest's thresholds.
    let probe = people[0].1[3].clone();
    let top = client
        .identify(identify_request("site-a", &probe, 1, None))
        .await
        .expect("identify")
        .into_inner();
    let d = top.decision.expect("decision");
    assert_eq!((d.threshold, d.fmr), (0.8, 1e-3), "default rule: FMR 1e-3");
    assert_eq!(d.is_match, top.candidates[0].score >= 0.8);
    assert_eq!(top.matched_subject_id.is_empty(), !d.is_match);
    let at_1e4 = client
        .identify(identify_request("site-a", &probe, 1, Some(Rule::TargetFmr(1e-4))))
        .await
        .expect("identify")
        .into_inner();
    assert_eq!(at_1e4.decision.expect("decision").threshold, 0.95);

    // Galleries are separate populations.
    let b = client
        .identify(identify_request("site-b", &probe, 10, None))
        .await
        .expect("identify site-b")
        .into_inner();
    assert_eq!(b.gallery_size, 2);
    assert!(
        b.candidates
            .iter()
            .all(|c| c.subject_id == format!("person-{}", people[0].0)
                || c.subject_id == format!("person-{}", people[1].0))
    );

    // Verify: the subject's best template score, as offline.
    let subject = format!("person-{}", people[1].0);
    let probe_embedding = offline_embedding(&embedder, &probe);
    let want = site_a
        .iter()
        .filter(|(s, _)| *s == subject)
        .map(|(_, e)| e.iter().zip(&probe_embedding).map(|(a, b)| a * b).sum::<f32>())
        .fold(f32::NEG_INFINITY, f32::max);
    let verified = client
        .verify(pb::VerifyRequest {
            gallery_id: "site-a".to_owned(),
            subject_id: subject.clone(),
            image: Some(image(probe.clone())),
            rule: Some(pb::DecisionRule {
                rule: Some(Rule::Threshold(want - 1e-3)),
            }),
        })
        .await
        .expect("verify")
        .into_inner();
    assert!(
        (verified.score - want).abs() <= 1e-6,
        "{} vs {want}",
        verified.score
    );
    assert!(verified.decision.expect("decision").is_match);
    assert_eq!(verified.model_id, model_id);

    // Embed: the normalised vectors, stored nowhere.
    let embedded = client
        .embed(pb::EmbedRequest {
            images: vec![image(probe.clone()), image(payloads[0].clone())],
        })
        .await
        .expect("embed")
        .into_inner();
    assert_eq!(embedded.dimension, 16);
    assert_eq!(embedded.model_id, model_id);
    for (got, bytes) in embedded.embeddings.iter().zip([&probe, &payloads[0]]) {
        let want = offline_embedding(&embedder, bytes);
        assert!(got.values.iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-6));
    }

    // GetSubject lists the templates in enrolment order.
    let record = client
        .get_subject(pb::GetSubjectRequest {
            gallery_id: "site-a".to_owned(),
            subject_id: subject.clone(),
        })
        .await
        .expect("get subject")
        .into_inner();
    let ids: Vec<String> = record
        .subject
        .expect("subject")
        .templates
        .iter()
        .map(|t| t.template_id.clone())
        .collect();
    assert_eq!(ids, enrolled_ids[&subject]);

    // ListSubjects, two per page, by subject id.
    let mut listed = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_subjects(pb::ListSubjectsRequest {
                gallery_id: "site-a".to_owned(),
                page_size: 4,
                page_token: token,
            })
            .await
            .expect("list")
            .into_inner();
        assert_eq!(page.model_id, model_id);
        assert!(page.subjects.iter().all(|s| s.templates.len() == 3));
        // The same records as GetSubject: timestamps included.
        assert!(
            page.subjects
                .iter()
                .all(|s| s.created_at.is_some() && s.templates.iter().all(|t| t.created_at.is_some()))
        );
        listed.extend(page.subjects.into_iter().map(|s| s.subject_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut all: Vec<String> = enrolled_ids.keys().cloned().collect();
    all.sort();
    assert_eq!(listed, all);

    // Idempotent retries return the first result.
    let extra = people[2].1[3].clone();
    let key_request = enroll_request(
        "site-a",
        "late-comer",
        std::slice::from_ref(&extra),
        "retry-key-1",
    );
    let first = client
        .enroll(key_request.clone())
        .await
        .expect("enroll")
        .into_inner();
    let retry = client.enroll(key_request).await.expect("retry").into_inner();
    assert!(retry.replayed && !first.replayed);
    assert_eq!(retry.template_ids, first.template_ids);
    assert_eq!(retry.template_count, 1);
    let misuse = client
        .enroll(enroll_request(
            "site-a",
            "someone-else",
            std::slice::from_ref(&extra),
            "retry-key-1",
        ))
        .await
        .expect_err("key reused for another subject");
    assert_eq!(misuse.code(), Code::AlreadyExists);

    // Erasure: the subject leaves the database and the index.
    let deleted = client
        .delete_subject(pb::DeleteSubjectRequest {
            gallery_id: "site-a".to_owned(),
            subject_id: subject.clone(),
        })
        .await
        .expect("delete subject")
        .into_inner();
    assert_eq!(deleted.templates_deleted, 3);
    let after = client
        .identify(identify_request("site-a", &probe, 10, None))
        .await
        .expect("identify")
        .into_inner();
    assert_eq!(after.gallery_size, 6, "five people and the late comer");
    assert!(after.candidates.iter().all(|c| c.subject_id != subject));
    let gone = client
        .get_subject(pb::GetSubjectRequest {
            gallery_id: "site-a".to_owned(),
            subject_id: subject.clone(),
        })
        .await
        .expect_err("erased");
    assert_eq!(gone.code(), Code::NotFound);
    let erased = client
        .delete_gallery(pb::DeleteGalleryRequest {
            gallery_id: "site-b".to_owned(),
        })
        .await
        .expect("delete gallery")
        .into_inner();
    assert_eq!((erased.subjects_deleted, erased.templates_deleted), (2, 2));
    let gone = client
        .identify(identify_request("site-b", &probe, 1, None))
        .await
        .expect_err("deleted gallery");
    assert_eq!(gone.code(), Code::NotFound);

    // A restarted server loads the same index from Postgres.
    let before = client
        .identify(identify_request("site-a", &probe, 10, None))
        .await
        .expect("identify")
        .into_inner();
    server.stop().await.expect("graceful stop");
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let reloaded = client
        .identify(identify_request("site-a", &probe, 10, None))
        .await
        .expect("identify after restart")
        .into_inner();
    assert_eq!(reloaded.candidates.len(), before.candidates.len());
    for (a, b) in reloaded.candidates.iter().zip(&before.candidates) {
        assert_eq!((&a.subject_id, a.rank), (&b.subject_id, b.rank));
        assert!((a.score - b.score).abs() <= 1e-6);
    }
    server.stop().await.expect("graceful stop");

    // The audit log saw every call: who, what, outcome, never an image.
    let db = PgPoolOptions::new()
        .connect_with(options.clone())
        .await
        .expect("connect");
    let outcomes: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT action, outcome, count(*) FROM audit_log GROUP BY 1, 2 ORDER BY 1, 2")
            .fetch_all(&db)
            .await
            .expect("audit rows");
    let count = |action: &str, outcome: &str| {
        outcomes
            .iter()
            .find(|(a, o, _)| a == action && o == outcome)
            .map_or(0, |r| r.2)
    };
    assert_eq!(count("enroll", "ok"), 6 * 2 + 2 + 2, "{outcomes:?}");
    assert_eq!(count("enroll", "ALREADY_EXISTS"), 1, "{outcomes:?}");
    assert_eq!(count("identify", "NOT_FOUND"), 1, "{outcomes:?}");
    assert_eq!(count("delete_subject", "ok"), 1, "{outcomes:?}");
    let scored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE action = 'identify' AND top_score IS NOT NULL",
    )
    .fetch_one(&db)
    .await
    .expect("scores");
    assert!(scored >= 6, "identify rows carry their top score");
    db.close().await;

    // No photo byte reached the database or the logs.
    let dump = pg_dump(&options);
    assert!(
        contains(&dump, b"CREATE TABLE public.templates"),
        "the dump is real"
    );
    let logs = logs();
    assert!(
        contains(&logs, b"gallery indexes loaded"),
        "the log capture is real"
    );
    for payload in &payloads {
        for print in fingerprints(payload) {
            assert!(!contains(&dump, &print), "image bytes in the database dump");
            assert!(!contains(&logs, &print), "image bytes in the logs");
        }
    }
}

#[sqlx::test(migrations = false)]
async fn bad_requests_get_their_status_codes(_: PgPoolOptions, options: PgConnectOptions) {
    let dir = checkpoint();
    let server = TestServer::start(settings(&options, dir.path())).await;
    let mut client = server.client().await;
    let good = people()[0].1[0].clone();
    client
        .enroll(enroll_request("g", "known", std::slice::from_ref(&good), ""))
        .await
        .expect("enroll");

    let truncated = good[..good.len() / 2].to_vec();
    let too_many_bytes = vec![0xFFu8; (1 << 20) + 1];
    // 1200 x 1000 pixels is over the 1 M pixel limit, yet a few KB as PNG.
    let mut big = Vec::new();
    image::RgbImage::new(1200, 1000)
        .write_to(&mut std::io::Cursor::new(&mut big), image::ImageFormat::Png)
        .expect("encode png");
    let bad_images: [(&str, Vec<u8>, &str); 5] = [
        (
            "not an image",
            b"definitely not a JPEG".to_vec(),
            "not a decodable image",
        ),
        ("truncated JPEG", truncated.clone(), "not a decodable image"),
        ("zero bytes", Vec::new(), "empty"),
        ("over max bytes", too_many_bytes, "over the limit of 1048576"),
        ("over the pixel limit", big, "1200x1000 pixels"),
    ];
    for (what, bytes, says) in &bad_images {
        for status in [
            client
                .enroll(enroll_request("g", "s", &[good.clone(), bytes.clone()], ""))
                .await
                .expect_err(what),
            client
                .identify(identify_request("g", bytes, 1, None))
                .await
                .expect_err(what),
        ] {
            assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
            assert!(status.message().contains(says), "{what}: {}", status.message());
        }
    }
    // The refused enrolments stored nothing.
    let s = client
        .get_subject(pb::GetSubjectRequest {
            gallery_id: "g".to_owned(),
            subject_id: "s".to_owned(),
        })
        .await
        .expect_err("never enrolled");
    assert_eq!(s.code(), Code::NotFound);

    let cases: Vec<(&str, tonic::Status, Code)> = vec![
        (
            "empty gallery id",
            client
                .identify(identify_request("", &good, 1, None))
                .await
                .expect_err("x"),
            Code::InvalidArgument,
        ),
        (
            "malformed subject id",
            client
                .enroll(enroll_request("g", "no spaces", std::slice::from_ref(&good), ""))
                .await
                .expect_err("x"),
            Code::InvalidArgument,
        ),
        (
            "no images",
            client
                .enroll(enroll_request("g", "s", &[], ""))
                .await
                .expect_err("x"),
            Code::InvalidArgument,
        ),
        (
            "too many images",
            client
                .enroll(enroll_request("g", "s", &vec![good.clone(); 5], ""))
                .await
                .expect_err("x"),
            Code::InvalidArgument,
        ),
        (
            "top_k 0",
            client
                .identify(identify_request("g", &good, 0, None))
                .await
                .expect_err("x"),
            Code::InvalidArgument,
        ),
        (
            "top_k over the limit",
            client
                .identify(identify_request("g", &good, 11, None))
                .await
                .expect_err("x"),
            Code::InvalidArgument,
        ),
        (
            "uncalibrated FMR",
            client
                .identify(identify_request("g", &good, 1, Some(Rule::TargetFmr(0.5))))
                .await
                .expect_err("x"),
            Code::InvalidArgument,
        ),
        (
            "unknown gallery",
            client
                .identify(identify_request("nope", &good, 1, None))
                .await
                .expect_err("x"),
            Code::NotFound,
        ),
        (
            "unknown subject",
            client
                .verify(pb::VerifyRequest {
                    gallery_id: "g".to_owned(),
                    subject_id: "stranger".to_owned(),
                    image: Some(image(good.clone())),
                    rule: None,
                })
                .await
                .expect_err("x"),
            Code::NotFound,
        ),
        (
            "delete an unknown subject",
            client
                .delete_subject(pb::DeleteSubjectRequest {
                    gallery_id: "g".to_owned(),
                    subject_id: "stranger".to_owned(),
                })
                .await
                .expect_err("x"),
            Code::NotFound,
        ),
        (
            "a forged page token",
            client
                .list_subjects(pb::ListSubjectsRequest {
                    gallery_id: "g".to_owned(),
                    page_size: 0,
                    page_token: "known".to_owned(),
                })
                .await
                .expect_err("x"),
            Code::InvalidArgument,
        ),
    ];
    for (what, status, code) in cases {
        assert_eq!(status.code(), code, "{what}: {status:?}");
    }
    server.stop().await.expect("graceful stop");

    let dump = pg_dump(&options);
    let logs = logs();
    for payload in [&good, &truncated] {
        for print in fingerprints(payload) {
            assert!(!contains(&dump, &print), "image bytes in the database dump");
            assert!(!contains(&logs, &print), "image bytes in the logs");
        }
    }
}

#[sqlx::test(migrations = false)]
async fn concurrent_calls_share_forward_passes(_: PgPoolOptions, options: PgConnectOptions) {
    let dir = checkpoint();
    let mut config = settings(&options, dir.path());
    config.batch.max_batch_size = 8;
    config.batch.max_wait_ms = 50;
    config.batch.wait_when_idle = true;
    let server = TestServer::start(config).await;
    let client = server.client().await;
    let embedder = Embedder::load(dir.path(), Device::Cpu).expect("offline embedder");
    let photos: Vec<Vec<u8>> = common::people(8, 1).into_iter().flat_map(|(_, p)| p).collect();
    // Eight concurrent Embed calls, one bad: it alone fails.
    let calls = photos.iter().enumerate().map(|(i, bytes)| {
        let mut client = client.clone();
        let data = if i == 3 { b"junk".to_vec() } else { bytes.clone() };
        tokio::spawn(async move {
            client
                .embed(pb::EmbedRequest {
                    images: vec![image(data)],
                })
                .await
        })
    });
    let results = futures::future::join_all(calls).await;
    for (i, result) in results.into_iter().enumerate() {
        let result = result.expect("task");
        if i == 3 {
            assert_eq!(result.expect_err("junk").code(), Code::InvalidArgument);
            continue;
        }
        let got = result.expect("embed").into_inner().embeddings.remove(0).values;
        let want = offline_embedding(&embedder, &photos[i]);
        // Batched with others: equal to the single-image pass up to float
        // summation order.
        assert!(
            got.iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-5),
            "call {i}"
        );
    }
    let batched = String::from_utf8_lossy(&logs())
        .lines()
        .filter_map(|l| l.split("batch_size=").nth(1))
        .filter_map(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .unwrap_or(0);
    assert!(batched > 1, "no forward pass ever held more than one image");
    server.stop().await.expect("graceful stop");
}

#[sqlx::test(migrations = false)]
async fn shutdown_drains_in_flight_calls(_: PgPoolOptions, options: PgConnectOptions) {
    let dir = checkpoint();
    let mut config = settings(&options, dir.path());
    // The call waits in the batcher for company while shutdown begins.
    config.batch.max_wait_ms = 500;
    config.batch.wait_when_idle = true;
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    // Serving first: a call sent while the server still starts would sit in
    // the listen backlog, not in the batcher, and be reset by the shutdown.
    wait_for_health(&server, ServingStatus::Serving).await;
    let photo = people()[0].1[0].clone();
    let call = tokio::spawn(async move {
        client
            .embed(pb::EmbedRequest {
                images: vec![image(photo)],
            })
            .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    assert!(
        !call.is_finished(),
        "the call should still be waiting in the batcher"
    );
    server.stop().await.expect("graceful stop");
    let answered = call
        .await
        .expect("task")
        .expect("the in-flight call was answered");
    assert_eq!(answered.into_inner().embeddings.len(), 1);
}

#[sqlx::test(migrations = false)]
async fn a_subject_holds_at_most_its_template_quota(_: PgPoolOptions, options: PgConnectOptions) {
    let dir = checkpoint();
    let mut s = settings(&options, dir.path());
    s.limits.max_images_per_request = 2;
    s.limits.max_templates_per_subject = 3;
    let server = TestServer::start(s).await;
    let mut client = server.client().await;
    let person = people().remove(0).1;
    let two = [person[0].clone(), person[1].clone()];
    client
        .enroll(enroll_request("g", "p", &two, ""))
        .await
        .expect("two templates");
    // Two more would make four: refused whole, nothing stored, naming the
    // setting; one more fits.
    let status = client
        .enroll(enroll_request("g", "p", &two, ""))
        .await
        .expect_err("over the quota");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    for says in [
        "\"p\"",
        "holds 2 templates",
        "at most 3",
        "limits.max_templates_per_subject",
    ] {
        assert!(
            status.message().contains(says),
            "{says:?} in {}",
            status.message()
        );
    }
    let held = |r: pb::GetSubjectResponse| r.subject.map_or(0, |s| s.templates.len());
    let get = pb::GetSubjectRequest {
        gallery_id: "g".to_owned(),
        subject_id: "p".to_owned(),
    };
    assert_eq!(
        held(client.get_subject(get.clone()).await.expect("get").into_inner()),
        2
    );
    client
        .enroll(enroll_request("g", "p", std::slice::from_ref(&person[2]), ""))
        .await
        .expect("the third template");
    assert_eq!(held(client.get_subject(get).await.expect("get").into_inner()), 3);
    // Another subject has its own quota.
    client
        .enroll(enroll_request("g", "q", &two, ""))
        .await
        .expect("another subject");
    // A quota below one Enroll's images cannot be configured.
    let mut s = settings(&options, dir.path());
    s.limits.max_templates_per_subject = 1;
    let refused = s.validate().expect_err("below max_images_per_request");
    assert!(
        refused.to_string().contains("limits.max_templates_per_subject"),
        "{refused}"
    );
    server.stop().await.expect("clean stop");
}
