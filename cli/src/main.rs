//! The `trellis` command: the reference shop in one process (`up`) or one process per
//! service (`serve`), the gateway alone (`gateway`), the load generator (`load`), operator
//! tools for sagas (`saga`), dead letters (`dlq`) and accounts (`users create-admin`), and the
//! resilience demo (`demo`). `agent` runs an AI agent on the shop, `mcp` serves the shop's
//! tools to MCP clients on stdio, `chaos` runs the shop as processes under faults and checks
//! the invariants, `fault-proxy` is its TCP fault proxy alone. Errors print one line and exit
//! non-zero; they never panic with a backtrace.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use trellis_telemetry::{LogFormat, TelemetryConfig};

mod agent;
mod chaos;
mod demo;
mod dlq;
mod fault_proxy;
mod load;
mod mcp;
mod saga;
mod shop;
mod users;

/// The allocator: mimalloc instead of glibc's malloc (docs/decisions/0016-allocator.md).
/// glibc raises its mmap threshold after freeing a large block (argon2 hashes 19 MiB per
/// login), after which large blocks come from arenas it cannot give back: `trellis up` held
/// 648 MB after 6,000 orders where its heap never exceeded a quarter of that.
/// The `system-allocator` feature keeps glibc's, for heap profilers that hook `malloc`
/// (heaptrack, valgrind): `cargo build --release -p trellis --features system-allocator`.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// trellis: resilient, event-driven microservices in Rust.
#[derive(Debug, Parser)]
#[command(name = "trellis", version, propagate_version = true)]
struct Cli {
    /// Log output: `human` or `json`.
    #[arg(
        long,
        global = true,
        default_value = "human",
        env = "TRELLIS_LOG_FORMAT"
    )]
    log_format: LogFormat,

    /// Log filter in `RUST_LOG` syntax (for example `info,trellis_resilience=debug`).
    #[arg(long, global = true, env = "RUST_LOG")]
    log: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs a durable AI agent on the shop as a logged-in user (any OpenAI-compatible
    /// endpoint), and lists, shows, approves, denies, cancels and resumes its runs.
    Agent(agent::AgentArgs),
    /// Runs the shop as processes behind fault proxies, drives orders at a steady rate,
    /// injects faults on a seeded schedule (kills, network faults, provider faults), then
    /// checks every invariant through the API and in each database. Exits 1 on a violation.
    Chaos(chaos::ChaosArgs),
    /// Guided demonstrations of the toolkit.
    #[command(subcommand)]
    Demo(demo::Demo),
    /// Runs the API gateway in front of any HTTP upstreams (routing, JWT, rate limits, load
    /// balancing). SIGHUP reloads the file; Ctrl-C drains and stops.
    Gateway(GatewayArgs),
    /// Inspects and acts on dead letters: list, show, replay, discard.
    Dlq(dlq::DlqArgs),
    /// A TCP proxy to one upstream that injects faults (latency, resets, blackholes, bandwidth
    /// limits, sliced writes, down), switched at run time over HTTP (--control).
    FaultProxy(fault_proxy::FaultProxyArgs),
    /// Serves the shop's agent tools over MCP on stdio, as the user whose token is in
    /// TRELLIS_TOKEN (for MCP clients that start it; logs go to stderr).
    Mcp(mcp::McpArgs),
    /// Inspects sagas and acts on them: list, show, retry, cancel, skip, purge.
    Saga(saga::SagaArgs),
    /// Runs the reference shop: the gateway and every service in one process, embedded
    /// databases under --data-dir. Ctrl-C drains and stops.
    Up(shop::UpArgs),
    /// Runs one shop service (or its gateway) in this process, for one process per service.
    Serve(shop::ServeArgs),
    /// Drives the shop's public API at a constant arrival rate (browse, order, check) and
    /// reports latency percentiles, order outcomes, errors and the invariants.
    Load(load::LoadArgs),
    /// Works on a users database without the service: `create-admin` makes the first
    /// administrator of a shop run with `trellis serve`.
    Users(users::UsersArgs),
}

