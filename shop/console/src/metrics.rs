//! What the overview shows, read from the services' `/metrics` (docs/metrics.md names every
//! family used here): a small parser of Prometheus's text format, a scraper that keeps the
//! last two scrapes, and the figures computed from them (rates and p99 over the window between
//! the two, like `rate()` and `histogram_quantile()` would).
//!
//! # Cost
//! A scrape happens only when a page asks for the overview, at most once per
//! [`SCRAPE_INTERVAL_MIN`] however many operators watch (the figures are shared), and each
//! target gets [`SCRAPE_TIMEOUT`]. The browser polls every few seconds and stops while its tab
//! is hidden. With `trellis up` one scrape of the gateway's operator listener covers every
//! service (they share the process's recorder).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

/// Scrapes closer together than this reuse the last one.
pub const SCRAPE_INTERVAL_MIN: Duration = Duration::from_secs(2);
/// How long one target's `/metrics` or `/readyz` may take.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest `/metrics` body read, in bytes.
const SCRAPE_BYTES_MAX: usize = 16 * 1024 * 1024;
/// gRPC codes that count as the server's error (the rest are the caller's or success).
const GRPC_SERVER_ERRORS: [&str; 6] = [
    "UNKNOWN",
    "DEADLINE_EXCEEDED",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
];

/// One sample of a scrape.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sample {
    /// The series name (`_bucket`, `_sum`, `_count` included).
    pub(crate) name: String,
    /// Its labels, in the order given.
    pub(crate) labels: Vec<(String, String)>,
    /// Its value.
    pub(crate) value: f64,
}

impl Sample {
    /// The value of label `name`, if it has it.
    pub(crate) fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(label, _)| label == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Parses Prometheus's text exposition format; comments and lines that do not parse are
/// skipped (a scrape is best effort: one odd line must not blank the overview).
pub(crate) fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let close = loop {
            // label name
            while chars.next_if(|(_, c)| *c == ',' || *c == ' ').is_some() {}
            let &(start, c) = chars.peek()?;
            if c == '}' {
                break start;
            }
            let mut eq = None;
            for (i, c) in chars.by_ref() {
                if c == '=' {
                    eq = Some(i);
                    break;
                }
            }
            let label = inner[start..eq?].trim().to_owned();
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                let (_, c) = chars.next()?;
                match c {
                    '"' => break,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    other => value.push(other),
                }
            }
            labels.push((label, value));
        };
        rest = &inner[close + 1..];
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// One scrape of every metrics target.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    at: Instant,
    samples: Vec<Sample>,
}

impl Snapshot {
    /// A snapshot of `samples` taken at `at`.
    pub(crate) fn new(at: Instant, samples: Vec<Sample>) -> Self {
        Self { at, samples }
    }

    /// The sum of the series named `name` whose labels pass `keep`.
    fn sum(&self, name: &str, keep: impl Fn(&Sample) -> bool) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name && keep(s))
            .map(|s| s.value)
            .sum()
    }

    /// The histogram `name`'s buckets (upper bound, cumulative count) summed over the series
    /// `keep` passes, in bound order.
    fn buckets(&self, name: &str, keep: impl Fn(&Sample) -> bool) -> Vec<(f64, f64)> {
        let bucket = format!("{name}_bucket");
        let mut by_bound: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for sample in self.samples.iter().filter(|s| s.name == bucket && keep(s)) {
            let Some(bound) = sample.label("le").and_then(|le| match le {
                "+Inf" => Some(f64::INFINITY),
                other => other.parse::<f64>().ok(),
            }) else {
                continue;
            };
            // f64 bounds ordered by their bits: every bound here is non-negative.
            let entry = by_bound.entry(bound.to_bits()).or_insert((bound, 0.0));
            entry.1 += sample.value;
        }
        by_bound.into_values().collect()
    }

    /// Every value of label `label` on series named `name`, each once, sorted.
    fn label_values(&self, name: &str, label: &str) -> Vec<String> {
        let mut values: Vec<String> = self
            .samples
            .iter()
            .filter(|s| s.name == name)
            .filter_map(|s| s.label(label).map(str::to_owned))
            .collect();
        values.sort();
        values.dedup();
        values
    }
}

/// A counter's increase between two snapshots; a reset (the process restarted) counts from 0.
fn increase(last: f64, previous: Option<f64>) -> f64 {
    match previous {
        Some(previous) if last >= previous => last - previous,
        _ => last,
    }
}

