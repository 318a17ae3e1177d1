//! gRPC clients that carry the trace and spread calls over a service's replicas, and gRPC
//! statuses mapped to API errors.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use tonic::transport::{Channel, Endpoint};
use trellis_telemetry::http::TraceContextClient;

use crate::ApiError;
use crate::auth::{ServiceIdentity, ServiceIdentityClient};

/// A tonic channel that sends the calling service's identity token and the current W3C trace
/// context with every call, to one of a service's replicas. Generated clients take it as
/// their transport: `UsersClient::new(channel)`.
pub type GrpcChannel = ServiceIdentityClient<TraceContextClient<Replicas>>;

/// How long a replica whose call failed to connect is passed over.
pub const REPLICA_DOWN_FOR: Duration = Duration::from_secs(2);

/// One lazily connected channel per replica of a service, called in turn (round robin). A
/// replica whose call failed at the transport (refused, reset: a dead or restarting process)
/// is passed over for [`REPLICA_DOWN_FOR`], unless every replica is; then it is tried again,
/// so a restarted replica gets calls back within that time.
///
/// Why not tonic's `Channel::balance_list`: tower's balancer drops an endpoint whose
/// connection failed and never adds it back, so a replica that restarts would get no calls.
/// The calls a failed replica had in flight fail (the caller's retry policy decides); a
/// gRPC status (the replica answered) never counts against it.
#[derive(Debug)]
pub struct Replicas {
    channels: Vec<Channel>,
    health: Arc<ReplicaHealth>,
    /// The replica [`poll_ready`](tower::Service::poll_ready) readied for the next call.
    picked: Option<usize>,
}

impl Clone for Replicas {
    /// A clone picks its own replica: the readied one belongs to the original (whose
    /// channel holds the reserved slot), so a clone made between `poll_ready` and `call` (the
    /// clone-and-swap of tower middleware) does not stick to it.
    fn clone(&self) -> Self {
        Self {
            channels: self.channels.clone(),
            health: Arc::clone(&self.health),
            picked: None,
        }
    }
}

#[derive(Debug)]
struct ReplicaHealth {
    /// Per replica: milliseconds after `epoch` until which it is passed over.
    down_until_ms: Vec<AtomicU64>,
    next: AtomicUsize,
    epoch: Instant,
}

impl ReplicaHealth {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The next replica in turn that is not passed over; the next in turn when all are.
    fn pick(&self) -> usize {
        let count = self.down_until_ms.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed) % count;
        let now = self.now_ms();
        (0..count)
            .map(|offset| (first + offset) % count)
            .find(|&i| self.down_until_ms[i].load(Ordering::Relaxed) <= now)
            .unwrap_or(first)
    }

    fn mark_down(&self, index: usize) {
        let until = self
            .now_ms()
            .saturating_add(u64::try_from(REPLICA_DOWN_FOR.as_millis()).unwrap_or(u64::MAX));
        if let Some(slot) = self.down_until_ms.get(index) {
            slot.store(until, Ordering::Relaxed);
        }
    }
}

impl Replicas {
    fn new(channels: Vec<Channel>) -> Self {
        let health = ReplicaHealth {
            down_until_ms: channels.iter().map(|_| AtomicU64::new(0)).collect(),
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
        };
        Self {
            channels,
            health: Arc::new(health),
            picked: None,
        }
    }
}

type ReplicaFuture = Pin<
    Box<
        dyn Future<Output = Result<http::Response<tonic::body::Body>, tonic::transport::Error>>
            + Send,
    >,
>;

impl tower::Service<http::Request<tonic::body::Body>> for Replicas {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = ReplicaFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let index = *self.picked.get_or_insert_with(|| self.health.pick());
        let ready = tower::Service::poll_ready(&mut self.channels[index], cx);
        if let Poll::Ready(Err(_)) = &ready {
            self.health.mark_down(index);
            self.picked = None;
        }
        ready
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        // tower's contract: `call` follows a successful `poll_ready`, which picked a replica.
        let index = self.picked.take().unwrap_or_else(|| self.health.pick());
        let call = tower::Service::call(&mut self.channels[index], request);
        let health = Arc::clone(&self.health);
        Box::pin(async move {
            let answer = call.await;
            if answer.is_err() {
                health.mark_down(index);
            }
            answer
        })
    }
}

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

/// A channel to `addrs`: one address (`host:port` or `http://host:port`) or the addresses of
/// a service's replicas separated by commas, spread as [`Replicas`] says. Each connects on
/// first use and reconnects after failures, so services can start in any order. Every call
/// carries `identity` (the callee refuses calls without one, see [`crate::auth::protect`]).
///
/// # Errors
/// A 500 `bad_address` [`ApiError`] naming an address that is not one, or none at all.
pub fn grpc_channel(
    addrs: &str,
    config: GrpcClientConfig,
    identity: ServiceIdentity,
) -> Result<GrpcChannel, ApiError> {
    let bad =
        |message: String| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "bad_address", message);
    let mut channels = Vec::new();
    for addr in addrs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let uri = if addr.starts_with("http://") {
            addr.to_owned()
        } else {
            format!("http://{addr}")
        };
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|e| bad(format!("{addr:?} is not a gRPC address: {e}")))?;
        channels.push(
            endpoint
                .connect_timeout(config.connect_timeout)
                .timeout(config.request_timeout)
                .tcp_nodelay(true)
                .connect_lazy(),
        );
    }
    if channels.is_empty() {
        return Err(bad(format!("{addrs:?} names no gRPC address")));
    }
    Ok(ServiceIdentityClient::new(
        TraceContextClient::new(Replicas::new(channels)),
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

#[cfg(test)]
mod replica_tests {
    use super::*;

    fn health(count: usize) -> ReplicaHealth {
        ReplicaHealth {
            down_until_ms: (0..count).map(|_| AtomicU64::new(0)).collect(),
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
        }
    }

    #[test]
    fn replicas_take_turns_and_a_failed_one_is_passed_over() {
        let health = health(3);
        let turns: Vec<usize> = (0..6).map(|_| health.pick()).collect();
        assert_eq!(turns, [0, 1, 2, 0, 1, 2]);
        health.mark_down(1);
        let turns: Vec<usize> = (0..4).map(|_| health.pick()).collect();
        assert!(!turns.contains(&1), "{turns:?}");
    }

    #[test]
    fn when_every_replica_failed_they_are_tried_anyway() {
        let health = health(2);
        health.mark_down(0);
        health.mark_down(1);
        let turns: Vec<usize> = (0..2).map(|_| health.pick()).collect();
        assert_eq!(turns.len(), 2);
        assert!(turns.contains(&0) && turns.contains(&1), "{turns:?}");
    }
}
