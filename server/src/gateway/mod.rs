//! The HTTP/JSON gateway: the gRPC API as REST resources
//! ([`routes::ROUTES`]), bodies in the proto3 JSON mapping.
//!
//! No call is implemented twice. A request is turned into the gRPC request
//! it stands for (its JSON into the protobuf message, its `Authorization`
//! or `x-api-key` header into metadata, its connection into the same
//! connection info tonic gives) and sent, in process, through the same
//! protection stack and services as the gRPC listener's calls: the same
//! keys and scopes, the same rate and concurrency limits (shared, not a
//! second allowance), the same deadlines, the same audit rows. The gRPC
//! status comes back as the HTTP status Google's API guidelines give it
//! (`google.rpc.Code`), with a JSON body `{"error": {"code", "status",
//! "message"}}`.
//!
//! The body is read and translated *inside* that stack, by [`Translate`],
//! its innermost service: a caller is authenticated, rate-limited and given
//! one of the server's concurrency slots before a byte of its body is read,
//! as tonic reads a gRPC message only once the stack has admitted the call.
//! A caller whose key is refused gets its refusal without its body being
//! read at all, and the call's deadline bounds the body's arrival.
//!
//! One limit is the gateway's own: a body larger than the largest gRPC
//! message could be once base64-encoded is refused (413) while it is read.
//! The JSON is decoded straight into the protobuf message (no tree of the
//! whole document), so a body costs memory in proportion to its bytes.

pub mod openapi;
pub mod routes;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::value::RawValue;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tonic::Code;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};

use crate::layers::ProtectionLayer;
use routes::{Found, Route};

/// The gRPC services alone, as [`Translate`] calls them.
pub type Services =
    BoxCloneSyncService<http::Request<Full<Bytes>>, http::Response<tonic::body::Body>, Infallible>;

/// [`Translate`] and the services behind the protection stack, as the
/// gateway calls them: a request for a gRPC path whose body is still the
/// HTTP request's, and a [`Payload`] saying what it holds.
pub type Protected = BoxCloneSyncService<http::Request<Body>, http::Response<tonic::body::Body>, Infallible>;

/// The path of the gRPC health check, asked by `/healthz`.
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// What the handlers share.
#[derive(Debug)]
pub struct Gateway {
    grpc: Protected,
    openapi: Bytes,
}

impl Gateway {
    /// A gateway calling `services` through `protection` (the gRPC
    /// listener's stack, whose limits it shares), with [`Translate`]
    /// innermost: bodies are refused past the base64 size of
    /// `max_message_bytes`.
    pub fn new(protection: &ProtectionLayer, services: Services, max_message_bytes: usize) -> Self {
        let translate = Translate {
            services,
            max_body_bytes: max_body_bytes(max_message_bytes),
            max_message_bytes,
        };
        Self {
            grpc: BoxCloneSyncService::new(protection.layer(translate)),
            openapi: Bytes::from(openapi::document().to_string()),
        }
    }

    /// The axum application.
    pub fn router(self: Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route("/healthz", axum::routing::get(health))
            .route("/v1/openapi.json", axum::routing::get(openapi_document))
            .fallback(call)
            .with_state(self)
    }
}

/// The largest body: a message of `max_message_bytes` whose bytes are all
/// base64 text (4 characters per 3 bytes), plus room for the JSON around
/// them.
fn max_body_bytes(max_message_bytes: usize) -> usize {
    max_message_bytes
        .div_ceil(3)
        .saturating_mul(4)
        .saturating_add(64 * 1024)
}

/// A refusal as the gateway answers it.
#[derive(Debug, Clone)]
pub struct Refusal {
    http: StatusCode,
    code: Code,
    message: String,
}

impl Refusal {
    fn new(http: StatusCode, code: Code, message: impl Into<String>) -> Self {
        Self {
            http,
            code,
            message: message.into(),
        }
    }

    fn from_status(status: &tonic::Status) -> Self {
        Self::new(http_status(status.code()), status.code(), status.message())
    }

    /// The refusal as a gRPC answer, for the layers above [`Translate`] to
    /// see (the audit row records its code) and the gateway to turn back
    /// into this refusal, HTTP status included.
    fn into_grpc(self) -> http::Response<tonic::body::Body> {
        let mut response = tonic::Status::new(self.code, self.message).into_http();
        response.extensions_mut().insert(HttpStatus(self.http));
        response
    }
}

