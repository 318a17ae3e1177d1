//! Failpoints at the bus's durable boundaries, for crash tests (feature `failpoints`).
//!
//! Each point sits right after something became durable and before the party that made it
//! durable learns so: a crash there is the case the at-least-once contract and the inbox
//! exist for. The points use the [`fail`] crate's global registry; without the feature they
//! are not compiled at all.
//!
//! | point | where | scope |
//! | --- | --- | --- |
//! | [`PUBLISH_AFTER_COMMIT`] | a backend stored a publish (SQLite commit, JetStream ack, the in-memory log), before `publish` returns | topic |
//! | [`DELIVERY_BEFORE_ACK`] | [`Delivery::ack`](crate::Delivery::ack), before the ack reaches the backend | group |
//! | [`INBOX_AFTER_COMMIT`] | `handle_once` committed the handler's effect with the inbox record, before it returns (so before the ack) | group |
//! | [`OUTBOX_AFTER_PUBLISH`] | a relay round published rows, before it deletes them from the outbox | topic of a published row |
//!
//! Configure a point with `fail::cfg(POINT, "return(SCOPE)")` to make it fail with
//! [`BusError::Unavailable`] (what a crash looks like to a caller that survives), or
//! `"return(SCOPE:panic)"` to panic there (a crash of the task). `SCOPE` is the topic or
//! group the point fires for; other topics and groups pass, so tests running beside a crash
//! test in the same process are not hit. An empty scope (`"return"`) fires for everything.
//! fail's own actions (`panic`, `sleep(ms)`, `N*...`) work as usual but ignore the scope.

use crate::error::BusError;

/// A backend stored a publish; `publish` has not returned yet. Scope: the topic.
pub const PUBLISH_AFTER_COMMIT: &str = "trellis_bus::publish::after_commit";
/// A delivery is about to be acked. Scope: the group.
pub const DELIVERY_BEFORE_ACK: &str = "trellis_bus::delivery::before_ack";
/// The inbox committed a handler's effect; the delivery is not acked yet. Scope: the group.
pub const INBOX_AFTER_COMMIT: &str = "trellis_bus::inbox::after_commit";
/// An outbox relay published rows and has not deleted them yet. Scope: a published topic.
pub const OUTBOX_AFTER_PUBLISH: &str = "trellis_bus::outbox::after_publish";

/// Evaluates failpoint `name` for `scope`: `Some(error)` when configured to fail here,
/// `None` to go on; panics when configured to.
pub(crate) fn hit(name: &str, scope: &str) -> Option<BusError> {
    let arg = fail::eval(name, |arg| arg)?.unwrap_or_default();
    let (target, panic) = match arg.strip_suffix(":panic") {
        Some(target) => (target, true),
        None => (arg.as_str(), false),
    };
    if !target.is_empty() && target != scope {
        return None;
    }
    assert!(!panic, "failpoint {name} ({scope}): crash");
    Some(BusError::Unavailable(format!(
        "failpoint {name} ({scope}): crash"
    )))
}
