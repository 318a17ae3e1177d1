//! Durable publish/subscribe for trellis services: consumer groups, per-subject ordering,
//! retries with backoff, dead-letter queues with redrive, an inbox for exactly-once effects
//! and a transactional outbox.
//!
//! # Overview
//!
//! - [`Bus`] publishes [`Envelope`]s on topics (`orders.created`) and subscribes consumer
//!   groups to topic patterns (`orders.*`), or to a list of them
//!   (`orders.created,payments.failed`, see [`topic`]). Consumers of one group compete; every
//!   group sees every message its list matches; two messages with the same envelope `subject`
//!   are never in flight at once within a group, so each aggregate's messages are handled in
//!   order, across all the topics of the group's list.
//! - A [`Delivery`] is settled with [`Delivery::ack`], [`Delivery::nack`] (redeliver after a
//!   delay), [`Delivery::fail`] (the subscription's [`RetryPolicy`]: backoff with jitter, then
//!   the DLQ), [`Delivery::term`] or [`Delivery::poison`]. An unsettled delivery is
//!   redelivered after the ack wait. [`Subscription::run`] does all of this around a handler.
//! - [`DeadLetters`] lists (a page at a time, following a cursor), groups by failure
//!   fingerprint, redrives, discards and archives dead letters, logging every action;
//!   [`http::router`] serves it as JSON.
//!
//! Backends: [`InMemoryBus`] (tests), [`sqlite::SqliteBus`] (the embedded default: a durable
//! log in one SQLite file that several processes can share) and [`nats::NatsBus`] (NATS
//! JetStream). They pass one conformance suite (`tests/it/conformance.rs`). [`AnyBus`] picks
//! one by URL (`memory://`, `sqlite://path`, `nats://host:port`).
//!
//! # How it fits
//!
//! `trellis-eventstore` appends events and relays its global log onto the bus;
//! services that do not event-source write an [`outbox`] row in the same transaction as their
//! state change and run an [`outbox`] relay. `trellis-saga` and the shop's services consume
//! with [`Subscription::run`] and make their effects idempotent with [`inbox`]'s
//! `handle_once`. Trace context travels in the envelope's `traceparent`
//! (via `trellis-telemetry`), so a consumer's span is a child of the producer's.
//!
//! # Feature flags
//!
//! | feature | default | what |
//! | --- | --- | --- |
//! | `sqlite` | yes | [`sqlite::SqliteBus`], the durable log |
//! | `nats` | yes | [`nats::NatsBus`] (async-nats) |
//! | `http` | yes | [`http::router`], the DLQ's JSON endpoints (axum) |
//! | `failpoints` | no | `failpoints`: crash points at the durable boundaries, for tests |
//!
//! [`inbox`] and [`outbox`] (SQLite and PostgreSQL) are always built.
//!
//! # Limits and metrics
//!
//! Every bound is a named constant: message size ([`MESSAGE_BYTES_MAX_DEFAULT`], configurable
//! per backend, checked at publish), headers ([`HEADERS_COUNT_MAX`]), fetch batch and wait
//! ([`FETCH_BATCH_MAX`], [`FETCH_WAIT_MAX`]), in-flight deliveries per consumer
//! ([`IN_FLIGHT_MAX`]), deliveries per message ([`DELIVERIES_MAX`]), retry delay
//! ([`RETRY_DELAY_MAX`]), the SQLite group-commit batch and queue
//! ([`sqlite::WRITE_BATCH_MAX`], [`sqlite::WRITE_QUEUE_MAX`]), NATS request timeouts
//! ([`nats::REQUEST_TIMEOUT`]), DLQ list and redrive sizes ([`dlq::LIST_LIMIT_MAX`],
//! [`dlq::REDRIVE_BATCH_MAX`], [`nats::DLQ_BATCH_MAX`], [`nats::DLQ_SCAN_MAX`]) and outbox
//! rounds ([`outbox::RELAY_BATCH_MAX`]). Metrics go through the `metrics` facade:
//! `trellis_bus_published_total{topic}`, `trellis_bus_delivered_total{group}`,
//! `trellis_bus_acked_total{group}`, `trellis_bus_retried_total{group}`,
//! `trellis_bus_dead_lettered_total{group,reason}`, the histogram
//! `trellis_bus_consumer_lag_seconds{group}` (envelope time to first delivery),
//! `trellis_bus_dlq_actions_total{action}`, `trellis_bus_inbox_duplicates_total`,
//! `trellis_bus_publish_refused_total{reason}` (NATS: a full stream refused a publish) and the
//! gauges `trellis_bus_outbox_lag_seconds` and `trellis_bus_stream_max_age_seconds` (NATS: the
//! bus stream's age limit, 0 for none). The service that owns a bus runs a [`DlqGauges`] for
//! `trellis_bus_dlq_messages{group}` and `trellis_bus_dlq_oldest_age_seconds{group}`.
//! docs/metrics.md is the catalog.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//!
//! use trellis_bus::{Bus, Envelope, InMemoryBus, SubscribeOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), trellis_bus::BusError> {
//! let bus = InMemoryBus::new();
//! let mut billing = bus
//!     .subscribe("orders.*", "billing", SubscribeOptions::default())
//!     .await?;
//! let order = serde_json::json!({ "order_id": "o-1", "total_cents": 1299 });
//! bus.publish("orders.created", Envelope::new("order.created", "orders", "o-1", order))
//!     .await?;
//!
//! let deliveries = billing.fetch(10, Duration::from_secs(1)).await?;
//! assert_eq!(deliveries.len(), 1);
//! for delivery in deliveries {
//!     assert_eq!(delivery.envelope().subject, "o-1");
//!     delivery.ack().await?;
//! }
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

