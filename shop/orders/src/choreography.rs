//! The orders service's part in the choreographed order saga.
//!
//! Nothing drives the flow: the orders service reacts to the participants' events like any
//! other service, and its own events reach the bus through the order outbox (the event store's
//! log). It is the one place that decides between the customer's cancel and shipping (the
//! order aggregate serialises `RequestCancel` and `StartShipping`), so it sits between
//! `payment.completed` and the shipment:
//!
//! - `inventory.reserved`, `payment.refunded`, `shipment.created`: recorded on the timeline.
//! - `payment.completed`: `StartShipping` (published as `order.shipping_started`), or, when the
//!   customer cancelled first, `Fail` (published as `order.failed`: payments refunds, inventory
//!   releases).
//! - `inventory.failed`: the order is cancelled (nothing was held).
//! - `payment.failed`, `shipment.failed`: the reason is noted; inventory's release follows.
//! - `inventory.released`: every compensation is done, the order is cancelled with the noted
//!   reason.
//! - `inventory.committed`: the order is confirmed.
//!
//! Every command is idempotent on the aggregate, so a redelivery changes nothing; the inbox
//! and the choreography log live in the read-model database.

use std::sync::Arc;

use shop_contracts::api::reason;
use shop_contracts::events::{self, StepDone, StepFailed};
use trellis_eventstore::{AnyStore, Metadata, Repository, RepositoryError};
use trellis_service::choreography::{
    Choreography, ChoreographyDb, EffectFuture, Envelope, HandlerError, Message, NextEvent,
    Participant, PrepareFuture,
};

use crate::aggregate::{Order, OrderCommand, OrderError, SharedClock};

/// The choreography's name in the log.
pub const FLOW: &str = "place-order";

/// The orders service as a participant.
pub(crate) struct OrdersParticipant {
    pub(crate) orders: Arc<Repository<Order, AnyStore>>,
    /// The time the order's events record.
    pub(crate) clock: SharedClock,
}

/// Every handler emits nothing itself: the order's events reach the bus from its stream,
/// through the outbox.
fn flow<D: ChoreographyDb>() -> Choreography<D> {
    let none = none::<D::Connection>;
    Choreography::new(FLOW, "shop.orders")
        .step(events::INVENTORY_RESERVED, "track", none)
        .step(events::PAYMENT_COMPLETED, "approve", none)
        .step(events::SHIPMENT_CREATED, "track", none)
        .step(events::INVENTORY_COMMITTED, "confirm", none)
        .compensation(events::INVENTORY_FAILED, "cancel", none)
        .compensation(events::PAYMENT_FAILED, "note-failure", none)
        .compensation(events::SHIPMENT_FAILED, "note-failure", none)
        .compensation(events::PAYMENT_REFUNDED, "track", none)
        .compensation(events::INVENTORY_RELEASED, "cancel", none)
}

fn none<'t, C>(_tx: &'t mut C, _trigger: &'t Envelope) -> EffectFuture<'t> {
    Box::pin(async { Ok(None::<NextEvent>) })
}

fn transient(error: impl std::fmt::Display) -> HandlerError {
    HandlerError::transient("event_store", error)
}

fn decode<T: serde::de::DeserializeOwned>(message: &Message) -> Result<T, HandlerError> {
    serde_json::from_value(message.envelope.data.clone()).map_err(|e| {
        HandlerError::permanent(
            "bad_event",
            format!("{} does not decode: {e}", message.envelope.kind),
        )
    })
}

impl OrdersParticipant {
    /// Runs `command`; `Ok(None)` when the order refuses it (the refusal is the answer).
    /// The order is the trigger's subject; the events it appends name the trigger as their
    /// cause, which the outbox puts on the bus.
    async fn run(
        &self,
        trigger: &Envelope,
        command: OrderCommand,
    ) -> Result<Result<Order, OrderError>, HandlerError> {
        let order_id = trigger.subject.as_str();
        let metadata = Metadata {
            correlation_id: uuid::Uuid::parse_str(order_id).ok(),
            causation_id: Some(trigger.id),
            traceparent: trellis_telemetry::propagation::current_traceparent(),
        };
        let command = command.at(self.clock.now());
        match self.orders.execute(order_id, command, metadata).await {
            Ok(executed) => Ok(Ok(executed.state)),
            Err(RepositoryError::Domain(error)) => Ok(Err(error)),
            Err(error) => Err(transient(error)),
        }
    }

