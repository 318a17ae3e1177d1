//! The Order aggregate: what happened to one order, as events.
//!
//! The aggregate reads no clock: each command arrives stamped with the time it is handled at
//! ([`OrderCommand::at`], from the caller's [`Clock`]), so the events a command produces
//! depend only on the order's state and the command, and tests pin the time.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shop_contracts::api::{OrderLineView, OrderStatus, TimelineEntry};
use trellis_eventstore::{Aggregate, DomainEvent};

/// A priced line.
pub type Line = OrderLineView;

/// Everything that can happen to an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderEvent {
    /// The order was accepted.
    Created {
        /// Owner.
        user_id: String,
        /// Priced lines.
        items: Vec<Line>,
        /// Sum of the lines, cents.
        total_cents: i64,
        /// RFC 3339.
        at: String,
        /// Whether its saga is choreographed (events only) rather than orchestrated.
        #[serde(default)]
        choreographed: bool,
    },
    /// The saga driving the order.
    SagaAttached {
        /// The saga id.
        saga_id: String,
    },
    /// A step of the order flow happened.
    Progress {
        /// `inventory`, `payment`, `shipping`.
        step: String,
        /// `reserved`, `captured`, `created`, `released`, `refunded`, `failed: …`.
        outcome: String,
        /// RFC 3339.
        at: String,
    },
    /// Why the order will be cancelled; the first reason wins.
    FailureNoted {
        /// One of `shop_contracts::api::reason`.
        reason: String,
    },
    /// The customer asked to cancel.
    CancelRequested {
        /// RFC 3339.
        at: String,
    },
    /// Shipping began: from here the order only goes forward.
    ShippingStarted,
    /// The order's own step failed before shipping (choreography: the customer's cancel
    /// reached the point of no return first); its compensations run, then it is cancelled.
    Failed {
        /// Why (the noted reason).
        reason: String,
    },
    /// Paid and shipped.
    Confirmed {
        /// RFC 3339.
        at: String,
    },
    /// Ended without a sale, every compensation done.
    Cancelled {
        /// Why.
        reason: String,
        /// RFC 3339.
        at: String,
    },
}

impl DomainEvent for OrderEvent {}

/// What callers ask of an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderCommand {
    /// Accept the order (a no-op when it exists).
    Create {
        /// Owner.
        user_id: String,
        /// Priced lines.
        items: Vec<Line>,
        /// Whether its saga is choreographed.
        choreographed: bool,
    },
    /// Record the saga driving the order; refused when another saga drives it.
    AttachSaga(String),
    /// Record a step's outcome (a no-op when it is already the latest entry for the step).
    Record {
        /// Step.
        step: String,
        /// Outcome.
        outcome: String,
    },
    /// Note why the order fails (the first reason is kept).
    NoteFailure(String),
    /// The customer cancels; refused once shipping started or the order ended.
    RequestCancel,
    /// Shipping begins; refused when a cancel was requested.
    StartShipping,
    /// The order's own step fails with the noted reason, or `fallback` (a no-op when it
    /// failed already); refused once shipping began or the order ended.
    Fail {
        /// The reason when none was noted.
        fallback: String,
    },
    /// The order is confirmed (a no-op when it is).
    Confirm,
    /// The order is cancelled with the noted reason, or `fallback` (a no-op when it ended).
    Cancel {
        /// The reason when none was noted.
        fallback: String,
    },
}

impl OrderCommand {
    /// This command, handled at `now` (the time its events record).
    pub fn at(self, now: DateTime<Utc>) -> StampedCommand {
        StampedCommand { command: self, now }
    }
}

/// An [`OrderCommand`] with the time it is handled at: what the aggregate takes.
///
/// A command retried after a version conflict keeps its time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StampedCommand {
    /// The command.
    pub command: OrderCommand,
    /// When it is handled.
    pub now: DateTime<Utc>,
}

/// The time source of the services that command orders.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time.
    fn now(&self) -> DateTime<Utc>;
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock shared by the services of one process.
pub type SharedClock = Arc<dyn Clock>;

