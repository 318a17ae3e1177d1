//! Integration tests for trellis-saga: behaviour, crash recovery and the SQL stores.

mod choreography;
mod command_step;
mod engine;
mod inspector;
mod leasing;
mod recovery;
mod saga_metrics;
mod sql;
mod store;
mod support;
