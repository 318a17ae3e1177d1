//! AI agents on trellis: typed tools with JSON Schema, a durable agent loop, an
//! OpenAI-compatible LLM client and an MCP server.
//!
//! (Crate documentation is completed with the loop; see the modules.)
#![forbid(unsafe_code)]

pub mod mcp;
pub mod tool;

pub use tool::{
    Caller, Effect, Tool, ToolContext, ToolError, ToolFailure, ToolRegistry, ToolRegistryBuilder,
    ToolSpec,
};
