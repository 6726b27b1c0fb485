//! The protection stack under load: calls beyond the concurrency limit are
//! refused at once (and memory stays bounded), slow calls hit the request
//! timeout, a key past its rate is refused (and a default rate limit holds
//! without any setting), a key past its own concurrency limit is refused
//! while others are served, oversized messages are refused.

mod common;

use std::time::{Duration, Instant};

use common::{TestServer, checkpoint, settings, vm_rss_kib, wait_for_health};
use futures::StreamExt;
use handid_proto::v1 as pb;
use handid_server::auth::{generate_key, hash_key};
use handid_server::settings::{ApiKeySettings, Scope};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::{Code, Request};
use tonic_health::pb::health_check_response::ServingStatus;

fn identify(gallery: &str, image: Vec<u8>) -> pb::IdentifyRequest {
    pb::IdentifyRequest {
        gallery_id: gallery.to_owned(),
        image: Some(pb::Image { data: image }),
        top_k: 1,
        rule: Some(pb::DecisionRule {
            rule: Some(pb::decision_rule::Rule::Threshold(0.0)),
        }),
    }
}

#[sqlx::test(migrations = false)]
async fn load_beyond_the_limit_is_shed_at_once_and_memory_stays_bounded(
    _: PgPoolOptions,
    options: PgConnectOptions,
) {
    let dir = checkpoint();
    let mut s = settings(&options, dir.path());
    s.server.max_concurrent_requests = 2;
    // Every admitted Identify waits this long for a batch to fill: slow calls.
    s.batch.max_wait_ms = 400;
    s.batch.wait_when_idle = true;
    s.batch.max_batch_size = 64;
    let server = TestServer::start(s).await;
    let client = server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let photos = common::people(1, 2).remove(0).1;
    client
        .clone()
        .enroll(pb::EnrollRequest {
            gallery_id: "g".to_owned(),
            subject_id: "a".to_owned(),
            images: vec![pb::Image {
                data: photos[0].clone(),
            }],
            idempotency_key: String::new(),
        })
        .await
        .expect("enroll");

    // 50 slow calls at once on one connection, limit 2.
    let started = Instant::now();
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let mut client = client.clone();
            let probe = photos[1].clone();
            tokio::spawn(async move {
                let began = Instant::now();
                let code = match client.identify(identify("g", probe)).await {
                    Ok(_) => Code::Ok,
                    Err(status) => {
                        if status.code() == Code::ResourceExhausted {
                            assert!(
                                status.message().contains("limit of 2 concurrent calls"),
                                "{status:?}"
                            );
                        }
                        status.code()
                    }
                };
                (code, began.elapsed())
            })
        })
        .collect();
    let results = tokio::time::timeout(Duration::from_secs(20), futures::future::join_all(calls))
        .await
        .expect("no call may hang");
    let total = started.elapsed();
    let results: Vec<(Code, Duration)> = results.into_iter().map(|r| r.expect("task")).collect();
    let refused: Vec<Duration> = results
        .iter()
        .filter(|(c, _)| *c == Code::ResourceExhausted)
        .map(|(_, d)| *d)
        .collect();
    let served = results.iter().filter(|(c, _)| *c == Code::Ok).count();
    assert_eq!(
        refused.len() + served,
        50,
        "only OK or RESOURCE_EXHAUSTED: {results:?}"
    );
    assert!(
        refused.len() >= 40,
        "{} of 50 refused: {results:?}",
        refused.len()
    );
    assert!(served >= 2, "the admitted calls complete: {results:?}");
    let mut sorted = refused.clone();
    sorted.sort();
    let median = sorted[sorted.len() / 2];
    // A refusal costs no batch wait (400 ms): it is answered at once.
    assert!(
        median < Duration::from_millis(150),
        "median refusal took {median:?}"
    );
    eprintln!(
        "[overload] 50 calls, limit 2: {} refused (median {median:?}, max {:?}), {served} served, all done in {total:?}",
        refused.len(),
        sorted.last().copied().unwrap_or_default()
    );

    // A burst of large (256 KiB) requests: refused or rejected quickly, and
    // nothing of them is kept. A warm-up round first, so allocator arenas
    // and connection buffers are already in the baseline.
    let burst = |round: usize| {
        let client = client.clone();
        async move {
            let calls: Vec<_> = (0..100)
                .map(|i| {
                    let mut client = client.clone();
                    let junk: Vec<u8> = (0..256 * 1024).map(|j| (j * 31 + i * 7 + round) as u8).collect();
                    tokio::spawn(async move { client.identify(identify("g", junk)).await.map(|_| ()) })
                })
                .collect();
            for call in futures::future::join_all(calls).await {
                let code = call
                    .expect("task")
                    .expect_err("garbage is never identified")
                    .code();
                assert!(
                    matches!(code, Code::ResourceExhausted | Code::InvalidArgument),
                    "{code:?}"
                );
            }
        }
    };
    burst(0).await;
    let before = vm_rss_kib();
    for round in 1..=10 {
        burst(round).await;
    }
    let after = vm_rss_kib();
    eprintln!(
        "[overload] VmRSS before {} MiB, after 1000 calls x 256 KiB: {} MiB",
        before / 1024,
        after / 1024
    );
    // 250 MiB went through; a leak of even a tenth of it would show.
    assert!(
        after.saturating_sub(before) < 64 * 1024,
        "VmRSS grew from {before} KiB to {after} KiB"
    );
    server.stop().await.expect("graceful stop");
}

