//! Upstream clusters: endpoints, load balancing, passive outlier ejection, active health
//! checks, a circuit breaker per endpoint, and the pooled HTTP client.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::{Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;
use trellis_resilience::{BreakerState, CallPermit, CircuitBreaker, Outcome, SlidingWindow};

use crate::body::{GatewayBody, empty};
use crate::config::{
    ClusterConfig, HealthCheckConfig, LoadBalancing, OutlierConfig, UpstreamProtocol,
};
use crate::error::ConfigError;

/// The pooled client every cluster uses.
pub(crate) type HttpClient = Client<HttpConnector, GatewayBody>;

thread_local! {
    /// Which of a cluster's clients this thread uses: 0 outside the gateway's worker threads,
    /// `i + 1` on worker `i` (see `Gateway::serve_threads`). A client's pooled connections run
    /// as tasks on the runtime that opened them, so a worker that keeps to its own client never
    /// wakes another thread to forward a request.
    static WORKER_INDEX: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the current thread as gateway worker `index` (0-based).
pub(crate) fn set_worker_index(index: usize) {
    WORKER_INDEX.with(|w| w.set(index + 1));
}

/// Weight of a new latency sample in an endpoint's EWMA (out of 1).
const EWMA_WEIGHT: f64 = 0.3;
/// EWMA latency assumed for an endpoint before its first answer, nanoseconds: zero, so every
/// endpoint is tried early and gets a real figure.
const EWMA_INITIAL_NS: u64 = 0;
/// Time constant of the decay of an endpoint's EWMA while it gets no answers, milliseconds
/// (Linkerd's peak-EWMA default), so an endpoint once slow is tried again.
const EWMA_DECAY_MS: f64 = 10_000.0;
/// Doublings of the base ejection time before it is capped.
const EJECTION_DOUBLINGS_MAX: u32 = 16;

/// One upstream host.
#[derive(Debug)]
pub(crate) struct Endpoint {
    /// `host:port`.
    pub(crate) authority: http::uri::Authority,
    pub(crate) breaker: CircuitBreaker,
    outstanding: AtomicU32,
    ewma_ns: AtomicU64,
    /// Cluster-epoch milliseconds of the last EWMA sample.
    ewma_at_ms: AtomicU64,
    consecutive_failures: AtomicU32,
    /// Milliseconds since the cluster's epoch until which the endpoint is ejected; 0 = not.
    ejected_until_ms: AtomicU64,
    ejections: AtomicU32,
    /// Active health-check verdict (true when checks are off).
    healthy: AtomicBool,
}

/// A set of interchangeable endpoints and how to pick one.
#[derive(Debug)]
pub(crate) struct Cluster {
    pub(crate) name: String,
    pub(crate) endpoints: Vec<Arc<Endpoint>>,
    /// One client per worker thread, plus one (index 0) for everything else.
    clients: Vec<HttpClient>,
    balancing: LoadBalancing,
    protocol: UpstreamProtocol,
    outlier: OutlierConfig,
    health: Option<HealthCheckConfig>,
    next: AtomicUsize,
    epoch: Instant,
    ejected_count: AtomicUsize,
    metrics: ClusterMetrics,
}

/// Handles registered once per cluster, so the hot path does no registry lookup.
#[derive(Debug)]
struct ClusterMetrics {
    duration: metrics::Histogram,
    successes: metrics::Counter,
    failures: metrics::Counter,
}

impl ClusterMetrics {
    fn new(cluster: &str) -> Self {
        let outcome = |o: &'static str| metrics::counter!("trellis_gateway_upstream_requests_total", "cluster" => cluster.to_owned(), "outcome" => o);
        Self {
            duration: metrics::histogram!("trellis_gateway_upstream_duration_seconds", "cluster" => cluster.to_owned()),
            successes: outcome("success"),
            failures: outcome("failure"),
        }
    }
}

/// An endpoint chosen for one attempt: holds its in-flight slot and breaker permit, both
/// borrowed from the cluster (which the request's routing table keeps alive).
#[derive(Debug)]
pub(crate) struct Pick<'a> {
    pub(crate) endpoint: &'a Arc<Endpoint>,
    permit: Option<CallPermit<'a>>,
    started: Instant,
}

