//! Integration tests of the products service: REST and gRPC served on a loopback port,
//! against SQLite in a tempdir and PostgreSQL (`trellis_testkit::postgres`), with a fake
//! inventory gRPC server that counts calls and can be switched off.

mod catalogue;
mod creation;
mod helpers;
