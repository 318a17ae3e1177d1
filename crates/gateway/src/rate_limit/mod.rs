//! Per-route GCRA rate limiting keyed by client IP, JWT subject, API key or a header, on
//! governor's keyed limiter, with a bounded key table.
//!
//! With `redis_url`, the limit is shared across gateway replicas: each check runs one GCRA
//! Lua script in Redis (time from Redis `TIME`, so replicas' clocks need not agree; idle keys
//! expire by themselves). When Redis fails or is slower than `redis_timeout_ms`, the local
//! limiter answers instead (fail open to a per-replica limit), Redis is left alone for
//! [`REDIS_RETRY_AFTER_FAILURE`](shared::REDIS_RETRY_AFTER_FAILURE), and
//! `trellis_gateway_rate_limit_backend_errors_total` counts the failure (the Redis side is
//! in `shared`). See docs/decisions/0005-gateway-design.md.
//!
//! The local limiter reads time only from the clock it is given ([`RouteLimiter::with_clock`]):
//! governor's monotonic clock in production, a `FakeRelativeClock` in tests.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{Quota, RateLimiter};
use http::{HeaderMap, HeaderName};

use crate::auth::Identity;
use crate::config::RateLimitConfig;
use crate::error::ConfigError;

use shared::SharedLimit;

mod shared;

type Keyed<C> = RateLimiter<String, KeyTable, C, StateInformationMiddleware>;

/// What identifies a client.
#[derive(Debug, Clone)]
pub(crate) enum KeySource {
    Ip,
    JwtSubject,
    ApiKey,
    Header(HeaderName),
}

/// A route's limiter, on clock `C` (governor's monotonic clock unless a test injects one).
#[derive(Debug)]
pub(crate) struct RouteLimiter<C: Clock = DefaultClock> {
    source: KeySource,
    limiter: Keyed<C>,
    clock: C,
    table: Arc<KeyTableState>,
    burst: u32,
    emission: Duration,
    keys_max: usize,
    /// When a full table was last swept of replenished keys.
    last_sweep: Mutex<C::Instant>,
    shared: Option<SharedLimit>,
    /// Requests this limit refused (`trellis_gateway_rate_limited_total`).
    limited: metrics::Counter,
}

/// Least time between two sweeps of a full key table (each walks the whole table under its
/// lock), so a flood of new keys costs one sweep per this period, not one per request.
const KEY_TABLE_SWEEP_INTERVAL_MIN: Duration = Duration::from_secs(1);

/// The per-key GCRA states of one route, bounded to `keys_max` keys.
///
/// Why not start a fresh table when it is full (as this limiter once did): every key in it
/// would get a fresh burst, so a client that floods distinct keys (spoofed header values,
/// rotating addresses) would reset everybody's limit, its own included, as often as it
/// likes. Instead a full table makes room only by forgetting keys whose bucket has refilled
/// (governor's `retain_recent`): such a key, seen again, starts with the full bucket it had
/// anyway, so forgetting it loses nothing. Until room frees up, keys the table does not know
/// share one overflow bucket with the route's quota: during a flood, new clients are limited
/// together (they may see 429s a known client would not) while known clients keep exactly
/// their own state. That is failing closed for unknown keys, the opposite of the Redis
/// fallback above; here failing open would be the attack itself, and memory stays bounded
/// either way.
#[derive(Debug)]
struct KeyTable(Arc<KeyTableState>);

#[derive(Debug)]
struct KeyTableState {
    keys: Mutex<HashMap<String, InMemoryState>>,
    keys_max: usize,
    overflow: InMemoryState,
    /// Set when a request went to the overflow bucket; the next check sweeps the table.
    full: AtomicBool,
    overflowed: metrics::Counter,
}

