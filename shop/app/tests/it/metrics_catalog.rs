//! docs/metrics.md against what the shop serves on `/metrics`: the catalog is read from the
//! page itself, so a metric renamed in the code or the docs alone fails here.

use std::collections::{BTreeMap, BTreeSet};

use crate::harness::{Backend, TestShop};

/// The catalog page, relative to this crate.
const CATALOG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/metrics.md");

/// The services whose requests an order crosses: each must have its own request series.
const SERVED_AN_ORDER: [&str; 7] = [
    "users",
    "products",
    "inventory",
    "orders",
    "payments",
    "shipping",
    "payment-provider",
];

/// One row of the catalog table.
#[derive(Debug)]
struct Row {
    kind: String,
    always: bool,
}

/// The rows of the table under `## Catalog`, by metric name.
fn catalog() -> BTreeMap<String, Row> {
    let text = std::fs::read_to_string(CATALOG).expect("docs/metrics.md is readable");
    let table = text
        .split("\n## Catalog\n")
        .nth(1)
        .expect("docs/metrics.md has a ## Catalog section");
    let mut rows = BTreeMap::new();
    let mut header = None;
    for line in table.lines().skip_while(|line| !line.starts_with('|')) {
        if !line.starts_with('|') {
            break; // the table ends at its first non-table line
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        if header.is_none() {
            assert_eq!(
                cells,
                [
                    "Name",
                    "Type",
                    "Labels",
                    "Unit",
                    "Appears",
                    "Meaning",
                    "Emitted by"
                ],
                "the catalog's columns"
            );
            header = Some(());
            continue;
        }
        if cells.iter().all(|cell| cell.chars().all(|c| c == '-')) {
            continue; // the separator row
        }
        assert_eq!(cells.len(), 7, "a catalog row has 7 cells: {line}");
        let name = cells[0]
            .strip_prefix('`')
            .and_then(|name| name.strip_suffix('`'))
            .unwrap_or_else(|| panic!("a name in backticks: {line}"))
            .to_owned();
        let kind = cells[1].to_owned();
        assert!(
            ["counter", "gauge", "histogram"].contains(&kind.as_str()),
            "{name}: type {kind}"
        );
        assert_eq!(
            kind == "counter",
            name.ends_with("_total"),
            "{name}: counters, and only counters, end in _total"
        );
        let always = match cells[4] {
            "always" => true,
            "on event" => false,
            other => panic!("{name}: appears {other:?}, not `always` or `on event`"),
        };
        assert!(
            rows.insert(name.clone(), Row { kind, always }).is_none(),
            "{name} is listed twice"
        );
    }
    assert!(
        rows.len() > 50,
        "the catalog table parsed to {} rows",
        rows.len()
    );
    rows
}

/// One scrape: the families' `# TYPE`, those with `# HELP`, and those with samples.
#[derive(Debug, Default)]
struct Scrape {
    types: BTreeMap<String, String>,
    helped: BTreeSet<String>,
    sampled: BTreeSet<String>,
    text: String,
}

impl Scrape {
    fn parse(text: String) -> Self {
        let mut scrape = Self::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
                scrape.types.insert(name.to_owned(), kind.to_owned());
            } else if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().expect("# HELP name text");
                scrape.helped.insert(name.to_owned());
            } else if !line.is_empty() && !line.starts_with('#') {
                let series = line.split(['{', ' ']).next().expect("a sample line");
                scrape.sampled.insert(series.to_owned());
            }
        }
        scrape.text = text;
        scrape
    }

    /// Whether `name` (of type `kind`) has at least one sample.
    fn has_samples(&self, name: &str, kind: &str) -> bool {
        match kind {
            "histogram" => self.sampled.contains(&format!("{name}_bucket")),
            _ => self.sampled.contains(name),
        }
    }
}

async fn scrape(shop: &TestShop, base: &str) -> Scrape {
    let response = shop
        .http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("/metrics answers");
    assert_eq!(response.status(), 200, "{base}/metrics");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{base}/metrics content type {content_type:?}"
    );
    Scrape::parse(response.text().await.expect("a text body"))
}

/// Checks one listener's scrape against the catalog.
fn check(listener: &str, scrape: &Scrape, catalog: &BTreeMap<String, Row>) {
    for (name, row) in catalog {
        if let Some(kind) = scrape.types.get(name) {
            assert_eq!(
                kind, &row.kind,
                "{listener}: {name} is a {kind}, the catalog says"
            );
        }
        if !row.always {
            continue;
        }
        assert!(
            scrape.types.contains_key(name),
            "{listener}: no `# TYPE {name}` on /metrics, though docs/metrics.md says it always appears"
        );
        assert!(
            scrape.helped.contains(name),
            "{listener}: no `# HELP {name}` (describe it where it is recorded)"
        );
        assert!(
            scrape.has_samples(name, &row.kind),
            "{listener}: {name} has no samples"
        );
    }
    // The other way round: nothing of ours is served without a row in the catalog.
    for name in scrape.types.keys() {
        let ours = ["trellis_", "shop_", "process_"]
            .iter()
            .any(|prefix| name.starts_with(prefix));
        assert!(
            !ours || catalog.contains_key(name),
            "{listener}: {name} is served but missing from docs/metrics.md"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_catalogued_metric_is_served_after_an_order() {
    // Goal: docs/metrics.md and /metrics agree. Start a shop with its recorder, place one
    // order to the end, then scrape the gateway's operator listener and every service's
    // listener: each `always` row has TYPE, HELP and samples, no row has another type, nothing
    // of ours is served without a row, and every service an order crosses has request series
    // under its own name.
    let catalog = catalog();
    let shop = TestShop::start(Backend::Sqlite, "metrics_catalog")
        .await
        .expect("a SQLite shop needs no server");
    let alice = shop.customer("alice").await;
    let product = shop.product("Mug", 1_250, 5).await;
    let id = shop.order(&alice, &product, 2).await;
    let order = shop.settled(&alice, &id).await;
    assert_eq!(order["status"], "CONFIRMED", "{order}");

    let mut listeners = vec![("gateway operator".to_owned(), shop.shop.operator_url())];
    for (service, addr) in shop.shop.addrs() {
        listeners.push(((*service).to_owned(), format!("http://{addr}")));
    }
    let mut served = BTreeSet::new();
    for (listener, base) in &listeners {
        let scrape = scrape(&shop, base).await;
        check(listener, &scrape, &catalog);
        for service in SERVED_AN_ORDER {
            let label = format!("{{service=\"{service}\"");
            let requests = scrape.text.lines().any(|line| {
                (line.starts_with("trellis_http_server_requests_total")
                    || line.starts_with("trellis_grpc_server_requests_total"))
                    && line.contains(&label)
            });
            if requests {
                served.insert(service);
            }
        }
    }
    let missing: Vec<_> = SERVED_AN_ORDER
        .iter()
        .filter(|service| !served.contains(*service))
        .collect();
    assert!(
        missing.is_empty(),
        "no request series for {missing:?}: is RequestMetricsLayer on their routers?"
    );
    shop.stop().await;
}
