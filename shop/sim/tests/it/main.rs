//! The seeded simulation of the order flow: many seeds clean, one seed replayed exactly, and
//! proof that the simulation fails when a safeguard is off.

use std::time::Instant;

use shop_sim::{Config, Safeguards, run_seed, seeds_from_env};

/// Seeds a CI run covers (`TRELLIS_SIM_SEEDS` overrides, `TRELLIS_SIM_SEED` runs one).
const CI_SEEDS: u64 = 500;

#[test]
fn seeds_keep_every_invariant() {
    let seeds = seeds_from_env(CI_SEEDS);
    let echo =
        std::env::var("TRELLIS_SIM_SEED").is_ok() && std::env::var("TRELLIS_SIM_ECHO").is_ok();
    let config = Config {
        echo,
        ..Config::default()
    };
    let started = Instant::now();
    let (mut orders, mut confirmed, mut cancelled, mut crashes, mut retries) = (0, 0, 0, 0, 0);
    let count = seeds.end - seeds.start;
    let mut failures = Vec::new();
    for seed in seeds {
        let outcome = run_seed(seed, &config);
        if !outcome.violations.is_empty() {
            eprintln!("TRELLIS_SIM_SEED={seed}: {}", outcome.violations.join("; "));
            if failures.is_empty() {
                failures.push(outcome.report());
            } else {
                failures.push(format!("TRELLIS_SIM_SEED={seed}"));
            }
            continue;
        }
        orders += outcome.stats.orders;
        confirmed += outcome.stats.confirmed;
        cancelled += outcome.stats.cancelled;
        crashes += outcome.stats.orchestrator_crashes;
        retries += outcome.stats.operator_retries;
    }
    eprintln!(
        "{count} seeds run in {:.1?}: {orders} orders ({confirmed} confirmed, {cancelled} cancelled), {crashes} orchestrator crashes, {retries} operator retries",
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {count} seeds broke an invariant; the first:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn the_mirrored_saga_is_the_orders_saga() {
    // src/saga.rs mirrors shop/orders/src/saga.rs (private to shop-orders). When this fails,
    // copy the new definition into src/saga.rs (keeping the channel type and the safeguard
    // switch) and update MIRRORED_SAGA_FNV.
    let original = include_bytes!("../../../orders/src/saga.rs");
    assert_eq!(
        shop_sim::fnv1a(original),
        shop_sim::MIRRORED_SAGA_FNV,
        "shop/orders/src/saga.rs changed since shop/sim/src/saga.rs mirrored it"
    );
}

#[test]
fn a_seed_replays_exactly() {
    // The same seed twice: the same decisions, outcomes and end states, line for line.
    let config = Config::default();
    for seed in [1, 2, 3, 8, 9] {
        let first = run_seed(seed, &config);
        let second = run_seed(seed, &config);
        assert!(first.trace.len() > 10, "seed {seed} ran: {:?}", first.trace);
        assert_eq!(first.trace, second.trace, "seed {seed} diverged");
        assert_eq!(first.violations, second.violations);
        assert_eq!(first.stats, second.stats);
    }
}

/// Seeds the "can fail" tests may search before giving up.
const SEARCH_SEEDS: u64 = 200;

fn first_failing_seed(safeguards: Safeguards, finds: &str) -> Option<u64> {
    let config = Config {
        safeguards,
        ..Config::default()
    };
    (1..=SEARCH_SEEDS).find(|&seed| {
        run_seed(seed, &config)
            .violations
            .iter()
            .any(|v| v.contains(finds))
    })
}

#[test]
fn without_the_refund_on_compensation_a_cancelled_order_keeps_its_charge() {
    // The payment step's refund (its compensation) turned off: a charge made before the saga
    // gave up is never refunded, and the simulation must notice within the search budget.
    let found = first_failing_seed(
        Safeguards {
            refund_on_compensation: false,
            ..Safeguards::default()
        },
        "not refunded",
    );
    eprintln!("found at seed {found:?}");
    assert!(
        found.is_some(),
        "no seed of {SEARCH_SEEDS} found the kept charge"
    );
}

#[test]
fn without_idempotent_charges_an_order_is_captured_twice() {
    // The provider's dedupe by idempotency key turned off: a duplicated or retried charge
    // captures again.
    let found = first_failing_seed(
        Safeguards {
            provider_idempotency: false,
            ..Safeguards::default()
        },
        "captured 2 times",
    );
    eprintln!("found at seed {found:?}");
    assert!(
        found.is_some(),
        "no seed of {SEARCH_SEEDS} found the double capture"
    );
}

#[test]
fn seeds_that_found_bugs_stay_clean() {
    // Seeds that broke an invariant before the fixes (kept as regression tests):
    // 1 and 106: a cancelled order kept a live shipment (the pivot failed with a shipment
    //   created by an attempt whose answer was lost; the one best-effort cancel was refused);
    // 9, 8, 107: a cancelled order kept its stock reserved (the inventory step failed for good
    //   after an earlier attempt's Reserve held the stock with its answer lost, or a delayed
    //   Reserve arrived after the Release).
    for seed in [1, 8, 9, 106, 107] {
        let outcome = run_seed(seed, &Config::default());
        assert!(outcome.violations.is_empty(), "{}", outcome.report());
    }
}