impl KeyTableState {
    fn keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, InMemoryState>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl StateStore for KeyTable {
    type Key = String;

    fn measure_and_replace<T, F, E>(&self, key: &String, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let table = &self.0;
        {
            let mut keys = table.keys();
            if let Some(state) = keys.get(key) {
                return state.measure_and_replace(&NotKeyed::NonKey, f);
            }
            if keys.len() < table.keys_max {
                return keys
                    .entry(key.clone())
                    .or_default()
                    .measure_and_replace(&NotKeyed::NonKey, f);
            }
        }
        table.full.store(true, Ordering::Relaxed);
        table.overflowed.increment(1);
        table.overflow.measure_and_replace(&NotKeyed::NonKey, f)
    }
}

impl ShrinkableKeyedStateStore<String> for KeyTable {
    fn retain_recent(&self, drop_below: Nanos) {
        self.0
            .keys()
            .retain(|_, state| theoretical_arrival(state).is_some_and(|tat| tat > drop_below));
    }

    fn shrink_to_fit(&self) {
        self.0.keys().shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.0.keys().len()
    }

    fn is_empty(&self) -> bool {
        self.0.keys().is_empty()
    }
}

/// A state's theoretical arrival time (GCRA's TAT), `None` when it was never used; read
/// through `measure_and_replace` with a closure that declines to replace (governor keeps its
/// own reader crate-private).
fn theoretical_arrival(state: &InMemoryState) -> Option<Nanos> {
    state
        .measure_and_replace(&NotKeyed::NonKey, Err::<((), Nanos), _>)
        .err()
        .flatten()
}

/// The values of the `RateLimit-*` headers on an admitted request's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RateLimitHeaders {
    /// `RateLimit-Limit`: the burst, requests.
    pub(crate) limit: u32,
    /// `RateLimit-Remaining`: requests left in the burst.
    pub(crate) remaining: u32,
    /// `RateLimit-Reset`: seconds until the burst is whole again.
    pub(crate) reset_s: u64,
}

/// The verdict for one request.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Admitted, with the values for the `RateLimit-*` headers.
    Allowed(RateLimitHeaders),
    /// Refused for this long.
    Limited { retry_after: Duration, limit: u32 },
}

impl RouteLimiter {
    /// A limiter for route `route` following policy `name`, on governor's monotonic clock.
    pub(crate) fn new(
        name: &str,
        route: &str,
        config: &RateLimitConfig,
    ) -> Result<Self, ConfigError> {
        Self::with_clock(name, route, config, DefaultClock::default())
    }
}

impl<C: Clock + Clone> RouteLimiter<C> {
    /// A limiter for route `route` following policy `name`, reading time from `clock`.
    pub(crate) fn with_clock(
        name: &str,
        route: &str,
        config: &RateLimitConfig,
        clock: C,
    ) -> Result<Self, ConfigError> {
        let bad = |message: &str| ConfigError::Invalid {
            key: format!("rate_limits.{name}"),
            message: message.to_owned(),
        };
        let source = match config.key.as_str() {
            "ip" => KeySource::Ip,
            "jwt_sub" => KeySource::JwtSubject,
            "api_key" => KeySource::ApiKey,
            other => KeySource::Header(
                other
                    .strip_prefix("header:")
                    .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                    .ok_or_else(|| bad("bad key"))?,
            ),
        };
        let rate = NonZeroU32::new(config.requests_per_second).ok_or_else(|| bad("rate is 0"))?;
        let burst = NonZeroU32::new(config.burst).ok_or_else(|| bad("burst is 0"))?;
        let quota = Quota::per_second(rate).allow_burst(burst);
        let emission = Duration::from_secs(1) / config.requests_per_second;
        let shared = config
            .redis_url
            .as_deref()
            .map(|url| SharedLimit::new(name, route, url, config, emission))
            .transpose()?;
        let table = Arc::new(KeyTableState {
            keys: Mutex::new(HashMap::new()),
            keys_max: config.keys_max,
            overflow: InMemoryState::default(),
            full: AtomicBool::new(false),
            overflowed: metrics::counter!("trellis_gateway_rate_limit_overflow_total", "policy" => name.to_owned()),
        });
        let limiter = Keyed::new(quota, KeyTable(Arc::clone(&table)), clock.clone());
        Ok(Self {
            source,
            limiter,
            last_sweep: Mutex::new(clock.now()),
            clock,
            table,
            burst: config.burst,
            emission,
            keys_max: config.keys_max,
            shared,
            limited: metrics::counter!("trellis_gateway_rate_limited_total", "policy" => name.to_owned(), "route" => route.to_owned()),
        })
    }

