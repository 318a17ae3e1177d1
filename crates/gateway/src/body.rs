//! The one body type the gateway sends both ways.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};

/// A boxed error from a body or transport.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body the gateway handles: streamed client and upstream bodies, and its own answers.
pub type GatewayBody = BoxBody<Bytes, BoxError>;

/// A body holding `bytes`.
pub(crate) fn full(bytes: impl Into<Bytes>) -> GatewayBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub(crate) fn empty() -> GatewayBody {
    Empty::new().map_err(|never| match never {}).boxed()
}
