//! `trellis mcp`: the shop's agent tools over MCP on stdio, for one logged-in user.
//!
//! An MCP client (a desktop assistant, an IDE, the MCP inspector) starts `trellis mcp` as a
//! child process and speaks JSON-RPC on its stdin and stdout; every tool call acts as the user
//! whose token is in `TRELLIS_TOKEN` (from `POST /api/auth/token`), through the shop's gateway.
//! stdout carries MCP frames only: logs go to stderr. The token is read from the environment
//! only, never from a flag, so it does not show in process listings.
//!
//! Over HTTP the gateway serves the same tools at `/mcp` (see `shop_app::MCP_PATH`), for the
//! caller whose bearer token each request carries.

use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::Value;
use trellis_agent::Caller;

/// The environment variable holding the user's token.
const TOKEN_ENV: &str = "TRELLIS_TOKEN";

/// `trellis mcp`.
#[derive(Debug, clap::Args)]
pub(crate) struct McpArgs {
    /// The shop's gateway, which the tools call with the user's token.
    #[arg(long, env = "TRELLIS_GATEWAY", default_value = "http://127.0.0.1:8080")]
    gateway: String,
}

impl McpArgs {
    pub(crate) async fn run(self) -> anyhow::Result<()> {
        let gateway = self.gateway.trim_end_matches('/').to_owned();
        let token = match std::env::var(TOKEN_ENV) {
            Ok(token) if !token.trim().is_empty() => token.trim().to_owned(),
            Ok(_) | Err(std::env::VarError::NotPresent) => bail!(
                "set {TOKEN_ENV} to the token of the user the tools act for (from POST \
                 {gateway}/api/auth/token)"
            ),
            Err(std::env::VarError::NotUnicode(_)) => bail!("{TOKEN_ENV} is not valid text"),
        };
        // The tools build their own client; a bad URL is refused before anything else.
        let tools =
            shop_agent::registry(&gateway).map_err(|e| anyhow::anyhow!("the shop's tools: {e}"))?;
        let caller = whoami(&gateway, &token).await?;
        tracing::info!(
            user = %caller.subject,
            role = %caller.role,
            %gateway,
            "serving the shop's tools over MCP on stdio"
        );
        trellis_agent::mcp::serve_stdio(tools, caller)
            .await
            .context("the MCP connection")?;
        Ok(())
    }
}

/// Who the token belongs to (`GET /api/users/me`): a token the shop refuses stops the server
/// at once, rather than failing every call later.
async fn whoami(gateway: &str, token: &str) -> anyhow::Result<Caller> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .context("building the HTTP client")?;
    let response = http
        .get(format!("{gateway}/api/users/me"))
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("reaching the shop at {gateway}"))?;
    let status = response.status();
    if !status.is_success() {
        bail!("the shop at {gateway} did not accept {TOKEN_ENV} (GET /api/users/me: {status})");
    }
    let me: Value = response
        .json()
        .await
        .context("GET /api/users/me answered something that is not JSON")?;
    let id = me["id"]
        .as_str()
        .filter(|id| !id.is_empty())
        .context("GET /api/users/me answered without an id")?;
    let role = me["role"].as_str().unwrap_or("customer");
    Ok(Caller::new(id, role).with_bearer(token))
}