#[sqlx::test(migrations = false)]
async fn a_call_past_the_request_timeout_gets_deadline_exceeded(_: PgPoolOptions, options: PgConnectOptions) {
    let dir = checkpoint();
    let mut s = settings(&options, dir.path());
    s.server.request_timeout_ms = 300;
    // The batch waits far longer than the timeout.
    s.batch.max_wait_ms = 3_000;
    s.batch.wait_when_idle = true;
    s.batch.max_batch_size = 64;
    let server = TestServer::start(s).await;
    let mut client = server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let photo = common::people(1, 1).remove(0).1.remove(0);
    let started = Instant::now();
    let status = client
        .embed(pb::EmbedRequest {
            images: vec![pb::Image { data: photo }],
        })
        .await
        .expect_err("slower than the timeout");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("300 ms"), "{}", status.message());
    assert!(
        started.elapsed() < Duration::from_millis(2_500),
        "{:?}",
        started.elapsed()
    );
    server.stop().await.expect("graceful stop");
}

#[sqlx::test(migrations = false)]
async fn each_key_has_its_own_rate_limit(_: PgPoolOptions, options: PgConnectOptions) {
    let dir = checkpoint();
    let (busy, quiet) = (generate_key(), generate_key());
    let mut s = settings(&options, dir.path());
    s.auth.enabled = true;
    s.auth.keys = [("busy", &busy), ("quiet", &quiet)]
        .into_iter()
        .map(|(id, key)| ApiKeySettings {
            id: id.to_owned(),
            sha256: hash_key(key),
            scopes: vec![Scope::Embed],
            galleries: Vec::new(),
        })
        .collect();
    s.server.rate_limit_per_second = 0.2;
    s.server.rate_limit_burst = 3;
    let server = TestServer::start(s).await;
    let client = server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let photo = common::people(1, 1).remove(0).1.remove(0);
    let embed = |key: &str| {
        let mut request = Request::new(pb::EmbedRequest {
            images: vec![pb::Image { data: photo.clone() }],
        });
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().expect("ascii"));
        let mut client = client.clone();
        async move { client.embed(request).await.map(|_| ()) }
    };
    for i in 0..3 {
        embed(&busy)
            .await
            .unwrap_or_else(|e| panic!("call {i} within the burst: {e:?}"));
    }
    let status = embed(&busy).await.expect_err("past the burst");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("rate limit")
            && status.message().contains("busy")
            && status.message().contains("server.rate_limit_per_second"),
        "{}",
        status.message()
    );
    embed(&quiet)
        .await
        .expect("another key is not limited by the first");
    server.stop().await.expect("graceful stop");
}

