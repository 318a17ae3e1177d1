//! A rate limit shared across gateway replicas through Redis: one GCRA Lua script per check,
//! timed by Redis `TIME`. Its caller falls back to the local limiter when this answers
//! `None` (see the parent module on failing open).

use std::time::Duration;

use crate::config::RateLimitConfig;
use crate::error::ConfigError;

use super::{RateLimitHeaders, Verdict};

/// Time Redis is not asked after it failed, so a dead Redis costs one timeout per this
/// period rather than one per request.
pub(crate) const REDIS_RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// GCRA in one round trip. KEYS[1]: the client's key. ARGV[1]: emission interval (µs),
/// ARGV[2]: burst tolerance (µs) = (burst - 1) × emission. The stored value is the
/// theoretical arrival time (TAT, µs). Returns `{1, remaining, reset_us}` or
/// `{0, retry_after_us}`.
const GCRA_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local emission = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
if tat - now > tolerance then
  return {0, tat - now - tolerance}
end
local new_tat = tat + emission
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
return {1, math.floor((now + tolerance + emission - new_tat) / emission), new_tat - now}
";

/// The Redis side of a shared limit.
pub(super) struct SharedLimit {
    client: redis::Client,
    script: redis::Script,
    prefix: String,
    timeout: Duration,
    emission_us: u64,
    tolerance_us: u64,
    state: std::sync::Mutex<SharedState>,
    errors: metrics::Counter,
}

#[derive(Default)]
struct SharedState {
    connection: Option<redis::aio::MultiplexedConnection>,
    down_until: Option<tokio::time::Instant>,
}

impl std::fmt::Debug for SharedLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimit")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl SharedLimit {
    /// The Redis side of policy `name` on route `route`, at `url`.
    pub(super) fn new(
        name: &str,
        route: &str,
        url: &str,
        config: &RateLimitConfig,
        emission: Duration,
    ) -> Result<Self, ConfigError> {
        let client = redis::Client::open(url).map_err(|e| ConfigError::Invalid {
            key: format!("rate_limits.{name}.redis_url"),
            message: e.to_string(),
        })?;
        let emission_us = u64::try_from(emission.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        Ok(Self {
            client,
            script: redis::Script::new(GCRA_SCRIPT),
            prefix: format!("trellis:rl:{route}:{name}:"),
            timeout: Duration::from_millis(config.redis_timeout_ms),
            emission_us,
            tolerance_us: emission_us.saturating_mul(u64::from(config.burst - 1)),
            state: std::sync::Mutex::new(SharedState::default()),
            errors: metrics::counter!("trellis_gateway_rate_limit_backend_errors_total", "policy" => name.to_owned()),
        })
    }

    /// The shared verdict, or `None` when Redis cannot answer in time.
    pub(super) async fn check(&self, key: &str, limit: u32) -> Option<Verdict> {
        let connection = {
            let state = self
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if state
                .down_until
                .is_some_and(|until| tokio::time::Instant::now() < until)
            {
                return None;
            }
            state.connection.clone()
        };
        let result = tokio::time::timeout(self.timeout, async {
            let mut connection = match connection {
                Some(c) => c,
                None => {
                    let c = self.client.get_multiplexed_async_connection().await?;
                    self.state
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .connection = Some(c.clone());
                    c
                }
            };
            self.script
                .key(format!("{}{key}", self.prefix))
                .arg(self.emission_us)
                .arg(self.tolerance_us)
                .invoke_async::<Vec<i64>>(&mut connection)
                .await
        })
        .await;
        let reply = match result {
            Ok(Ok(reply)) => reply,
            Ok(Err(error)) => {
                self.failed(&error.to_string());
                return None;
            }
            Err(_elapsed) => {
                self.failed("timed out");
                return None;
            }
        };
        let micros = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
        match reply.as_slice() {
            [1, remaining, reset_us] => Some(Verdict::Allowed(RateLimitHeaders {
                limit,
                remaining: u32::try_from(*remaining).unwrap_or(0),
                reset_s: micros(*reset_us).as_secs_f64().ceil() as u64,
            })),
            [0, retry_after_us] => Some(Verdict::Limited {
                retry_after: micros(*retry_after_us),
                limit,
            }),
            other => {
                self.failed(&format!("unexpected script reply {other:?}"));
                None
            }
        }
    }

    fn failed(&self, why: &str) {
        self.errors.increment(1);
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.connection = None;
        state.down_until = Some(tokio::time::Instant::now() + REDIS_RETRY_AFTER_FAILURE);
        tracing::warn!(prefix = %self.prefix, error = why, "shared rate limit unavailable; using the local limiter");
    }
}
