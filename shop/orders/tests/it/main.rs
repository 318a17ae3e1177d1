//! shop-orders against fake participants: order placement's idempotency.

mod helpers;
mod placement;