/// The HTTP status of a refusal [`Translate`] made, which may be more
/// precise than its gRPC code's (413, 415).
#[derive(Debug, Clone, Copy)]
struct HttpStatus(StatusCode);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": {
                "code": self.http.as_u16(),
                "status": crate::audit::code_name(self.code),
                "message": self.message,
            }
        });
        json_response(self.http, body.to_string().into())
    }
}

fn json_response(status: StatusCode, body: Bytes) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The HTTP status of a gRPC code (google.rpc.Code's mapping).
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

async fn openapi_document(State(gateway): State<Arc<Gateway>>) -> Response {
    json_response(StatusCode::OK, gateway.openapi.clone())
}

/// `/healthz`: the gRPC health check's answer for the whole server; 200
/// when SERVING, 503 otherwise.
async fn health(State(gateway): State<Arc<Gateway>>, request: Request) -> Response {
    let (parts, _) = request.into_parts();
    let answer = gateway
        .unary(
            HEALTH_CHECK,
            &parts.headers,
            parts.extensions,
            Payload::Message(Bytes::new()),
            Body::empty(),
        )
        .await;
    let serving = answer
        .ok()
        .and_then(|bytes| {
            <tonic_health::pb::HealthCheckResponse as prost::Message>::decode(bytes.as_ref()).ok()
        })
        .map(|r| r.status() == tonic_health::pb::health_check_response::ServingStatus::Serving);
    let (status, text) = match serving {
        Some(true) => (StatusCode::OK, "SERVING"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING"),
    };
    json_response(status, serde_json::json!({ "status": text }).to_string().into())
}

/// Every resource of [`routes::ROUTES`].
async fn call(State(gateway): State<Arc<Gateway>>, request: Request) -> Response {
    match gateway.route(request).await {
        Ok(response) => response,
        Err(refusal) => refusal.into_response(),
    }
}

impl Gateway {
    async fn route(&self, request: Request) -> Result<Response, Refusal> {
        let (parts, body) = request.into_parts();
        let (route, fields) = match routes::find(&parts.method, parts.uri.path()) {
            Found::Route(route, fields) => (route, fields),
            Found::WrongMethod(allowed) => {
                let allowed: Vec<&str> = allowed.iter().map(http::Method::as_str).collect();
                return Err(Refusal::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    Code::Unimplemented,
                    format!(
                        "{} is not served here; this resource takes {}",
                        parts.method,
                        allowed.join(", ")
                    ),
                ));
            }
            Found::Nothing => {
                return Err(Refusal::new(
                    StatusCode::NOT_FOUND,
                    Code::NotFound,
                    format!(
                        "no resource at {}; the API's resources are listed at /v1/openapi.json",
                        parts.uri.path()
                    ),
                ));
            }
        };
        // Only what the headers and the path say is looked at here; the
        // body is read by `Translate`, once the stack has admitted the call.
        let payload = if route.body {
            Payload::Json {
                route,
                fields,
                content_type: parts.headers.get(header::CONTENT_TYPE).cloned(),
                declared: parts
                    .headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok()),
            }
        } else {
            Payload::Query {
                route,
                fields,
                query: parts.uri.query().unwrap_or("").to_owned(),
            }
        };
        let bytes = self
            .unary(route.grpc, &parts.headers, parts.extensions, payload, body)
            .await?;
        let json = (route.encode)(&bytes).map_err(|e| {
            tracing::error!(method = route.grpc, error = %e, "a response could not be written as JSON");
            Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                Code::Internal,
                "the response could not be written as JSON",
            )
        })?;
        Ok(json_response(StatusCode::OK, json.into()))
    }

    /// One unary call through the protection stack: the request's body and
    /// what it holds in, the response message's bytes or the call's
    /// refusal out.
    async fn unary(
        &self,
        path: &'static str,
        headers: &HeaderMap,
        extensions: http::Extensions,
        payload: Payload,
        body: Body,
    ) -> Result<Bytes, Refusal> {
        let mut request = http::Request::new(body);
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = http::Uri::from_static(path);
        *request.extensions_mut() = extensions;
        request.extensions_mut().insert(payload);
        let grpc_headers = request.headers_mut();
        grpc_headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        grpc_headers.insert(header::TE, HeaderValue::from_static("trailers"));
        // Only the credentials cross over: no other header of the HTTP
        // request can become gRPC metadata.
        for name in [header::AUTHORIZATION.as_str(), "x-api-key"] {
            for value in headers.get_all(name) {
                grpc_headers.append(name, value.clone());
            }
        }
        let Ok(response) = self.grpc.clone().oneshot(request).await;
        let (parts, body) = response.into_parts();
        if let Some(status) = tonic::Status::from_header_map(&parts.headers)
            && status.code() != Code::Ok
        {
            return Err(match parts.extensions.get::<HttpStatus>() {
                Some(HttpStatus(http)) => Refusal::new(*http, status.code(), status.message()),
                None => Refusal::from_status(&status),
            });
        }
        let internal = |message: String| Refusal::from_status(&tonic::Status::internal(message));
        let collected = body
            .collect()
            .await
            .map_err(|e| internal(format!("reading the response: {e}")))?;
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let data = collected.to_bytes();
        match tonic::Status::from_header_map(&trailers) {
            Some(status) if status.code() != Code::Ok => Err(Refusal::from_status(&status)),
            _ => match (data.first(), data.get(5..)) {
                (Some(0), Some(message)) => Ok(data.slice(5..5 + message.len())),
                _ => Err(internal("the service answered without a message".to_owned())),
            },
        }
    }
}

