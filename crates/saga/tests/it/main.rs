//! Integration tests for trellis-saga: behaviour, crash recovery and the SQL stores.

mod engine;
mod recovery;
mod sql;
mod store;
mod support;
