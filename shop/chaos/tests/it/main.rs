//! shop-chaos's integration tests, one binary.

mod checks;
mod scenario;