/// What [`Translate`] makes of a call's body; the gateway puts it in the
/// request's extensions.
#[derive(Debug, Clone)]
enum Payload {
    /// The body is the route's JSON object (POST); the path's fields go
    /// into it. The request's own `Content-Type` and `Content-Length`,
    /// which the gRPC request's headers replace.
    Json {
        route: &'static Route,
        fields: Vec<(&'static str, String)>,
        content_type: Option<HeaderValue>,
        declared: Option<u64>,
    },
    /// The fields are the query string's (GET, DELETE), with the path's.
    Query {
        route: &'static Route,
        fields: Vec<(&'static str, String)>,
        query: String,
    },
    /// The call's protobuf message, whole (the health check's).
    Message(Bytes),
}

/// The innermost service of the gateway's stack: turns the admitted call's
/// [`Payload`] and body into the protobuf message and calls the service.
/// A body that is not the call's message is refused here, after the
/// layers above have admitted (and will audit) the call.
#[derive(Clone)]
pub struct Translate {
    services: Services,
    max_body_bytes: usize,
    max_message_bytes: usize,
}

impl std::fmt::Debug for Translate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Translate")
            .field("max_body_bytes", &self.max_body_bytes)
            .finish_non_exhaustive()
    }
}

/// Bodies larger than this are decoded on the blocking pool, not on the
/// runtime's threads (tens of megabytes of JSON take a while).
const BLOCKING_DECODE_BYTES: usize = 256 * 1024;

impl tower::Service<http::Request<Body>> for Translate {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.translate(request).await) })
    }
}

impl Translate {
    async fn translate(self, request: http::Request<Body>) -> http::Response<tonic::body::Body> {
        let (mut parts, body) = request.into_parts();
        let message = match parts.extensions.remove::<Payload>() {
            Some(Payload::Json {
                route,
                fields,
                content_type,
                declared,
            }) => {
                self.body_message(route, fields, content_type.as_ref(), declared, body)
                    .await
            }
            Some(Payload::Query { route, fields, query }) => query_message(route, fields, &query),
            Some(Payload::Message(message)) => Ok(message),
            None => Err(Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                Code::Internal,
                "the gateway sent a call without its payload",
            )),
        };
        let message = match message {
            Ok(message) => message,
            Err(refusal) => return refusal.into_grpc(),
        };
        let mut framed = Vec::with_capacity(message.len() + 5);
        framed.push(0);
        framed.extend_from_slice(&u32::try_from(message.len()).unwrap_or(u32::MAX).to_be_bytes());
        framed.extend_from_slice(&message);
        drop(message);
        let request = http::Request::from_parts(parts, Full::new(Bytes::from(framed)));
        let Ok(response) = self.services.oneshot(request).await;
        response
    }

    /// The message of a call whose fields come in a JSON body.
    async fn body_message(
        &self,
        route: &'static Route,
        fields: Vec<(&'static str, String)>,
        content_type: Option<&HeaderValue>,
        declared: Option<u64>,
        body: Body,
    ) -> Result<Bytes, Refusal> {
        let bad = |message: String| Refusal::new(StatusCode::BAD_REQUEST, Code::InvalidArgument, message);
        if let Some(kind) = content_type {
            let json = kind
                .to_str()
                .ok()
                .and_then(|k| k.split(';').next())
                .is_some_and(|k| k.trim().eq_ignore_ascii_case("application/json"));
            if !json {
                return Err(Refusal::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    Code::InvalidArgument,
                    "the body must be application/json (the proto3 JSON mapping; images as base64)",
                ));
            }
        }
        let too_large = || {
            Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                Code::OutOfRange,
                format!(
                    "the body is larger than {} bytes (limits.max_message_bytes, base64-encoded)",
                    self.max_body_bytes
                ),
            )
        };
        if declared.is_some_and(|n| n > self.max_body_bytes as u64) {
            return Err(too_large());
        }
        // The call's deadline (the stack's) bounds how long this may take.
        let bytes = match http_body_util::Limited::new(body, self.max_body_bytes)
            .collect()
            .await
        {
            Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
            Err(_) => return Err(bad("the body could not be read".to_owned())),
            Ok(collected) => collected.to_bytes(),
        };
        let max_message_bytes = self.max_message_bytes;
        if bytes.len() <= BLOCKING_DECODE_BYTES {
            return json_message(route, fields, &bytes, max_message_bytes);
        }
        tokio::task::spawn_blocking(move || json_message(route, fields, &bytes, max_message_bytes))
            .await
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "decoding a request body failed");
                Err(Refusal::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Code::Internal,
                    "internal error",
                ))
            })
    }
}

