//! `[rate_limits.NAME]`: GCRA rate-limit policies.

use serde::Deserialize;

use crate::error::ConfigError;

use super::{
    RATE_LIMIT_KEYS_MAX_DEFAULT, REDIS_TIMEOUT_MS_DEFAULT, TIMEOUT_MS_CEILING, header_name,
    invalid, range,
};

/// `[rate_limits.NAME]`: a GCRA policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// What identifies a client: `ip`, `jwt_sub`, `api_key` or `header:NAME`.
    pub key: String,
    /// Sustained rate, requests per second.
    pub requests_per_second: u32,
    /// Burst size, requests.
    pub burst: u32,
    /// Most keys tracked. A full table forgets keys whose bucket has refilled (nothing is
    /// lost: they would start full anyway); until that frees room, keys it does not know
    /// share one overflow bucket with this policy's rate and burst, so a flood of new keys
    /// never hands out fresh bursts (`trellis_gateway_rate_limit_overflow_total` counts
    /// requests charged to that bucket).
    #[serde(default = "default_keys_max")]
    pub keys_max: usize,
    /// Share the limit across gateway replicas through this Redis (`redis://host:port/db`).
    /// The local limiter still answers when Redis fails or is slower than `redis_timeout_ms`.
    #[serde(default)]
    pub redis_url: Option<String>,
    /// Longest wait for Redis per request, milliseconds.
    #[serde(default = "default_redis_timeout_ms")]
    pub redis_timeout_ms: u64,
}

fn default_redis_timeout_ms() -> u64 {
    REDIS_TIMEOUT_MS_DEFAULT
}

fn default_keys_max() -> usize {
    RATE_LIMIT_KEYS_MAX_DEFAULT
}

impl RateLimitConfig {
    /// Checks the key source, the rate and the Redis settings; `key` is `rate_limits.NAME`.
    pub(super) fn validate(&self, key: &str) -> Result<(), ConfigError> {
        match self.key.as_str() {
            "ip" | "jwt_sub" | "api_key" => {}
            other => match other.strip_prefix("header:") {
                Some(h) => header_name(&format!("{key}.key"), h)?,
                None => {
                    return Err(invalid(
                        &format!("{key}.key"),
                        &format!("`{other}` is not ip, jwt_sub, api_key or header:NAME"),
                    ));
                }
            },
        }
        range(
            &format!("{key}.requests_per_second"),
            u64::from(self.requests_per_second),
            1,
            10_000_000,
        )?;
        range(
            &format!("{key}.burst"),
            u64::from(self.burst),
            1,
            10_000_000,
        )?;
        if let Some(url) = &self.redis_url
            && !(url.starts_with("redis://") && redis::Client::open(url.as_str()).is_ok())
        {
            return Err(invalid(
                &format!("{key}.redis_url"),
                "expected redis://host:port[/db]",
            ));
        }
        range(
            &format!("{key}.redis_timeout_ms"),
            self.redis_timeout_ms,
            1,
            TIMEOUT_MS_CEILING,
        )?;
        range(
            &format!("{key}.keys_max"),
            self.keys_max as u64,
            1,
            100_000_000,
        )?;
        Ok(())
    }
}
