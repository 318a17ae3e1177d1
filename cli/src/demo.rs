//! `trellis demo`: short, real runs of the toolkit's parts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, ensure};
use clap::{Args, Subcommand};
use trellis_resilience::{
    Backoff, CircuitBreaker, Resilience, ResilienceError, RetryBudget, RetryPolicy, SlidingWindow,
};

/// Demonstrations.
#[derive(Debug, Subcommand)]
pub(crate) enum Demo {
    /// Calls a flaky in-process upstream through retry, a circuit breaker and a timeout, and
    /// prints each breaker transition: the upstream fails, the breaker opens and calls fail
    /// fast, the upstream heals, trial calls close the breaker.
    Breaker(BreakerArgs),
}

/// Settings of the breaker demo.
#[derive(Debug, Args)]
pub(crate) struct BreakerArgs {
    /// Calls to make in all.
    #[arg(long, default_value_t = 400)]
    calls: u64,
    /// Fraction of calls that fail while the upstream is unhealthy (0..=1).
    #[arg(long, default_value_t = 0.8)]
    failure_rate: f64,
    /// The upstream is unhealthy from this call number...
    #[arg(long, default_value_t = 100)]
    outage_from: u64,
    /// ...until this call number.
    #[arg(long, default_value_t = 250)]
    outage_until: u64,
    /// Pause between calls, in milliseconds.
    #[arg(long, default_value_t = 5)]
    interval_ms: u64,
    /// Seed of the upstream's failures, for a repeatable run.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

impl Demo {
    pub(crate) async fn run(self) -> anyhow::Result<()> {
        match self {
            Self::Breaker(args) => breaker(args).await,
        }
    }
}

async fn breaker(args: BreakerArgs) -> anyhow::Result<()> {
    ensure!(
        (0.0..=1.0).contains(&args.failure_rate),
        "--failure-rate must be between 0 and 1, got {}",
        args.failure_rate
    );
    ensure!(
        args.outage_from <= args.outage_until,
        "--outage-from must not be after --outage-until"
    );
    ensure!(args.calls <= 1_000_000, "--calls is limited to 1,000,000");
    ensure!(
        args.interval_ms <= 10_000,
        "--interval-ms is limited to 10,000"
    );

    let breaker = CircuitBreaker::builder("demo-upstream")
        .sliding_window(SlidingWindow::Count(20))
        .minimum_calls(10)
        .failure_rate_threshold(0.5)
        .open_duration(Duration::from_millis(250))
        .half_open_calls(3)
        .build()
        .context("breaker settings")?;
    let stack = Resilience::builder()
        .retry(
            RetryPolicy::builder()
                .max_attempts(2)
                .backoff(Backoff {
                    initial: Duration::from_millis(2),
                    max: Duration::from_millis(20),
                    ..Backoff::default()
                })
                .budget(RetryBudget::new(0.2, 5, 20))
                .build()
                .context("retry settings")?,
        )
        .circuit_breaker(breaker.clone())
        .timeout(Duration::from_millis(100))
        .build();

    let mut transitions = breaker.transitions();
    let printer = tokio::spawn(async move {
        while let Ok(t) = transitions.recv().await {
            println!(
                "  breaker {} -> {} at {:>6} ms: {}",
                t.from,
                t.to,
                t.at.as_millis(),
                t.reason
            );
        }
    });

    let unhealthy = Arc::new(AtomicBool::new(false));
    let upstream_calls = Arc::new(AtomicU64::new(0));
    let mut rng = fastrand::Rng::with_seed(args.seed);
    let (mut ok, mut failed, mut rejected) = (0u64, 0u64, 0u64);
    println!(
        "calling a flaky upstream {} times; it fails {:.0}% of calls from call {} to call {}",
        args.calls,
        args.failure_rate * 100.0,
        args.outage_from,
        args.outage_until
    );
    for call in 0..args.calls {
        unhealthy.store(
            (args.outage_from..args.outage_until).contains(&call),
            Ordering::Relaxed,
        );
        let fail_roll = rng.f64();
        let result = stack
            .call(|| {
                let unhealthy = unhealthy.clone();
                let upstream_calls = upstream_calls.clone();
                async move {
                    upstream_calls.fetch_add(1, Ordering::Relaxed);
                    if unhealthy.load(Ordering::Relaxed) && fail_roll < args.failure_rate {
                        Err("upstream error")
                    } else {
                        Ok(())
                    }
                }
            })
            .await;
        match result {
            Ok(()) => ok += 1,
            Err(ResilienceError::BreakerOpen { .. }) => rejected += 1,
            Err(_) => failed += 1,
        }
        tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
    }
    drop(stack);
    drop(breaker);
    printer.await.context("transition printer")?;
    println!(
        "done: {ok} succeeded, {failed} failed, {rejected} rejected fast by the open breaker; the upstream saw {} calls",
        upstream_calls.load(Ordering::Relaxed)
    );
    Ok(())
}
