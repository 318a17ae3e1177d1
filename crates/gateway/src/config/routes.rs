//! `[[routes]]`: what a route matches, where it sends the request, and what it requires.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::ConfigError;
use crate::route::MatchRule;

use super::{
    BODY_BYTES_MAX_CEILING, Config, RETRY_ATTEMPTS_MAX, TIMEOUT_MS_CEILING, header_name, invalid,
    range,
};

/// `[[routes]]`: one route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Name used in metrics and logs.
    pub name: String,
    /// `Host` to match (without port); `*.example.com` matches subdomains. Any when absent.
    #[serde(default)]
    pub host: Option<String>,
    /// Exact path. Route paths and request paths are compared in canonical form (escapes of
    /// unreserved characters decoded, `//` merged, dot segments resolved; see the crate docs)
    /// and case-sensitively; a path that cannot be normalised is refused at start-up.
    #[serde(default)]
    pub path_exact: Option<String>,
    /// Path prefix, on segment boundaries (`/api` matches `/api` and `/api/x`, not `/apix`).
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Path template, `{name}` matching one segment: `/api/orders/{id}`.
    #[serde(default)]
    pub path_template: Option<String>,
    /// Methods; any when empty.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Headers that must be present with these exact values.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Upstream cluster.
    pub cluster: String,
    /// Prefix removed from the path before forwarding.
    #[serde(default)]
    pub strip_prefix: Option<String>,
    /// Prefix put in front of the (stripped) path before forwarding.
    #[serde(default)]
    pub add_prefix: Option<String>,
    /// Route timeout, milliseconds: from the request to the upstream's response headers
    /// (retries included).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Time the upstream has to send the whole response body after its headers,
    /// milliseconds; `server.response_body_timeout_ms` when absent.
    #[serde(default)]
    pub response_body_timeout_ms: Option<u64>,
    /// Longest pause between two pieces of the upstream response body, milliseconds;
    /// `server.response_body_idle_timeout_ms` when absent.
    #[serde(default)]
    pub response_body_idle_timeout_ms: Option<u64>,
    /// Request body limit, bytes.
    #[serde(default)]
    pub body_bytes_max: Option<u64>,
    /// Retry policy; no retries when absent.
    #[serde(default)]
    pub retry: Option<RetryConfig>,
    /// Auth policies; any one succeeding admits the request. Open route when empty.
    #[serde(default)]
    pub auth: Vec<String>,
    /// Scopes (`scope`/`scp` claim) all required; 403 when one is missing.
    #[serde(default)]
    pub required_scopes: Vec<String>,
    /// Roles (`roles`/`role` claim), at least one required; 403 otherwise.
    #[serde(default)]
    pub required_roles: Vec<String>,
    /// Rate-limit policy.
    #[serde(default)]
    pub rate_limit: Option<String>,
}

/// A route's retry policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all, first included (2..=5).
    pub attempts: u32,
    /// Statuses that are retried (for any method when the body is empty); idempotent methods
    /// are also retried after connection errors.
    #[serde(default = "default_retry_statuses")]
    pub on_statuses: Vec<u16>,
    /// Retries allowed per request, as a ratio of requests (the retry budget).
    #[serde(default = "default_budget_ratio")]
    pub budget_ratio: f64,
}

fn default_retry_statuses() -> Vec<u16> {
    vec![502, 503, 504]
}
fn default_budget_ratio() -> f64 {
    0.2
}

impl RouteConfig {
    /// What the route matches on and how it rewrites the path, for [`crate::route`].
    pub(crate) fn match_rule(&self) -> MatchRule<'_> {
        MatchRule {
            host: self.host.as_deref(),
            path_exact: self.path_exact.as_deref(),
            path_prefix: self.path_prefix.as_deref(),
            path_template: self.path_template.as_deref(),
            methods: &self.methods,
            headers: &self.headers,
            strip_prefix: self.strip_prefix.as_deref(),
            add_prefix: self.add_prefix.as_deref(),
        }
    }

    /// Checks the route and its references into `config` (cluster, auth and rate-limit
    /// policies); `key` is `routes[I]`. The path syntax is the routing module's to judge
    /// ([`MatchRule::validate`]).
    pub(super) fn validate(&self, key: &str, config: &Config) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return Err(invalid(&format!("{key}.name"), "must not be empty"));
        }
        if !config.clusters.contains_key(&self.cluster) {
            return Err(invalid(
                &format!("{key}.cluster"),
                &format!("no cluster named `{}` in [clusters]", self.cluster),
            ));
        }
        self.match_rule().validate().map_err(|e| {
            let key = match e.field {
                Some(field) => format!("{key}.{field}"),
                None => key.to_owned(),
            };
            invalid(&key, &e.message)
        })?;
        for (j, m) in self.methods.iter().enumerate() {
            http::Method::from_bytes(m.as_bytes())
                .map_err(|_| invalid(&format!("{key}.methods[{j}]"), "not an HTTP method"))?;
        }
        for (h, v) in &self.headers {
            header_name(&format!("{key}.headers.{h}"), h)?;
            http::HeaderValue::from_str(v)
                .map_err(|_| invalid(&format!("{key}.headers.{h}"), "not a valid header value"))?;
        }
        for (field, value) in [
            ("timeout_ms", self.timeout_ms),
            ("response_body_timeout_ms", self.response_body_timeout_ms),
            (
                "response_body_idle_timeout_ms",
                self.response_body_idle_timeout_ms,
            ),
        ] {
            if let Some(t) = value {
                range(&format!("{key}.{field}"), t, 1, TIMEOUT_MS_CEILING)?;
            }
        }
        if let Some(b) = self.body_bytes_max {
            range(
                &format!("{key}.body_bytes_max"),
                b,
                0,
                BODY_BYTES_MAX_CEILING,
            )?;
        }
        if let Some(retry) = &self.retry {
            retry.validate(&format!("{key}.retry"))?;
        }
        for (j, a) in self.auth.iter().enumerate() {
            if !config.auth.contains_key(a) {
                return Err(invalid(
                    &format!("{key}.auth[{j}]"),
                    &format!("no auth policy named `{a}` in [auth]"),
                ));
            }
        }
        if (!self.required_scopes.is_empty() || !self.required_roles.is_empty())
            && self.auth.is_empty()
        {
            return Err(invalid(
                &format!("{key}.required_scopes"),
                "scopes and roles need an `auth` policy",
            ));
        }
        if let Some(rl) = &self.rate_limit
            && !config.rate_limits.contains_key(rl)
        {
            return Err(invalid(
                &format!("{key}.rate_limit"),
                &format!("no rate-limit policy named `{rl}` in [rate_limits]"),
            ));
        }
        Ok(())
    }
}

impl RetryConfig {
    /// `key` is `routes[I].retry`.
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        range(
            &format!("{key}.attempts"),
            u64::from(self.attempts),
            1,
            u64::from(RETRY_ATTEMPTS_MAX),
        )?;
        if !(0.0..=1.0).contains(&self.budget_ratio) {
            return Err(invalid(
                &format!("{key}.budget_ratio"),
                "expected a number in [0, 1]",
            ));
        }
        for (j, s) in self.on_statuses.iter().enumerate() {
            range(&format!("{key}.on_statuses[{j}]"), u64::from(*s), 500, 599)?;
        }
        Ok(())
    }
}