/// A JSON document's top-level members, each kept as its own text: the
/// document is checked as JSON, but no tree of it is built.
type Members = BTreeMap<String, Box<RawValue>>;

/// The message of a body call: the JSON object `bytes` with the path's
/// fields.
fn json_message(
    route: &Route,
    fields: Vec<(&'static str, String)>,
    bytes: &[u8],
    max_message_bytes: usize,
) -> Result<Bytes, Refusal> {
    let bad = |message: String| Refusal::new(StatusCode::BAD_REQUEST, Code::InvalidArgument, message);
    let members = if bytes.iter().all(u8::is_ascii_whitespace) {
        Members::new()
    } else {
        serde_json::from_slice::<Members>(bytes).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => bad("the body must be a JSON object".to_owned()),
            _ => bad(format!("the body is not valid JSON: {}", json_error(&e))),
        })?
    };
    message(route, members, fields, max_message_bytes)
}

/// The message of a query-string call.
fn query_message(route: &Route, fields: Vec<(&'static str, String)>, query: &str) -> Result<Bytes, Refusal> {
    let bad = |message: String| Refusal::new(StatusCode::BAD_REQUEST, Code::InvalidArgument, message);
    let pairs = routes::query_pairs(query)
        .ok_or_else(|| bad("the query string is not valid percent-encoded UTF-8".to_owned()))?;
    let mut members = Members::new();
    for (name, value) in pairs {
        if members.contains_key(&name) {
            return Err(bad(format!("query parameter {name:?} is given twice")));
        }
        members.insert(name, json_string(&value));
    }
    message(route, members, fields, usize::MAX)
}

/// `value` as a JSON string.
fn json_string(value: &str) -> Box<RawValue> {
    // A string always serialises, and its serialisation is valid JSON.
    RawValue::from_string(serde_json::Value::String(value.to_owned()).to_string())
        .unwrap_or_else(|_| unreachable!("a serialised string is JSON"))
}

/// The protobuf message of the call: `members` with the path's fields.
fn message(
    route: &Route,
    mut members: Members,
    fields: Vec<(&'static str, String)>,
    max_message_bytes: usize,
) -> Result<Bytes, Refusal> {
    let bad = |message: String| Refusal::new(StatusCode::BAD_REQUEST, Code::InvalidArgument, message);
    for (field, value) in fields {
        // The path names the resource; the body may repeat it, not
        // contradict it (either spelling of the field).
        for name in [field.to_owned(), camel_case(field)] {
            if let Some(given) = members.get(&name) {
                if serde_json::from_str::<String>(given.get()).is_ok_and(|v| v == value) {
                    members.remove(&name);
                } else {
                    return Err(bad(format!("{name} in the body differs from the path's {field}")));
                }
            }
        }
        members.insert(field.to_owned(), json_string(&value));
    }
    let document = serde_json::to_vec(&members).map_err(|e| bad(json_error(&e)))?;
    drop(members);
    let message = (route.decode)(&document).map_err(|e| {
        let (_, method) = route.grpc.rsplit_once('/').unwrap_or(("", route.grpc));
        bad(format!(
            "the request is not a valid {method} request in the proto3 JSON mapping: {}",
            json_error(&e)
        ))
    })?;
    if message.len() > max_message_bytes {
        return Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Code::OutOfRange,
            format!(
                "the request's message is {} bytes, more than limits.max_message_bytes ({max_message_bytes})",
                message.len()
            ),
        ));
    }
    Ok(Bytes::from(message))
}

