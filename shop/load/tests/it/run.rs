use std::sync::atomic::Ordering;
use std::time::Duration;

use shop_load::{LoadConfig, LoadError, Mix, Report};

use crate::fake::{self, ADMIN_EMAIL, ADMIN_PASSWORD, Faults};

const CONFIRM_AFTER: Duration = Duration::from_millis(50);

/// 150 products (so setup must follow a cursor), every third one out of stock.
fn catalogue() -> Vec<i64> {
    (0..150)
        .map(|i| if i % 3 == 0 { 0 } else { 10_000 })
        .collect()
}

fn config(target: &str, rate: f64, duration_ms: u64) -> LoadConfig {
    let mut config = LoadConfig::new(target, rate, Duration::from_millis(duration_ms))
        .with_admin(ADMIN_EMAIL, ADMIN_PASSWORD);
    config.users = 5;
    config.settle_timeout = Duration::from_secs(2);
    config.seed = Some(42);
    config
}

fn only(browse: u32, order: u32, check: u32) -> Mix {
    Mix {
        browse,
        order,
        check,
    }
}

fn op<'a>(report: &'a Report, name: &str) -> &'a shop_load::OpReport {
    report
        .ops
        .iter()
        .find(|o| o.op == name)
        .expect("every operation has a row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_shop_gets_rate_times_duration_arrivals_and_passes() {
    // Goal: the arrival count is rate × duration, every op succeeds, orders settle CONFIRMED
    // and every invariant holds. Method: 100/s for 1 s against a correct fake.
    let (url, shop) = fake::start(&catalogue(), CONFIRM_AFTER, Faults::default()).await;
    let report = shop_load::run(config(&url, 100.0, 1000)).await.unwrap();
    println!("{}", report.render());

    assert!(report.arrivals.abs_diff(100) <= 1, "{}", report.render());
    assert_eq!(report.sent, report.arrivals);
    assert!(report.ok(), "{}", report.render());
    assert!((report.elapsed_s - 1.0).abs() < 0.3, "{}", report.render());
    assert!(
        report.achieved_rate > 75.0 && report.achieved_rate <= 101.0,
        "{}",
        report.render()
    );
    let orders = op(&report, "order").ok;
    assert!(orders > 10, "{}", report.render());
    assert_eq!(
        orders,
        shop.counters.orders_accepted.load(Ordering::Relaxed)
    );
    assert!(
        op(&report, "check").ok > 0,
        "checks read earlier orders: {}",
        report.render()
    );
    assert_eq!(
        report.overall.arrivals,
        report.ops.iter().map(|o| o.arrivals).sum::<u64>()
    );
    // Setup followed the listing's cursor, and only in-stock products are ordered.
    assert!(
        shop.counters
            .orders_beyond_first_page
            .load(Ordering::Relaxed)
            > 0
    );
    assert_eq!(
        shop.counters
            .orders_without_stock_product
            .load(Ordering::Relaxed),
        0
    );
    assert_eq!(report.orders.placed, orders);
    assert_eq!(report.orders.confirmed, orders);
    assert_eq!(report.orders.pending, 0);
    assert!(report.invariants.admin_checked);
    assert_eq!(report.invariants.orders_checked, orders);
    assert!(report.invariants.products_checked > 0);
    let text = report.render();
    assert!(text.contains("invariants: OK"), "{text}");
    assert!(text.contains("errors: none"), "{text}");
    let json = report.to_json();
    assert_eq!(json["arrivals"], report.arrivals);
    assert_eq!(json["orders"]["confirmed"], orders);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ticker_does_not_wait_for_a_stalled_request() {
    // Goal: the open model issues arrivals on schedule while one request stalls. Method: the
    // first browse sleeps 300 ms; with room in flight, the other 49 arrivals stay fast.
    let faults = Faults {
        stall_browse_once: Some(Duration::from_millis(300)),
        ..Faults::default()
    };
    let (url, _shop) = fake::start(&catalogue(), CONFIRM_AFTER, faults).await;
    let mut config = config(&url, 50.0, 1000);
    config.mix = only(1, 0, 0);
    let report = shop_load::run(config).await.unwrap();

    let browse = op(&report, "browse");
    assert_eq!(browse.arrivals, 50, "{}", report.render());
    assert!(report.errors.is_empty(), "{}", report.render());
    assert!(browse.latency.max_ms >= 300.0, "{}", report.render());
    assert!(browse.latency.p90_ms < 150.0, "{}", report.render());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_in_flight_a_stall_turns_later_arrivals_into_overloaded_errors() {
    // Goal: an arrival beyond max_in_flight is an `overloaded` error, not silently delayed.
    // Method: max_in_flight 1, 50/s, the first browse stalls 300 ms: the ~15 arrivals due
    // meanwhile must be counted as overloaded.
    let faults = Faults {
        stall_browse_once: Some(Duration::from_millis(300)),
        ..Faults::default()
    };
    let (url, _shop) = fake::start(&catalogue(), CONFIRM_AFTER, faults).await;
    let mut config = config(&url, 50.0, 1000);
    config.mix = only(1, 0, 0);
    config.max_in_flight = 1;
    let report = shop_load::run(config).await.unwrap();

    let overloaded = report.errors.get("overloaded").copied().unwrap_or(0);
    assert!((10..=20).contains(&overloaded), "{}", report.render());
    assert_eq!(report.arrivals, 50);
    assert_eq!(report.sent + overloaded, 50);
    let browse = op(&report, "browse");
    assert_eq!(browse.ok + browse.errors, 50);
    assert!(browse.latency.max_ms >= 300.0, "{}", report.render());
    assert!(!report.ok());
    assert!(report.render().contains("overloaded"));
}

#[tokio::test(flavor = "current_thread")]
async fn latency_runs_from_the_due_time_so_a_client_stall_shows() {
    // Goal: no coordinated omission. Method: one runtime thread for client and fake; the first
    // browse blocks it for 300 ms, so the ~15 arrivals due meanwhile go out late. Measured from
    // their due time they show 20..300 ms; measured from sending they would look instant.
    let faults = Faults {
        block_runtime_once: Some(Duration::from_millis(300)),
        ..Faults::default()
    };
    let (url, _shop) = fake::start(&catalogue(), CONFIRM_AFTER, faults).await;
    let mut config = config(&url, 50.0, 1000);
    config.mix = only(1, 0, 0);
    let report = shop_load::run(config).await.unwrap();

    let browse = op(&report, "browse");
    assert_eq!(browse.arrivals, 50, "{}", report.render());
    assert!(report.errors.is_empty(), "{}", report.render());
    // At least 10% of the requests were due during the block by 100 ms or more.
    assert!(browse.latency.p90_ms >= 100.0, "{}", report.render());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmed_order_without_payment_is_reported() {
    // Goal: a broken invariant is listed with the order id, at most 20 listed, all counted.
    // Method: the fake confirms orders without capturing a payment.
    let faults = Faults {
        confirm_without_payment: true,
        ..Faults::default()
    };
    let (url, _shop) = fake::start(&catalogue(), CONFIRM_AFTER, faults).await;
    let mut config = config(&url, 50.0, 1000);
    config.mix = only(0, 1, 0);
    let report = shop_load::run(config).await.unwrap();
    println!("{}", report.render());

    assert!(report.errors.is_empty(), "{}", report.render());
    assert_eq!(report.orders.confirmed, 50);
    let inv = &report.invariants;
    assert_eq!(inv.violation_count, 50, "{}", report.render());
    assert_eq!(inv.violations.len(), shop_load::VIOLATIONS_LISTED_MAX);
    assert!(inv.violations.iter().all(|v| v.subject == "order"
        && v.id.starts_with("order-")
        && v.reason.contains("no payment")));
    assert!(!report.ok());
    let text = report.render();
    assert!(
        text.contains("invariants: FAILED, 50 violation(s)"),
        "{text}"
    );
    assert!(text.contains("and 30 more"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_stock_is_reported_per_product() {
    // Goal: a reservation never released shows as held stock. Method: the fake keeps every
    // reservation; all orders on one product.
    let faults = Faults {
        leak_reservation: true,
        ..Faults::default()
    };
    let (url, _shop) = fake::start(&[100], CONFIRM_AFTER, faults).await;
    let mut config = config(&url, 20.0, 500);
    config.mix = only(0, 1, 0);
    let report = shop_load::run(config).await.unwrap();

    assert_eq!(report.orders.confirmed, 10, "{}", report.render());
    let inv = &report.invariants;
    assert_eq!(inv.products_checked, 1);
    assert_eq!(inv.violation_count, 1, "{}", report.render());
    assert_eq!(inv.violations[0].subject, "product");
    assert_eq!(inv.violations[0].id, "prod-0000");
    assert!(
        inv.violations[0].reason.contains("reserved 10 != 0"),
        "{}",
        report.render()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellations_are_counted_by_reason_and_a_charge_kept_is_reported() {
    // Goal: orders that run out of stock count as cancelled by reason, and a cancelled order
    // that keeps its payment breaks an invariant. Method: one product with 4 units, 10 orders;
    // first a correct fake, then one that charges cancelled orders.
    for charge_cancelled in [false, true] {
        let faults = Faults {
            charge_cancelled,
            ..Faults::default()
        };
        let (url, _shop) = fake::start(&[4], CONFIRM_AFTER, faults).await;
        let mut config = config(&url, 20.0, 500);
        config.mix = only(0, 1, 0);
        let report = shop_load::run(config).await.unwrap();

        assert_eq!(report.orders.confirmed, 4, "{}", report.render());
        assert_eq!(
            report.orders.cancelled.get("out_of_stock"),
            Some(&6),
            "{}",
            report.render()
        );
        assert!(report.render().contains("cancelled 6 (out_of_stock 6)"));
        if charge_cancelled {
            assert_eq!(report.invariants.violation_count, 6, "{}", report.render());
            assert!(
                report.invariants.violations[0]
                    .reason
                    .contains("CANCELLED but payment status is \"captured\"")
            );
        } else {
            assert!(report.ok(), "{}", report.render());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_stuck_pending_are_reported_even_without_admin() {
    // Goal: the settle wait is bounded and orders still PENDING are reported. Method: the fake
    // never settles; no admin credentials, so only the terminal check runs.
    let faults = Faults {
        never_settle: true,
        ..Faults::default()
    };
    let (url, _shop) = fake::start(&catalogue(), CONFIRM_AFTER, faults).await;
    let mut config = config(&url, 20.0, 500);
    config.admin_email = None;
    config.admin_password = None;
    config.mix = only(0, 1, 0);
    config.settle_timeout = Duration::from_millis(300);
    let started = std::time::Instant::now();
    let report = shop_load::run(config).await.unwrap();

    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(report.orders.placed, 10);
    assert_eq!(report.orders.pending, 10);
    assert!(!report.invariants.admin_checked);
    assert_eq!(report.invariants.violation_count, 10);
    assert!(
        report.invariants.violations[0]
            .reason
            .contains("still PENDING")
    );
    assert!(!report.ok());
    assert!(report.render().contains("give admin credentials"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_errors_are_counted_by_status() {
    // Goal: 4xx/5xx answers are errors of kind "<status>", counted exactly. Method: every 3rd
    // browse answers 429 and every 4th order 503; compare with what the fake injected.
    let faults = Faults {
        browse_status_every: Some((3, 429)),
        order_status_every: Some((4, 503)),
        ..Faults::default()
    };
    let (url, shop) = fake::start(&catalogue(), CONFIRM_AFTER, faults).await;
    let mut config = config(&url, 100.0, 800);
    config.mix = only(1, 1, 0);
    let report = shop_load::run(config).await.unwrap();

    let injected_429 = shop.counters.browse_injected.load(Ordering::Relaxed);
    let injected_503 = shop.counters.order_injected.load(Ordering::Relaxed);
    assert!(injected_429 > 0 && injected_503 > 0);
    assert_eq!(
        report.errors.get("429"),
        Some(&injected_429),
        "{}",
        report.render()
    );
    assert_eq!(
        report.errors.get("503"),
        Some(&injected_503),
        "{}",
        report.render()
    );
    assert_eq!(report.errors.len(), 2, "{}", report.render());
    assert_eq!(op(&report, "browse").errors, injected_429);
    assert_eq!(op(&report, "order").errors, injected_503);
    assert_eq!(
        report.orders.placed,
        shop.counters.orders_accepted.load(Ordering::Relaxed)
    );
    // The refused orders were never accepted, so the invariants still hold.
    assert!(report.invariants.hold(), "{}", report.render());
    assert!(!report.ok());
    assert!(report.render().contains("429"));
    assert_eq!(report.to_json()["errors"]["503"], injected_503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_answers_are_counted_as_timeouts() {
    // Goal: a request over the per-request timeout is a `timeout` error. Method: orders take
    // 400 ms, the timeout is 150 ms.
    let faults = Faults {
        order_delay: Some(Duration::from_millis(400)),
        ..Faults::default()
    };
    let (url, _shop) = fake::start(&catalogue(), CONFIRM_AFTER, faults).await;
    let mut config = config(&url, 20.0, 500);
    config.mix = only(0, 1, 0);
    config.request_timeout = Duration::from_millis(150);
    let report = shop_load::run(config).await.unwrap();

    assert_eq!(
        report.errors.get("timeout"),
        Some(&10),
        "{}",
        report.render()
    );
    assert_eq!(report.orders.placed, 0);
    // A timed-out order may still exist: it is reported as in doubt.
    assert_eq!(report.orders.in_doubt, 10);
    assert!(
        report.render().contains("in doubt 10"),
        "{}",
        report.render()
    );
}

#[tokio::test]
async fn setup_failures_name_the_step() {
    // Goal: a run that cannot start says why. Method: an unreachable target, a shop with
    // nothing in stock, wrong admin credentials, a bad config.
    // Bound but never listening: connections are refused, and no other test's server can take
    // the port meanwhile (a listener dropped at once could hand it over).
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = reserved.local_addr().unwrap().port();
    let err = shop_load::run(config(&format!("http://127.0.0.1:{port}"), 10.0, 100))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, LoadError::Setup { step: "admin login", message } if message.contains("connect")),
        "{err}"
    );

    let (url, _shop) = fake::start(&[0, 0], CONFIRM_AFTER, Faults::default()).await;
    let err = shop_load::run(config(&url, 10.0, 100)).await.unwrap_err();
    assert!(
        matches!(&err, LoadError::Setup { step: "products", message } if message.contains("available > 0")),
        "{err}"
    );
    // Without orders in the mix, an empty shop is fine to browse.
    let mut browse_only = config(&url, 10.0, 100);
    browse_only.mix = only(1, 0, 1);
    assert!(shop_load::run(browse_only).await.unwrap().ok());

    let bad_admin = config(&url, 10.0, 100).with_admin(ADMIN_EMAIL, "wrong");
    let err = shop_load::run(bad_admin).await.unwrap_err();
    assert!(
        matches!(&err, LoadError::Setup { step: "admin login", message } if message.contains("401")),
        "{err}"
    );

    let err = shop_load::run(config(&url, -1.0, 100)).await.unwrap_err();
    assert!(
        matches!(&err, LoadError::Config(m) if m.contains("rate")),
        "{err}"
    );
}