/// Why an order refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    /// The order does not exist.
    #[error("no such order")]
    NotFound,
    /// Another saga drives the order.
    #[error("order is driven by saga {0}")]
    OtherSaga(String),
    /// The order can no longer be cancelled.
    #[error("the order can no longer be cancelled: {0}")]
    NotCancellable(&'static str),
    /// The customer cancelled before shipping began.
    #[error("the customer cancelled the order")]
    CancelRequested,
    /// The order already ended.
    #[error("the order already ended as {0}")]
    Ended(&'static str),
}

/// The order's state, rebuilt from its events.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// Whether `Created` happened.
    pub exists: bool,
    /// Owner.
    pub user_id: String,
    /// Lines.
    pub items: Vec<Line>,
    /// Total, cents.
    pub total_cents: i64,
    /// Status.
    pub status: Option<OrderStatus>,
    /// Reason noted or recorded.
    pub reason: Option<String>,
    /// The saga driving it.
    pub saga_id: Option<String>,
    /// Whether the customer asked to cancel.
    pub cancel_requested: bool,
    /// Whether shipping began.
    pub shipping_started: bool,
    /// Whether its saga is choreographed.
    pub choreographed: bool,
    /// Whether its own step failed (choreography), so its compensations run.
    pub failed: bool,
    /// What happened.
    pub timeline: Vec<TimelineEntry>,
}

impl Order {
    /// The status, `PENDING` for an order that exists and has not ended.
    pub fn status(&self) -> OrderStatus {
        self.status.unwrap_or(OrderStatus::Pending)
    }

    fn ended(&self) -> Option<&'static str> {
        match self.status {
            Some(OrderStatus::Confirmed) => Some("CONFIRMED"),
            Some(OrderStatus::Cancelled) => Some("CANCELLED"),
            _ => None,
        }
    }
}

