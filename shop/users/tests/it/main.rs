//! Integration tests of the users service: REST, gRPC and the JWKS, served on a loopback
//! port, against SQLite in a tempdir and PostgreSQL (`trellis_testkit::postgres`); plus the
//! gateway verifying the service's tokens through its published JWKS.

mod accounts;
mod gateway;
mod helpers;
mod sessions;
mod tokens;