    async fn record(
        &self,
        trigger: &Envelope,
        step: &str,
        outcome: &str,
    ) -> Result<Order, HandlerError> {
        let command = OrderCommand::Record {
            step: step.to_owned(),
            outcome: outcome.to_owned(),
        };
        match self.run(trigger, command).await? {
            Ok(order) => Ok(order),
            // Not an order of this service (or not yet): nothing to do but say so.
            Err(error) => Err(HandlerError::permanent("unknown_order", error)),
        }
    }

    /// Notes why the order fails: the customer's cancel wins over a later failure.
    async fn note(&self, trigger: &Envelope, order: &Order, why: &str) -> Result<(), HandlerError> {
        let why = if order.cancel_requested {
            reason::CANCELLED_BY_USER
        } else {
            why
        };
        self.run(trigger, OrderCommand::NoteFailure(why.to_owned()))
            .await?
            .map(drop)
            .or(Ok(()))
    }

    async fn cancel(&self, trigger: &Envelope) -> Result<(), HandlerError> {
        // Refused only when the order is confirmed already, which a cancel cannot change.
        let _ = self
            .run(
                trigger,
                OrderCommand::Cancel {
                    fallback: "cancelled".to_owned(),
                },
            )
            .await?;
        Ok(())
    }

    async fn act(&self, message: &Message) -> Result<bool, HandlerError> {
        let trigger = &message.envelope;
        match message.envelope.kind.as_str() {
            events::INVENTORY_RESERVED => {
                self.record(trigger, "inventory", "reserved").await?;
            }
            events::INVENTORY_FAILED => {
                let failed: StepFailed = decode(message)?;
                let order = self.record(trigger, "inventory", &failed.reason).await?;
                self.note(trigger, &order, &failed.reason).await?;
                self.cancel(trigger).await?;
            }
            events::PAYMENT_COMPLETED => {
                let order = self.record(trigger, "payment", "captured").await?;
                if order
                    .status
                    .is_some_and(|s| s != shop_contracts::api::OrderStatus::Pending)
                {
                    return Ok(true);
                }
                match self.run(trigger, OrderCommand::StartShipping).await? {
                    Ok(_) => {}
                    Err(OrderError::CancelRequested) => {
                        self.note(trigger, &order, reason::CANCELLED_BY_USER)
                            .await?;
                        let fail = OrderCommand::Fail {
                            fallback: reason::CANCELLED_BY_USER.to_owned(),
                        };
                        let _ = self.run(trigger, fail).await?;
                    }
                    Err(_) => {}
                }
            }
            events::PAYMENT_FAILED => {
                let failed: StepFailed = decode(message)?;
                let outcome = if failed.reason == reason::PAYMENT_DECLINED {
                    "declined"
                } else {
                    "unavailable"
                };
                let order = self.record(trigger, "payment", outcome).await?;
                self.note(trigger, &order, &failed.reason).await?;
            }
            events::PAYMENT_REFUNDED => {
                let done: StepDone = decode(message)?;
                if done.state == "refunded" {
                    self.record(trigger, "payment", "refunded").await?;
                }
            }
            events::SHIPMENT_CREATED => {
                self.record(trigger, "shipping", "created").await?;
            }
            events::SHIPMENT_FAILED => {
                let failed: StepFailed = decode(message)?;
                let order = self.record(trigger, "shipping", "failed").await?;
                self.note(trigger, &order, &failed.reason).await?;
            }
            events::INVENTORY_RELEASED => {
                let done: StepDone = decode(message)?;
                if done.state == "released" {
                    self.record(trigger, "inventory", "released").await?;
                }
                self.cancel(trigger).await?;
            }
            events::INVENTORY_COMMITTED => {
                self.record(trigger, "inventory", "committed").await?;
                let _ = self.run(trigger, OrderCommand::Confirm).await?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl Participant for OrdersParticipant {
    fn group(&self) -> &str {
        "orders"
    }

    fn choreography<D: ChoreographyDb>(&self) -> Choreography<D> {
        flow()
    }

    fn prepare<'a>(&'a self, message: &'a Message) -> PrepareFuture<'a> {
        Box::pin(async move { Ok(self.act(message).await?.then_some(serde_json::Value::Null)) })
    }
}
