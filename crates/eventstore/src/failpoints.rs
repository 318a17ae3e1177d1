//! Failpoints at the projection's durable boundary, for crash tests (feature `failpoints`).
//!
//! A [`ProjectionRunner`](crate::ProjectionRunner) applies a batch and stores its checkpoint in
//! one transaction, so the boundary has two sides, and a crash on either must leave every
//! event applied exactly once:
//!
//! | point | where | scope |
//! | --- | --- | --- |
//! | [`PROJECTION_BEFORE_CHECKPOINT`] | the batch is applied to the read model inside the transaction; the checkpoint is not written yet | projection name |
//! | [`PROJECTION_AFTER_COMMIT`] | batch and checkpoint committed; the runner has not moved on | projection name |
//!
//! `fail::cfg(POINT, "return(NAME)")` fails there with [`EventStoreError::Unavailable`];
//! `"return(NAME:panic)"` panics there. Other projections pass, so tests beside a crash test
//! in the same process are not hit; an empty scope (`"return"`) fires for every projection.

use crate::error::EventStoreError;

/// The batch is applied inside the transaction; the checkpoint is not stored yet.
pub const PROJECTION_BEFORE_CHECKPOINT: &str = "trellis_eventstore::projection::before_checkpoint";
/// The batch and its checkpoint are committed; the runner has not returned yet.
pub const PROJECTION_AFTER_COMMIT: &str = "trellis_eventstore::projection::after_commit";

/// Evaluates failpoint `name` for `scope`: `Some(error)` when configured to fail here,
/// `None` to go on; panics when configured to.
pub(crate) fn hit(name: &str, scope: &str) -> Option<EventStoreError> {
    let arg = fail::eval(name, |arg| arg)?.unwrap_or_default();
    let (target, panic) = match arg.strip_suffix(":panic") {
        Some(target) => (target, true),
        None => (arg.as_str(), false),
    };
    if !target.is_empty() && target != scope {
        return None;
    }
    assert!(!panic, "failpoint {name} ({scope}): crash");
    Some(EventStoreError::Unavailable(format!(
        "failpoint {name} ({scope}): crash"
    )))
}
