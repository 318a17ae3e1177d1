//! The payment provider simulator, called over HTTP as shop/payments calls it:
//! `POST /v1/charges` `{idempotency_key: <order id>, amount_cents}`, so every repeat names the
//! same charge; `GET /v1/charges?idempotency_key=` to settle a lost answer; `POST /v1/refunds`
//! under `refund-<order id>`. Attempts, timeouts and backoff are payments' defaults (three
//! attempts of at most 2 s within 4 s, 50 ms doubling to 500 ms between them); its circuit
//! breaker, bulkhead and retry budget are left out: against the healthy simulator the load
//! runs with they never act.
//!
//! The provider's contract: a 503 (or no connection) means nothing was done; a timeout, any
//! other 5xx or a broken answer leaves the outcome unknown; a 4xx is final.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Largest provider answer read, in bytes.
const ANSWER_BYTES_MAX: usize = 64 * 1024;
/// Limit of one attempt.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Limit of a whole call, every attempt and wait included.
const CALL_DEADLINE: Duration = Duration::from_secs(4);
/// Attempts per call, the first included.
const ATTEMPTS_MAX: u32 = 3;
/// Wait before the first retry; doubles per retry.
const BACKOFF_INITIAL: Duration = Duration::from_millis(50);
/// Longest wait between attempts.
const BACKOFF_MAX: Duration = Duration::from_millis(500);

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

/// A charge as the provider answers it (the fields read here).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ProviderCharge {
    pub(crate) id: String,
    pub(crate) status: String,
}

/// `GET /v1/charges?idempotency_key=` answer.
#[derive(Debug, Deserialize)]
struct ChargeList {
    items: Vec<ProviderCharge>,
}

/// A final answer (2xx or 4xx).
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Vec<u8>,
}

/// A call without a final answer.
#[derive(Debug)]
struct Fault {
    /// Whether any attempt may have reached the provider's processing.
    reached: bool,
    message: String,
}

/// What asking for a capture came to.
#[derive(Debug)]
pub(crate) enum Charge {
    /// Captured (now, or before under the same key).
    Captured { charge_id: String },
    /// Declined; nothing was taken.
    Declined,
    /// No attempt reached the provider: nothing was captured.
    NotReached(String),
    /// The outcome is unknown.
    Unknown(String),
}

/// The provider's HTTP API.
#[derive(Debug, Clone)]
pub(crate) struct Provider {
    http: reqwest::Client,
    base: String,
}

impl Provider {
    /// A client of the provider at `base` (`http://host:port`).
    pub(crate) fn new(base: &str) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(CALL_TIMEOUT)
            .timeout(CALL_DEADLINE)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    /// Captures `amount_cents` under the order id as the idempotency key.
    pub(crate) async fn charge(&self, order_id: &str, amount_cents: i64) -> Charge {
        let body = ChargeRequest {
            idempotency_key: order_id,
            amount_cents,
        };
        let url = format!("{}/v1/charges", self.base);
        let answer = match self.send(|| self.http.post(&url).json(&body)).await {
            Ok(answer) => answer,
            Err(Fault {
                reached: false,
                message,
            }) => return Charge::NotReached(message),
            Err(Fault { message, .. }) => return Charge::Unknown(message),
        };
        match answer.status {
            200 | 201 => match serde_json::from_slice::<ProviderCharge>(&answer.body) {
                Ok(charge)
                    if !charge.id.trim().is_empty()
                        && matches!(charge.status.as_str(), "captured" | "refunded") =>
                {
                    Charge::Captured {
                        charge_id: charge.id,
                    }
                }
                _ => Charge::Unknown(unexpected(&answer)),
            },
            402 => Charge::Declined,
            _ => Charge::Unknown(unexpected(&answer)),
        }
    }

    /// The charge made under the order id, if any.
    pub(crate) async fn find_charge(
        &self,
        order_id: &str,
    ) -> Result<Option<ProviderCharge>, String> {
        let url = format!(
            "{}/v1/charges?idempotency_key={}",
            self.base,
            percent_encode(order_id)
        );
        let answer = self
            .send(|| self.http.get(&url))
            .await
            .map_err(|f| f.message)?;
        if answer.status != 200 {
            return Err(unexpected(&answer));
        }
        serde_json::from_slice::<ChargeList>(&answer.body)
            .map(|list| list.items.into_iter().next())
            .map_err(|e| format!("unreadable charge list: {e}"))
    }

    /// Refunds a charge under the key `refund-<order id>`.
    pub(crate) async fn refund(&self, order_id: &str, charge_id: &str) -> Result<(), String> {
        let body = RefundRequest {
            charge_id,
            idempotency_key: format!("refund-{order_id}"),
        };
        let url = format!("{}/v1/refunds", self.base);
        let answer = self
            .send(|| self.http.post(&url).json(&body))
            .await
            .map_err(|f| f.message)?;
        match answer.status {
            200 | 201 => Ok(()),
            _ => Err(unexpected(&answer)),
        }
    }

    /// One call: attempts until a final answer, retrying transport faults, 5xx and 429.
    async fn send(&self, request: impl Fn() -> reqwest::RequestBuilder) -> Result<Answer, Fault> {
        let deadline = Instant::now() + CALL_DEADLINE;
        let mut reached = false;
        let mut message = String::from("no attempt was made");
        let mut backoff = BACKOFF_INITIAL;
        for attempt in 1..=ATTEMPTS_MAX {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match tokio::time::timeout(CALL_TIMEOUT.min(left), attempt_once(request())).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(fault)) => {
                    reached |= fault.reached;
                    message = fault.message;
                }
                Err(_) => {
                    reached = true;
                    message = format!(
                        "the payment provider did not answer within {} ms",
                        CALL_TIMEOUT.min(left).as_millis()
                    );
                }
            }
            if attempt < ATTEMPTS_MAX {
                let left = deadline.saturating_duration_since(Instant::now());
                tokio::time::sleep(backoff.min(left)).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
        Err(Fault { reached, message })
    }
}

/// One attempt, its answer read up to [`ANSWER_BYTES_MAX`].
async fn attempt_once(request: reqwest::RequestBuilder) -> Result<Answer, Fault> {
    let mut response = request.send().await.map_err(|e| Fault {
        // No connection, no request: the provider saw nothing.
        reached: !e.is_connect(),
        message: format!("the payment provider could not be reached: {e}"),
    })?;
    let status = response.status().as_u16();
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) if body.len() + chunk.len() <= ANSWER_BYTES_MAX => {
                body.extend_from_slice(&chunk);
            }
            Ok(Some(_)) => {
                return Err(Fault {
                    reached: status != 503,
                    message: format!("answer larger than {ANSWER_BYTES_MAX} bytes"),
                });
            }
            Ok(None) => break,
            Err(e) => {
                return Err(Fault {
                    reached: status != 503,
                    message: format!("the answer broke off: {e}"),
                });
            }
        }
    }
    let answer = Answer { status, body };
    if status >= 500 || status == 429 {
        return Err(Fault {
            // The provider's promise: a 503 is answered before anything is done.
            reached: status != 503,
            message: unexpected(&answer),
        });
    }
    Ok(answer)
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

/// `status N: <the error body, at most 200 characters>`.
fn unexpected(answer: &Answer) -> String {
    let text: String = String::from_utf8_lossy(&answer.body)
        .chars()
        .take(200)
        .collect();
    format!("status {}: {text}", answer.status)
}
