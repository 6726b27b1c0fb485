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
//! Two limits are the gateway's own: a body larger than the largest gRPC
//! message could be once base64-encoded is refused (413) while it is read,
//! and a caller whose key is refused gets its refusal without its body
//! being read at all.

pub mod openapi;
pub mod routes;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tonic::Code;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

use crate::live::LiveAuth;
use routes::{Found, Route};

/// The gRPC services behind the protection stack, as the gateway calls
/// them.
pub type Protected =
    BoxCloneSyncService<http::Request<Full<Bytes>>, http::Response<tonic::body::Body>, Infallible>;

/// The path of the gRPC health check, asked by `/healthz`.
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// What the handlers share.
#[derive(Debug)]
pub struct Gateway {
    grpc: Protected,
    auth: Arc<LiveAuth>,
    max_body_bytes: usize,
    body_timeout: Duration,
    openapi: Bytes,
}

impl Gateway {
    /// A gateway calling `grpc` (the services behind the protection stack);
    /// `auth` is the stack's own key table, consulted before a body is
    /// read; bodies are refused past the base64 size of `max_message_bytes`
    /// and when they take longer than `body_timeout` to arrive.
    pub fn new(
        grpc: Protected,
        auth: Arc<LiveAuth>,
        max_message_bytes: usize,
        body_timeout: Duration,
    ) -> Self {
        Self {
            grpc,
            auth,
            max_body_bytes: max_body_bytes(max_message_bytes),
            body_timeout,
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
#[derive(Debug)]
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
}

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
        .unary(HEALTH_CHECK, &parts.headers, parts.extensions, Vec::new())
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
        // A caller the keys refuse is answered without reading its body;
        // the empty message still goes through the stack, so the refusal
        // is the gRPC one, audited like it.
        let admitted = self
            .auth
            .current()
            .check(route.grpc, &parts.headers, &parts.extensions)
            .is_ok();
        let message = if admitted {
            let json = self.request_json(route, &parts, body).await?;
            self.message(route, json, fields)?
        } else {
            Vec::new()
        };
        let bytes = self
            .unary(route.grpc, &parts.headers, parts.extensions, message)
            .await
            .map_err(|status| Refusal::from_status(&status))?;
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

    /// The request's fields as JSON: the body (POST) or the query string.
    async fn request_json(
        &self,
        route: &Route,
        parts: &http::request::Parts,
        body: Body,
    ) -> Result<serde_json::Value, Refusal> {
        let bad = |message: String| Refusal::new(StatusCode::BAD_REQUEST, Code::InvalidArgument, message);
        if !route.body {
            let pairs = routes::query_pairs(parts.uri.query().unwrap_or(""))
                .ok_or_else(|| bad("the query string is not valid percent-encoded UTF-8".to_owned()))?;
            let mut object = serde_json::Map::new();
            for (name, value) in pairs {
                if object
                    .insert(name.clone(), serde_json::Value::String(value))
                    .is_some()
                {
                    return Err(bad(format!("query parameter {name:?} is given twice")));
                }
            }
            return Ok(serde_json::Value::Object(object));
        }
        if let Some(kind) = parts.headers.get(header::CONTENT_TYPE) {
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
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body_bytes as u64) {
            return Err(too_large());
        }
        let limited = http_body_util::Limited::new(body, self.max_body_bytes);
        let bytes = match tokio::time::timeout(self.body_timeout, limited.collect()).await {
            Err(_) => {
                return Err(Refusal::new(
                    StatusCode::REQUEST_TIMEOUT,
                    Code::DeadlineExceeded,
                    format!(
                        "the body did not arrive within {} ms (server.request_timeout_ms)",
                        self.body_timeout.as_millis()
                    ),
                ));
            }
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
            Ok(Err(_)) => return Err(bad("the body could not be read".to_owned())),
            Ok(Ok(collected)) => collected.to_bytes(),
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(serde_json::Value::Object(serde_json::Map::new()));
        }
        match serde_json::from_slice(&bytes) {
            Ok(value @ serde_json::Value::Object(_)) => Ok(value),
            Ok(_) => Err(bad("the body must be a JSON object".to_owned())),
            Err(e) => Err(bad(format!("the body is not valid JSON: {}", json_error(&e)))),
        }
    }

    /// The protobuf message of the call: `json` with the path's fields.
    fn message(
        &self,
        route: &Route,
        mut json: serde_json::Value,
        fields: Vec<(&'static str, String)>,
    ) -> Result<Vec<u8>, Refusal> {
        let bad = |message: String| Refusal::new(StatusCode::BAD_REQUEST, Code::InvalidArgument, message);
        let object = json
            .as_object_mut()
            .ok_or_else(|| bad("the body must be a JSON object".to_owned()))?;
        for (field, value) in fields {
            // The path names the resource; the body may repeat it, not
            // contradict it (either spelling of the field).
            for name in [field.to_owned(), camel_case(field)] {
                match object.get(&name) {
                    Some(serde_json::Value::String(v)) if *v == value => {
                        object.remove(&name);
                    }
                    Some(_) => {
                        return Err(bad(format!("{name} in the body differs from the path's {field}")));
                    }
                    None => {}
                }
            }
            object.insert(field.to_owned(), serde_json::Value::String(value));
        }
        (route.decode)(json).map_err(|e| {
            let (_, method) = route.grpc.rsplit_once('/').unwrap_or(("", route.grpc));
            bad(format!(
                "the request is not a valid {method} request in the proto3 JSON mapping: {}",
                json_error(&e)
            ))
        })
    }

    /// One unary call through the protection stack: the message's bytes
    /// in, the response message's bytes or the call's status out.
    async fn unary(
        &self,
        path: &'static str,
        headers: &HeaderMap,
        extensions: http::Extensions,
        message: Vec<u8>,
    ) -> Result<Bytes, tonic::Status> {
        let mut framed = Vec::with_capacity(message.len() + 5);
        framed.push(0);
        framed.extend_from_slice(&u32::try_from(message.len()).unwrap_or(u32::MAX).to_be_bytes());
        framed.extend_from_slice(&message);
        let mut request = http::Request::new(Full::new(Bytes::from(framed)));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = http::Uri::from_static(path);
        *request.extensions_mut() = extensions;
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
            return Err(status);
        }
        let collected = body
            .collect()
            .await
            .map_err(|e| tonic::Status::internal(format!("reading the response: {e}")))?;
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let data = collected.to_bytes();
        match tonic::Status::from_header_map(&trailers) {
            Some(status) if status.code() != Code::Ok => Err(status),
            _ => match (data.first(), data.get(5..)) {
                (Some(0), Some(message)) => Ok(data.slice(5..5 + message.len())),
                _ => Err(tonic::Status::internal("the service answered without a message")),
            },
        }
    }
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
