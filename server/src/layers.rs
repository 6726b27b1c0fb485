//! The protection middleware: every layer a call passes through before a
//! handler sees it, built in one place ([`Protection::stack`]).
//!
//! Each layer that refuses a call answers at once with a gRPC status
//! (trailers-only response) instead of an error, so the client always gets a
//! precise code and message, never a transport failure.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tower::layer::util::{Identity, Stack};
use tower::{Layer, Service, ServiceBuilder};

use crate::audit::{AuditLayer, AuditSink, CallRecord};
use crate::auth::{Access, access_of};
use crate::engine::Caller;
use crate::index::lock;
use crate::live::LiveAuth;
use crate::settings::Settings;
use crate::telemetry::metrics;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The stack's type, outermost layer last (tower's `Stack` nesting).
pub type ProtectionLayer = Stack<
    GateLayer<Shed>,
    Stack<
        GateLayer<PerCaller>,
        Stack<
            GateLayer<RateLimit>,
            Stack<GateLayer<Authenticate>, Stack<DeadlineLayer, Stack<AuditLayer, Identity>>>,
        >,
    >,
>;

/// Builds the stack, outermost first.
#[derive(Debug)]
pub struct Protection;

impl Protection {
    /// The layers, in the order a call meets them. The order matters:
    /// cheap refusals come first, and nothing refused takes a slot of the
    /// concurrency limit.
    pub fn stack(settings: &Settings, auth: Arc<LiveAuth>, audit: AuditSink) -> ProtectionLayer {
        ServiceBuilder::new()
            // 1. The audit record: every call (health and reflection
            //    aside) leaves a row; this layer writes it for the calls
            //    refused before the core could (`audit.rs`). Outermost, so
            //    it sees every refusal below.
            .layer(AuditLayer::new(audit))
            // 2. Request timeout: a call may not run forever; past
            //    `server.request_timeout_ms` (`admin_timeout_ms` for the
            //    Admin service, whose reloads take minutes) it is dropped
            //    (with it its decoding and batch slot; a write already
            //    committing finishes on its own task) and the client gets
            //    DEADLINE_EXCEEDED. It bounds everything below; it also
            //    records each call's latency.
            .layer(DeadlineLayer {
                timeout: settings.request_timeout(),
                admin_timeout: settings.admin_timeout(),
            })
            // 3. Authentication and scope: who is calling (API key or client
            //    certificate) and whether the method's scope is granted.
            //    UNAUTHENTICATED / PERMISSION_DENIED before any work is done.
            //    Health and reflection stay open. Refusals are rate-limited
            //    per peer address with the settings of layer 4: each leaves
            //    an audit row, so a caller without a key could otherwise
            //    fill the audit log (and crowd out other refusals' rows);
            //    past its budget a peer's refusals are RESOURCE_EXHAUSTED,
            //    counted (`handid.audit.unrecorded`) instead of recorded.
            .layer(GateLayer(Arc::new(Authenticate {
                auth,
                refusals: RateLimit::new(
                    settings.server.rate_limit_per_second,
                    settings.server.rate_limit_burst,
                ),
            })))
            // 4. Per-caller rate limit (a token bucket per key id,
            //    certificate grant, or peer IP with auth off; 100/s, burst
            //    200 by default): one noisy client cannot take the capacity
            //    of the others. RESOURCE_EXHAUSTED naming the setting.
            //    Health checks are not counted.
            .layer(GateLayer(Arc::new(RateLimit::new(
                settings.server.rate_limit_per_second,
                settings.server.rate_limit_burst,
            ))))
            // 5. Per-caller concurrency: at most
            //    `server.max_concurrent_per_caller` calls of one caller in
            //    flight, so one caller cannot take every slot of the next
            //    layer. RESOURCE_EXHAUSTED at once.
            .layer(GateLayer(Arc::new(PerCaller::new(
                settings.server.max_concurrent_per_caller,
            ))))
            // 6. Concurrency limit with load shedding: at most
            //    `server.max_concurrent_requests` calls in flight across all
            //    connections (one semaphore for the server); one more is
            //    refused at once with RESOURCE_EXHAUSTED rather than queued,
            //    so overload shows as fast errors, not growing latency and
            //    memory.
            .layer(GateLayer(Arc::new(Shed::new(
                settings.server.max_concurrent_requests,
            ))))
            // 7. (In server.rs, per service) the maximum message size:
            //    `limits.max_message_bytes`, refused by the codec with
            //    OUT_OF_RANGE before the message is buffered whole.
            .into_inner()
    }
}