#[sqlx::test(migrations = false)]
async fn a_default_rate_limit_holds_without_any_setting(_: PgPoolOptions, options: PgConnectOptions) {
    let defaults = handid_server::Settings::default();
    assert_eq!(defaults.server.rate_limit_per_second, 100.0);
    assert_eq!(defaults.server.rate_limit_burst, 200);
    let dir = checkpoint();
    // The test settings leave the rate limit at its default; auth is off,
    // so the limit counts by peer address.
    let s = settings(&options, dir.path());
    assert_eq!(s.server.rate_limit_per_second, 100.0);
    let server = TestServer::start(s).await;
    let client = server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    // 600 cheap calls (no image: refused by validation) as fast as the
    // server takes them, 32 at a time (within the per-caller concurrency
    // limit): well past a burst of 200 plus 100 a second.
    let started = Instant::now();
    let calls: Vec<_> = futures::stream::iter((0..600).map(|_| {
        let mut client = client.clone();
        async move { client.embed(pb::EmbedRequest { images: Vec::new() }).await }
    }))
    .buffer_unordered(32)
    .collect()
    .await;
    let mut limited = 0;
    let mut admitted = 0;
    for call in calls {
        let status = call.expect_err("no image");
        match status.code() {
            Code::InvalidArgument => admitted += 1,
            Code::ResourceExhausted => {
                assert!(
                    status
                        .message()
                        .contains("rate limit of 100 calls per second (burst 200)")
                        && status.message().contains("server.rate_limit_per_second"),
                    "{}",
                    status.message()
                );
                limited += 1;
            }
            other => panic!("{other:?}: {status:?}"),
        }
    }
    let elapsed = started.elapsed();
    eprintln!(
        "[overload] 600 calls in {elapsed:?} with the default rate limit: {admitted} admitted, {limited} limited"
    );
    // The bucket holds 200 and refills at 100 a second.
    let most = 200 + (elapsed.as_secs_f64() * 100.0).ceil() as usize + 1;
    assert!(admitted >= 200, "{admitted} admitted");
    assert!(
        admitted <= most,
        "{admitted} admitted in {elapsed:?}, at most {most}"
    );
    assert!(limited > 0, "none limited in {elapsed:?}");
    server.stop().await.expect("graceful stop");
}

#[sqlx::test(migrations = false)]
async fn a_key_past_its_own_concurrency_limit_is_refused_while_others_are_served(
    _: PgPoolOptions,
    options: PgConnectOptions,
) {
    let dir = checkpoint();
    let (busy, quiet) = (generate_key(), generate_key());
    let mut s = settings(&options, dir.path());
    s.auth.enabled = true;
    s.auth.keys = [("busy", &busy), ("quiet", &quiet)]
        .into_iter()
        .map(|(id, key)| ApiKeySettings {
            id: id.to_owned(),
            sha256: hash_key(key),
            scopes: vec![Scope::Embed],
            galleries: Vec::new(),
        })
        .collect();
    s.server.max_concurrent_per_caller = 1;
    // Every Embed waits this long for its batch to fill: a slow call.
    s.batch.max_wait_ms = 1_500;
    s.batch.wait_when_idle = true;
    s.batch.max_batch_size = 64;
    let server = TestServer::start(s).await;
    let client = server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let photo = common::people(1, 1).remove(0).1.remove(0);
    let embed = |key: &str| {
        let mut request = Request::new(pb::EmbedRequest {
            images: vec![pb::Image { data: photo.clone() }],
        });
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().expect("ascii"));
        let mut client = client.clone();
        async move { client.embed(request).await.map(|_| ()) }
    };
    // One slow call of "busy" in flight...
    let first = tokio::spawn(embed(&busy));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...so its second is refused at once, naming the setting...
    let began = Instant::now();
    let status = embed(&busy).await.expect_err("a second call in flight");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("busy") && status.message().contains("server.max_concurrent_per_caller"),
        "{}",
        status.message()
    );
    assert!(
        began.elapsed() < Duration::from_millis(500),
        "{:?}",
        began.elapsed()
    );
    // ...while another key is served meanwhile.
    embed(&quiet).await.expect("another key has its own limit");
    first.await.expect("task").expect("the first call completes");
    // Its slot is back once the call ends.
    embed(&busy).await.expect("the limit counts calls in flight only");
    server.stop().await.expect("graceful stop");
}

#[sqlx::test(migrations = false)]
async fn a_message_over_the_size_limit_is_refused(_: PgPoolOptions, options: PgConnectOptions) {
    let dir = checkpoint();
    let mut s = settings(&options, dir.path());
    s.limits.max_message_bytes = 1 << 20;
    s.limits.max_image_bytes = 1 << 20;
    let server = TestServer::start(s).await;
    let mut client = server.client().await.max_encoding_message_size(8 << 20);
    wait_for_health(&server, ServingStatus::Serving).await;
    let status = client
        .identify(identify("g", vec![7u8; 2 << 20]))
        .await
        .expect_err("2 MiB over a 1 MiB limit");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    server.stop().await.expect("graceful stop");
}
