//! `trellis chaos` for the reference shop: run the shop as supervised processes, drive orders
//! at a steady rate with the `trellis load` engine, inject faults on a seeded schedule (process
//! kills, network faults through fault proxies, payment-provider faults), heal, wait for the
//! shop to settle, and check every DESIGN.md invariant through the API and in each service's
//! database.
//!
//! [`scenario`] holds the built-in scenarios, TOML scenario files and the seeded schedule;
//! [`runner`] runs one against a [`runner::Target`]: [`processes::ProcessTarget`] (the shop
//! started as supervised processes behind fault proxies, on embedded backends or on
//! PostgreSQL + NATS) or [`running::RunningTarget`] (a shop already running, given by its
//! URLs); [`checks`] reads the invariants in the databases and the bus afterwards.
//!
//! # Example
//! ```
//! use std::time::Duration;
//! use shop_chaos::scenario::{Action, Scenario};
//!
//! let storm = Scenario::built_in("storm").expect("a built-in");
//! let plan = storm.schedule(Duration::from_secs(600), 7, &Default::default());
//! let kills: usize = plan.iter().map(|p| match &p.action {
//!     Action::Kill { services, .. } => services.len(),
//!     _ => 0,
//! }).sum();
//! assert!(kills >= 40, "a 10-minute storm kills at least 40 processes");
//! assert_eq!(plan, storm.schedule(Duration::from_secs(600), 7, &Default::default()), "the same seed, the same plan");
//! ```
#![forbid(unsafe_code)]

pub mod checks;
pub mod processes;
pub mod runner;
pub mod running;
pub mod scenario;
