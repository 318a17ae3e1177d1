//! Prints the shop's agent tools as a model sees them: name, effect, description and the JSON
//! Schema of the arguments. No shop needs to run.
//!
//! ```text
//! cargo run -p shop-agent --example tools [GATEWAY_URL]
//! ```

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let gateway = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:8080".to_owned());
    let tools = shop_agent::registry(&gateway)?;
    for spec in tools.specs() {
        println!("{} ({:?})\n  {}", spec.name, spec.effect, spec.description);
        println!("  {}\n", serde_json::to_string(&spec.input_schema)?);
    }
    Ok(())
}
