//! Drives a running shop: `cargo run -p shop-load --example load -- [TARGET] [RATE] [SECONDS]`.
//! Admin credentials for the invariant checks come from `TRELLIS_ADMIN_EMAIL` and
//! `TRELLIS_ADMIN_PASSWORD`. Exits 1 when the run saw errors or broken invariants.

use std::time::Duration;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let target = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let rate: f64 = args.next().and_then(|r| r.parse().ok()).unwrap_or(50.0);
    let seconds: f64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(10.0);
    let mut config = shop_load::LoadConfig::new(
        target,
        rate,
        Duration::try_from_secs_f64(seconds).unwrap_or(Duration::ZERO),
    );
    config.admin_email = std::env::var("TRELLIS_ADMIN_EMAIL").ok();
    config.admin_password = std::env::var("TRELLIS_ADMIN_PASSWORD").ok();
    config.progress = true;
    match shop_load::run(config).await {
        Ok(report) => {
            print!("{}", report.render());
            std::process::exit(if report.ok() { 0 } else { 1 });
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    }
}
