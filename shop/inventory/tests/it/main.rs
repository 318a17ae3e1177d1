//! Integration tests of the inventory service: its gRPC server and REST routes, served on a
//! loopback port, against SQLite in a tempdir and PostgreSQL (`trellis_testkit::postgres`).

mod helpers;
mod model;
mod reservations;
mod rest;
