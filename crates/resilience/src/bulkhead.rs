//! Bulkhead: at most N calls at once, a bounded queue of waiting calls, and a bounded wait.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use metrics::Counter;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service, ServiceExt};

use crate::error::{ConfigError, ResilienceError};

/// Limits concurrent calls. Cheap to clone; clones share the limit.
///
/// A call first takes a free slot; when none is free it waits in a queue of at most
/// `max_waiting` calls for at most `max_wait`; otherwise it is rejected with
/// [`ResilienceError::BulkheadFull`] at once. Waiters are served first come, first served.
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use trellis_resilience::Bulkhead;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let bulkhead = Bulkhead::new("db", 8, 16, Duration::from_millis(100)).expect("valid settings");
/// let rows = bulkhead.call(|| async { Ok::<_, std::io::Error>(3) }).await;
/// assert_eq!(rows.ok(), Some(3));
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Bulkhead {
    inner: Arc<BulkheadInner>,
}

#[derive(Debug)]
struct BulkheadInner {
    slots: Arc<Semaphore>,
    max_concurrent: usize,
    waiting: AtomicUsize,
    max_waiting: usize,
    max_wait: Duration,
    rejected: Counter,
}

/// A slot in a [`Bulkhead`], given back on drop.
#[derive(Debug)]
pub struct BulkheadPermit {
    _permit: OwnedSemaphorePermit,
}

/// Decrements the waiting count however the wait ends (including cancellation).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Bulkhead {
    /// A bulkhead of `max_concurrent` slots, a queue of `max_waiting` and a wait limit.
    ///
    /// # Errors
    /// A [`ConfigError`] when `max_concurrent` is 0 or above tokio's semaphore limit.
    pub fn new(
        name: &str,
        max_concurrent: usize,
        max_waiting: usize,
        max_wait: Duration,
    ) -> Result<Self, ConfigError> {
        if max_concurrent == 0 || max_concurrent > Semaphore::MAX_PERMITS {
            return Err(ConfigError::new(
                "bulkhead",
                "max_concurrent",
                "must be at least 1",
            ));
        }
        crate::metric_help::describe();
        Ok(Self {
            inner: Arc::new(BulkheadInner {
                slots: Arc::new(Semaphore::new(max_concurrent)),
                max_concurrent,
                waiting: AtomicUsize::new(0),
                max_waiting,
                max_wait,
                rejected: metrics::counter!("trellis_bulkhead_rejections_total", "bulkhead" => name.to_owned()),
            }),
        })
    }

    /// Calls running now.
    pub fn in_flight(&self) -> usize {
        self.inner.max_concurrent - self.inner.slots.available_permits()
    }

    /// Calls waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.inner.waiting.load(Ordering::Acquire)
    }

    /// Takes a slot, waiting within the limits.
    ///
    /// # Errors
    /// [`ResilienceError::BulkheadFull`] when the queue is full or the wait passes its limit.
    pub async fn acquire<E>(&self) -> Result<BulkheadPermit, ResilienceError<E>> {
        let inner = &*self.inner;
        if let Ok(permit) = inner.slots.clone().try_acquire_owned() {
            return Ok(BulkheadPermit { _permit: permit });
        }
        if inner.max_waiting == 0 || inner.max_wait.is_zero() {
            inner.rejected.increment(1);
            return Err(ResilienceError::BulkheadFull);
        }
        if inner.waiting.fetch_add(1, Ordering::AcqRel) >= inner.max_waiting {
            inner.waiting.fetch_sub(1, Ordering::AcqRel);
            inner.rejected.increment(1);
            return Err(ResilienceError::BulkheadFull);
        }
        let _waiting = Waiting(&inner.waiting);
        match tokio::time::timeout(inner.max_wait, inner.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(BulkheadPermit { _permit: permit }),
            // The semaphore is never closed; a timeout is the only other way out.
            Ok(Err(_)) | Err(_) => {
                inner.rejected.increment(1);
                Err(ResilienceError::BulkheadFull)
            }
        }
    }

    /// Runs `f` in a slot.
    ///
    /// # Errors
    /// [`ResilienceError::BulkheadFull`] without running `f`, or `f`'s error as
    /// [`ResilienceError::Inner`].
    pub async fn call<F, Fut, T, E>(&self, f: F) -> Result<T, ResilienceError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let _permit = self.acquire().await?;
        f().await.map_err(ResilienceError::Inner)
    }
}

/// Wraps services in a [`BulkheadService`].
#[derive(Debug, Clone)]
pub struct BulkheadLayer {
    bulkhead: Bulkhead,
}

impl BulkheadLayer {
    /// Services made by this layer share `bulkhead`.
    pub fn new(bulkhead: Bulkhead) -> Self {
        Self { bulkhead }
    }
}

impl<S> Layer<S> for BulkheadLayer {
    type Service = BulkheadService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BulkheadService {
            inner,
            bulkhead: self.bulkhead.clone(),
        }
    }
}

/// A service whose calls pass through a [`Bulkhead`].
#[derive(Debug, Clone)]
pub struct BulkheadService<S> {
    inner: S,
    bulkhead: Bulkhead,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, Req> Service<Req> for BulkheadService<S>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    S::Error: Send,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = ResilienceError<S::Error>;
    type Future = BoxFuture<Result<S::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let service = self.inner.clone();
        let bulkhead = self.bulkhead.clone();
        Box::pin(async move {
            let _permit = bulkhead.acquire().await?;
            service
                .oneshot(request)
                .await
                .map_err(ResilienceError::Inner)
        })
    }
}