/// The `q` quantile of a histogram's bucket increases (upper bound, cumulative count), by
/// linear interpolation inside the bucket it falls in, as `histogram_quantile` does. `None`
/// without observations.
pub(crate) fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower_bound = 0.0;
    let mut lower_count = 0.0;
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                // Beyond the last finite bucket: its bound is the best answer there is.
                return Some(lower_bound);
            }
            let in_bucket = count - lower_count;
            if in_bucket <= 0.0 {
                return Some(bound);
            }
            return Some(lower_bound + (bound - lower_bound) * (rank - lower_count) / in_bucket);
        }
        lower_bound = bound;
        lower_count = count;
    }
    Some(lower_bound)
}

/// Requests, errors and p99 of one service over the window.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Red {
    /// The service (`gateway` for the edge).
    pub(crate) service: String,
    /// Requests per second.
    pub(crate) rate: f64,
    /// The share of requests that were server errors (0 to 1), when there were requests.
    pub(crate) error_ratio: Option<f64>,
    /// The 99th percentile latency, seconds, when there were requests.
    pub(crate) p99_seconds: Option<f64>,
}

/// A circuit breaker's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Breaker {
    /// The breaker's name (`payment_provider`).
    pub(crate) name: String,
    /// `closed`, `open`, `half-open`, `forced open`, `forced closed` or `unknown`.
    pub(crate) state: &'static str,
}

/// What the overview shows, computed from the last two scrapes.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Figures {
    /// The window the rates cover, seconds (0 with a single scrape: the figures are totals
    /// since start then, and the rates are not shown).
    pub(crate) window_seconds: f64,
    /// Per service, the gateway first.
    pub(crate) red: Vec<Red>,
    /// Every breaker.
    pub(crate) breakers: Vec<Breaker>,
    /// Dead letters waiting, per consumer group: (group, messages, oldest age in seconds).
    pub(crate) dlq: Vec<(String, f64, f64)>,
    /// Events behind, per projection.
    pub(crate) projection_lag: Vec<(String, f64)>,
    /// Sagas compensating and stuck, per definition: (definition, compensating, stuck).
    pub(crate) sagas: Vec<(String, f64, f64)>,
    /// Why there are no figures, when there are none (no target, every scrape failed).
    pub(crate) problem: Option<String>,
}

fn breaker_state(value: f64) -> &'static str {
    // trellis_breaker_state: 0 closed, 1 open, 2 half-open, 3 forced open, 4 forced closed.
    match value.round() as i64 {
        0 => "closed",
        1 => "open",
        2 => "half-open",
        3 => "forced open",
        4 => "forced closed",
        _ => "unknown",
    }
}

/// The overview's figures from the `last` scrape and, for rates, the `previous` one.
pub(crate) fn figures(last: &Snapshot, previous: Option<&Snapshot>) -> Figures {
    let window_seconds = previous
        .map(|p| last.at.saturating_duration_since(p.at).as_secs_f64())
        .unwrap_or(0.0);
    let mut red = Vec::new();
    let everything: Keep<'_> = &|_: &Sample| true;
    // The edge: every request the gateway answered.
    red.push(red_of(
        "gateway",
        last,
        previous,
        window_seconds,
        &|s: &Sample| s.name == "trellis_gateway_requests_total",
        &|s: &Sample| s.label("status_class") == Some("5xx"),
        &[("trellis_gateway_request_duration_seconds", everything)],
    ));
    let mut services = last.label_values("trellis_http_server_requests_total", "service");
    services.extend(last.label_values("trellis_grpc_server_requests_total", "service"));
    services.sort();
    services.dedup();
    for service in services {
        let own_closure = |s: &Sample| s.label("service") == Some(service.as_str());
        let own: Keep<'_> = &own_closure;
        red.push(red_of(
            &service,
            last,
            previous,
            window_seconds,
            &|s: &Sample| {
                (s.name == "trellis_http_server_requests_total"
                    || s.name == "trellis_grpc_server_requests_total")
                    && own(s)
            },
            &|s: &Sample| {
                s.label("status_class") == Some("5xx")
                    || s.label("code")
                        .is_some_and(|c| GRPC_SERVER_ERRORS.contains(&c))
            },
            &[
                ("trellis_http_server_request_duration_seconds", own),
                ("trellis_grpc_server_request_duration_seconds", own),
            ],
        ));
    }
    let mut breakers: Vec<Breaker> = last
        .samples
        .iter()
        .filter(|s| s.name == "trellis_breaker_state")
        .map(|s| Breaker {
            name: s.label("breaker").unwrap_or("?").to_owned(),
            state: breaker_state(s.value),
        })
        .collect();
    // What needs a look first: breakers that are not closed, then by name.
    breakers.sort_by(|a, b| (a.state == "closed", &a.name).cmp(&(b.state == "closed", &b.name)));
    let dlq = last
        .label_values("trellis_bus_dlq_messages", "group")
        .into_iter()
        .map(|group| {
            let of = |s: &Sample| s.label("group") == Some(group.as_str());
            let waiting = last.sum("trellis_bus_dlq_messages", of);
            let oldest = last.sum("trellis_bus_dlq_oldest_age_seconds", of);
            (group, waiting, oldest)
        })
        .collect();
    let projection_lag = last
        .samples
        .iter()
        .filter(|s| s.name == "trellis_projection_lag_events")
        .map(|s| (s.label("projection").unwrap_or("?").to_owned(), s.value))
        .collect();
    let sagas = last
        .label_values("trellis_saga_instances", "definition")
        .into_iter()
        .map(|definition| {
            let count = |status: &str| {
                last.sum("trellis_saga_instances", |s| {
                    s.label("definition") == Some(definition.as_str())
                        && s.label("status") == Some(status)
                })
            };
            let (compensating, stuck) = (count("compensating"), count("stuck"));
            (definition, compensating, stuck)
        })
        .collect();
    Figures {
        window_seconds,
        red,
        breakers,
        dlq,
        projection_lag,
        sagas,
        problem: None,
    }
}

