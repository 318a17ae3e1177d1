//! Integration tests for trellis-saga: behaviour, crash recovery and the SQL stores.

mod bus;
mod choreography;
mod engine;
mod inspector;
mod leasing;
mod recovery;
mod sql;
mod store;
mod support;
