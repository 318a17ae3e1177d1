//! The outcome of a run: [`Report`], rendered as a plain-text table or JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Most invariant violations listed one by one; the rest are only counted.
pub const VIOLATIONS_LISTED_MAX: usize = 20;

/// Latency percentiles of the successful requests of one operation, measured from each
/// request's due time (so time spent waiting behind a stall counts).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Requests measured.
    pub count: u64,
    /// Median, in milliseconds.
    pub p50_ms: f64,
    /// 90th percentile, in milliseconds.
    pub p90_ms: f64,
    /// 99th percentile, in milliseconds.
    pub p99_ms: f64,
    /// Slowest, in milliseconds.
    pub max_ms: f64,
}

impl Latency {
    /// Summarizes a histogram of microseconds.
    pub(crate) fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }
}

/// One row of the operations table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpReport {
    /// `browse`, `order`, `check` or `all`.
    pub op: String,
    /// Arrivals that picked this operation (`ok + errors`).
    pub arrivals: u64,
    /// Requests answered as expected.
    pub ok: u64,
    /// Arrivals that failed, `overloaded` included.
    pub errors: u64,
    /// Latency of the `ok` requests.
    pub latency: Latency,
}

/// What became of the orders the run placed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OrderOutcomes {
    /// Orders accepted (`202`).
    pub placed: u64,
    /// Ended `CONFIRMED`.
    pub confirmed: u64,
    /// Ended `CANCELLED`, by reason (`unknown` when none was given).
    pub cancelled: BTreeMap<String, u64>,
    /// Still `PENDING` (or not visible to their owner) when the settle wait ended.
    pub pending: u64,
    /// Accepted beyond the tracking limit, so neither checked nor settled.
    pub untracked: u64,
    /// Order requests whose outcome is unknown (timeout, broken connection, 502/504, an
    /// unreadable success): the order may exist. While any is in doubt, "nothing reserved
    /// once every order is terminal" is not checked.
    pub in_doubt: u64,
}

impl OrderOutcomes {
    /// All cancelled orders.
    pub fn cancelled_total(&self) -> u64 {
        self.cancelled.values().sum()
    }
}

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// `order` or `product`.
    pub subject: String,
    /// The order or product id.
    pub id: String,
    /// What is wrong.
    pub reason: String,
}

/// The invariant checks (DESIGN.md's list, through the API).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Invariants {
    /// Whether the admin-only checks ran (payments, shipments, inventory); without admin
    /// credentials only "every accepted order is terminal" is checked.
    pub admin_checked: bool,
    /// Orders checked.
    pub orders_checked: u64,
    /// Products checked.
    pub products_checked: u64,
    /// How many violations were found.
    pub violation_count: u64,
    /// The first [`VIOLATIONS_LISTED_MAX`] of them.
    pub violations: Vec<Violation>,
}

impl Invariants {
    /// Records a violation (listed while there is room, always counted).
    pub(crate) fn violate(&mut self, subject: &str, id: &str, reason: String) {
        self.violation_count += 1;
        if self.violations.len() < VIOLATIONS_LISTED_MAX {
            self.violations.push(Violation {
                subject: subject.into(),
                id: id.into(),
                reason,
            });
        }
    }

    /// No violation found.
    pub fn hold(&self) -> bool {
        self.violation_count == 0
    }
}

/// The outcome of [`run`](crate::run).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The gateway driven.
    pub target: String,
    /// Seed of the random choices; pass it back in [`LoadConfig::seed`](crate::LoadConfig::seed)
    /// to repeat the run's choices.
    pub seed: u64,
    /// Arrivals per second asked for.
    pub rate_target: f64,
    /// Scheduled duration, in seconds.
    pub duration_s: f64,
    /// Time the drive phase took (at least the scheduled duration), in seconds.
    pub elapsed_s: f64,
    /// Arrivals scheduled and issued (`rate × duration`).
    pub arrivals: u64,
    /// Arrivals actually sent (the rest were `overloaded`).
    pub sent: u64,
    /// `sent / elapsed_s`.
    pub achieved_rate: f64,
    /// One row per operation.
    pub ops: Vec<OpReport>,
    /// All operations together.
    pub overall: OpReport,
    /// Errors by kind: an HTTP status (`"429"`, `"503"`), `timeout`, `connect`, `transport`
    /// (the connection broke after it was made), `overloaded`, `bad_response`.
    pub errors: BTreeMap<String, u64>,
    /// What became of the orders placed.
    pub orders: OrderOutcomes,
    /// The invariant checks.
    pub invariants: Invariants,
}

impl Report {
    /// No errors and every invariant checked holds.
    pub fn ok(&self) -> bool {
        self.errors.is_empty() && self.invariants.hold()
    }

