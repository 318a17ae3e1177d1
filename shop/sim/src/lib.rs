//! A seeded, deterministic simulation of the shop's orchestrated order flow.
//!
//! One seed names one run: a single-threaded tokio runtime on paused time, and one
//! SplitMix64 RNG seeded with it that decides everything random: the fault level, the
//! stock, the orders and when they are placed, which customers cancel and when, the fate of
//! every call between the orders process and the participants (refused, delayed, held past
//! the client's timeout, delivered twice, its answer lost, the participant crashing before
//! or after handling it), the payment provider's answers (declines, 503s, 500s after a
//! capture, the payments process dying between the capture and its record), and when the
//! orders process crashes (at its n-th saga-log write, before or after it commits, or at a
//! time) and how long it stays down. When the world is quiet, the faults end and an
//! operator retries any stuck saga; then every DESIGN.md invariant is checked.
//!
//! # What is real and what is simulated
//! Real: trellis-saga's [`SagaEngine`](trellis_saga::SagaEngine) (start, leases, retries,
//! timeouts, compensation, `recover` and `run_recovery`, the inspector's retry) over an
//! [`InMemorySagaStore`](trellis_saga::InMemorySagaStore); the Order aggregate
//! (`shop_orders::aggregate`) over trellis-eventstore's in-memory store; the generated
//! tonic clients and servers; and the inventory, payments and shipping services as their
//! `app()` builds them: service-identity check, gRPC handlers, idempotency and state rules,
//! SQLite stores, and for payments its provider client with breaker, retry and timeout.
//!
//! Mirrored: the order saga's definition. Its steps are private to shop-orders, so
//! `src/saga.rs` is a copy of `shop/orders/src/saga.rs` with the gRPC channel swapped; a
//! test fails when the original changes ([`MIRRORED_SAGA_FNV`]). The orders process around
//! it (the saga queue, recovery every 10 s, the sweeper) is mirrored the same way.
//!
//! Simulated: the network (a tower service under tonic's clients), the payment provider (an
//! HTTP fake with the provider simulator's contract, and the ledger the checks read),
//! crashes, and time. The participants run on a host thread of their own; each delivered
//! request is handed to it and waited for, so a participant call is one atomic step in
//! simulated time and SQLite's own threads cannot make a run diverge. A participant crash
//! is a restart from its database file, before or after a request (and, for payments,
//! between the provider's capture and its record); a crash inside a single-transaction
//! handler is the same as one before it.
//!
//! Replay: [`run_seed`] with the same seed gives the same trace line for line; the trace
//! holds no wall-clock time, uuid or saga id (order ids are derived from the seed). Saga ids
//! are UUIDv7 and only ever compared or ordered: they are made in the same order in every
//! replay, and v7 ids from one process sort in the order they were made.
//!
//! # Example
//! ```
//! let outcome = shop_sim::run_seed(7, &shop_sim::Config { orders: 2, ..Default::default() });
//! assert!(outcome.violations.is_empty(), "{}", outcome.report());
//! assert_eq!(outcome.trace, shop_sim::run_seed(7, &shop_sim::Config { orders: 2, ..Default::default() }).trace);
//! ```
#![forbid(unsafe_code)]

mod check;
mod host;
mod net;
mod orders;
mod provider;
mod rng;
mod saga;
mod sim;
mod trace;

use std::time::Duration;

pub use rng::Rng;
pub use saga::Safeguards;

/// The FNV-1a hash of `shop/orders/src/saga.rs` as mirrored in this crate's `src/saga.rs`.
/// When the original changes, update the mirror and this hash.
pub const MIRRORED_SAGA_FNV: u64 = 0x597f_63b0_9322_1819;

/// FNV-1a, 64 bits.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What one run does.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Orders placed.
    pub orders: usize,
    /// Safeguards (all on unless a test turns one off).
    pub safeguards: Safeguards,
    /// Print the trace as it happens.
    pub echo: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            orders: 6,
            safeguards: Safeguards::default(),
            echo: false,
        }
    }
}

/// Counts of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Orders placed.
    pub orders: usize,
    /// Of which confirmed.
    pub confirmed: usize,
    /// Of which cancelled.
    pub cancelled: usize,
    /// Crashes of the orders process.
    pub orchestrator_crashes: usize,
    /// Stuck sagas an operator retried.
    pub operator_retries: usize,
    /// Simulated time until the run settled.
    pub sim_time: Duration,
}

/// What one run found.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The seed.
    pub seed: u64,
    /// Every decision and outcome, in order, stamped with simulated time.
    pub trace: Vec<String>,
    /// Broken invariants (empty when the run is clean).
    pub violations: Vec<String>,
    /// Counts.
    pub stats: Stats,
}

impl Outcome {
    fn failed(seed: u64, trace: &trace::Trace, why: String) -> Self {
        Self {
            seed,
            trace: trace.lines(),
            violations: vec![format!("the simulation could not run: {why}")],
            stats: Stats::default(),
        }
    }

    /// The violations, how to replay the seed, and the decisions log.
    pub fn report(&self) -> String {
        format!(
            "TRELLIS_SIM_SEED={seed}: {n} violation(s)\n  {violations}\nreplay: TRELLIS_SIM_SEED={seed} cargo test -p shop-sim --test it -- one_seed --nocapture\ndecisions log:\n{trace}",
            seed = self.seed,
            n = self.violations.len(),
            violations = self.violations.join("\n  "),
            trace = self.trace.join("\n"),
        )
    }
}

/// Runs seed `seed` on a fresh single-threaded runtime with paused time (what
/// `#[tokio::test(flavor = "current_thread", start_paused = true)]` builds), so nothing of
/// one seed leaks into the next.
pub fn run_seed(seed: u64, config: &Config) -> Outcome {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            return Outcome {
                seed,
                trace: Vec::new(),
                violations: vec![format!("no runtime: {e}")],
                stats: Stats::default(),
            };
        }
    };
    runtime.block_on(sim::simulate(seed, config))
}

/// The seeds to run: `TRELLIS_SIM_SEED` alone when set, else `TRELLIS_SIM_SEEDS` (or
/// `default`) seeds from `TRELLIS_SIM_FIRST_SEED` (or 1).
pub fn seeds_from_env(default: u64) -> std::ops::Range<u64> {
    let var = |name: &str| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    if let Some(seed) = var("TRELLIS_SIM_SEED") {
        return seed..seed + 1;
    }
    let first = var("TRELLIS_SIM_FIRST_SEED").unwrap_or(1);
    first..first + var("TRELLIS_SIM_SEEDS").unwrap_or(default)
}