    /// The key of this request, or `None` when it has none (no subject on an anonymous
    /// request, no such header): such requests share one bucket per route.
    fn key(&self, peer: IpAddr, identity: Option<&Identity>, headers: &HeaderMap) -> String {
        let key = match &self.source {
            KeySource::Ip => Some(peer.to_string()),
            KeySource::JwtSubject => identity.and_then(|i| i.subject.clone()),
            KeySource::ApiKey => identity.and_then(|i| i.api_key_id.clone()),
            KeySource::Header(h) => headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.chars().take(256).collect()),
        };
        key.unwrap_or_default()
    }

    /// Checks (and counts) one request: in Redis when the limit is shared and Redis answers,
    /// else locally.
    pub(crate) async fn check(
        &self,
        peer: IpAddr,
        identity: Option<&Identity>,
        headers: &HeaderMap,
    ) -> Verdict {
        let key = self.key(peer, identity, headers);
        let verdict = match &self.shared {
            Some(shared) => match shared.check(&key, self.burst).await {
                Some(verdict) => verdict,
                None => self.check_local(key),
            },
            None => self.check_local(key),
        };
        if matches!(verdict, Verdict::Limited { .. }) {
            self.limited.increment(1);
        }
        verdict
    }

    fn check_local(&self, key: String) -> Verdict {
        let verdict = match self.limiter.check_key(&key) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                let used = self.burst.saturating_sub(remaining);
                let reset = self.emission * used;
                Verdict::Allowed(RateLimitHeaders {
                    limit: self.burst,
                    remaining,
                    reset_s: reset.as_secs() + u64::from(reset.subsec_nanos() > 0),
                })
            }
            Err(not_until) => Verdict::Limited {
                retry_after: not_until.wait_time_from(self.clock.now()),
                limit: self.burst,
            },
        };
        if self.table.full.swap(false, Ordering::Relaxed) {
            self.sweep_full_table();
        }
        verdict
    }

    /// Makes room in a full table by forgetting replenished keys, at most once per
    /// [`KEY_TABLE_SWEEP_INTERVAL_MIN`].
    fn sweep_full_table(&self) {
        {
            let mut last = self
                .last_sweep
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let now = self.clock.now();
            if Duration::from(now.duration_since(*last)) < KEY_TABLE_SWEEP_INTERVAL_MIN {
                return;
            }
            *last = now;
        }
        self.limiter.retain_recent();
        let keys = self.limiter.len();
        if keys >= self.keys_max {
            tracing::warn!(
                keys,
                bound = self.keys_max,
                "rate-limit key table full of active keys; new keys share one overflow bucket"
            );
        }
    }

    /// Evicts idle keys; called periodically.
    pub(crate) fn evict_idle(&self) {
        self.limiter.retain_recent();
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use governor::clock::FakeRelativeClock;
    use http::HeaderValue;

    use super::*;

    fn limiter(keys_max: usize) -> (RouteLimiter<FakeRelativeClock>, FakeRelativeClock) {
        limiter_with_burst(keys_max, 2)
    }

    /// A limiter at 1 request/s on a fake clock that only moves when the test advances it.
    fn limiter_with_burst(
        keys_max: usize,
        burst: u32,
    ) -> (RouteLimiter<FakeRelativeClock>, FakeRelativeClock) {
        let config: RateLimitConfig = toml::from_str(&format!(
            "key = \"header:x-tenant\"\nrequests_per_second = 1\nburst = {burst}\nkeys_max = {keys_max}"
        ))
        .expect("config");
        let clock = FakeRelativeClock::default();
        let limiter =
            RouteLimiter::with_clock("t", "route", &config, clock.clone()).expect("limiter");
        (limiter, clock)
    }

    fn tenant(name: impl std::fmt::Display) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-tenant",
            HeaderValue::from_str(&name.to_string()).expect("header value"),
        );
        headers
    }

    /// A counter the test reads back.
    #[derive(Debug, Default)]
    struct Count(std::sync::atomic::AtomicU64);

    impl metrics::CounterFn for Count {
        fn increment(&self, value: u64) {
            self.0.fetch_add(value, Ordering::Relaxed);
        }

        fn absolute(&self, value: u64) {
            self.0.store(value, Ordering::Relaxed);
        }
    }

    #[tokio::test]
    async fn each_refused_request_is_counted_once_and_admitted_ones_are_not() {
        // Goal: trellis_gateway_rate_limited_total counts 429s only. Method: burst 2 on a
        // clock that stands still, five requests: two admitted, three refused.
        let (mut l, _clock) = limiter_with_burst(10, 2);
        let count = Arc::new(Count::default());
        l.limited = metrics::Counter::from_arc(count.clone());
        let peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let mut refused = 0;
        for _ in 0..5 {
            if let Verdict::Limited { .. } = l.check(peer, None, &tenant("a")).await {
                refused += 1;
            }
        }
        assert_eq!(refused, 3);
        assert_eq!(count.0.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn a_flooded_key_table_does_not_hand_out_fresh_bursts() {
        // Goal: a client that has spent its burst gets no new one when a flood of distinct
        // keys overfills the table, and the flood gets no burst per key beyond the table's
        // room. Method: burst 10 at 1 request/s on a fake clock that stands still, so no
        // bucket regains anything during the test.
        let keys_max = 100;
        let burst = 10;
        let (l, _clock) = limiter_with_burst(keys_max, burst);
        let peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let spender = tenant("spender");
        for _ in 0..burst {
            assert!(matches!(
                l.check(peer, None, &spender).await,
                Verdict::Allowed(_)
            ));
        }
        assert!(matches!(
            l.check(peer, None, &spender).await,
            Verdict::Limited { .. }
        ));

        let mut flood_allowed: u64 = 0;
        for i in 0..5_000 {
            if let Verdict::Allowed(_) = l.check(peer, None, &tenant(i)).await {
                flood_allowed += 1;
            }
        }

        // The periodic eviction forgets only replenished keys: the spender stays.
        l.evict_idle();
        assert!(
            l.table.keys().contains_key("spender"),
            "the spender's state was evicted"
        );

        // The clock stood still: the spender has nothing back.
        let per_bucket = u64::from(burst);
        match l.check(peer, None, &spender).await {
            Verdict::Limited { .. } => {}
            Verdict::Allowed(headers) => panic!(
                "the spender got a fresh burst: {} requests left",
                headers.remaining
            ),
        }
        // Every key the table had room for, plus one shared bucket for the rest.
        let bound = (keys_max as u64 + 1) * per_bucket;
        assert!(
            flood_allowed <= bound,
            "the flood was admitted {flood_allowed} times (bound {bound})"
        );
    }

    #[tokio::test]
    async fn the_key_table_stays_within_its_bound_under_a_flood_of_keys() {
        let (l, _clock) = limiter(100);
        let peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
        for i in 0..10_000 {
            let mut headers = HeaderMap::new();
            headers.insert("x-tenant", HeaderValue::from(i));
            let _ = l.check(peer, None, &headers).await;
            assert!(l.limiter.len() <= 100);
        }
    }

    #[tokio::test]
    async fn a_key_is_limited_after_its_burst_and_others_are_not() {
        // Goal: one key's spent burst limits that key only, for exactly one emission
        // interval. Method: burst 2 at 1 request/s on a fake clock advanced by hand.
        let (l, clock) = limiter(100);
        let peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let mut a = HeaderMap::new();
        a.insert("x-tenant", HeaderValue::from_static("a"));
        let mut b = HeaderMap::new();
        b.insert("x-tenant", HeaderValue::from_static("b"));
        assert!(matches!(
            l.check(peer, None, &a).await,
            Verdict::Allowed(RateLimitHeaders { remaining: 1, .. })
        ));
        assert!(matches!(
            l.check(peer, None, &a).await,
            Verdict::Allowed(RateLimitHeaders { remaining: 0, .. })
        ));
        match l.check(peer, None, &a).await {
            Verdict::Limited { retry_after, limit } => {
                assert_eq!(limit, 2);
                assert_eq!(retry_after, Duration::from_secs(1));
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(matches!(l.check(peer, None, &b).await, Verdict::Allowed(_)));
        clock.advance(Duration::from_secs(1));
        assert!(matches!(
            l.check(peer, None, &a).await,
            Verdict::Allowed(RateLimitHeaders { remaining: 0, .. })
        ));
    }
}