    /// The report as JSON (the same fields as the struct).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a report is plain data with string keys")
    }

    /// A compact plain-text report: operations table, achieved rate, order outcomes, errors
    /// by kind, invariants.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; the results are ignored on purpose.
        let _ = writeln!(
            out,
            "load: {} at {}/s for {:.1} s (seed {})",
            self.target,
            fmt_rate(self.rate_target),
            self.duration_s,
            self.seed
        );
        let _ = writeln!(
            out,
            "arrivals {}, sent {}, achieved {}/s over {:.1} s",
            self.arrivals,
            self.sent,
            fmt_rate(self.achieved_rate),
            self.elapsed_s
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<8}{:>9}{:>9}{:>8}{:>10}{:>10}{:>10}{:>10}",
            "op", "count", "ok", "errors", "p50 ms", "p90 ms", "p99 ms", "max ms"
        );
        for row in self.ops.iter().chain(std::iter::once(&self.overall)) {
            let l = &row.latency;
            // No successful request, no latency: a dash rather than a misleading 0.0.
            let ms = |v: f64| {
                if l.count == 0 {
                    "-".to_owned()
                } else {
                    format!("{v:.1}")
                }
            };
            let _ = writeln!(
                out,
                "{:<8}{:>9}{:>9}{:>8}{:>10}{:>10}{:>10}{:>10}",
                row.op,
                row.arrivals,
                row.ok,
                row.errors,
                ms(l.p50_ms),
                ms(l.p90_ms),
                ms(l.p99_ms),
                ms(l.max_ms)
            );
        }
        let _ = writeln!(out);
        let o = &self.orders;
        let mut line = format!(
            "orders: placed {}, confirmed {}, cancelled {}",
            o.placed,
            o.confirmed,
            o.cancelled_total()
        );
        if !o.cancelled.is_empty() {
            let reasons: Vec<String> = o
                .cancelled
                .iter()
                .map(|(r, n)| format!("{r} {n}"))
                .collect();
            let _ = write!(line, " ({})", reasons.join(", "));
        }
        let _ = write!(line, ", pending {}", o.pending);
        if o.untracked > 0 {
            let _ = write!(line, ", untracked {}", o.untracked);
        }
        if o.in_doubt > 0 {
            let _ = write!(line, ", in doubt {}", o.in_doubt);
        }
        let _ = writeln!(out, "{line}");
        if self.errors.is_empty() {
            let _ = writeln!(out, "errors: none");
        } else {
            let kinds: Vec<String> = self
                .errors
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            let _ = writeln!(out, "errors: {}", kinds.join(", "));
        }
        let inv = &self.invariants;
        let scope = if inv.admin_checked {
            format!(
                "{} orders, {} products checked",
                inv.orders_checked, inv.products_checked
            )
        } else {
            format!(
                "{} orders checked for a terminal status; give admin credentials to check payments, shipments and stock",
                inv.orders_checked
            )
        };
        if inv.hold() {
            let _ = writeln!(out, "invariants: OK ({scope})");
        } else {
            let _ = writeln!(
                out,
                "invariants: FAILED, {} violation(s) ({scope})",
                inv.violation_count
            );
            for v in &inv.violations {
                let _ = writeln!(out, "  - {} {}: {}", v.subject, v.id, v.reason);
            }
            let unlisted = inv
                .violation_count
                .saturating_sub(inv.violations.len() as u64);
            if unlisted > 0 {
                let _ = writeln!(out, "  … and {unlisted} more");
            }
        }
        out
    }
}

fn fmt_rate(rate: f64) -> String {
    if rate >= 100.0 {
        format!("{rate:.0}")
    } else {
        format!("{rate:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        let row = |op: &str| OpReport {
            op: op.into(),
            arrivals: 10,
            ok: 9,
            errors: 1,
            latency: Latency {
                count: 9,
                p50_ms: 1.25,
                p90_ms: 2.0,
                p99_ms: 3.0,
                max_ms: 4.0,
            },
        };
        Report {
            target: "http://127.0.0.1:8080".into(),
            seed: 7,
            rate_target: 10.0,
            duration_s: 3.0,
            elapsed_s: 3.0,
            arrivals: 30,
            sent: 29,
            achieved_rate: 9.7,
            ops: vec![row("browse"), row("order"), row("check")],
            overall: row("all"),
            errors: BTreeMap::from([("overloaded".to_owned(), 1), ("503".to_owned(), 2)]),
            orders: OrderOutcomes {
                placed: 9,
                confirmed: 7,
                cancelled: BTreeMap::from([("out_of_stock".to_owned(), 2)]),
                pending: 0,
                untracked: 0,
                in_doubt: 0,
            },
            invariants: Invariants::default(),
        }
    }

    #[test]
    fn render_shows_table_outcomes_errors_and_violations() {
        let mut r = report();
        for i in 0..(VIOLATIONS_LISTED_MAX + 5) {
            r.invariants
                .violate("order", &format!("o{i}"), "still PENDING".into());
        }
        let text = r.render();
        assert!(text.contains("order"), "{text}");
        assert!(text.contains("1.2") || text.contains("1.3"), "{text}");
        assert!(text.contains("cancelled 2 (out_of_stock 2)"), "{text}");
        assert!(text.contains("503 2, overloaded 1"), "{text}");
        assert!(text.contains("FAILED, 25 violation(s)"), "{text}");
        assert!(text.contains("order o19: still PENDING"), "{text}");
        assert!(!text.contains("o20:"), "{text}");
        assert!(text.contains("and 5 more"), "{text}");
        assert!(!r.ok());
    }

    #[test]
    fn ok_needs_no_errors_and_no_violations() {
        let mut r = report();
        assert!(!r.ok());
        r.errors.clear();
        assert!(r.ok());
        assert!(r.render().contains("invariants: OK"));
        r.invariants
            .violate("product", "p1", "reserved 1 != 0".into());
        assert!(!r.ok());
    }

    #[test]
    fn json_carries_the_same_fields() {
        let j = report().to_json();
        assert_eq!(j["arrivals"], 30);
        assert_eq!(j["ops"][1]["op"], "order");
        assert_eq!(j["errors"]["503"], 2);
        assert_eq!(j["orders"]["cancelled"]["out_of_stock"], 2);
        assert_eq!(j["overall"]["latency"]["p50_ms"], 1.25);
    }
}