/// Answers a refused call with its status.
fn refuse<B: Default>(status: Status) -> http::Response<B> {
    status.into_http()
}

/// The request-timeout layer.
#[derive(Debug, Clone)]
pub struct DeadlineLayer {
    timeout: Duration,
    admin_timeout: Duration,
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Deadline {
            inner,
            timeout: self.timeout,
            admin_timeout: self.admin_timeout,
        }
    }
}

/// See [`DeadlineLayer`].
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    timeout: Duration,
    admin_timeout: Duration,
}

impl<S, B, R> Service<http::Request<B>> for Deadline<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The clone is the ready one's twin; keep the ready one for this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let method = request.uri().path().to_owned();
        let timeout = if method.starts_with("/handid.v1.Admin/") {
            self.admin_timeout
        } else {
            self.timeout
        };
        let started = Instant::now();
        let call = inner.call(request);
        Box::pin(async move {
            let response = match tokio::time::timeout(timeout, call).await {
                Ok(response) => response.map(|r| decode_errors_are_invalid_arguments(r, &method)),
                Err(_) => Ok(refuse(Status::deadline_exceeded(format!(
                    "the call ran past the server's limit of {} ms",
                    timeout.as_millis()
                )))),
            };
            // Labelled by known names only: a client inventing paths must
            // not invent metric series.
            metrics().call_finished(method_name(&method), started.elapsed());
            response
        })
    }
}

/// The methods this server serves, as metrics and traces name them.
const METHODS: [&str; 19] = [
    "handid.v1.HandId/Enroll",
    "handid.v1.HandId/Identify",
    "handid.v1.HandId/Verify",
    "handid.v1.HandId/Embed",
    "handid.v1.HandId/DeleteSubject",
    "handid.v1.HandId/DeleteGallery",
    "handid.v1.HandId/GetSubject",
    "handid.v1.HandId/ListSubjects",
    "handid.v1.Admin/GetModel",
    "handid.v1.Admin/ReloadModel",
    "handid.v1.Admin/PromoteModel",
    "handid.v1.Admin/RollbackModel",
    "handid.v1.Admin/CancelMigration",
    "handid.v1.Admin/ReloadSettings",
    "grpc.health.v1.Health/Check",
    "grpc.health.v1.Health/Watch",
    "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "unknown",
];

/// The name of the method at `path` (`/handid.v1.HandId/Identify` ->
/// `handid.v1.HandId/Identify`), or `unknown` for a path this server does
/// not serve.
pub fn method_name(path: &str) -> &'static str {
    let name = path.strip_prefix('/').unwrap_or(path);
    METHODS
        .iter()
        .find(|known| **known == name)
        .copied()
        .unwrap_or("unknown")
}

/// tonic answers a request body that is not a valid protobuf message with
/// INTERNAL ("failed to decode Protobuf message: ..."); it is the client's
/// fault, so it becomes INVALID_ARGUMENT, naming the method. The detail is
/// prost's description of the problem (field names, wire types), never
/// the payload.
fn decode_errors_are_invalid_arguments<B: Default>(
    response: http::Response<B>,
    path: &str,
) -> http::Response<B> {
    const PREFIX: &str = "failed to decode Protobuf message";
    match Status::from_header_map(response.headers()) {
        Some(status) if status.code() == tonic::Code::Internal && status.message().starts_with(PREFIX) => {
            let detail = status.message()[PREFIX.len()..].trim_start_matches(':').trim();
            refuse(Status::invalid_argument(format!(
                "the request is not a valid {} message ({detail})",
                method_name(path)
            )))
        }
        _ => response,
    }
}

/// A check run before a call reaches the handler; what it returns is held
/// until the call completes (e.g. a concurrency permit).
pub trait Gate: Send + Sync + 'static {
    /// Held for the call's lifetime.
    type Ticket: Send + 'static;
    /// Admits the call (possibly adding extensions) or refuses it.
    fn admit<B>(&self, request: &mut http::Request<B>) -> Result<Self::Ticket, Status>;
}

/// Wraps a service with a [`Gate`].
#[derive(Debug)]
pub struct GateLayer<G>(Arc<G>);

