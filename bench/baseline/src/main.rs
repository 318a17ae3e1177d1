//! `trellis-baseline`: the shop's order transaction in one process on one SQLite database,
//! the baseline `bench/baseline/run.sh` measures the distributed shop against (see the
//! library's docs for what it keeps from the shop and what it leaves out).
//!
//! ```text
//! trellis-baseline --port 18182 --data-dir /tmp/baseline
//! ```
//! Prints the URL it serves; stops on Ctrl-C / SIGINT.
#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use shop_payment_provider::ProviderConfig;
use trellis_bench_baseline::{Config, start};

/// The same allocator as the `trellis` binary (docs/decisions/0016-allocator.md), so the
/// comparison measures the design, not the allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The shop's order transaction in one process on one database (a benchmark baseline).
#[derive(Debug, Parser)]
#[command(name = "trellis-baseline", version)]
struct Args {
    /// Port of the API (0: a free one).
    #[arg(long, default_value_t = 18182)]
    port: u16,
    /// Address of the API.
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    /// Where the database lives (created; a database left there is replaced by a fresh one).
    #[arg(long, default_value = "baseline-data")]
    data_dir: PathBuf,
    /// The administrator's email.
    #[arg(
        long,
        env = "TRELLIS_ADMIN_EMAIL",
        default_value = "admin@trellis.local"
    )]
    admin_email: String,
    /// The administrator's password (generated and printed when not given).
    #[arg(long, env = "TRELLIS_ADMIN_PASSWORD", hide_env_values = true)]
    admin_password: Option<String>,
    /// Latency the payment provider simulator adds to every call, in milliseconds
    /// (`trellis up --provider-latency-ms`; 0 by default there too).
    #[arg(long, default_value_t = 0)]
    provider_latency_ms: u64,
}

/// 16 random bytes from the OS, hex-encoded.
fn generated_password() -> anyhow::Result<String> {
    let mut bytes = [0_u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let (admin_password, generated) = match args.admin_password {
        Some(password) => (password, false),
        None => (generated_password()?, true),
    };
    let mut config = Config::new(&args.data_dir, &args.admin_email, &admin_password);
    config.bind = args.bind;
    config.port = args.port;
    config.provider = ProviderConfig {
        latency_ms: args.provider_latency_ms,
        ..ProviderConfig::default()
    };
    let baseline = start(config).await.context("starting the baseline")?;
    println!("trellis-baseline serving {}", baseline.url());
    println!(
        "  payment provider simulator on http://{}",
        baseline.provider_addr()
    );
    if generated {
        println!("  admin {} / {admin_password}", args.admin_email);
    }
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    baseline.shutdown().await;
    Ok(())
}
