//! trellis-eventstore: the conformance suite on every backend, then aggregates, snapshots,
//! upcasting and projections.

mod conformance;
