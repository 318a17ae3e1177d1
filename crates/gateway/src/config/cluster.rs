//! `[clusters.NAME]`: upstream endpoints, how one is picked, and how failing ones are
//! detected (active health checks, passive outlier ejection, a circuit breaker each).

use serde::Deserialize;

use crate::error::ConfigError;

use super::{
    CONNECT_TIMEOUT_MS_DEFAULT, ENDPOINTS_MAX, POOL_IDLE_PER_HOST_DEFAULT,
    POOL_IDLE_TIMEOUT_MS_DEFAULT, TIMEOUT_MS_CEILING, invalid, range,
};

/// How a cluster picks an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancing {
    /// Each available endpoint in turn.
    #[default]
    RoundRobin,
    /// The available endpoint with the fewest requests in flight.
    LeastOutstanding,
    /// Two random available endpoints; the one with the lower EWMA latency × (in flight + 1).
    P2cEwma,
}

/// The HTTP version spoken to a cluster's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive.
    #[default]
    Http1,
    /// HTTP/2 over cleartext with prior knowledge.
    H2c,
}

/// `[clusters.NAME]`: a set of interchangeable upstream endpoints.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `host:port` of each endpoint.
    pub endpoints: Vec<String>,
    /// Endpoint selection.
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    /// Protocol to the endpoints.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// Connect timeout, milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Idle pooled connections kept per endpoint.
    #[serde(default = "default_pool_idle_per_host")]
    pub pool_idle_per_host: usize,
    /// Time an idle pooled connection is kept, milliseconds.
    #[serde(default = "default_pool_idle_timeout_ms")]
    pub pool_idle_timeout_ms: u64,
    /// Active health checking; off when absent.
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    /// Passive outlier ejection.
    #[serde(default)]
    pub outlier: OutlierConfig,
    /// The circuit breaker each endpoint gets.
    #[serde(default)]
    pub breaker: BreakerConfig,
}

fn default_connect_timeout_ms() -> u64 {
    CONNECT_TIMEOUT_MS_DEFAULT
}
fn default_pool_idle_per_host() -> usize {
    POOL_IDLE_PER_HOST_DEFAULT
}
fn default_pool_idle_timeout_ms() -> u64 {
    POOL_IDLE_TIMEOUT_MS_DEFAULT
}

/// `[clusters.NAME.health_check]`: active checks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    /// Path requested with GET; a 2xx answer is healthy.
    pub path: String,
    /// Time between checks, milliseconds.
    pub interval_ms: u64,
    /// Time one check may take, milliseconds.
    pub timeout_ms: u64,
    /// Consecutive successes that mark an unhealthy endpoint healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures that mark a healthy endpoint unhealthy.
    pub unhealthy_threshold: u32,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            path: "/healthz".to_owned(),
            interval_ms: 5_000,
            timeout_ms: 1_000,
            healthy_threshold: 2,
            unhealthy_threshold: 2,
        }
    }
}

/// `[clusters.NAME.outlier]`: passive ejection of endpoints that keep failing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Consecutive 5xx answers or connect errors that eject an endpoint; 0 turns ejection off.
    pub consecutive_failures: u32,
    /// First ejection time, milliseconds; each further ejection doubles it.
    pub base_ejection_ms: u64,
    /// Longest ejection time, milliseconds.
    pub max_ejection_ms: u64,
    /// Most endpoints ejected at once, as a percentage of the cluster (at least one stays).
    pub max_ejected_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection_ms: 5_000,
            max_ejection_ms: 300_000,
            max_ejected_percent: 50,
        }
    }
}

/// `[clusters.NAME.breaker]`: the trellis-resilience circuit breaker of each endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Calls in the count window.
    pub window_calls: u32,
    /// Calls needed before the failure rate is judged.
    pub minimum_calls: u32,
    /// Failure rate (0..=1) that opens the breaker.
    pub failure_rate: f64,
    /// Time the breaker stays open, milliseconds.
    pub open_ms: u64,
    /// Trial calls admitted while half-open.
    pub half_open_calls: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            window_calls: 100,
            minimum_calls: 20,
            failure_rate: 0.5,
            open_ms: 10_000,
            half_open_calls: 5,
        }
    }
}