/// `now` as the events record it: RFC 3339, milliseconds, `Z`.
fn timestamp(now: DateTime<Utc>) -> String {
    now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Aggregate for Order {
    const TYPE: &'static str = "order";
    type Command = StampedCommand;
    type Event = OrderEvent;
    type Error = OrderError;

    fn handle(&self, stamped: StampedCommand) -> Result<Vec<OrderEvent>, OrderError> {
        let StampedCommand { command, now } = stamped;
        let now = || timestamp(now);
        if !self.exists {
            return match command {
                OrderCommand::Create {
                    user_id,
                    items,
                    choreographed,
                } => {
                    let total_cents = items.iter().map(|l| l.price_cents * l.quantity).sum();
                    Ok(vec![OrderEvent::Created {
                        user_id,
                        items,
                        total_cents,
                        at: now(),
                        choreographed,
                    }])
                }
                _ => Err(OrderError::NotFound),
            };
        }
        match command {
            OrderCommand::Create { .. } => Ok(vec![]),
            OrderCommand::AttachSaga(saga_id) => match &self.saga_id {
                Some(existing) if *existing == saga_id => Ok(vec![]),
                Some(existing) => Err(OrderError::OtherSaga(existing.clone())),
                None => Ok(vec![OrderEvent::SagaAttached { saga_id }]),
            },
            OrderCommand::Record { step, outcome } => {
                let latest = self.timeline.iter().rev().find(|e| e.step == step);
                if latest.is_some_and(|e| e.outcome == outcome) {
                    Ok(vec![])
                } else {
                    Ok(vec![OrderEvent::Progress {
                        step,
                        outcome,
                        at: now(),
                    }])
                }
            }
            OrderCommand::NoteFailure(reason) => {
                if self.reason.is_some() || self.ended().is_some() {
                    Ok(vec![])
                } else {
                    Ok(vec![OrderEvent::FailureNoted { reason }])
                }
            }
            OrderCommand::RequestCancel => {
                if let Some(ended) = self.ended() {
                    return Err(OrderError::Ended(ended));
                }
                if self.shipping_started {
                    return Err(OrderError::NotCancellable("shipping has begun"));
                }
                if self.cancel_requested {
                    return Ok(vec![]);
                }
                Ok(vec![OrderEvent::CancelRequested { at: now() }])
            }
            OrderCommand::StartShipping => {
                if self.cancel_requested {
                    return Err(OrderError::CancelRequested);
                }
                if let Some(ended) = self.ended() {
                    return Err(OrderError::Ended(ended));
                }
                if self.shipping_started {
                    return Ok(vec![]);
                }
                Ok(vec![OrderEvent::ShippingStarted])
            }
            OrderCommand::Fail { fallback } => {
                if let Some(ended) = self.ended() {
                    return Err(OrderError::Ended(ended));
                }
                if self.shipping_started {
                    return Err(OrderError::NotCancellable("shipping has begun"));
                }
                if self.failed {
                    return Ok(vec![]);
                }
                Ok(vec![OrderEvent::Failed {
                    reason: self.reason.clone().unwrap_or(fallback),
                }])
            }
            OrderCommand::Confirm => match self.status {
                Some(OrderStatus::Confirmed) => Ok(vec![]),
                Some(OrderStatus::Cancelled) => Err(OrderError::Ended("CANCELLED")),
                _ => Ok(vec![OrderEvent::Confirmed { at: now() }]),
            },
            OrderCommand::Cancel { fallback } => match self.status {
                Some(OrderStatus::Cancelled) => Ok(vec![]),
                Some(OrderStatus::Confirmed) => Err(OrderError::Ended("CONFIRMED")),
                _ => Ok(vec![OrderEvent::Cancelled {
                    reason: self.reason.clone().unwrap_or(fallback),
                    at: now(),
                }]),
            },
        }
    }

    fn apply(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::Created {
                user_id,
                items,
                total_cents,
                at,
                choreographed,
            } => {
                self.exists = true;
                self.choreographed = *choreographed;
                self.user_id.clone_from(user_id);
                self.items.clone_from(items);
                self.total_cents = *total_cents;
                self.status = Some(OrderStatus::Pending);
                self.timeline.push(entry("order", "created", at));
            }
            OrderEvent::SagaAttached { saga_id } => self.saga_id = Some(saga_id.clone()),
            OrderEvent::Progress { step, outcome, at } => {
                self.timeline.push(entry(step, outcome, at));
            }
            OrderEvent::FailureNoted { reason } => self.reason = Some(reason.clone()),
            OrderEvent::CancelRequested { at } => {
                self.cancel_requested = true;
                self.timeline.push(entry("order", "cancel_requested", at));
            }
            OrderEvent::ShippingStarted => self.shipping_started = true,
            OrderEvent::Failed { .. } => self.failed = true,
            OrderEvent::Confirmed { at } => {
                self.status = Some(OrderStatus::Confirmed);
                self.timeline.push(entry("order", "confirmed", at));
            }
            OrderEvent::Cancelled { reason, at } => {
                self.status = Some(OrderStatus::Cancelled);
                self.reason = Some(reason.clone());
                self.timeline
                    .push(entry("order", &format!("cancelled: {reason}"), at));
            }
        }
    }
}