/// `failpoint!(NAME, scope)`: returns `Err(error.into())` from the enclosing function when
/// failpoint `NAME` fires for `scope` (feature `failpoints`, see [`failpoints`]); expands to
/// nothing without the feature. Defined before the modules so they all see it.
macro_rules! failpoint {
    ($name:expr, $scope:expr) => {
        #[cfg(feature = "failpoints")]
        {
            if let Some(error) = $crate::failpoints::hit($name, $scope) {
                return Err(error.into());
            }
        }
    };
}

mod any;
mod bus;
pub mod dlq;
mod envelope;
mod error;
#[cfg(feature = "failpoints")]
pub mod failpoints;
mod gauges;
#[cfg(feature = "http")]
pub mod http;
pub mod inbox;
mod memory;
#[cfg(feature = "nats")]
pub mod nats;
pub mod outbox;
mod policy;
#[cfg(feature = "sqlite")]
pub mod sqlite;
pub mod topic;

pub use any::AnyBus;
pub use bus::{
    Bus, Delivery, FETCH_BATCH_MAX, FETCH_WAIT_MAX, HandlerError, Message, Subscription,
    consume_span, produce_span,
};
pub use dlq::{
    DeadLetter, DeadLetterFilter, DeadLetterPage, DeadLetterReason, DeadLetterState,
    DeadLetterStats, DeadLetters, DlqAction, DlqActionKind, FailureGroup,
};
pub use envelope::{
    ATTRIBUTE_BYTES_MAX, Envelope, HEADER_NAME_BYTES_MAX, HEADERS_COUNT_MAX,
    MESSAGE_BYTES_MAX_DEFAULT, REDRIVE_COUNT_HEADER, TRACESTATE_HEADER,
};
pub use error::BusError;
pub use gauges::{DLQ_MESSAGES, DLQ_OLDEST_AGE, DLQ_SAMPLE_INTERVAL_DEFAULT, DlqGauges};
pub use memory::{InMemoryBus, MEMORY_LOG_MESSAGES_MAX};
pub use policy::{
    ACK_WAIT_MAX, ACK_WAIT_MIN, DELIVERIES_MAX, IN_FLIGHT_MAX, RETRY_DELAY_MAX, RetryPolicy,
    SubscribeOptions,
};
