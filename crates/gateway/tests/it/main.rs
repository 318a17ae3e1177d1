//! Integration tests of trellis-gateway: real upstream servers and the gateway on 127.0.0.1,
//! port 0; real sockets, so waits are short and bounded.

mod auth;
mod balancing;
mod config_reload;
mod cors;
mod headers;
mod helpers;
mod limits;
mod paths;
mod routing;
mod tls;
