//! Runs the gateway from a configuration file, as `trellis gateway --config FILE` does.
//!
//! `cargo run -p trellis-gateway --example serve -- crates/gateway/examples/gateway.toml`

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "crates/gateway/examples/gateway.toml".to_owned());
    trellis_gateway::run(path).await?;
    Ok(())
}
