//! Memory grows with templates, not with the names callers send: 1,000
//! galleries of one 512-d template each, enrolled through a real server,
//! cost less than the one 64 Ki-row chunk a single gallery used to
//! allocate; and the gallery quota stops a caller from inventing more.
//! Alone in its binary, so its resident-memory figures are its own.

mod common;

use common::{TestServer, settings, vm_rss_kib, wait_for_health};
use futures::StreamExt;
use handid_model::{ClipVisionConfig, create_random_checkpoint};
use handid_proto::v1 as pb;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const GALLERIES: usize = 1_000;

#[sqlx::test(migrations = false)]
async fn a_thousand_one_template_galleries_cost_megabytes(_: PgPoolOptions, options: PgConnectOptions) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = ClipVisionConfig {
        output_dim: 512,
        ..ClipVisionConfig::tiny_vit()
    };
    create_random_checkpoint(dir.path(), &config, 3).expect("checkpoint");
    let mut s = settings(&options, dir.path());
    s.limits.max_galleries_per_caller = GALLERIES as u32;
    // A bulk load, as an operator would run it with the rate limit raised;
    // the limit itself is tested in overload.rs.
    s.server.rate_limit_per_second = 0.0;
    let server = TestServer::start(s).await;
    let client = server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let photo = common::people(1, 1).remove(0).1.remove(0);
    let enroll = |gallery: String| {
        let mut client = client.clone();
        let photo = photo.clone();
        async move {
            client
                .enroll(pb::EnrollRequest {
                    gallery_id: gallery,
                    subject_id: "only".to_owned(),
                    images: vec![pb::Image { data: photo }],
                    idempotency_key: String::new(),
                })
                .await
                .map(|r| r.into_inner().model_id)
        }
    };
    // The first gallery warms up every buffer the others reuse.
    enroll("g-0000".to_owned()).await.expect("first enrolment");
    let before = vm_rss_kib();
    let mut pending =
        futures::stream::iter((1..GALLERIES).map(|i| enroll(format!("g-{i:04}")))).buffer_unordered(8);
    while let Some(result) = pending.next().await {
        result.expect("enrol");
    }
    let after = vm_rss_kib();
    let grown_kib = after.saturating_sub(before);
    eprintln!(
        "[memory] {GALLERIES} galleries x 1 template x 512-d: VmRSS {} MiB -> {} MiB (+{} KiB, {} KiB per gallery)",
        before / 1024,
        after / 1024,
        grown_kib,
        grown_kib / GALLERIES as u64
    );
    // One 64 Ki-row chunk of 512 f32 is 128 MiB: the thousand galleries
    // together must cost less than what one used to.
    assert!(
        grown_kib < 128 * 1024,
        "{GALLERIES} galleries grew VmRSS by {grown_kib} KiB"
    );
    // The caller has used its quota: one more name is refused, enrolling
    // into an existing gallery is not.
    let status = enroll("g-extra".to_owned()).await.expect_err("over the quota");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("limits.max_galleries_per_caller"),
        "{}",
        status.message()
    );
    enroll("g-0500".to_owned()).await.expect("an existing gallery");
    server.stop().await.expect("graceful stop");
}