/// `gallery_id` -> `galleryId`, as the proto3 JSON mapping names fields.
fn camel_case(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut upper = false;
    for c in field.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// A JSON error for the caller, without the text it quotes: a value the
/// caller put in the wrong place may be a base64 image, and no image may
/// reach an error text or a log.
fn json_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let mut out = String::with_capacity(text.len().min(300));
    let mut in_quote = false;
    let mut quoted = 0;
    for c in text.chars() {
        if c == '"' {
            if in_quote && quoted > 32 {
                out.push_str("...");
            }
            in_quote = !in_quote;
            quoted = 0;
            out.push(c);
        } else if in_quote {
            quoted += 1;
            if quoted <= 32 {
                out.push(c);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The connection info a request carries, as tonic's server would give it
/// (access control reads the peer address and the client certificate from
/// it).
#[derive(Debug, Clone)]
enum ConnectInfo {
    Tcp(TcpConnectInfo),
    Tls(tonic::transport::server::TlsConnectInfo<TcpConnectInfo>),
}

/// Serves the gateway on `listener` (TLS when `tls` is given) until
/// `shutdown` says so; open connections are then drained.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    tls: Option<TlsAcceptor>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tracing::info!(address = ?listener.local_addr().ok(), tls = tls.is_some(), "HTTP gateway serving");
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors and the like: wait, do not spin.
                tracing::warn!(error = %e, "the HTTP gateway cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY on a connection");
        }
        let (app, tls, watcher) = (app.clone(), tls.clone(), graceful.watcher());
        tokio::spawn(async move {
            match tls {
                None => {
                    let info = ConnectInfo::Tcp(stream.connect_info());
                    connection(TokioIo::new(stream), info, app, watcher).await;
                }
                Some(acceptor) => {
                    // A client that never finishes its handshake holds a
                    // task, not the server: give it 10 s.
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let info = ConnectInfo::Tls(stream.connect_info());
                            connection(TokioIo::new(stream), info, app, watcher).await;
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
        });
    }
    // Stop accepting, let requests in flight finish (bounded by the
    // request timeout of the calls they make).
    drop(listener);
    graceful.shutdown().await;
}

async fn connection<I>(
    io: TokioIo<I>,
    info: ConnectInfo,
    app: axum::Router,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
        let mut request = request.map(Body::new);
        match &info {
            ConnectInfo::Tcp(tcp) => {
                request.extensions_mut().insert(tcp.clone());
            }
            ConnectInfo::Tls(tls) => {
                request.extensions_mut().insert(tls.clone());
            }
        }
        app.clone().oneshot(request)
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // A client that opens a connection and sends its headers slowly is
    // dropped after 10 s.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    let served = watcher.watch(builder.serve_connection(io, service).into_owned());
    if let Err(e) = served.await {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// The TLS acceptor of the gateway from the `tls.*` PEM files: the same
/// certificate as the gRPC listener, and with `client_ca`, the same mutual
/// TLS (a client certificate is then required).
pub fn tls_acceptor(cert: &[u8], key: &[u8], client_ca: Option<&[u8]>) -> Result<TlsAcceptor, String> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls.cert_file: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("tls.key_file: {e}"))?;
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca) {
                roots
                    .add(cert.map_err(|e| format!("tls.client_ca_file: {e}"))?)
                    .map_err(|e| format!("tls.client_ca_file: {e}"))?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| format!("tls.client_ca_file: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls.cert_file / tls.key_file: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The gateway's address as a URL, for logs and tests.
pub fn url(address: SocketAddr, tls: bool) -> String {
    format!("{}://{address}", if tls { "https" } else { "http" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_as_google_maps_them() {
        assert_eq!(http_status(Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(http_status(Code::FailedPrecondition), StatusCode::BAD_REQUEST);
        assert_eq!(
            http_status(Code::ResourceExhausted),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(http_status(Code::Unauthenticated), StatusCode::UNAUTHORIZED);
        assert_eq!(http_status(Code::Cancelled).as_u16(), 499);
        assert_eq!(
            crate::audit::code_name(Code::PermissionDenied),
            "PERMISSION_DENIED"
        );
    }

    #[test]
    fn errors_quote_no_long_values() {
        let image = "A".repeat(10_000);
        let e = serde_json::from_str::<u32>(&format!("\"{image}\"")).expect_err("not a number");
        let text = json_error(&e);
        assert!(text.len() < 200, "{text}");
        assert!(!text.contains(&"A".repeat(33)));
    }

    #[test]
    fn fields_are_camel_cased() {
        assert_eq!(camel_case("gallery_id"), "galleryId");
        assert_eq!(camel_case("require_full_coverage"), "requireFullCoverage");
        assert_eq!(max_body_bytes(3), 4 + 64 * 1024);
    }
}
