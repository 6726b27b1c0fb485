//! The HTTP/JSON gateway against a real server and Postgres: every route
//! answers as its gRPC call does, and every refusal (key, scope, gallery,
//! JSON, size, path, method) comes back with the HTTP status Google's
//! guidelines give its gRPC code, audited like a gRPC call.

mod common;

use std::net::SocketAddr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use common::{TestServer, checkpoint, people, settings};
use handid_proto::v1 as pb;
use handid_server::auth::hash_key;
use handid_server::settings::{ApiKeySettings, Scope};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

const DESK: &str = "hid_desk_key";
const DOOR: &str = "hid_door_key";
const OPS: &str = "hid_ops_key";

fn key(id: &str, key: &str, scopes: &[Scope], galleries: &[&str]) -> ApiKeySettings {
    ApiKeySettings {
        id: id.to_owned(),
        sha256: hash_key(key),
        scopes: scopes.to_vec(),
        galleries: galleries.iter().map(|g| (*g).to_owned()).collect(),
    }
}

/// One HTTP/1.1 request on its own connection: the status and the JSON
/// body (`Null` when the body is not JSON).
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    api_key: Option<&str>,
    body: Option<Vec<u8>>,
) -> (u16, Value) {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    if let Some(key) = api_key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let request = request
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn post(addr: SocketAddr, path: &str, api_key: &str, body: Value) -> (u16, Value) {
    http(
        addr,
        "POST",
        path,
        Some(api_key),
        Some(body.to_string().into_bytes()),
    )
    .await
}

fn image(bytes: &[u8]) -> Value {
    json!({ "data": STANDARD.encode(bytes) })
}

/// The status name and message of a refusal, after checking its HTTP code.
fn refusal(answer: &(u16, Value), http: u16) -> (String, String) {
    assert_eq!(answer.0, http, "{}", answer.1);
    assert_eq!(answer.1["error"]["code"], http, "{}", answer.1);
    (
        answer.1["error"]["status"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        answer.1["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

async fn start(options: &PgConnectOptions) -> (TestServer, SocketAddr, tempfile::TempDir) {
    start_with(options, |_| {}).await
}

/// [`start`], with `adjust` applied to the settings last.
async fn start_with(
    options: &PgConnectOptions,
    adjust: impl FnOnce(&mut handid_server::Settings),
) -> (TestServer, SocketAddr, tempfile::TempDir) {
    let model = checkpoint();
    let mut s = settings(options, model.path());
    s.auth.enabled = true;
    s.auth.keys = vec![
        key("desk", DESK, &[Scope::Enroll, Scope::Identify, Scope::Embed], &[]),
        key("door", DOOR, &[Scope::Identify], &["site-a"]),
        key("ops", OPS, &[Scope::Admin], &[]),
    ];
    s.server.rate_limit_per_second = 0.0;
    s.limits.max_message_bytes = 2 << 20;
    adjust(&mut s);
    let (server, gateway) = TestServer::start_with_gateway(s).await;
    for _ in 0..200 {
        if http(gateway, "GET", "/healthz", None, None).await.0 == 200 {
            return (server, gateway, model);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the gateway never said SERVING");
}

#[sqlx::test(migrations = false)]
async fn every_route_answers_as_its_grpc_call(_pool: PgPoolOptions, options: PgConnectOptions) {
    let (server, gw, _model) = start(&options).await;
    let people = people(3, 2);
    let (p0, p1) = (&people[0].1, &people[1].1);

    let (status, health) = http(gw, "GET", "/healthz", None, None).await;
    assert_eq!((status, health["status"].as_str()), (200, Some("SERVING")));
    let (status, doc) = http(gw, "GET", "/v1/openapi.json", None, None).await;
    assert_eq!(status, 200);
    assert!(doc["paths"]["/v1/galleries/{gallery_id}:identify"]["post"].is_object());

    // Enroll: path fields and a body in the proto3 JSON mapping.
    let enroll = |images: &[Vec<u8>], key: &str| json!({ "images": images.iter().map(|i| image(i)).collect::<Vec<_>>(), "idempotencyKey": key });
    let (status, first) = post(
        gw,
        "/v1/galleries/site-a/subjects/p0:enroll",
        DESK,
        enroll(p0, "k0"),
    )
    .await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["galleryId"], "site-a");
    assert_eq!(first["subjectId"], "p0");
    assert_eq!(first["templateCount"], 2);
    assert_eq!(first["replayed"], false, "defaults are written out");
    let (status, again) = post(
        gw,
        "/v1/galleries/site-a/subjects/p0:enroll",
        DESK,
        enroll(p0, "k0"),
    )
    .await;
    assert_eq!((status, &again["replayed"]), (200, &json!(true)));
    assert_eq!(again["templateIds"], first["templateIds"]);
    let (status, _) = post(
        gw,
        "/v1/galleries/site-a/subjects/p1:enroll",
        DESK,
        enroll(&p1[..1], ""),
    )
    .await;
    assert_eq!(status, 200);

    // Identify: the same answer as the gRPC call.
    let probe = &p0[1];
    let (status, found) = post(
        gw,
        "/v1/galleries/site-a:identify",
        DOOR,
        json!({ "image": image(probe), "topK": 2, "rule": { "threshold": 0.5 } }),
    )
    .await;
    assert_eq!(status, 200, "{found}");
    let mut grpc = server.client().await;
    let mut request = tonic::Request::new(pb::IdentifyRequest {
        gallery_id: "site-a".to_owned(),
        image: Some(pb::Image { data: probe.clone() }),
        top_k: 2,
        rule: Some(pb::DecisionRule {
            rule: Some(pb::decision_rule::Rule::Threshold(0.5)),
        }),
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {DOOR}").parse().expect("metadata"),
    );
    let direct = grpc.identify(request).await.expect("gRPC identify").into_inner();
    assert_eq!(found["candidates"][0]["subjectId"], "p0");
    let direct: Value = serde_json::from_slice(&serde_json::to_vec(&direct).expect("json")).expect("json");
    assert_eq!(found, direct, "gateway and gRPC agree");
    assert_eq!(found["matchedSubjectId"], "p0");
    assert_eq!(found["decision"]["isMatch"], true);
    assert_eq!(found["gallerySize"], 2);

    let (status, verified) = post(
        gw,
        "/v1/galleries/site-a/subjects/p1:verify",
        DOOR,
        json!({ "image": image(&p1[0]), "rule": { "threshold": 0.99 } }),
    )
    .await;
    assert_eq!(status, 200, "{verified}");
    assert_eq!(verified["decision"]["isMatch"], true);
    assert!(verified["score"].as_f64().is_some_and(|s| s > 0.99));

    let (status, embedded) = post(gw, "/v1/images:embed", DESK, json!({ "images": [image(probe)] })).await;
    assert_eq!(status, 200, "{embedded}");
    let dimension = embedded["dimension"].as_u64().expect("dimension") as usize;
    let values = embedded["embeddings"][0]["values"].as_array().expect("values");
    assert_eq!(values.len(), dimension);
    let norm: f64 = values.iter().map(|v| v.as_f64().expect("number").powi(2)).sum();
    assert!((norm - 1.0).abs() < 1e-3, "unit norm, got {norm}");

    // Resources: GET, list with a query string, DELETE.
    let (status, subject) = http(gw, "GET", "/v1/galleries/site-a/subjects/p0", Some(DOOR), None).await;
    assert_eq!(status, 200, "{subject}");
    assert_eq!(subject["subject"]["templates"].as_array().map(Vec::len), Some(2));
    let created = &subject["subject"]["createdAt"];
    let rfc3339 = created.as_str().map(chrono::DateTime::parse_from_rfc3339);
    assert!(matches!(rfc3339, Some(Ok(_))), "RFC 3339: {created}");
    let (status, page) = http(
        gw,
        "GET",
        "/v1/galleries/site-a/subjects?page_size=1",
        Some(DOOR),
        None,
    )
    .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["subjects"][0]["subjectId"], "p0");
    let token = page["nextPageToken"].as_str().expect("token").to_owned();
    let path = format!("/v1/galleries/site-a/subjects?pageSize=1&pageToken={token}");
    let (status, next) = http(gw, "GET", &path, Some(DOOR), None).await;
    assert_eq!(
        (status, &next["subjects"][0]["subjectId"]),
        (200, &json!("p1")),
        "{next}"
    );
    let (status, deleted) = http(gw, "DELETE", "/v1/galleries/site-a/subjects/p1", Some(DESK), None).await;
    assert_eq!(
        (status, &deleted["templatesDeleted"]),
        (200, &json!(1)),
        "{deleted}"
    );
    let (status, gone) = http(gw, "GET", "/v1/galleries/site-a/subjects/p1", Some(DOOR), None).await;
    assert_eq!(refusal(&(status, gone), 404).0, "NOT_FOUND");

    // Admin.
    let (status, model) = http(gw, "GET", "/v1/model", Some(OPS), None).await;
    assert_eq!(status, 200, "{model}");
    let model_id = model["active"]["modelId"].as_str().expect("model id").to_owned();
    assert_eq!(first["modelId"], model_id.as_str());
    let (status, reloaded) = post(gw, "/v1/model:reload", OPS, json!({})).await;
    assert_eq!(status, 200, "{reloaded}");
    assert_eq!(reloaded["loaded"]["modelId"], model_id.as_str());
    assert_eq!(reloaded["staged"], false);
    let promote = post(
        gw,
        "/v1/model:promote",
        OPS,
        json!({ "requireFullCoverage": true }),
    )
    .await;
    assert_eq!(refusal(&promote, 400).0, "FAILED_PRECONDITION");
    let rollback = post(gw, "/v1/model:rollback", OPS, json!({})).await;
    assert_eq!(refusal(&rollback, 400).0, "FAILED_PRECONDITION");
    let settings = post(gw, "/v1/settings:reload", OPS, json!({})).await;
    assert_eq!(refusal(&settings, 400).0, "FAILED_PRECONDITION");

    let (status, dropped) = http(gw, "DELETE", "/v1/galleries/site-a", Some(DESK), None).await;
    assert_eq!(status, 200, "{dropped}");
    assert_eq!(dropped["subjectsDeleted"], 1);
    assert_eq!(dropped["templatesDeleted"], 2);
    server.stop().await.expect("clean stop");
}

#[sqlx::test(migrations = false)]
async fn refusals_carry_the_grpc_code_as_an_http_status(pool: PgPoolOptions, options: PgConnectOptions) {
    let (server, gw, _model) = start(&options).await;
    let photo = &people(1, 1)[0].1[0];
    let identify = json!({ "image": image(photo), "topK": 1, "rule": { "threshold": 0.5 } });
    let path = "/v1/galleries/site-a:identify";

    let none = http(gw, "POST", path, None, Some(identify.to_string().into_bytes())).await;
    assert_eq!(refusal(&none, 401).0, "UNAUTHENTICATED");
    let (code, message) = refusal(&post(gw, path, "hid_wrong", identify.clone()).await, 401);
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("UNAUTHENTICATED", "the API key is not valid")
    );
    // A forbidden gallery, a missing scope.
    let (code, message) = refusal(
        &post(gw, "/v1/galleries/site-b:identify", DOOR, identify.clone()).await,
        403,
    );
    assert_eq!(code, "PERMISSION_DENIED");
    assert!(message.contains("site-b"), "{message}");
    let enroll = json!({ "images": [image(photo)] });
    let (code, message) = refusal(
        &post(gw, "/v1/galleries/site-a/subjects/x:enroll", DOOR, enroll).await,
        403,
    );
    assert_eq!(code, "PERMISSION_DENIED");
    assert!(message.contains("enroll"), "{message}");
    // Admin needs its scope too.
    assert_eq!(
        refusal(&http(gw, "GET", "/v1/model", Some(DESK), None).await, 403).0,
        "PERMISSION_DENIED"
    );

    // Bodies that are not the call's message.
    let malformed = http(gw, "POST", path, Some(DESK), Some(b"{\"topK\": 1,".to_vec())).await;
    let (code, message) = refusal(&malformed, 400);
    assert_eq!(code, "INVALID_ARGUMENT");
    assert!(message.contains("not valid JSON"), "{message}");
    let (code, message) = refusal(
        &post(gw, path, DESK, json!({ "topK": 1, "imagez": {} })).await,
        400,
    );
    assert_eq!(code, "INVALID_ARGUMENT");
    assert!(message.contains("imagez"), "{message}");
    let (_, message) = refusal(&post(gw, path, DESK, json!([1, 2])).await, 400);
    assert!(message.contains("JSON object"), "{message}");
    let contradiction = json!({ "galleryId": "site-b", "image": image(photo), "topK": 1 });
    let (_, message) = refusal(&post(gw, path, DESK, contradiction).await, 400);
    assert!(message.contains("differs from the path"), "{message}");
    let not_base64 = json!({ "image": { "data": "%%%" }, "topK": 1 });
    assert_eq!(
        refusal(&post(gw, path, DESK, not_base64).await, 400).0,
        "INVALID_ARGUMENT"
    );
    // Valid base64 of bytes that are no image: the service's own refusal.
    let garbage = json!({ "image": { "data": STANDARD.encode(vec![7u8; 5000]) }, "topK": 1, "rule": { "threshold": 0.5 } });
    let (code, message) = refusal(&post(gw, path, DESK, garbage).await, 400);
    assert_eq!(code, "INVALID_ARGUMENT");
    assert!(message.contains("image"), "{message}");
    // A value in the wrong place is not quoted back whole.
    let misplaced = json!({ "topK": STANDARD.encode(photo) });
    let (_, message) = refusal(&post(gw, path, DESK, misplaced).await, 400);
    assert!(message.len() < 400, "{message}");
    let top_k = json!({ "image": image(photo), "topK": 0 });
    assert_eq!(
        refusal(&post(gw, path, DESK, top_k).await, 400).0,
        "INVALID_ARGUMENT"
    );

    // Oversize: refused while read (413), and not read at all for a
    // caller without a valid key (401).
    let huge = json!({ "image": { "data": "A".repeat(3 << 20) }, "topK": 1 })
        .to_string()
        .into_bytes();
    let (code, message) = refusal(&http(gw, "POST", path, Some(DESK), Some(huge.clone())).await, 413);
    assert_eq!(code, "OUT_OF_RANGE");
    assert!(message.contains("limits.max_message_bytes"), "{message}");
    assert_eq!(
        refusal(&http(gw, "POST", path, Some("hid_wrong"), Some(huge)).await, 401).0,
        "UNAUTHENTICATED"
    );

    // Paths and methods.
    let (code, message) = refusal(&http(gw, "GET", "/v1/nothing", Some(DESK), None).await, 404);
    assert_eq!(code, "NOT_FOUND");
    assert!(message.contains("/v1/openapi.json"), "{message}");
    let (_, message) = refusal(
        &http(gw, "PUT", "/v1/galleries/site-a/subjects/p", Some(DESK), None).await,
        405,
    );
    assert!(message.contains("GET, DELETE"), "{message}");

    // Audited as the gRPC calls they stand for, refusals included.
    server.stop().await.expect("clean stop");
    let pool = pool.connect_with(options).await.expect("pool");
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT actor, action, outcome FROM audit_log WHERE action = 'identify' ORDER BY id")
            .fetch_all(&pool)
            .await
            .expect("audit rows");
    let seen = |actor: &str, outcome: &str| rows.iter().any(|(a, _, o)| a == actor && o == outcome);
    assert!(seen("unauthenticated", "UNAUTHENTICATED"), "{rows:?}");
    assert!(seen("door", "PERMISSION_DENIED"), "{rows:?}");
    assert!(seen("desk", "INVALID_ARGUMENT"), "{rows:?}");
}

#[sqlx::test(migrations = false)]
async fn the_gateway_and_grpc_share_each_callers_rate_limit(_pool: PgPoolOptions, options: PgConnectOptions) {
    // A burst of 2 calls, refilled at one call a minute.
    let (server, gw, _model) = start_with(&options, |s| {
        s.server.rate_limit_per_second = 1.0 / 60.0;
        s.server.rate_limit_burst = 2;
    })
    .await;
    let mut admin = server.admin().await;
    for _ in 0..2 {
        let mut request = tonic::Request::new(pb::GetModelRequest {});
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {OPS}").parse().expect("metadata"),
        );
        admin.get_model(request).await.expect("within the burst");
    }
    // The burst was spent over gRPC: the gateway's call is the third.
    let (code, message) = refusal(&http(gw, "GET", "/v1/model", Some(OPS), None).await, 429);
    assert_eq!(code, "RESOURCE_EXHAUSTED");
    assert!(message.contains("server.rate_limit_per_second"), "{message}");
    // Another caller has its own bucket (its call reaches the service,
    // which knows no such gallery); health is never counted.
    let other = http(gw, "GET", "/v1/galleries/site-a/subjects", Some(DOOR), None).await;
    assert_eq!(refusal(&other, 404).0, "NOT_FOUND");
    assert_eq!(http(gw, "GET", "/healthz", None, None).await.0, 200);
    server.stop().await.expect("clean stop");
}

/// Sends the head of a POST and `partial`, a part of its body, and waits
/// at most `wait` for the answer's status line; the rest of the body is
/// never sent.
async fn status_before_the_body(
    addr: SocketAddr,
    path: &str,
    api_key: &str,
    partial: &str,
    wait: std::time::Duration,
) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {api_key}\r\n\
         content-type: application/json\r\ncontent-length: 1000000\r\n\r\n{partial}"
    );
    stream.write_all(head.as_bytes()).await.expect("send the head");
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(wait, stream.read(&mut answer))
        .await
        .ok()?
        .expect("read the answer");
    let text = String::from_utf8_lossy(&answer[..n]).into_owned();
    Some(text.lines().next().unwrap_or("").to_owned())
}

#[sqlx::test(migrations = false)]
async fn a_body_is_read_only_once_the_stack_admits_the_call(_pool: PgPoolOptions, options: PgConnectOptions) {
    // A burst of 2 calls, refilled at one call a minute; calls end after 2 s.
    let (server, gw, _model) = start_with(&options, |s| {
        s.server.rate_limit_per_second = 1.0 / 60.0;
        s.server.rate_limit_burst = 2;
        s.server.request_timeout_ms = 2_000;
    })
    .await;
    let path = "/v1/galleries/site-a:identify";
    let wait = std::time::Duration::from_secs(10);
    // The desk's burst is spent; its next call is refused at once, its
    // body (a megabyte announced, a few bytes sent) never read: a caller
    // over its limits cannot make the gateway buffer and parse bodies.
    for _ in 0..2 {
        let (code, _) = post(gw, path, DESK, json!({ "topK": 0 })).await;
        assert_eq!(code, 400, "within the burst: the service's refusal of top_k 0");
    }
    let started = std::time::Instant::now();
    let line = status_before_the_body(gw, path, DESK, "{\"topK\": 1, \"image\": {\"data\": \"", wait)
        .await
        .expect("answered without the body");
    assert!(line.starts_with("HTTP/1.1 429"), "{line}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // Without a key, the same: 401 before the body.
    let line = status_before_the_body(gw, path, "hid_wrong", "{", wait)
        .await
        .expect("answered without the body");
    assert!(line.starts_with("HTTP/1.1 401"), "{line}");
    // An admitted call whose body does not arrive ends with the call's
    // deadline, as a gRPC call's would: the deadline bounds the body too.
    let started = std::time::Instant::now();
    let line = status_before_the_body(gw, path, DOOR, "{\"topK\": 1,", wait)
        .await
        .expect("answered at the deadline");
    assert!(line.starts_with("HTTP/1.1 504"), "{line}");
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(1_900),
        "{:?}",
        started.elapsed()
    );
    server.stop().await.expect("clean stop");
}
