//! The server side's RED metrics: rate, errors and duration per route (REST) and per RPC
//! (gRPC), labelled with the service's name.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::MatchedPath;
use http::{HeaderMap, Method, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

/// Requests a server answered, by service, method, route and status class (a counter).
pub const HTTP_REQUESTS: &str = "trellis_http_server_requests_total";
/// Time to a server's response headers, by service, method and route (a histogram).
pub const HTTP_DURATION: &str = "trellis_http_server_request_duration_seconds";
/// gRPC calls a server answered, by service, RPC and status code (a counter).
pub const GRPC_REQUESTS: &str = "trellis_grpc_server_requests_total";
/// Time to a gRPC server's response headers, by service and RPC (a histogram).
pub const GRPC_DURATION: &str = "trellis_grpc_server_request_duration_seconds";

/// The route label of a request no route matched (a 404, or an unknown gRPC service).
pub const UNMATCHED_ROUTE: &str = "unmatched";
/// The RPC label of a gRPC method the server does not implement.
pub const UNKNOWN_RPC: &str = "unknown";

/// Describes the metrics [`RequestMetricsLayer`] records, so `/metrics` carries their
/// `# HELP` lines. Called by [`RequestMetricsLayer::new`]; cheap, and harmless to repeat.
pub fn describe_request_metrics() {
    metrics::describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests a service answered, by service, method, matched route and status class"
    );
    metrics::describe_histogram!(
        HTTP_DURATION,
        "Seconds from an HTTP request's arrival to its response headers, by service, method and matched route"
    );
    metrics::describe_counter!(
        GRPC_REQUESTS,
        "gRPC calls a service answered, by service, RPC (/package.Service/Method) and gRPC status code"
    );
    metrics::describe_histogram!(
        GRPC_DURATION,
        "Seconds from a gRPC call's arrival to its response headers, by service and RPC"
    );
}

/// Wraps an axum router (or any service of `http` requests) in [`RequestMetrics`].
///
/// Apply it with `Router::layer`, so axum has matched the route before the layer reads it:
///
/// ```
/// use axum::{Router, routing::get};
/// use trellis_telemetry::http::RequestMetricsLayer;
///
/// let app: Router = Router::new()
///     .route("/api/orders/{id}", get(|| async { "an order" }))
///     .layer(RequestMetricsLayer::new("orders"));
/// # drop(app);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct RequestMetricsLayer {
    service: &'static str,
}

impl RequestMetricsLayer {
    /// A layer recording requests under `service="<service>"` (one name per service: in
    /// `trellis up` every service shares the process's recorder, and this label tells them
    /// apart).
    #[must_use]
    pub fn new(service: &'static str) -> Self {
        describe_request_metrics();
        Self { service }
    }
}

impl<S> Layer<S> for RequestMetricsLayer {
    type Service = RequestMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestMetrics {
            inner,
            service: self.service,
        }
    }
}

/// Counts each request and records its duration, as HTTP or as gRPC.
///
/// - HTTP: [`HTTP_REQUESTS`] with `service`, `method` (the standard methods, else `other`),
///   `route` (axum's matched route such as `/api/orders/{id}`, never the raw path, so ids do
///   not multiply series; [`UNMATCHED_ROUTE`] when none matched) and `status_class` (`2xx`…),
///   and [`HTTP_DURATION`].
/// - gRPC (a `content-type` of `application/grpc…`): [`GRPC_REQUESTS`] with `service`, `rpc`
///   (the request path `/package.Service/Method`; [`UNKNOWN_RPC`] when the server answers
///   `UNIMPLEMENTED`, [`UNMATCHED_ROUTE`] when no service matched, so a caller cannot mint
///   series) and `code` (`OK`, `UNAVAILABLE`, …), and [`GRPC_DURATION`].
///
/// The duration runs to the response headers. A gRPC error is read from the response
/// headers, where tonic puts the status of a failed unary call (a trailers-only answer); a
/// status sent only in trailers after a body counts as `OK`, which for unary calls it is.
/// A service error (the inner service failing rather than answering) counts as a 5xx or as
/// `INTERNAL`.
#[derive(Debug, Clone)]
pub struct RequestMetrics<S> {
    inner: S,
    service: &'static str,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RequestMetrics<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = RequestMetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let matched = request
            .extensions()
            .get::<MatchedPath>()
            .map(|path| path.as_str().to_owned());
        let kind = if is_grpc(request.headers()) {
            Kind::Grpc {
                rpc: matched.map(|_| request.uri().path().to_owned()),
            }
        } else {
            Kind::Http {
                method: method_label(request.method()),
                route: matched,
            }
        };
        RequestMetricsFuture {
            inner: self.inner.call(request),
            started: Instant::now(),
            service: self.service,
            kind: Some(kind),
        }
    }
}

