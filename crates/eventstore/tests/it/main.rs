//! trellis-eventstore: the conformance suite on every backend, then aggregates, snapshots,
//! upcasting and projections.

mod account;
mod aggregates;
mod conformance;
#[cfg(feature = "failpoints")]
mod failpoints;
mod open_and_subscribe;
mod projections;