/// Settings of `trellis gateway`.
#[derive(Debug, clap::Args)]
struct GatewayArgs {
    /// The gateway's TOML configuration (see crates/gateway/examples/gateway.toml).
    #[arg(long, env = "TRELLIS_GATEWAY_CONFIG")]
    config: std::path::PathBuf,
    /// Listen here instead of the file's `server.listen` (for example 127.0.0.1:8080).
    #[arg(long, env = "TRELLIS_GATEWAY_LISTEN")]
    listen: Option<std::net::SocketAddr>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage_error(&error),
    };
    // The service name spans are exported under (OTEL_SERVICE_NAME overrides it): the served
    // service in `trellis serve NAME`, the gateway in `trellis gateway`. `trellis up` names
    // each of its services' spans itself (trellis_telemetry::service).
    let service_name = match &cli.command {
        Command::Serve(args) => args.service_name().to_owned(),
        Command::Gateway(_) => "gateway".to_owned(),
        _ => "trellis".to_owned(),
    };
    let mut telemetry = TelemetryConfig::new(service_name)
        .with_log_format(cli.log_format)
        .with_otel_env();
    if let Some(filter) = &cli.log {
        telemetry = telemetry.with_filter(filter.clone());
    } else if matches!(cli.command, Command::Chaos(_)) {
        // The run prints its own progress and report; the proxies' and the shop's info lines
        // would bury them (the children's logs go to a file in the data directory).
        telemetry = telemetry.with_filter("warn".to_owned());
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            return fail(&anyhow::Error::new(error).context("cannot start the async runtime"));
        }
    };
    // Inside the runtime: the OTLP exporter's gRPC channel runs on it. Declared after the
    // runtime, so the guard (which flushes the last spans) drops while the runtime still runs.
    let initialised = {
        let _entered = runtime.enter();
        trellis_telemetry::init(telemetry)
    };
    let _telemetry = match initialised {
        Ok(guard) => guard,
        Err(error) => return fail(&anyhow::Error::new(error).context("cannot set up logging")),
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Agent(args) => args.run().await,
            Command::Chaos(args) => args.run().await,
            Command::Demo(demo) => demo.run().await,
            Command::Dlq(args) => args.run().await,
            Command::FaultProxy(args) => args.run().await,
            Command::Mcp(args) => args.run().await,
            Command::Saga(args) => args.run().await,
            Command::Up(args) => args.run().await,
            Command::Serve(args) => args.run().await,
            Command::Load(args) => args.run().await,
            Command::Users(args) => args.run().await,
            Command::Gateway(args) => trellis_gateway::run_on(&args.config, args.listen)
                .await
                .with_context(|| format!("gateway with {}", args.config.display())),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&error),
    }
}

/// Help and version go to stdout with success; any other parse error is one line on stderr.
fn usage_error(error: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match error.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = error.print();
            if error.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        _ => {
            let rendered = error.render().to_string();
            let first = rendered
                .lines()
                .find(|line| !line.trim().is_empty())
                .unwrap_or("invalid arguments");
            eprintln!("{} (see `trellis --help`)", first.trim());
            ExitCode::from(2)
        }
    }
}

fn fail(error: &anyhow::Error) -> ExitCode {
    eprintln!("error: {}", one_line(&format!("{error:#}")));
    ExitCode::FAILURE
}

/// Folds a multi-line message (a TOML parser's source excerpt, say) into one line, keeping
/// the words and dropping the excerpt's `|` and `^` decoration.
fn one_line(message: &str) -> String {
    let decoration = |line: &str| {
        let rest = line.trim_start_matches(|c: char| c.is_ascii_digit() || c == ' ');
        rest.starts_with('|')
            && line
                .trim_start()
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit() || c == '|')
    };
    message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !decoration(line))
        .collect::<Vec<_>>()
        .join(": ")
}