/// What a request is measured as.
#[derive(Debug)]
enum Kind {
    Http {
        method: &'static str,
        route: Option<String>,
    },
    Grpc {
        rpc: Option<String>,
    },
}

pin_project! {
    /// The response future of [`RequestMetrics`]: records the request when the inner future
    /// completes.
    #[derive(Debug)]
    pub struct RequestMetricsFuture<F> {
        #[pin]
        inner: F,
        started: Instant,
        service: &'static str,
        kind: Option<Kind>,
    }
}

impl<F, B, E> Future for RequestMetricsFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = std::task::ready!(this.inner.poll(cx));
        let seconds = this.started.elapsed().as_secs_f64();
        let service = *this.service;
        match this.kind.take() {
            Some(Kind::Http { method, route }) => {
                let status_class = match &output {
                    Ok(response) => status_class(response.status().as_u16()),
                    Err(_) => "5xx",
                };
                let route = route.unwrap_or_else(|| UNMATCHED_ROUTE.to_owned());
                metrics::counter!(
                    HTTP_REQUESTS,
                    "service" => service, "method" => method, "route" => route.clone(),
                    "status_class" => status_class
                )
                .increment(1);
                metrics::histogram!(
                    HTTP_DURATION,
                    "service" => service, "method" => method, "route" => route
                )
                .record(seconds);
            }
            Some(Kind::Grpc { rpc }) => {
                let code = match &output {
                    Ok(response) => grpc_code(response.headers()),
                    Err(_) => "INTERNAL",
                };
                let rpc = match rpc {
                    None => UNMATCHED_ROUTE.to_owned(),
                    Some(_) if code == "UNIMPLEMENTED" => UNKNOWN_RPC.to_owned(),
                    Some(rpc) => rpc,
                };
                metrics::counter!(
                    GRPC_REQUESTS,
                    "service" => service, "rpc" => rpc.clone(), "code" => code
                )
                .increment(1);
                metrics::histogram!(GRPC_DURATION, "service" => service, "rpc" => rpc)
                    .record(seconds);
            }
            // Polled again after it completed: the request is already counted.
            None => {}
        }
        Poll::Ready(output)
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc"))
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The gRPC status in the response headers by its canonical name; `OK` when there is none
/// (a successful call sends its status in the trailers).
fn grpc_code(headers: &HeaderMap) -> &'static str {
    let Some(code) = headers.get("grpc-status") else {
        return "OK";
    };
    match code.to_str().ok().and_then(|code| code.parse::<u8>().ok()) {
        Some(0) => "OK",
        Some(1) => "CANCELLED",
        Some(3) => "INVALID_ARGUMENT",
        Some(4) => "DEADLINE_EXCEEDED",
        Some(5) => "NOT_FOUND",
        Some(6) => "ALREADY_EXISTS",
        Some(7) => "PERMISSION_DENIED",
        Some(8) => "RESOURCE_EXHAUSTED",
        Some(9) => "FAILED_PRECONDITION",
        Some(10) => "ABORTED",
        Some(11) => "OUT_OF_RANGE",
        Some(12) => "UNIMPLEMENTED",
        Some(13) => "INTERNAL",
        Some(14) => "UNAVAILABLE",
        Some(15) => "DATA_LOSS",
        Some(16) => "UNAUTHENTICATED",
        // 2 is UNKNOWN, and so is anything a server should not have sent.
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_are_read_by_name_and_a_missing_status_is_ok() {
        // A trailers-only error carries its code in the headers; a success carries none.
        let mut headers = HeaderMap::new();
        assert_eq!(grpc_code(&headers), "OK");
        headers.insert("grpc-status", "14".parse().expect("header value"));
        assert_eq!(grpc_code(&headers), "UNAVAILABLE");
        headers.insert("grpc-status", "99".parse().expect("header value"));
        assert_eq!(grpc_code(&headers), "UNKNOWN");
    }

    #[test]
    fn status_classes_cover_every_status() {
        // Each status maps to its hundred; anything out of range counts as a server error.
        assert_eq!(status_class(101), "1xx");
        assert_eq!(status_class(204), "2xx");
        assert_eq!(status_class(308), "3xx");
        assert_eq!(status_class(429), "4xx");
        assert_eq!(status_class(503), "5xx");
        assert_eq!(status_class(999), "5xx");
    }
}
