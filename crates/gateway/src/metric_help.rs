//! The `# HELP` text of every metric the gateway records (docs/metrics.md is the catalog).

/// Describes the gateway's metrics to the installed recorder; [`Gateway::from_config`]
/// calls it, so a scrape explains them.
///
/// [`Gateway::from_config`]: crate::Gateway::from_config
pub(crate) fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "trellis_gateway_requests_total",
        "Requests the gateway answered, by route and status class"
    );
    describe_histogram!(
        "trellis_gateway_request_duration_seconds",
        "Seconds from a request's arrival at the gateway to its response headers, by route"
    );
    describe_counter!(
        "trellis_gateway_upstream_requests_total",
        "Attempts the gateway sent to a cluster's endpoints, by cluster and outcome"
    );
    describe_histogram!(
        "trellis_gateway_upstream_duration_seconds",
        "Seconds an upstream attempt took to its response headers, by cluster"
    );
    describe_counter!(
        "trellis_gateway_tls_handshake_failures_total",
        "Connections to the HTTPS listener whose TLS handshake failed or timed out"
    );
    describe_counter!(
        "trellis_gateway_upstream_body_timeouts_total",
        "Upstream response bodies cut off by the body or idle timeout, by route"
    );
    describe_counter!(
        "trellis_gateway_ejections_total",
        "Endpoints ejected by outlier detection, by cluster and endpoint"
    );
    describe_counter!(
        "trellis_gateway_rate_limited_total",
        "Requests refused with 429 by a rate-limit policy, by policy and route"
    );
    describe_counter!(
        "trellis_gateway_rate_limit_overflow_total",
        "Requests sent to a policy's shared overflow bucket because its key table was full"
    );
    describe_counter!(
        "trellis_gateway_rate_limit_backend_errors_total",
        "Shared (Redis) rate-limit checks that failed and fell back to the local limit"
    );
    describe_counter!(
        "trellis_gateway_connection_limit_reached_total",
        "Connections the gateway waited to accept because max_connections were open"
    );
    describe_gauge!(
        "trellis_gateway_connections_open",
        "Client connections the gateway holds open"
    );
}
