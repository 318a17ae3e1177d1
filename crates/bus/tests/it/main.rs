//! trellis-bus integration tests: the conformance suite on every backend, and the features
//! built on it (inbox, outbox, DLQ HTTP API, trace propagation).

mod conformance;
mod dlq_http;
mod dlq_paging;
mod exactly_once;
#[cfg(feature = "failpoints")]
mod failpoints;
mod helpers;
mod memory;
mod nats;
mod outbox;
mod sqlite;
mod trace;
