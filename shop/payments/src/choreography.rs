//! The payments service's part in the choreographed order saga (see
//! `shop_contracts::events` for the whole flow).
//!
//! - `inventory.reserved`: charge the order's total (at most one capture per order, as over
//!   gRPC) → `payment.completed`, or `payment.failed` with `payment_declined` or
//!   `payment_unavailable` (the provider down, the breaker open, or an outcome still unknown).
//! - `order.failed`, `shipment.failed` (compensations): refund → `payment.refunded` (state
//!   `refunded`, or `none` when nothing was captured).
//! - `order.cancelled` for `payment_unavailable`: settle the charge whose outcome was unknown
//!   (refund it if the provider captured after all), so no cancelled order keeps a charge.
//!
//! The provider call runs before the inbox transaction (never under a database lock); a
//! redelivery repeats it, and the service's per-order record answers the first outcome.

use shop_contracts::api::reason;
use shop_contracts::events::{self, OrderEnded, OrderProgress, StepDone, StepFailed};
use shop_contracts::proto::ChargeRequest;
use tonic::Code;
use trellis_service::choreography::{
    Choreography, ChoreographyDb, HandlerError, Message, Participant, PrepareFuture, emit_prepared,
    next,
};

use crate::service::PaymentsService;

/// The choreography's name in the log.
pub const FLOW: &str = "place-order";

/// The payments service as a participant.
pub(crate) struct PaymentsParticipant {
    pub(crate) service: PaymentsService,
}

fn flow<D: ChoreographyDb>() -> Choreography<D> {
    let emit = emit_prepared::<D::Connection>;
    Choreography::new(FLOW, "shop.payments")
        .step(events::INVENTORY_RESERVED, "payment", emit)
        .compensation(events::ORDER_FAILED, "payment", emit)
        .compensation(events::SHIPMENT_FAILED, "payment", emit)
        .compensation(events::ORDER_CANCELLED, "settle", emit)
}

fn decode<T: serde::de::DeserializeOwned>(message: &Message) -> Result<T, HandlerError> {
    serde_json::from_value(message.envelope.data.clone()).map_err(|e| {
        HandlerError::permanent(
            "bad_event",
            format!("{} does not decode: {e}", message.envelope.kind),
        )
    })
}

fn failed(order_id: &str, why: &str, error: String) -> Result<serde_json::Value, HandlerError> {
    next(
        events::PAYMENT_FAILED,
        StepFailed {
            order_id: order_id.to_owned(),
            reason: why.to_owned(),
            error,
        },
    )
}

impl PaymentsParticipant {
    /// Refunds; `Ok(state)` once settled (`refunded` or `none`), a retryable error while the
    /// provider cannot tell.
    async fn refund(&self, order_id: &str) -> Result<String, HandlerError> {
        match self.service.refund_order(order_id).await {
            Ok(answer) if answer.status == "unavailable" => Err(HandlerError::transient(
                "provider_unavailable",
                format!("the refund of order {order_id} cannot be settled yet"),
            )),
            Ok(answer) => Ok(answer.status),
            Err(status) if status.code() == Code::InvalidArgument => {
                Err(HandlerError::permanent("bad_order", status.message()))
            }
            Err(status) => Err(HandlerError::transient("payments", status.message())),
        }
    }

    async fn act(&self, message: &Message) -> Result<Option<serde_json::Value>, HandlerError> {
        let order_id = message.envelope.subject.as_str();
        let outcome = match message.envelope.kind.as_str() {
            events::INVENTORY_RESERVED => {
                let order: OrderProgress = decode(message)?;
                let request = ChargeRequest {
                    order_id: order_id.to_owned(),
                    user_id: order.user_id.clone(),
                    amount_cents: order.total_cents,
                };
                match self.service.charge_order(request).await {
                    Ok(answer) => match answer.status.as_str() {
                        "captured" => next(events::PAYMENT_COMPLETED, order)?,
                        "declined" => failed(order_id, reason::PAYMENT_DECLINED, answer.message)?,
                        _ => failed(order_id, reason::PAYMENT_UNAVAILABLE, answer.message)?,
                    },
                    // Refused for good: a cancelled payment, a changed amount, bad input.
                    Err(status)
                        if matches!(
                            status.code(),
                            Code::FailedPrecondition | Code::InvalidArgument
                        ) =>
                    {
                        failed(
                            order_id,
                            reason::PAYMENT_UNAVAILABLE,
                            status.message().to_owned(),
                        )?
                    }
                    Err(status) => {
                        return Err(HandlerError::transient("payments", status.message()));
                    }
                }
            }
            events::ORDER_FAILED | events::SHIPMENT_FAILED => {
                let state = self.refund(order_id).await?;
                next(
                    events::PAYMENT_REFUNDED,
                    StepDone {
                        order_id: order_id.to_owned(),
                        state,
                    },
                )?
            }
            events::ORDER_CANCELLED => {
                let ended: OrderEnded = decode(message)?;
                if ended.reason.as_deref() != Some(reason::PAYMENT_UNAVAILABLE) {
                    return Ok(None);
                }
                self.refund(order_id).await?;
                serde_json::Value::Null
            }
            _ => return Ok(None),
        };
        Ok(Some(outcome))
    }
}

impl Participant for PaymentsParticipant {
    fn group(&self) -> &str {
        "payments"
    }

    fn choreography<D: ChoreographyDb>(&self) -> Choreography<D> {
        flow()
    }

    fn prepare<'a>(&'a self, message: &'a Message) -> PrepareFuture<'a> {
        Box::pin(self.act(message))
    }
}