impl<G> Clone for GateLayer<G> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<S, G> Layer<S> for GateLayer<G> {
    type Service = Gated<S, G>;
    fn layer(&self, inner: S) -> Self::Service {
        Gated {
            inner,
            gate: Arc::clone(&self.0),
        }
    }
}

/// See [`GateLayer`].
#[derive(Debug)]
pub struct Gated<S, G> {
    inner: S,
    gate: Arc<G>,
}

impl<S: Clone, G> Clone for Gated<S, G> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            gate: Arc::clone(&self.gate),
        }
    }
}

impl<S, G, B, R> Service<http::Request<B>> for Gated<S, G>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    G: Gate,
    R: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let ticket = match self.gate.admit(&mut request) {
            Ok(ticket) => ticket,
            Err(status) => return Box::pin(std::future::ready(Ok(refuse(status)))),
        };
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let call = inner.call(request);
        Box::pin(async move {
            let response = call.await;
            drop(ticket);
            response
        })
    }
}

/// Authentication and scope check; puts the [`Caller`] in the request's
/// extensions, where tonic hands it to the handler.
#[derive(Debug)]
pub struct Authenticate {
    auth: Arc<LiveAuth>,
    /// Refusals per peer address.
    refusals: RateLimit,
}

impl Gate for Authenticate {
    type Ticket = ();
    fn admit<B>(&self, request: &mut http::Request<B>) -> Result<(), Status> {
        let path = request.uri().path().to_owned();
        let refused = match self
            .auth
            .current()
            .check(&path, request.headers(), request.extensions())
        {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                return Ok(());
            }
            Err(status) => status,
        };
        // Charged to the key when access control knew it (a scope it
        // lacks), else to the peer's address (no key, an unknown one).
        let record = request.extensions().get::<Arc<CallRecord>>().cloned();
        let who = match record.as_ref().and_then(|r| r.actor()) {
            Some(actor) => format!("key {actor:?}"),
            None => crate::auth::peer_addr(request.extensions())
                .map_or_else(|| "an unknown address".to_owned(), |a| a.ip().to_string()),
        };
        if self.refusals.per_second > 0.0 && !self.refusals.take(format!("refused: {who}")) {
            // Past the budget: the call's record closes without a row,
            // counted and logged sparsely instead.
            if let Some(record) = record {
                record.leave_unrecorded();
            }
            return Err(Status::resource_exhausted(format!(
                "too many refused calls from {who} (server.rate_limit_per_second, \
                 server.rate_limit_burst); retry later with a valid key"
            )));
        }
        tracing::info!(method = %path, code = ?refused.code(), "call refused by access control");
        Err(refused)
    }
}

/// Callers remembered by the rate limiter before idle ones are forgotten.
const RATE_LIMIT_TABLE: usize = 10_000;

/// A token bucket per caller id.
#[derive(Debug)]
pub struct RateLimit {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimit {
    fn new(per_second: f64, burst: u32) -> Self {
        Self {
            per_second,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }
}

impl RateLimit {
    /// Takes a token from `key`'s bucket; `false` when it is empty.
    fn take(&self, key: String) -> bool {
        let now = Instant::now();
        let mut buckets = lock(&self.buckets);
        if buckets.len() >= RATE_LIMIT_TABLE {
            // A bucket idle long enough to be full again carries no state.
            let refill = Duration::from_secs_f64(self.burst / self.per_second);
            buckets.retain(|_, (_, last)| now.duration_since(*last) < refill);
        }
        let (tokens, last) = buckets.entry(key).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.per_second).min(self.burst);
        *last = now;
        if *tokens < 1.0 {
            return false;
        }
        *tokens -= 1.0;
        true
    }
}

impl Gate for RateLimit {
    type Ticket = ();
    fn admit<B>(&self, request: &mut http::Request<B>) -> Result<(), Status> {
        // Health checks are not counted: a busy client must not make its
        // address's probes fail.
        if self.per_second <= 0.0 || access_of(request.uri().path()) == Access::Open {
            return Ok(());
        }
        let Some(caller) = request.extensions().get::<Caller>() else {
            return Ok(());
        };
        let key = limit_key(caller);
        if self.take(key.clone()) {
            return Ok(());
        }
        Err(Status::resource_exhausted(format!(
            "rate limit of {} calls per second (burst {}) exceeded for {key:?} \
             (server.rate_limit_per_second, server.rate_limit_burst); retry later",
            self.per_second, self.burst
        )))
    }
}

/// Whom the per-caller limits count: the caller id, or with auth off
/// (every caller `anonymous`) the peer's IP without its port (one client,
/// many connections), so one client still cannot starve the others.
fn limit_key(caller: &Caller) -> String {
    match (caller.id.as_str(), &caller.peer) {
        ("anonymous", Some(peer)) => peer.rsplit_once(':').map_or(peer.as_str(), |p| p.0).to_owned(),
        (id, _) => id.to_owned(),
    }
}

/// Calls in flight per caller, refusing one more beyond the limit.
#[derive(Debug)]
pub struct PerCaller {
    limit: usize,
    in_flight: Arc<Mutex<HashMap<String, usize>>>,
}

impl PerCaller {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            in_flight: Arc::default(),
        }
    }
}

