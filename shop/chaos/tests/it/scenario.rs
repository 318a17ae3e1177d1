//! Scenarios: built-ins, TOML files, bad input, and the seeded schedule.

use std::time::Duration;

use proptest::prelude::*;
use shop_chaos::scenario::{
    Action, BUILT_IN, BackendFault, Backends, KILLABLE, NetFault, Scenario,
};

fn kills(plan: &[shop_chaos::scenario::Planned]) -> usize {
    plan.iter()
        .map(|p| match &p.action {
            Action::Kill { services, .. } => services.len(),
            _ => 0,
        })
        .sum()
}

#[test]
fn every_built_in_loads_and_validates() {
    for name in BUILT_IN {
        let scenario = Scenario::load(name).unwrap();
        scenario.validate().unwrap();
        let run = scenario.duration.unwrap().0;
        assert!(
            !scenario.schedule(run, 1, &Backends::default()).is_empty(),
            "{name}"
        );
    }
}

#[test]
fn kill_each_kills_every_killable_service_once_in_order_of_the_list() {
    let scenario = Scenario::built_in("kill-each").unwrap();
    let plan = scenario.schedule(Duration::from_secs(70), 3, &Backends::default());
    let killed: Vec<String> = plan
        .iter()
        .flat_map(|p| match &p.action {
            Action::Kill { services, .. } => services.clone(),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(
        killed,
        KILLABLE.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    );
    assert_eq!(plan[0].at, Duration::from_secs(10));
    assert!(plan.iter().all(|p| p.at < Duration::from_secs(70)));
}

#[test]
fn a_ten_minute_storm_has_the_faults_the_scorecard_asks_for() {
    let storm = Scenario::built_in("storm").unwrap();
    for seed in 0..20 {
        let plan = storm.schedule(Duration::from_secs(600), seed, &Backends::default());
        assert!(kills(&plan) >= 40, "seed {seed}: {} kills", kills(&plan));
        let network = plan.iter().filter(|p| p.action.kind() == "network").count();
        assert!(network >= 20, "seed {seed}: {network} network faults");
        assert!(
            plan.iter()
                .any(|p| matches!(&p.action, Action::Kill { services, .. } if services.len() == 2)),
            "seed {seed}: no double kill"
        );
        // Everything starts in time to heal before the end.
        assert!(plan.iter().all(|p| p.at <= Duration::from_secs(540)));
    }
}

#[test]
fn a_toml_scenario_reads_as_written() {
    let text = r#"
        name = "mine"
        duration = "2m"
        rate = 20
        [[events]]
        at = "50%"
        fault = { kind = "kill", services = ["orders", "payments"] }
        [[events]]
        at = "10s"
        hold = "30s"
        fault = { kind = "latency", service = "inventory", ms = 200, jitter_ms = 50, share = 0.5 }
        [[events]]
        at = "20s"
        fault = { kind = "provider", outage = true }
    "#;
    let scenario = Scenario::parse("mine.toml", text).unwrap();
    let plan = scenario.schedule(Duration::from_secs(120), 9, &Backends::default());
    assert_eq!(plan.len(), 3);
    assert_eq!(plan[0].at, Duration::from_secs(10));
    assert_eq!(
        plan[0].action,
        Action::Network {
            service: "inventory".into(),
            fault: NetFault::Latency {
                ms: 200,
                jitter_ms: 50
            },
            share: 0.5
        }
    );
    assert_eq!(plan[0].hold, Some(Duration::from_secs(30)));
    assert_eq!(plan[1].action.describe(), "provider outage");
    assert_eq!(plan[2].at, Duration::from_secs(60));
    assert_eq!(plan[2].action.describe(), "SIGKILL orders + payments");
}

#[test]
fn a_kill_may_name_a_replica_and_keep_it_down() {
    // Goal: the replica scenario CI runs reads as meant: `orders-2` is a process a kill may
    // take, `restart = false` keeps it down, and a plain kill still restarts by default.
    let scenario = Scenario::parse(
        "replicas",
        "name = \"r\"\n[[events]]\nat = \"1s\"\n\
         fault = { kind = \"kill\", services = [\"orders-2\", \"payments-2\"], restart = false }\n\
         [[events]]\nat = \"2s\"\nfault = { kind = \"kill\", services = [\"orders\"] }",
    )
    .unwrap();
    let plan = scenario.schedule(Duration::from_secs(10), 1, &Backends::default());
    let actions: Vec<&Action> = plan.iter().map(|p| &p.action).collect();
    assert_eq!(
        actions,
        [
            &Action::Kill {
                services: vec!["orders-2".into(), "payments-2".into()],
                restart: false
            },
            &Action::Kill {
                services: vec!["orders".into()],
                restart: true
            },
        ]
    );
    assert!(actions[0].describe().contains("kept down"));
    let shipped = Scenario::load(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scenarios/ci-replicas.toml"
    ))
    .unwrap();
    shipped.validate().unwrap();
}

#[test]
fn bad_scenarios_are_refused_with_the_problem_named() {
    let cases = [
        ("name = \"x\"\nrate = -1", "rate"),
        ("name = \"x\"\nduration = \"2 weeks\"", "unit"),
        (
            "name = \"x\"\n[[events]]\nat = \"150%\"\nfault = { kind = \"kill\", services = [\"orders\"] }",
            "100%",
        ),
        (
            "name = \"x\"\n[[events]]\nat = \"1s\"\nfault = { kind = \"kill\", services = [\"postgres\"] }",
            "cannot kill",
        ),
        (
            "name = \"x\"\n[[events]]\nat = \"1s\"\nfault = { kind = \"kill\" }",
            "names services",
        ),
        (
            "name = \"x\"\n[[events]]\nat = \"1s\"\nfault = { kind = \"kill\", services = [\"payment-provider-2\"] }",
            "cannot kill",
        ),
        (
            "name = \"x\"\n[[events]]\nat = \"1s\"\nfault = { kind = \"reset\", service = \"gateway\" }",
            "unknown service",
        ),
        (
            "name = \"x\"\n[[events]]\nat = \"1s\"\nfault = { kind = \"reset\", service = \"orders\", share = 2 }",
            "share",
        ),
        (
            "name = \"x\"\n[[events]]\nat = \"1s\"\nfault = { kind = \"explode\" }",
            "explode",
        ),
        (
            "name = \"x\"\n[[events]]\nat = \"1s\"\nfault = { kind = \"provider\" }",
            "latency_ms",
        ),
        ("name = \"x\"\nsurprise = 1", "surprise"),
        (
            "name = \"x\"\n[random]\nkills_per_minute = 1000",
            "kills_per_minute",
        ),
    ];
    for (text, needle) in cases {
        let error = Scenario::parse("case", text).unwrap_err().to_string();
        assert!(error.contains(needle), "{text:?}: {error}");
    }
    let missing = Scenario::load("/no/such/scenario.toml")
        .unwrap_err()
        .to_string();
    assert!(missing.contains("kill-each"), "{missing}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn schedules_are_seeded_sorted_and_inside_the_run(seed in any::<u64>(), secs in 10u64..3_600) {
        let storm = Scenario::built_in("storm").unwrap();
        let run = Duration::from_secs(secs);
        let plan = storm.schedule(run, seed, &Backends::default());
        prop_assert_eq!(&plan, &storm.schedule(run, seed, &Backends::default()));
        prop_assert!(plan.windows(2).all(|w| w[0].at <= w[1].at));
        prop_assert!(plan.iter().all(|p| p.at < run));
        for p in &plan {
            if let Action::Kill { services, .. } = &p.action {
                prop_assert!(!services.is_empty());
                prop_assert!(services.iter().all(|s| KILLABLE.contains(&s.as_str())));
            }
        }
    }
}

#[test]
fn a_storm_on_remote_backends_adds_backend_faults_and_leaves_the_rest_of_the_plan_alone() {
    // The backend faults are drawn after everything else, so an embedded run's timeline for a
    // seed does not move when remote backends exist; with them, the storm restarts NATS, kills
    // PostgreSQL connections and partitions the proxied backends.
    let storm = Scenario::built_in("storm").unwrap();
    let run = Duration::from_secs(600);
    let remote = Backends {
        faults: vec![BackendFault::NatsRestart, BackendFault::PgTerminate],
        proxied: vec!["postgres".into(), "nats".into()],
    };
    let mut kinds = std::collections::BTreeSet::new();
    for seed in 0..10 {
        let embedded = storm.schedule(run, seed, &Backends::default());
        assert!(embedded.iter().all(|p| p.action.kind() != "backend"));
        let plan = storm.schedule(run, seed, &remote);
        let others: Vec<_> = plan
            .iter()
            .filter(|p| p.action.kind() != "backend")
            .cloned()
            .collect();
        assert_eq!(others, embedded, "seed {seed}");
        let backend: Vec<_> = plan
            .iter()
            .filter(|p| p.action.kind() == "backend")
            .collect();
        assert_eq!(backend.len(), 6, "seed {seed}: 0.6 a minute for 10 minutes");
        for planned in backend {
            assert!(remote.allow(&planned.action), "{planned:?}");
            kinds.insert(planned.action.describe());
        }
    }
    assert!(kinds.contains("NATS server restart"), "{kinds:?}");
    assert!(
        kinds.contains("pg_terminate_backend of every shop connection"),
        "{kinds:?}"
    );
    assert!(kinds.contains("partition into postgres"), "{kinds:?}");
}

#[test]
fn backend_faults_read_from_toml_and_are_refused_where_the_run_lacks_them() {
    let scenario = Scenario::parse(
        "test",
        r#"
        name = "backends"
        [[events]]
        at = "10%"
        fault = { kind = "nats_restart" }
        [[events]]
        at = "20%"
        fault = { kind = "pg_terminate" }
        [[events]]
        at = "30%"
        hold = "5s"
        fault = { kind = "partition", service = "nats" }
    "#,
    )
    .unwrap();
    let plan = scenario.schedule(Duration::from_secs(100), 1, &Backends::default());
    assert_eq!(plan.len(), 3);
    let embedded = Backends::default();
    assert!(plan.iter().all(|p| !embedded.allow(&p.action)));
    let pg_only = Backends {
        faults: vec![BackendFault::PgTerminate],
        proxied: vec!["postgres".into()],
    };
    let allowed: Vec<_> = plan.iter().filter(|p| pg_only.allow(&p.action)).collect();
    assert_eq!(allowed.len(), 1);
    assert_eq!(
        allowed[0].action,
        Action::Backend {
            fault: BackendFault::PgTerminate
        }
    );
    let unknown = Scenario::parse(
        "test",
        r#"
        name = "bad"
        [[events]]
        at = "10%"
        fault = { kind = "partition", service = "redis" }
    "#,
    );
    assert!(unknown.unwrap_err().to_string().contains("postgres, nats"));
}
