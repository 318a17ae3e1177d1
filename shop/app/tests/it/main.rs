//! End-to-end tests: the whole shop in this process on free ports, driven through the
//! gateway's public API, on SQLite (temp dirs) and on PostgreSQL (one database per service).

mod agent_run;
mod agent_tools;
mod choreography;
mod console;
mod harness;
mod metrics_catalog;
mod orders;
mod owasp;
mod platform;
mod trust;
