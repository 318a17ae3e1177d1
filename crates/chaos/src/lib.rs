//! Chaos engineering for trellis deployments: the pieces `trellis chaos` is made of, each
//! usable alone.
//!
//! Modules are added as they land: a process supervisor (children restarted with backoff,
//! killed on demand, never orphaned) and a TCP fault proxy (latency, resets, blackholes,
//! bandwidth limits, sliced writes; switchable at run time).
#![forbid(unsafe_code)]

pub mod proxy;
pub mod supervisor;
