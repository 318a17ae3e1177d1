//! gRPC clients that carry the trace, and gRPC statuses mapped to API errors.

use std::time::Duration;

use axum::http::StatusCode;
use tonic::transport::{Channel, Endpoint};
use trellis_telemetry::http::TraceContextClient;

use crate::ApiError;
use crate::auth::{ServiceIdentity, ServiceIdentityClient};

/// A tonic channel that sends the calling service's identity token and the current W3C trace
/// context with every call. Generated clients take it as their transport:
/// `UsersClient::new(channel)`.
pub type GrpcChannel = ServiceIdentityClient<TraceContextClient<Channel>>;

/// Timeouts for a gRPC client.
#[derive(Debug, Clone, Copy)]
pub struct GrpcClientConfig {
    /// Time to establish the connection.
    pub connect_timeout: Duration,
    /// Time one call may take.
    pub request_timeout: Duration,
}

impl Default for GrpcClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// A channel to `addr` (`host:port` or `http://host:port`) that connects on first use and
/// reconnects after failures, so services can start in any order. Every call carries
/// `identity` (the callee refuses calls without one, see [`crate::auth::protect`]).
pub fn grpc_channel(
    addr: &str,
    config: GrpcClientConfig,
    identity: ServiceIdentity,
) -> Result<GrpcChannel, ApiError> {
    let uri = if addr.starts_with("http://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(uri).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "bad_address",
            format!("{addr:?} is not a gRPC address: {e}"),
        )
    })?;
    let channel = endpoint
        .connect_timeout(config.connect_timeout)
        .timeout(config.request_timeout)
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(ServiceIdentityClient::new(
        TraceContextClient::new(channel),
        identity,
    ))
}

/// Maps a gRPC status from another service to the error this service answers with:
/// `NotFound`/`InvalidArgument`/`FailedPrecondition` keep their meaning (the message is the
/// other service's), anything else is a 503 naming the dependency.
pub fn status_to_api_error(service: &str, status: &tonic::Status) -> ApiError {
    match status.code() {
        tonic::Code::NotFound => ApiError::not_found(status.message()),
        tonic::Code::InvalidArgument => ApiError::bad_request("invalid_argument", status.message()),
        tonic::Code::FailedPrecondition => {
            ApiError::conflict("failed_precondition", status.message())
        }
        _ => ApiError::unavailable(
            "dependency_unavailable",
            format!("the {service} service did not answer: {}", status.message()),
        ),
    }
}
