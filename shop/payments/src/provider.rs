//! The payment provider's HTTP API, called through the resilience stack.
//!
//! The provider is an outside system: what it accepts and answers is described here with
//! private types of this module (only the fields payments sends or reads), as for any foreign
//! API, and no Rust type is shared with the simulator that stands in for it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use trellis_resilience::{
    Backoff, Bulkhead, CircuitBreaker, Resilience, ResilienceError, RetryBudget, RetryPolicy,
    SlidingWindow,
};

use crate::{Error, ResilienceConfig};

/// Largest provider answer read, in bytes.
const ANSWER_BYTES_MAX: usize = 64 * 1024;
/// How long an extra caller may wait for a provider call slot before it is refused.
const BULKHEAD_WAIT: Duration = Duration::from_millis(500);

/// `POST /v1/charges`.
#[derive(Debug, Serialize)]
struct ChargeRequest<'a> {
    idempotency_key: &'a str,
    amount_cents: i64,
}

/// `POST /v1/refunds`.
#[derive(Debug, Serialize)]
struct RefundRequest<'a> {
    charge_id: &'a str,
    idempotency_key: String,
}

/// A charge as the provider answers it (the fields payments reads).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ProviderCharge {
    pub(crate) id: String,
    pub(crate) status: String,
}

impl ProviderCharge {
    /// Whether the charge has an id and one of the `statuses` payments acts on.
    fn is_known(&self, statuses: &[&str]) -> bool {
        !self.id.trim().is_empty() && statuses.contains(&self.status.as_str())
    }
}

/// `GET /v1/charges?idempotency_key=` answer.
#[derive(Debug, Deserialize)]
struct ChargeList {
    items: Vec<ProviderCharge>,
}

/// The body of the provider's error answers: `{"error": {"code", "message"}}`.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
}

/// A final answer from the provider (2xx or 4xx): it did what it says.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// At most `ANSWER_BYTES_MAX` bytes.
    body: Vec<u8>,
}

/// Why a provider call has no final answer: it may or may not have happened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Fault {
    #[error("the provider answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("the provider could not be reached: {0}")]
    Transport(String),
}

/// The outcome of asking the provider to capture.
#[derive(Debug)]
pub(crate) enum ChargeOutcome {
    /// Captured (now or earlier under the same key); the status is the provider's
    /// (`captured`, or `refunded` when it was refunded since).
    Charged(ProviderCharge),
    /// Declined: nothing was taken, and the key stays declined.
    Declined(String),
}

/// The outcome of asking the provider to refund.
#[derive(Debug)]
pub(crate) enum RefundOutcome {
    /// Refunded, now or before.
    Refunded,
    /// The charge was never captured.
    NotCaptured,
}

/// Why a provider call did not settle anything.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// No attempt reached the provider's processing: each was refused here (breaker open,
    /// bulkhead full), failed to connect, or was answered 503 (the provider's promise that it
    /// did nothing). Nothing happened at the provider.
    #[error("{0}")]
    NotReached(String),
    /// Down or slow after an attempt may have reached the provider (a timeout, a 5xx other
    /// than 503, a reset connection, an unreadable answer): the outcome is unknown, try later.
    #[error("{0}")]
    Unavailable(String),
    /// An answer this service cannot act on (a bug on one side): the outcome is unknown.
    #[error("unexpected answer from the payment provider: {0}")]
    Unexpected(String),
}

/// Calls the provider through breaker, retry, timeout and bulkhead.
#[derive(Debug, Clone)]
pub(crate) struct ProviderClient {
    http: reqwest::Client,
    base: String,
    stack: Resilience,
}

impl CallError {
    /// Whether the provider may have carried the call out (the outcome is unknown).
    pub(crate) fn may_have_reached(&self) -> bool {
        !matches!(self, Self::NotReached(_))
    }
}

/// Marks, when dropped, that an attempt may have reached the provider's processing, unless
/// [`cleared`](Self::clear) first. Dropped with its attempt, so an attempt cancelled by a
/// timeout or deadline counts as one that may have reached.
struct MayReach<'a> {
    reached: &'a AtomicBool,
    armed: bool,
}

impl<'a> MayReach<'a> {
    fn new(reached: &'a AtomicBool) -> Self {
        Self {
            reached,
            armed: true,
        }
    }

    /// This attempt certainly did not reach the provider's processing.
    fn clear(&mut self) {
        self.armed = false;
    }
}

impl Drop for MayReach<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.reached.store(true, Ordering::SeqCst);
        }
    }
}

