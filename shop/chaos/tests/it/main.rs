//! shop-chaos's integration tests, one binary.

mod scenario;
