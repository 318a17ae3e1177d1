//! Behaviour of every trellis-resilience policy, with paused tokio time or an injected clock.

mod breaker;
mod breaker_model;
mod bulkhead;
mod layers;
mod rate_limit;
mod retry;
mod support;
mod timeout;
