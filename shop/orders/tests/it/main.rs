//! shop-orders against fake participants: order placement's idempotency, and listing.

mod helpers;
mod listing;
mod placement;
