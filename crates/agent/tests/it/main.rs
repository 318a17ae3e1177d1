//! trellis-agent's integration tests, one binary.

mod agent_loop;
mod durable;
mod http;
mod mcp;
mod support;