impl ProviderClient {
    pub(crate) fn new(base_url: &str, config: &ResilienceConfig) -> Result<Self, Error> {
        let base = base_url.trim_end_matches('/').to_owned();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            return Err(Error::Config(format!(
                "provider_url {base_url:?} must be http://host:port"
            )));
        }
        let bad = |e: trellis_resilience::ConfigError| Error::Config(e.to_string());
        let retry = RetryPolicy::builder()
            .name("payment_provider")
            .max_attempts(config.attempts_max)
            .backoff(Backoff {
                initial: config.backoff_initial,
                max: config.backoff_max,
                multiplier: 2.0,
                full_jitter: true,
            })
            .budget(RetryBudget::new(config.retry_budget_ratio, 10, 100))
            .max_elapsed(config.call_deadline)
            .build()
            .map_err(bad)?;
        let breaker = CircuitBreaker::builder("payment_provider")
            .sliding_window(SlidingWindow::Count(config.breaker_window_calls))
            .minimum_calls(config.breaker_minimum_calls)
            .failure_rate_threshold(config.breaker_failure_rate)
            .open_duration(config.breaker_open)
            .half_open_calls(config.breaker_half_open_calls)
            .clock(config.clock.clone())
            .build()
            .map_err(bad)?;
        let bulkhead = Bulkhead::new(
            "payment_provider",
            config.concurrent_calls_max,
            config.concurrent_calls_max,
            BULKHEAD_WAIT,
        )
        .map_err(bad)?;
        let stack = Resilience::builder()
            .retry(retry)
            .circuit_breaker(breaker)
            .timeout(config.call_timeout)
            .bulkhead(bulkhead)
            .build();
        let http = reqwest::Client::builder()
            .connect_timeout(config.call_timeout)
            // A backstop: the stack's timeout cancels each attempt first.
            .timeout(config.call_deadline)
            .no_proxy()
            // A redirect is an answer like any other (unexpected): following it would send a
            // charge, amount and key, wherever the provider (or whoever answers for it) says.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {e}")))?;
        Ok(Self { http, base, stack })
    }

    /// Captures `amount_cents` under the order id as the idempotency key.
    pub(crate) async fn charge(
        &self,
        order_id: &str,
        amount_cents: i64,
    ) -> Result<ChargeOutcome, CallError> {
        let body = ChargeRequest {
            idempotency_key: order_id,
            amount_cents,
        };
        let answer = self
            .send(|| {
                self.http
                    .post(format!("{}/v1/charges", self.base))
                    .json(&body)
            })
            .await?;
        match answer.status {
            200 | 201 => {
                let charge: ProviderCharge = parse(&answer)?;
                // What a 2xx may say: captured, or refunded since (a repeated key). Anything
                // else (pending, declined, no id) is not a capture payments can record.
                if !charge.is_known(&["captured", "refunded"]) {
                    return Err(unexpected(&answer));
                }
                Ok(ChargeOutcome::Charged(charge))
            }
            402 => Ok(ChargeOutcome::Declined(error_message(&answer))),
            _ => Err(unexpected(&answer)),
        }
    }

    /// The charge made under the order id, if any.
    pub(crate) async fn find_charge(
        &self,
        order_id: &str,
    ) -> Result<Option<ProviderCharge>, CallError> {
        let answer = self
            .send(|| {
                self.http.get(format!(
                    "{}/v1/charges?idempotency_key={}",
                    self.base,
                    percent_encode(order_id)
                ))
            })
            .await?;
        match answer.status {
            200 => {
                let found = parse::<ChargeList>(&answer)?.items.into_iter().next();
                if found
                    .as_ref()
                    .is_some_and(|c| !c.is_known(&["captured", "declined", "refunded"]))
                {
                    return Err(unexpected(&answer));
                }
                Ok(found)
            }
            _ => Err(unexpected(&answer)),
        }
    }

    /// Refunds a charge under the key `refund-<order id>`.
    pub(crate) async fn refund(
        &self,
        order_id: &str,
        charge_id: &str,
    ) -> Result<RefundOutcome, CallError> {
        let body = RefundRequest {
            charge_id,
            idempotency_key: format!("refund-{order_id}"),
        };
        let answer = self
            .send(|| {
                self.http
                    .post(format!("{}/v1/refunds", self.base))
                    .json(&body)
            })
            .await?;
        match answer.status {
            200 | 201 => Ok(RefundOutcome::Refunded),
            409 => match error_code(&answer).as_deref() {
                Some("charge_already_refunded") => Ok(RefundOutcome::Refunded),
                Some("charge_not_captured") => Ok(RefundOutcome::NotCaptured),
                _ => Err(unexpected(&answer)),
            },
            _ => Err(unexpected(&answer)),
        }
    }

    /// One request through the stack: transport errors and 5xx/429 answers are failures (for
    /// the breaker) and retried; any other answer is final. Every request sent is safe to
    /// repeat: charges and refunds carry idempotency keys.
    ///
    /// Without a final answer, the error says whether any attempt may have reached the
    /// provider's processing ([`CallError::Unavailable`]) or none did
    /// ([`CallError::NotReached`]): an attempt refused here (breaker open, bulkhead full, never
    /// started), one that failed to connect, and one answered 503 (the provider's contract: it
    /// refused before doing anything) did not; a timeout, any other 5xx or 429, a reset
    /// connection or an unreadable answer may have.
    async fn send(
        &self,
        request: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<Answer, CallError> {
        let reached = AtomicBool::new(false);
        // One span for the call through the stack, one CLIENT span per attempt below it: the
        // provider's server span continues the attempt's trace, and retries and a breaker
        // refusal show as events on the call's span.
        let call_span = tracing::info_span!(
            "payment_provider.call",
            otel.status_code = tracing::field::Empty,
        );
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let attempt = || async {
            // Built when the attempt starts; an attempt the stack refuses never starts.
            let mut may_reach = MayReach::new(&reached);
            let number = attempts.fetch_add(1, Ordering::SeqCst) + 1;
            if number > 1 {
                tracing::info!(parent: &call_span, attempt = number, "retrying the payment provider");
            }
            let span = tracing::info_span!(
                parent: &call_span,
                "payment_provider.attempt",
                otel.kind = "client",
                attempt = number,
                http.response.status_code = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            );
            let mut builder = request();
            if let Some(traceparent) = trellis_telemetry::propagation::traceparent_of(&span) {
                builder = builder.header(trellis_telemetry::propagation::TRACEPARENT, traceparent);
            }
            let sent = tracing::Instrument::instrument(builder.send(), span.clone()).await;
            let mut response = match sent {
                Ok(response) => response,
                Err(e) => {
                    span.record("otel.status_code", "ERROR");
                    if e.is_connect() {
                        // No connection, so no request: the provider saw nothing.
                        may_reach.clear();
                    }
                    return Err(Fault::Transport(e.to_string()));
                }
            };
            span.record("http.response.status_code", response.status().as_u16());
            if response.status().is_server_error() || response.status().as_u16() == 429 {
                span.record("otel.status_code", "ERROR");
            }
            let status = response.status().as_u16();
            if status == 503 {
                may_reach.clear();
            }
            let mut body = Vec::new();
            while let Some(chunk) = response
                .chunk()
                .await
                .map_err(|e| Fault::Transport(e.to_string()))?
            {
                if body.len() + chunk.len() > ANSWER_BYTES_MAX {
                    return Err(Fault::Transport(format!(
                        "answer larger than {ANSWER_BYTES_MAX} bytes"
                    )));
                }
                body.extend_from_slice(&chunk);
            }
            let answer = Answer { status, body };
            if status >= 500 || status == 429 {
                return Err(Fault::Status {
                    status,
                    message: error_message(&answer),
                });
            }
            Ok(answer)
        };
        let result =
            tracing::Instrument::instrument(self.stack.call(attempt), call_span.clone()).await;
        let reached = reached.load(Ordering::SeqCst);
        if let Err(error) = &result {
            call_span.record("otel.status_code", "ERROR");
            if let ResilienceError::BreakerOpen { .. } = error {
                tracing::warn!(parent: &call_span, "the circuit breaker refused the call");
            }
        }
        result.map_err(|e| {
            let message = match e {
                ResilienceError::BreakerOpen { retry_after, .. } => format!(
                    "the payment provider's circuit breaker is open (failing fast); next trial in {} ms",
                    retry_after.as_millis()
                ),
                ResilienceError::Timeout(after) => format!(
                    "the payment provider did not answer within {} ms",
                    after.as_millis()
                ),
                ResilienceError::BulkheadFull => {
                    "too many calls to the payment provider in progress".to_owned()
                }
                ResilienceError::RateLimited { .. } => "provider calls are rate limited".to_owned(),
                ResilienceError::Inner(fault) => fault.to_string(),
            };
            if reached {
                CallError::Unavailable(message)
            } else {
                CallError::NotReached(message)
            }
        })
    }
}

fn parse<T: DeserializeOwned>(answer: &Answer) -> Result<T, CallError> {
    serde_json::from_slice(&answer.body)
        .map_err(|e| CallError::Unexpected(format!("status {}: {e}", answer.status)))
}

fn error_code(answer: &Answer) -> Option<String> {
    serde_json::from_slice::<ErrorBody>(&answer.body)
        .ok()
        .map(|b| b.error.code)
}

fn error_message(answer: &Answer) -> String {
    match serde_json::from_slice::<ErrorBody>(&answer.body) {
        Ok(body) => format!("{}: {}", body.error.code, body.error.message),
        Err(_) => String::from_utf8_lossy(&answer.body)
            .chars()
            .take(200)
            .collect(),
    }
}

fn unexpected(answer: &Answer) -> CallError {
    CallError::Unexpected(format!(
        "status {}: {}",
        answer.status,
        error_message(answer)
    ))
}

/// Percent-encodes a query value (everything but RFC 3986's unreserved characters).
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(percent_encode("order-1_a.b~"), "order-1_a.b~");
        assert_eq!(percent_encode("a b&c=é"), "a%20b%26c%3D%C3%A9");
    }
}