fn entry(step: &str, outcome: &str, at: &str) -> TimelineEntry {
    TimelineEntry {
        step: step.to_owned(),
        outcome: outcome.to_owned(),
        at: at.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_eventstore::AggregateTest;

    /// The fixed time every test command is handled at.
    fn noon() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-02T12:00:00.250Z")
            .expect("a valid time")
            .with_timezone(&Utc)
    }

    fn line() -> Line {
        Line {
            product_id: "p".into(),
            quantity: 2,
            price_cents: 150,
        }
    }

    fn created() -> OrderEvent {
        OrderEvent::Created {
            user_id: "u".into(),
            items: vec![line()],
            total_cents: 300,
            at: "t".into(),
            choreographed: false,
        }
    }

    #[test]
    fn a_cancel_after_shipping_began_is_refused_and_shipping_after_a_cancel_too() {
        let err = AggregateTest::<Order>::given(vec![created(), OrderEvent::ShippingStarted])
            .when(OrderCommand::RequestCancel.at(noon()))
            .then_expect_error();
        assert_eq!(err, OrderError::NotCancellable("shipping has begun"));
        let err = AggregateTest::<Order>::given(vec![
            created(),
            OrderEvent::CancelRequested { at: "t".into() },
        ])
        .when(OrderCommand::StartShipping.at(noon()))
        .then_expect_error();
        assert_eq!(err, OrderError::CancelRequested);
    }

    #[test]
    fn a_failure_takes_the_noted_reason_once_and_never_after_shipping_began() {
        AggregateTest::<Order>::given(vec![
            created(),
            OrderEvent::CancelRequested { at: "t".into() },
            OrderEvent::FailureNoted {
                reason: "cancelled_by_user".into(),
            },
        ])
        .when(
            OrderCommand::Fail {
                fallback: "other".into(),
            }
            .at(noon()),
        )
        .then_expect_events([OrderEvent::Failed {
            reason: "cancelled_by_user".into(),
        }]);
        let mut order = Order::default();
        for e in [created(), OrderEvent::Failed { reason: "x".into() }] {
            order.apply(&e);
        }
        let again = order.handle(
            OrderCommand::Fail {
                fallback: "y".into(),
            }
            .at(noon()),
        );
        assert_eq!(again, Ok(vec![]));
        let err = AggregateTest::<Order>::given(vec![created(), OrderEvent::ShippingStarted])
            .when(
                OrderCommand::Fail {
                    fallback: "x".into(),
                }
                .at(noon()),
            )
            .then_expect_error();
        assert_eq!(err, OrderError::NotCancellable("shipping has begun"));
    }

    #[test]
    fn the_first_noted_reason_is_the_cancellation_reason() {
        let mut order = Order::default();
        for e in [
            created(),
            OrderEvent::FailureNoted {
                reason: "out_of_stock".into(),
            },
        ] {
            order.apply(&e);
        }
        assert!(
            order
                .handle(OrderCommand::NoteFailure("x".into()).at(noon()))
                .unwrap()
                .is_empty()
        );
        let events = order
            .handle(
                OrderCommand::Cancel {
                    fallback: "other".into(),
                }
                .at(noon()),
            )
            .unwrap();
        assert!(
            matches!(&events[0], OrderEvent::Cancelled { reason, .. } if reason == "out_of_stock")
        );
    }

    #[test]
    fn commands_on_a_missing_order_are_refused_and_create_is_idempotent() {
        assert_eq!(
            Order::default().handle(OrderCommand::Confirm.at(noon())),
            Err(OrderError::NotFound)
        );
        let mut order = Order::default();
        order.apply(&created());
        assert!(
            order
                .handle(
                    OrderCommand::Create {
                        user_id: "u".into(),
                        items: vec![line()],
                        choreographed: false,
                    }
                    .at(noon())
                )
                .unwrap()
                .is_empty()
        );
        assert_eq!(order.total_cents, 300);
    }

    #[test]
    fn events_record_the_time_the_command_was_handled_at_not_the_wall_clock() {
        // A fixed time in, the same time out, in every event that records one.
        AggregateTest::<Order>::given(vec![created()])
            .when(OrderCommand::Confirm.at(noon()))
            .then_expect_events([OrderEvent::Confirmed {
                at: "2026-01-02T12:00:00.250Z".into(),
            }]);
        let events = Order::default()
            .handle(
                OrderCommand::Create {
                    user_id: "u".into(),
                    items: vec![line()],
                    choreographed: false,
                }
                .at(noon()),
            )
            .expect("created");
        assert!(
            matches!(&events[..], [OrderEvent::Created { at, .. }] if at == "2026-01-02T12:00:00.250Z"),
            "{events:?}"
        );
    }
}