/// Why no endpoint could be picked.
#[derive(Debug)]
pub(crate) struct NoEndpoint {
    /// Time until an open breaker admits a trial call, when breakers are what blocks.
    pub(crate) retry_after: Option<Duration>,
}

impl Cluster {
    /// Builds a cluster and its client. Call [`spawn_health_checks`] afterwards.
    pub(crate) fn new(
        name: &str,
        config: &ClusterConfig,
        workers: usize,
    ) -> Result<Arc<Self>, ConfigError> {
        let key = format!("clusters.{name}");
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_millis(config.connect_timeout_ms)));
        connector.set_nodelay(true);
        connector.enforce_http(true);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(Duration::from_millis(config.pool_idle_timeout_ms))
            .pool_max_idle_per_host(config.pool_idle_per_host)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new());
        if config.protocol == UpstreamProtocol::H2c {
            builder.http2_only(true);
        }
        let clients = (0..=workers)
            .map(|_| builder.build(connector.clone()))
            .collect();

        let b = &config.breaker;
        let mut endpoints = Vec::with_capacity(config.endpoints.len());
        for (i, e) in config.endpoints.iter().enumerate() {
            let authority: http::uri::Authority = e.parse().map_err(|_| ConfigError::Invalid {
                key: format!("{key}.endpoints[{i}]"),
                message: format!("`{e}` is not host:port"),
            })?;
            let breaker = CircuitBreaker::builder(&format!("{name}/{e}"))
                .sliding_window(SlidingWindow::Count(b.window_calls))
                .minimum_calls(b.minimum_calls)
                .failure_rate_threshold(b.failure_rate)
                .open_duration(Duration::from_millis(b.open_ms))
                .half_open_calls(b.half_open_calls)
                .build()
                .map_err(|err| ConfigError::Invalid {
                    key: format!("{key}.breaker"),
                    message: err.to_string(),
                })?;
            endpoints.push(Arc::new(Endpoint {
                authority,
                breaker,
                outstanding: AtomicU32::new(0),
                ewma_ns: AtomicU64::new(EWMA_INITIAL_NS),
                ewma_at_ms: AtomicU64::new(0),
                consecutive_failures: AtomicU32::new(0),
                ejected_until_ms: AtomicU64::new(0),
                ejections: AtomicU32::new(0),
                healthy: AtomicBool::new(true),
            }));
        }
        Ok(Arc::new(Self {
            name: name.to_owned(),
            endpoints,
            clients,
            balancing: config.load_balancing,
            protocol: config.protocol,
            outlier: config.outlier.clone(),
            health: config.health_check.clone(),
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
            ejected_count: AtomicUsize::new(0),
            metrics: ClusterMetrics::new(name),
        }))
    }

    /// The client of the current thread.
    pub(crate) fn client(&self) -> &HttpClient {
        let index = WORKER_INDEX.with(std::cell::Cell::get);
        &self.clients[index % self.clients.len()]
    }

    /// The protocol spoken to the endpoints.
    pub(crate) fn protocol(&self) -> UpstreamProtocol {
        self.protocol
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether the endpoint may take traffic now (health, ejection, breaker).
    fn available(&self, e: &Endpoint, now_ms: u64) -> bool {
        if !e.healthy.load(Ordering::Relaxed) {
            return false;
        }
        let until = e.ejected_until_ms.load(Ordering::Relaxed);
        if until != 0 {
            if now_ms < until {
                return false;
            }
            // The ejection is over: the endpoint returns (once).
            if e.ejected_until_ms
                .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                self.ejected_count.fetch_sub(1, Ordering::Relaxed);
            }
        }
        // An OPEN breaker is left to `try_acquire`, which moves it to HALF_OPEN once its open
        // time has passed; only an operator's hold is final.
        e.breaker.state() != BreakerState::ForcedOpen
    }

    /// Whether any endpoint can take traffic (for `/readyz`); breakers are not consulted, so
    /// a readiness probe never starves a breaker of its trial calls.
    pub(crate) fn any_available(&self) -> bool {
        let now = self.now_ms();
        self.endpoints.iter().any(|e| self.available(e, now))
    }

    /// Picks an endpoint, skipping `exclude` (the one a retry just failed on) when another is
    /// available, and takes a breaker permit for it.
    pub(crate) fn pick(&self, exclude: Option<&Arc<Endpoint>>) -> Result<Pick<'_>, NoEndpoint> {
        let now = self.now_ms();
        let n = self.endpoints.len();
        if n == 0 {
            // Validation refuses empty clusters; stay total anyway.
            return Err(NoEndpoint { retry_after: None });
        }
        let usable = |e: &Arc<Endpoint>| {
            self.available(e, now) && !exclude.is_some_and(|x| Arc::ptr_eq(x, e) && n > 1)
        };
        let mut retry_after: Option<Duration> = None;
        // Up to n tries: a breaker may reject a half-open trial we expected to get.
        for _ in 0..n {
            let chosen = match self.balancing {
                LoadBalancing::RoundRobin => {
                    let start = self.next.fetch_add(1, Ordering::Relaxed);
                    (0..n)
                        .map(|i| &self.endpoints[(start + i) % n])
                        .find(|e| usable(e))
                }
                LoadBalancing::LeastOutstanding => {
                    let start = fastrand::usize(..n);
                    (0..n)
                        .map(|i| &self.endpoints[(start + i) % n])
                        .filter(|e| usable(e))
                        .min_by_key(|e| e.outstanding.load(Ordering::Relaxed))
                }
                LoadBalancing::P2cEwma => {
                    let candidates: Vec<&Arc<Endpoint>> =
                        self.endpoints.iter().filter(|e| usable(e)).collect();
                    match candidates.len() {
                        0 => None,
                        1 => Some(candidates[0]),
                        len => {
                            let a = fastrand::usize(..len);
                            let mut b = fastrand::usize(..len - 1);
                            if b >= a {
                                b += 1;
                            }
                            let cost = |e: &Endpoint| {
                                let idle_ms =
                                    now.saturating_sub(e.ewma_at_ms.load(Ordering::Relaxed));
                                let decay = (-(idle_ms as f64) / EWMA_DECAY_MS).exp();
                                e.ewma_ns.load(Ordering::Relaxed) as f64
                                    * decay
                                    * f64::from(e.outstanding.load(Ordering::Relaxed) + 1)
                            };
                            Some(if cost(candidates[a]) <= cost(candidates[b]) {
                                candidates[a]
                            } else {
                                candidates[b]
                            })
                        }
                    }
                }
            };
            let Some(endpoint) = chosen else {
                break;
            };
            match endpoint.breaker.try_acquire() {
                Ok(permit) => {
                    endpoint.outstanding.fetch_add(1, Ordering::Relaxed);
                    return Ok(Pick {
                        endpoint,
                        permit: Some(permit),
                        started: Instant::now(),
                    });
                }
                Err(rejected) => {
                    let after = rejected.retry_after();
                    retry_after = match (retry_after, after) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
            }
        }
        Err(NoEndpoint { retry_after })
    }

    /// Records how an attempt went: breaker outcome, latency EWMA, outlier detection.
    pub(crate) fn finish(&self, mut pick: Pick<'_>, failed: bool) {
        let e = pick.endpoint;
        e.outstanding.fetch_sub(1, Ordering::Relaxed);
        let elapsed_ns = u64::try_from(pick.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let old = e.ewma_ns.load(Ordering::Relaxed) as f64;
        let new = if old == 0.0 {
            elapsed_ns as f64
        } else {
            old + EWMA_WEIGHT * (elapsed_ns as f64 - old)
        };
        e.ewma_ns.store(new as u64, Ordering::Relaxed);
        e.ewma_at_ms.store(self.now_ms(), Ordering::Relaxed);
        if let Some(permit) = pick.permit.take() {
            permit.record(if failed {
                Outcome::Failure
            } else {
                Outcome::Success
            });
        }
        self.metrics.duration.record(elapsed_ns as f64 / 1e9);
        if failed {
            self.metrics.failures.increment(1);
        } else {
            self.metrics.successes.increment(1);
        }
        if !failed {
            e.consecutive_failures.store(0, Ordering::Relaxed);
            return;
        }
        let threshold = self.outlier.consecutive_failures;
        if threshold == 0 {
            return;
        }
        let failures = e.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < threshold {
            return;
        }
        let allowed = (self.endpoints.len() * self.outlier.max_ejected_percent as usize / 100)
            .min(self.endpoints.len().saturating_sub(1));
        if self.ejected_count.load(Ordering::Relaxed) >= allowed {
            return;
        }
        let now = self.now_ms();
        let current = e.ejected_until_ms.load(Ordering::Relaxed);
        if current != 0 {
            return;
        }
        let ejections = e.ejections.fetch_add(1, Ordering::Relaxed);
        let factor = 1u64 << ejections.min(EJECTION_DOUBLINGS_MAX);
        let duration = self
            .outlier
            .base_ejection_ms
            .saturating_mul(factor)
            .min(self.outlier.max_ejection_ms);
        if e.ejected_until_ms
            .compare_exchange(
                0,
                now + duration.max(1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
        {
            self.ejected_count.fetch_add(1, Ordering::Relaxed);
            e.consecutive_failures.store(0, Ordering::Relaxed);
            metrics::counter!("trellis_gateway_ejections_total", "cluster" => self.name.clone(), "endpoint" => e.authority.to_string())
                .increment(1);
            tracing::warn!(cluster = %self.name, endpoint = %e.authority, ejection_ms = duration, "endpoint ejected");
        }
    }

    /// The URI of `path_and_query` on `endpoint`.
    pub(crate) fn uri(endpoint: &Endpoint, path_and_query: &str) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme("http")
            .authority(endpoint.authority.clone())
            .path_and_query(path_and_query)
            .build()
    }
}

impl Drop for Pick<'_> {
    fn drop(&mut self) {
        // A pick dropped without `finish` (the request was cancelled): give the slot back; the
        // breaker permit drops as "ignored".
        if self.permit.is_some() {
            self.endpoint.outstanding.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Starts the active health checks of `cluster`, if configured. The task ends when the
/// cluster is dropped (after a reload replaced it).
pub(crate) fn spawn_health_checks(cluster: &Arc<Cluster>) {
    let Some(config) = cluster.health.clone() else {
        return;
    };
    let weak: Weak<Cluster> = Arc::downgrade(cluster);
    tokio::spawn(async move {
        let interval = Duration::from_millis(config.interval_ms);
        let timeout = Duration::from_millis(config.timeout_ms);
        let mut streaks: Vec<(u32, u32)> = Vec::new();
        loop {
            let Some(cluster) = weak.upgrade() else {
                return;
            };
            streaks.resize(cluster.endpoints.len(), (0, 0));
            let checks = cluster.endpoints.iter().map(|e| {
                let client = cluster.client().clone();
                let uri = Cluster::uri(e, &config.path);
                async move {
                    let Ok(uri) = uri else {
                        return false;
                    };
                    let Ok(request) = Request::get(uri).body(empty()) else {
                        return false;
                    };
                    matches!(
                        tokio::time::timeout(timeout, client.request(request)).await,
                        Ok(Ok(response)) if response.status().is_success()
                    )
                }
            });
            let results = futures_util::future::join_all(checks).await;
            for ((e, ok), streak) in cluster
                .endpoints
                .iter()
                .zip(results)
                .zip(streaks.iter_mut())
            {
                if ok {
                    *streak = (streak.0 + 1, 0);
                } else {
                    *streak = (0, streak.1 + 1);
                }
                let healthy = e.healthy.load(Ordering::Relaxed);
                if healthy && streak.1 >= config.unhealthy_threshold {
                    e.healthy.store(false, Ordering::Relaxed);
                    tracing::warn!(cluster = %cluster.name, endpoint = %e.authority, "endpoint failed its health checks");
                } else if !healthy && streak.0 >= config.healthy_threshold {
                    e.healthy.store(true, Ordering::Relaxed);
                    tracing::info!(cluster = %cluster.name, endpoint = %e.authority, "endpoint passed its health checks");
                }
            }
            drop(cluster);
            tokio::time::sleep(interval).await;
        }
    });
}