impl ClusterConfig {
    /// Checks endpoints, ranges and the nested sections; `key` is `clusters.NAME`.
    pub(super) fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if self.endpoints.is_empty() || self.endpoints.len() > ENDPOINTS_MAX {
            return Err(invalid(
                &format!("{key}.endpoints"),
                &format!("list 1 to {ENDPOINTS_MAX} endpoints"),
            ));
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            let ok = e
                .parse::<http::uri::Authority>()
                .ok()
                .is_some_and(|a| a.port_u16().is_some() && !e.contains('@'));
            if !ok {
                return Err(invalid(
                    &format!("{key}.endpoints[{i}]"),
                    &format!("`{e}` is not host:port"),
                ));
            }
        }
        range(
            &format!("{key}.connect_timeout_ms"),
            self.connect_timeout_ms,
            1,
            TIMEOUT_MS_CEILING,
        )?;
        range(
            &format!("{key}.pool_idle_timeout_ms"),
            self.pool_idle_timeout_ms,
            1,
            TIMEOUT_MS_CEILING,
        )?;
        range(
            &format!("{key}.pool_idle_per_host"),
            self.pool_idle_per_host as u64,
            0,
            65_536,
        )?;
        if let Some(health_check) = &self.health_check {
            health_check.validate(&format!("{key}.health_check"))?;
        }
        self.outlier.validate(&format!("{key}.outlier"))?;
        self.breaker.validate(&format!("{key}.breaker"))
    }
}

impl HealthCheckConfig {
    /// `key` is `clusters.NAME.health_check`.
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if !self.path.starts_with('/') || self.path.parse::<http::uri::PathAndQuery>().is_err() {
            return Err(invalid(
                &format!("{key}.path"),
                "expected a path starting with /",
            ));
        }
        range(
            &format!("{key}.interval_ms"),
            self.interval_ms,
            10,
            TIMEOUT_MS_CEILING,
        )?;
        range(
            &format!("{key}.timeout_ms"),
            self.timeout_ms,
            1,
            TIMEOUT_MS_CEILING,
        )?;
        range(
            &format!("{key}.healthy_threshold"),
            u64::from(self.healthy_threshold),
            1,
            100,
        )?;
        range(
            &format!("{key}.unhealthy_threshold"),
            u64::from(self.unhealthy_threshold),
            1,
            100,
        )?;
        Ok(())
    }
}

impl OutlierConfig {
    /// `key` is `clusters.NAME.outlier`.
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        range(
            &format!("{key}.consecutive_failures"),
            u64::from(self.consecutive_failures),
            0,
            1000,
        )?;
        range(
            &format!("{key}.base_ejection_ms"),
            self.base_ejection_ms,
            1,
            TIMEOUT_MS_CEILING,
        )?;
        range(
            &format!("{key}.max_ejection_ms"),
            self.max_ejection_ms,
            self.base_ejection_ms,
            TIMEOUT_MS_CEILING,
        )?;
        range(
            &format!("{key}.max_ejected_percent"),
            u64::from(self.max_ejected_percent),
            0,
            100,
        )?;
        Ok(())
    }
}

impl BreakerConfig {
    /// `key` is `clusters.NAME.breaker`.
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        range(
            &format!("{key}.window_calls"),
            u64::from(self.window_calls),
            1,
            10_000,
        )?;
        range(
            &format!("{key}.minimum_calls"),
            u64::from(self.minimum_calls),
            1,
            u64::from(self.window_calls),
        )?;
        if !(self.failure_rate > 0.0 && self.failure_rate <= 1.0) {
            return Err(invalid(
                &format!("{key}.failure_rate"),
                "expected a number in (0, 1]",
            ));
        }
        range(
            &format!("{key}.open_ms"),
            self.open_ms,
            1,
            TIMEOUT_MS_CEILING,
        )?;
        range(
            &format!("{key}.half_open_calls"),
            u64::from(self.half_open_calls),
            1,
            1000,
        )?;
        Ok(())
    }
}
