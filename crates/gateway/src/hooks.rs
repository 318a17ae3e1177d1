//! The extension point: [`GatewayHooks`], called at fixed phases of every proxied request.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Response, StatusCode, request, response};

use crate::body::GatewayBody;

/// What the gateway knows about one request, handed to every hook.
#[derive(Debug, Clone)]
pub struct RequestCtx {
    /// The `x-request-id` (the client's, or one the gateway made).
    pub request_id: String,
    /// The matched route's name.
    pub route: Arc<str>,
    /// The client's address.
    pub peer: SocketAddr,
    /// The authenticated subject (JWT `sub` or API key id), once auth has run.
    pub subject: Option<String>,
}

/// A hook's decision on an incoming request.
#[derive(Debug)]
pub enum HookDecision {
    /// Go on with the request.
    Continue,
    /// Answer the client with this response; nothing is sent upstream.
    Respond(Response<GatewayBody>),
}

/// Hooks called at the phases of every proxied request (after routing; the admin endpoints
/// and unrouted requests do not reach them).
///
/// Phases, in order: [`request_filter`](Self::request_filter) (before auth and rate limits),
/// [`upstream_request_filter`](Self::upstream_request_filter) (once per attempt, just before
/// the request is sent), [`response_filter`](Self::response_filter) (on the upstream's answer
/// before it is streamed back) and [`logging`](Self::logging) (once, with the final status,
/// also for requests the gateway answered itself). Hooks are synchronous and run on the
/// request's task: keep them short. A panicking hook is a bug; the connection's task dies
/// with it, the gateway keeps serving.
pub trait GatewayHooks: Send + Sync + std::fmt::Debug + 'static {
    /// Inspects or changes the request, or answers it directly.
    fn request_filter(&self, ctx: &mut RequestCtx, request: &mut request::Parts) -> HookDecision;

    /// Changes the request about to be sent upstream (headers, URI). Default: nothing.
    fn upstream_request_filter(&self, ctx: &RequestCtx, request: &mut request::Parts) {
        let _ = (ctx, request);
    }

    /// Changes the upstream's answer head. Default: nothing.
    fn response_filter(&self, ctx: &RequestCtx, response: &mut response::Parts) {
        let _ = (ctx, response);
    }

    /// Called once per request with the final status. Default: nothing.
    fn logging(&self, ctx: &RequestCtx, status: StatusCode) {
        let _ = (ctx, status);
    }
}

/// Hooks that do nothing (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHooks;

impl GatewayHooks for NoHooks {
    fn request_filter(&self, _ctx: &mut RequestCtx, _request: &mut request::Parts) -> HookDecision {
        HookDecision::Continue
    }
}
