//! The one body type the gateway sends both ways, and the time bounds on upstream response
//! bodies.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use tokio::time::{Instant, Sleep};

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

/// Why an upstream response body was cut off.
#[derive(Debug, thiserror::Error)]
#[error("the upstream response body {what} ({limit:?})")]
pub(crate) struct BodyTimeout {
    what: &'static str,
    limit: Duration,
}

/// What a [`TimedBody`] reports when it cuts a body off.
#[derive(Debug)]
pub(crate) struct BodyTimeoutReport {
    pub(crate) route: Arc<str>,
    pub(crate) request_id: String,
    pub(crate) timeouts: metrics::Counter,
}

/// An upstream response body with two bounds: the whole body must arrive within `total` of
/// the headers, and no pause between two frames may last `idle`. When one passes the body
/// ends with a [`BodyTimeout`] error (hyper then aborts the client's connection or resets its
/// stream, as a response already started cannot change status) and the upstream body is
/// dropped, closing that connection.
pub(crate) struct TimedBody<B> {
    inner: Option<B>,
    total_limit: Duration,
    total: Pin<Box<Sleep>>,
    idle_limit: Duration,
    idle: Pin<Box<Sleep>>,
    report: BodyTimeoutReport,
}

impl<B> std::fmt::Debug for TimedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimedBody")
            .field("total_limit", &self.total_limit)
            .field("idle_limit", &self.idle_limit)
            .finish_non_exhaustive()
    }
}

impl<B> TimedBody<B> {
    /// Starts both clocks now (when the response headers have arrived).
    pub(crate) fn new(
        inner: B,
        total: Duration,
        idle: Duration,
        report: BodyTimeoutReport,
    ) -> Self {
        let now = Instant::now();
        Self {
            inner: Some(inner),
            total_limit: total,
            total: Box::pin(tokio::time::sleep_until(now + total)),
            idle_limit: idle,
            idle: Box::pin(tokio::time::sleep_until(now + idle)),
            report,
        }
    }
}

impl<B> Body for TimedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        // The total bound first: a body whose next frame is always ready would otherwise
        // never be checked against it.
        let timeout = if this.total.as_mut().poll(cx).is_ready() {
            BodyTimeout {
                what: "took longer than response_body_timeout_ms",
                limit: this.total_limit,
            }
        } else {
            match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let next = Instant::now() + this.idle_limit;
                    this.idle.as_mut().reset(next);
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error.into()))),
                Poll::Ready(None) => {
                    this.inner = None;
                    return Poll::Ready(None);
                }
                Poll::Pending => {}
            }
            if this.idle.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            BodyTimeout {
                what: "paused longer than response_body_idle_timeout_ms",
                limit: this.idle_limit,
            }
        };
        // Dropping the upstream body closes its connection rather than pooling a stalled one.
        this.inner = None;
        this.report.timeouts.increment(1);
        tracing::warn!(
            route = %this.report.route,
            request_id = %this.report.request_id,
            error = %timeout,
            source = "upstream",
            "response body cut off"
        );
        Poll::Ready(Some(Err(Box::new(timeout))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> BodyTimeoutReport {
        BodyTimeoutReport {
            route: Arc::from("r"),
            request_id: "id".to_owned(),
            timeouts: metrics::Counter::noop(),
        }
    }

    type Sent = Result<Frame<Bytes>, BoxError>;

    /// A body fed by hand through a channel.
    fn fed_body() -> (
        tokio::sync::mpsc::Sender<Sent>,
        impl Body<Data = Bytes, Error = BoxError> + Unpin,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Sent>(4);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|frame| (frame, rx))
        });
        (tx, http_body_util::StreamBody::new(Box::pin(stream)))
    }

    fn data(text: &'static str) -> Sent {
        Ok(Frame::data(Bytes::from_static(text.as_bytes())))
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_longer_than_the_idle_timeout_ends_the_body_with_an_error() {
        // Goal: each frame restarts the idle clock, and a pause past it ends the body with an
        // error while the total limit is still far. Paused time, advanced by hand.
        let (tx, inner) = fed_body();
        let mut body = TimedBody::new(
            inner,
            Duration::from_secs(60),
            Duration::from_secs(1),
            report(),
        );
        for piece in ["a", "b", "c"] {
            tokio::time::advance(Duration::from_millis(900)).await;
            tx.send(data(piece)).await.expect("send");
            let frame = body.frame().await.expect("a frame").expect("not an error");
            assert_eq!(frame.into_data().expect("data"), piece);
        }
        let cut = body.frame().await.expect("an end");
        let error = cut.expect_err("the pause is longer than the idle timeout");
        assert!(error.is::<BodyTimeout>(), "{error}");
        assert!(body.frame().await.is_none(), "nothing after the error");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_trickles_past_the_total_timeout_ends_with_an_error() {
        // Goal: frames within the idle limit do not extend the total limit. Paused time.
        let (tx, inner) = fed_body();
        let mut body = TimedBody::new(
            inner,
            Duration::from_secs(3),
            Duration::from_secs(1),
            report(),
        );
        let mut frames = 0;
        let error = loop {
            tokio::time::advance(Duration::from_millis(500)).await;
            let _ = tx.try_send(data("x"));
            match body
                .frame()
                .await
                .expect("the body goes on or ends with an error")
            {
                Ok(_) => frames += 1,
                Err(error) => break error,
            }
            assert!(frames < 100, "the total limit never fired");
        };
        assert!(error.is::<BodyTimeout>(), "{error}");
        assert!(frames >= 1, "frames flowed before the limit");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_ends_in_time_is_passed_through_whole() {
        // Goal: the bounds change nothing for a body that completes within them.
        let (tx, inner) = fed_body();
        let body = TimedBody::new(
            inner,
            Duration::from_secs(3),
            Duration::from_secs(1),
            report(),
        );
        tx.send(data("hello ")).await.expect("send");
        tx.send(data("world")).await.expect("send");
        drop(tx);
        let whole = body.collect().await.expect("whole body").to_bytes();
        assert_eq!(whole, "hello world");
    }
}