/// One call counted against its caller until it ends; the caller's entry
/// goes when its count returns to zero, so the table holds the callers with
/// calls in flight, no more.
#[derive(Debug)]
pub struct InFlight {
    key: String,
    in_flight: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut in_flight = lock(&self.in_flight);
        if let Some(n) = in_flight.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                in_flight.remove(&self.key);
            }
        }
    }
}

impl Gate for PerCaller {
    type Ticket = Option<InFlight>;
    fn admit<B>(&self, request: &mut http::Request<B>) -> Result<Self::Ticket, Status> {
        let Some(caller) = request.extensions().get::<Caller>() else {
            return Ok(None);
        };
        if access_of(request.uri().path()) == Access::Open {
            return Ok(None);
        }
        let key = limit_key(caller);
        let mut in_flight = lock(&self.in_flight);
        let n = in_flight.entry(key.clone()).or_insert(0);
        if *n >= self.limit {
            return Err(Status::resource_exhausted(format!(
                "{key:?} has {} calls in flight, its limit (server.max_concurrent_per_caller); retry with backoff",
                self.limit
            )));
        }
        *n += 1;
        Ok(Some(InFlight {
            key,
            in_flight: Arc::clone(&self.in_flight),
        }))
    }
}

/// The server-wide concurrency limit, refusing instead of queueing.
#[derive(Debug)]
pub struct Shed {
    slots: Arc<Semaphore>,
    limit: usize,
}

impl Shed {
    fn new(limit: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }
}

impl Gate for Shed {
    type Ticket = Option<OwnedSemaphorePermit>;
    fn admit<B>(&self, request: &mut http::Request<B>) -> Result<Self::Ticket, Status> {
        // Health checks must answer even at full load, or an orchestrator
        // would restart a replica for being busy.
        if access_of(request.uri().path()) == Access::Open {
            return Ok(None);
        }
        Arc::clone(&self.slots)
            .try_acquire_owned()
            .map(Some)
            .map_err(|_| {
                Status::resource_exhausted(format!(
                    "the server is at its limit of {} concurrent calls; retry with backoff",
                    self.limit
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_labels_come_from_known_method_names_only() {
        assert_eq!(
            method_name("/handid.v1.HandId/Identify"),
            "handid.v1.HandId/Identify"
        );
        assert_eq!(
            method_name("/grpc.health.v1.Health/Check"),
            "grpc.health.v1.Health/Check"
        );
        for invented in [
            "/handid.v1.HandId/Identify2",
            "/x",
            "",
            "/a/b/c",
            "/handid.v1.HandId/",
        ] {
            assert_eq!(method_name(invented), "unknown", "{invented:?}");
        }
    }

    #[test]
    fn protobuf_decode_errors_become_invalid_arguments() {
        let decode = refuse::<()>(Status::internal(
            "failed to decode Protobuf message: EnrollRequest.gallery_id: invalid string value: data is not UTF-8 encoded",
        ));
        let out = decode_errors_are_invalid_arguments(decode, "/handid.v1.HandId/Enroll");
        let status = Status::from_header_map(out.headers()).expect("a status");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "the request is not a valid handid.v1.HandId/Enroll message (EnrollRequest.gallery_id: invalid \
             string value: data is not UTF-8 encoded)"
        );
        // Our own server faults stay what they are.
        let fault = refuse::<()>(Status::internal("internal error"));
        let out = decode_errors_are_invalid_arguments(fault, "/handid.v1.HandId/Enroll");
        let status = Status::from_header_map(out.headers()).expect("a status");
        assert_eq!(status.code(), tonic::Code::Internal);
    }
}