type Keep<'a> = &'a dyn Fn(&Sample) -> bool;

fn red_of(
    service: &str,
    last: &Snapshot,
    previous: Option<&Snapshot>,
    window_seconds: f64,
    requests: Keep<'_>,
    is_error: Keep<'_>,
    histograms: &[(&str, Keep<'_>)],
) -> Red {
    let total = |snapshot: &Snapshot, error_only: bool| {
        snapshot
            .samples
            .iter()
            .filter(|s| requests(s) && (!error_only || is_error(s)))
            .map(|s| s.value)
            .sum::<f64>()
    };
    let count = increase(total(last, false), previous.map(|p| total(p, false)));
    let errors = increase(total(last, true), previous.map(|p| total(p, true)));
    // Bucket increases, summed over the service's histograms (REST and gRPC share bounds).
    let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for (name, keep) in histograms {
        let now = last.buckets(name, keep);
        let before = previous.map(|p| p.buckets(name, keep)).unwrap_or_default();
        for (bound, cumulative) in now {
            let earlier = before
                .iter()
                .find(|(b, _)| b.to_bits() == bound.to_bits())
                .map(|(_, c)| *c);
            let entry = buckets.entry(bound.to_bits()).or_insert((bound, 0.0));
            entry.1 += increase(cumulative, earlier);
        }
    }
    let buckets: Vec<(f64, f64)> = buckets.into_values().collect();
    Red {
        service: service.to_owned(),
        rate: if window_seconds > 0.0 {
            count / window_seconds
        } else {
            0.0
        },
        error_ratio: (count > 0.0).then(|| errors / count),
        p99_seconds: quantile(0.99, &buckets),
    }
}

/// Scrapes the metrics targets on demand, at most once per [`SCRAPE_INTERVAL_MIN`], keeping
/// the last two scrapes.
#[derive(Debug)]
pub(crate) struct Scraper {
    client: reqwest::Client,
    urls: Vec<String>,
    state: Mutex<(Option<Snapshot>, Option<Snapshot>)>,
}

impl Scraper {
    /// A scraper of `urls` (full `/metrics` URLs).
    pub(crate) fn new(client: reqwest::Client, urls: Vec<String>) -> Self {
        Self {
            client,
            urls,
            state: Mutex::new((None, None)),
        }
    }

    /// The figures now: from a fresh scrape, or the last one when it is recent.
    pub(crate) async fn figures(&self) -> Figures {
        if self.urls.is_empty() {
            return Figures {
                problem: Some("no metrics target is configured".to_owned()),
                ..Figures::default()
            };
        }
        // Held across the scrape: concurrent viewers wait for one scrape instead of each
        // starting their own.
        let mut state = self.state.lock().await;
        let fresh = state
            .1
            .as_ref()
            .is_some_and(|last| last.at.elapsed() < SCRAPE_INTERVAL_MIN);
        if !fresh {
            match self.scrape().await {
                Ok(snapshot) => {
                    let previous = state.1.take();
                    *state = (previous, Some(snapshot));
                }
                Err(problem) => {
                    return Figures {
                        problem: Some(problem),
                        ..Figures::default()
                    };
                }
            }
        }
        match &state.1 {
            Some(last) => figures(last, state.0.as_ref()),
            None => Figures::default(),
        }
    }

    async fn scrape(&self) -> Result<Snapshot, String> {
        let scrapes = self.urls.iter().map(|url| async move {
            let response = self
                .client
                .get(url)
                .timeout(SCRAPE_TIMEOUT)
                .send()
                .await
                .map_err(|e| format!("{url}: {e}"))?;
            if !response.status().is_success() {
                return Err(format!("{url}: {}", response.status()));
            }
            let body = response.bytes().await.map_err(|e| format!("{url}: {e}"))?;
            if body.len() > SCRAPE_BYTES_MAX {
                return Err(format!("{url}: more than {SCRAPE_BYTES_MAX} bytes"));
            }
            Ok(parse(&String::from_utf8_lossy(&body)))
        });
        let results = futures_util::future::join_all(scrapes).await;
        let mut samples = Vec::new();
        let mut problems = Vec::new();
        for result in results {
            match result {
                Ok(mut more) => samples.append(&mut more),
                Err(problem) => problems.push(problem),
            }
        }
        if samples.is_empty() && !problems.is_empty() {
            return Err(format!("cannot scrape: {}", problems.join("; ")));
        }
        for problem in &problems {
            tracing::debug!(%problem, "console: a metrics target did not answer");
        }
        Ok(Snapshot::new(Instant::now(), samples))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP trellis_http_server_requests_total Requests
# TYPE trellis_http_server_requests_total counter
trellis_http_server_requests_total{service="orders",method="GET",route="/api/orders/{id}",status_class="2xx"} 90
trellis_http_server_requests_total{service="orders",method="POST",route="/api/orders",status_class="5xx"} 10
trellis_http_server_request_duration_seconds_bucket{service="orders",method="GET",route="/x",le="0.1"} 50
trellis_http_server_request_duration_seconds_bucket{service="orders",method="GET",route="/x",le="1"} 100
trellis_http_server_request_duration_seconds_bucket{service="orders",method="GET",route="/x",le="+Inf"} 100
trellis_breaker_state{breaker="payment_provider"} 1
trellis_bus_dlq_messages{group="inventory"} 3
trellis_bus_dlq_oldest_age_seconds{group="inventory"} 42.5
trellis_projection_lag_events{projection="order_view"} 7
trellis_saga_instances{definition="order",status="stuck"} 2
trellis_saga_instances{definition="order",status="compensating"} 0
odd_label{a="x\"y\\z"} 1e3
"#;

    #[test]
    fn the_text_format_parses_with_escapes_and_special_values() {
        let samples = parse(TEXT);
        assert_eq!(samples.len(), 12);
        let odd = samples.last().expect("sample");
        assert_eq!(odd.label("a"), Some("x\"y\\z"));
        assert!((odd.value - 1000.0).abs() < f64::EPSILON);
        assert_eq!(
            samples[0].label("route"),
            Some("/api/orders/{id}"),
            "braces inside a label value"
        );
        assert!(parse("broken{a=\"x\" 1\nfine 2\n").len() == 1);
    }

    #[test]
    fn figures_give_rates_errors_p99_and_the_operator_gauges() {
        let t0 = Instant::now();
        let first = Snapshot::new(t0, parse(TEXT));
        let later = TEXT
            .replace("status_class=\"2xx\"} 90", "status_class=\"2xx\"} 170")
            .replace("status_class=\"5xx\"} 10", "status_class=\"5xx\"} 30")
            .replace("le=\"1\"} 100", "le=\"1\"} 200")
            .replace("le=\"+Inf\"} 100", "le=\"+Inf\"} 200");
        let second = Snapshot::new(t0 + Duration::from_secs(10), parse(&later));
        let figures = figures(&second, Some(&first));
        let orders = figures
            .red
            .iter()
            .find(|r| r.service == "orders")
            .expect("orders");
        assert!((orders.rate - 10.0).abs() < 1e-9, "{orders:?}");
        assert!((orders.error_ratio.expect("requests") - 0.2).abs() < 1e-9);
        // 100 new observations, all between 0.1 and 1 s: p99 interpolates near the top.
        let p99 = orders.p99_seconds.expect("p99");
        assert!((p99 - 0.991).abs() < 1e-9, "{p99}");
        assert_eq!(figures.breakers[0].state, "open");
        assert_eq!(figures.dlq, vec![("inventory".to_owned(), 3.0, 42.5)]);
        assert_eq!(figures.projection_lag, vec![("order_view".to_owned(), 7.0)]);
        assert_eq!(figures.sagas, vec![("order".to_owned(), 0.0, 2.0)]);
    }

    #[test]
    fn a_counter_reset_counts_from_zero_and_no_observations_have_no_p99() {
        assert!((increase(5.0, Some(100.0)) - 5.0).abs() < f64::EPSILON);
        assert_eq!(quantile(0.99, &[(0.1, 0.0), (f64::INFINITY, 0.0)]), None);
        assert_eq!(
            quantile(0.5, &[(0.1, 0.0), (f64::INFINITY, 4.0)]),
            Some(0.1)
        );
    }
}
