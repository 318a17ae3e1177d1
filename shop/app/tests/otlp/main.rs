//! One order is one trace: the whole shop in this process exports its spans over OTLP/gRPC to
//! a collector running in the test, and the test checks the tree the spans of one order make
//! (parents, service names, span kinds), for the orchestrated saga and the choreographed one.
//!
//! Its own test binary: telemetry is process-wide (a global tracing subscriber), and this one
//! exports to the collector below rather than nowhere as the `it` binary's does.

#[allow(dead_code, unused_macros, unused_imports)]
#[path = "../it/harness.rs"]
mod harness;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as OtlpValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use serde_json::json;
use shop_app::SagaStyle;

use crate::harness::{Backend, TestShop};

/// One span as the collector received it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    trace_id: String,
    span_id: String,
    parent_id: String,
    name: String,
    kind: SpanKind,
    attributes: HashMap<String, String>,
    events: Vec<String>,
    /// The span's status is ERROR.
    failed: bool,
}

/// An OTLP/gRPC trace receiver: keeps every span it is sent.
#[derive(Debug, Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

fn text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.and_then(|value| value.value.as_ref()) {
        Some(OtlpValue::StringValue(text)) => text.clone(),
        Some(OtlpValue::IntValue(number)) => number.to_string(),
        Some(OtlpValue::BoolValue(flag)) => flag.to_string(),
        Some(OtlpValue::DoubleValue(number)) => number.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(pairs: &[KeyValue]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|pair| (pair.key.clone(), text(pair.value.as_ref())))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|resource| attributes(&resource.attributes))
                .unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    received.push(Received {
                        service: service.clone(),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_id: hex(&span.parent_span_id),
                        name: span.name.clone(),
                        kind: SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified),
                        attributes: attributes(&span.attributes),
                        events: span.events.iter().map(|event| event.name.clone()).collect(),
                        failed: span
                            .status
                            .as_ref()
                            .is_some_and(|status| status.code == StatusCode::Error as i32),
                    });
                }
            }
        }
        self.spans.lock().expect("not poisoned").extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// The collector and the process's telemetry, exporting to it; started once per binary on a
/// runtime of their own, so they outlive each test's runtime.
struct Otlp {
    collector: Collector,
    guard: trellis_telemetry::TelemetryGuard,
    _runtime: tokio::runtime::Runtime,
}

fn otlp() -> &'static Otlp {
    static OTLP: OnceLock<Otlp> = OnceLock::new();
    OTLP.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("the collector's runtime");
        let collector = Collector::default();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        listener.set_nonblocking(true).expect("non-blocking");
        let address = listener.local_addr().expect("bound");
        let entered = runtime.enter();
        let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
        let router = tonic::service::Routes::new(TraceServiceServer::new(collector.clone()))
            .into_axum_router();
        drop(runtime.spawn(async move { axum::serve(listener, router).await }));
        let config = trellis_telemetry::TelemetryConfig::new("shop-otlp-test")
            .with_filter("warn")
            .with_otlp_endpoint(format!("http://{address}"));
        let guard = trellis_telemetry::init(config).expect("the only telemetry set-up here");
        drop(entered);
        Otlp {
            collector,
            guard,
            _runtime: runtime,
        }
    })
}

/// A random trace id and parent span id, as a client that starts the trace would send them.
fn client_trace() -> (String, String) {
    let trace = uuid::Uuid::now_v7().simple().to_string();
    // The random end of another UUIDv7 (its start is the clock).
    let parent = uuid::Uuid::now_v7().simple().to_string()[16..].to_owned();
    (trace, parent)
}

/// The spans of one trace, indexed for walking up and down.
struct Tree {
    spans: Vec<Received>,
}

impl Tree {
    fn by_id(&self, id: &str) -> Option<&Received> {
        self.spans.iter().find(|span| span.span_id == id)
    }

    /// Whether `ancestor` is `span` or above it.
    fn descends_from(&self, span: &Received, ancestor: &Received) -> bool {
        let mut current = Some(span);
        for _ in 0..=self.spans.len() {
            match current {
                Some(node) if node.span_id == ancestor.span_id => return true,
                Some(node) => current = self.by_id(&node.parent_id),
                None => return false,
            }
        }
        false
    }

    fn find(&self, what: impl Fn(&Received) -> bool) -> Vec<&Received> {
        self.spans.iter().filter(|span| what(span)).collect()
    }

    /// A SERVER span of `service` below `above` whose parent is a CLIENT span of `caller`.
    fn called(&self, above: &Received, caller: &str, service: &str) -> Result<(), String> {
        let found = self.find(|span| {
            span.service == service
                && span.kind == SpanKind::Server
                && self.descends_from(span, above)
                && self.by_id(&span.parent_id).is_some_and(|parent| {
                    parent.kind == SpanKind::Client && parent.service == caller
                })
        });
        if found.is_empty() {
            Err(format!(
                "no {service} SERVER span under a {caller} CLIENT span below {} {:?}",
                above.service, above.name
            ))
        } else {
            Ok(())
        }
    }

    fn describe(&self) -> String {
        let mut lines: Vec<String> = self
            .spans
            .iter()
            .map(|span| {
                format!(
                    "{} {:?} {:?} {} <- {} {:?}",
                    span.service, span.kind, span.name, span.span_id, span.parent_id, span.events
                )
            })
            .collect();
        lines.sort();
        lines.join("\n")
    }
}

/// The checks every order's trace passes, whatever the saga style: the gateway's span is the
/// root, the orders service continues it and calls users and products over gRPC, the
/// participants' servers are in the trace, and no span's parent is missing.
fn common_checks(tree: &Tree, client_parent: &str) -> Result<(), String> {
    let gateway = tree
        .find(|span| {
            span.service == "gateway"
                && span.kind == SpanKind::Server
                && span.attributes.get("url.path").map(String::as_str) == Some("/api/orders")
        })
        .first()
        .copied()
        .ok_or("no gateway SERVER span for POST /api/orders")?;
    // Names as OpenTelemetry's HTTP conventions have them, one per route, not one per path:
    // the gateway's after the route it took, a service's after its route template.
    if gateway.name != "POST orders" {
        return Err(format!(
            "the gateway span is named {:?}, not \"POST orders\"",
            gateway.name
        ));
    }
    if gateway.parent_id != client_parent {
        return Err(format!(
            "the gateway span's parent is {}, not the client's {client_parent}",
            gateway.parent_id
        ));
    }
    let orders = tree
        .find(|span| {
            span.service == "orders"
                && span.kind == SpanKind::Server
                && span.parent_id == gateway.span_id
        })
        .first()
        .copied()
        .ok_or("no orders SERVER span whose parent is the gateway's")?;
    if orders.name != "POST /api/orders"
        || orders.attributes.get("http.route").map(String::as_str) != Some("/api/orders")
    {
        return Err(format!(
            "the orders SERVER span is named {:?} with http.route {:?}, not POST /api/orders",
            orders.name,
            orders.attributes.get("http.route")
        ));
    }
    tree.called(orders, "orders", "users")?;
    tree.called(orders, "orders", "products")?;
    let provider = tree
        .find(|span| span.service == "payment-provider" && span.kind == SpanKind::Server)
        .first()
        .copied()
        .ok_or("no payment-provider SERVER span")?;
    let attempt = tree
        .by_id(&provider.parent_id)
        .ok_or("the provider's span has no parent in the trace")?;
    if attempt.service != "payments" || attempt.kind != SpanKind::Client {
        return Err(format!(
            "the provider's parent is {} {:?} {:?}, not a payments CLIENT span",
            attempt.service, attempt.kind, attempt.name
        ));
    }
    let orphans: Vec<&Received> =
        tree.find(|span| span.span_id != gateway.span_id && tree.by_id(&span.parent_id).is_none());
    if !orphans.is_empty() {
        return Err(format!(
            "spans whose parent is not in the trace: {:?}",
            orphans
                .iter()
                .map(|span| format!("{} {:?}", span.service, span.name))
                .collect::<Vec<_>>()
        ));
    }
    // Last: an order the provider's outage cancels never reaches shipping, and that run
    // accepts exactly this one failure.
    for service in ["inventory", "payments", "shipping"] {
        if tree.find(|span| span.service == service).is_empty() {
            return Err(format!("no span of {service} in the trace"));
        }
    }
    Ok(())
}

/// The orchestrated saga's part: the saga span below the orders request, a span per step, and
/// each step's gRPC call reaching its participant's server below it.
fn orchestrated_checks(tree: &Tree) -> Result<(), String> {
    let saga = tree
        .find(|span| span.service == "orders" && span.name == "order.saga")
        .first()
        .copied()
        .ok_or("no order.saga span in orders")?;
    for (step, service) in [
        ("inventory", "inventory"),
        ("payment", "payments"),
        ("shipping", "shipping"),
    ] {
        let span = tree
            .find(|span| {
                span.service == "orders"
                    && span.name == format!("execute {step}")
                    && span.kind == SpanKind::Internal
                    && tree.descends_from(span, saga)
            })
            .first()
            .copied()
            .ok_or(format!("no `execute {step}` span below the saga"))?;
        tree.called(span, "orders", service)?;
    }
    Ok(())
}

/// The choreographed saga's part: events cross the bus, each published in a PRODUCER span and
/// consumed in a CONSUMER span of the participant, its child.
fn choreographed_checks(tree: &Tree) -> Result<(), String> {
    let consumers: BTreeSet<&str> = tree
        .find(|span| span.kind == SpanKind::Consumer)
        .into_iter()
        .map(|span| span.service.as_str())
        .collect();
    for service in ["inventory", "payments", "shipping", "orders"] {
        if !consumers.contains(service) {
            return Err(format!(
                "no CONSUMER span of {service} (consumers seen: {consumers:?})"
            ));
        }
    }
    // The hops of the flow: each event's PRODUCER span in the service that published it is the
    // parent of the CONSUMER span in the service that acts on it.
    for (topic, producer, consumer) in [
        ("order.created", "orders", "inventory"),
        ("inventory.reserved", "inventory", "payments"),
        ("shipment.created", "shipping", "orders"),
    ] {
        let hop = tree.find(|span| {
            span.kind == SpanKind::Consumer
                && span.service == consumer
                && span.name == format!("{topic} process")
                && tree.by_id(&span.parent_id).is_some_and(|parent| {
                    parent.kind == SpanKind::Producer
                        && parent.service == producer
                        && parent.name == format!("{topic} create")
                })
        });
        if hop.is_empty() {
            return Err(format!(
                "no {consumer} CONSUMER span of {topic} under a {producer} PRODUCER span"
            ));
        }
    }
    Ok(())
}

/// With the provider down: the payments service's call spans record its retries and, once the
/// breaker has opened, its refusals as events, each attempt is a span of its own, and the
/// saga's compensations are in the trace.
fn outage_checks(tree: &Tree) -> Result<(), String> {
    let calls =
        tree.find(|span| span.service == "payments" && span.name == "payment_provider.call");
    if calls.is_empty() {
        return Err("no payment_provider.call span in payments".to_owned());
    }
    let retried = calls.iter().any(|call| {
        call.events
            .iter()
            .any(|event| event == "retrying the payment provider")
            && call.failed
    });
    if !retried {
        return Err(format!(
            "no failed provider call span with a retry event: {:?}",
            calls.iter().map(|call| &call.events).collect::<Vec<_>>()
        ));
    }
    let attempts = tree
        .find(|span| span.service == "payments" && span.name == "payment_provider.attempt")
        .len();
    if attempts < 2 {
        return Err(format!("{attempts} provider attempts, expected retries"));
    }
    if tree
        .find(|span| span.service == "orders" && span.name.starts_with("compensate "))
        .is_empty()
    {
        return Err("no `compensate …` span of the saga".to_owned());
    }
    let refused = calls.iter().any(|call| {
        call.events
            .iter()
            .any(|event| event == "the circuit breaker refused the call")
    });
    if !refused {
        return Err("no breaker refusal event on a provider call span".to_owned());
    }
    Ok(())
}

/// Places one order through the gateway as a client that starts a trace, waits for it to be
/// confirmed, then waits until the collector holds a tree that passes `checks`.
async fn one_order_one_trace(style: SagaStyle, checks: fn(&Tree) -> Result<(), String>) {
    one_order_traced(style, Provider::Healthy, checks).await;
}

/// How the payment provider simulator behaves for the order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Provider {
    /// Answers every call: the order is confirmed.
    Healthy,
    /// Down (every call 503): the order is cancelled after the payments service retried.
    Outage,
}

async fn one_order_traced(
    style: SagaStyle,
    provider: Provider,
    checks: fn(&Tree) -> Result<(), String>,
) {
    let otlp = otlp();
    let test = match (style, provider) {
        (SagaStyle::Orchestrated, Provider::Healthy) => "otlp_orchestrated",
        (SagaStyle::Choreography, Provider::Healthy) => "otlp_choreography",
        (_, Provider::Outage) => "otlp_outage",
    };
    let shop = TestShop::start_styled(Backend::Sqlite, style, test)
        .await
        .expect("a SQLite shop always starts");
    if provider == Provider::Outage {
        let mut config = shop.shop.provider().config();
        config.outage = true;
        shop.shop
            .provider()
            .set_config(config)
            .expect("an outage is a valid setting");
    }
    let product = shop.product("Traced lamp", 1_500, 5).await;
    let token = shop.customer("tracy").await;

    let (trace_id, client_parent) = client_trace();
    let response = shop
        .http
        .post(shop.url("/api/orders"))
        .bearer_auth(&token)
        .header("idempotency-key", uuid::Uuid::now_v7().to_string())
        .header("traceparent", format!("00-{trace_id}-{client_parent}-01"))
        .json(&json!({"items": [{"product_id": product, "quantity": 1}]}))
        .send()
        .await
        .expect("place");
    assert_eq!(response.status(), 202);
    let body: serde_json::Value = response.json().await.expect("json");
    let order = body["id"].as_str().expect("id").to_owned();
    let settled = shop.settled(&token, &order).await;
    let expected = match provider {
        Provider::Healthy => "CONFIRMED",
        Provider::Outage => "CANCELLED",
    };
    assert_eq!(settled["status"], expected, "{settled}");

    // The last spans (the saga's, the projection's) end just after the status flips; flush
    // until the tree is complete or ten seconds pass.
    let mut verdict = Err("nothing checked yet".to_owned());
    let mut tree = Tree { spans: Vec::new() };
    for _ in 0..20 {
        let flushed = tokio::task::spawn_blocking(|| otlp.guard.force_flush())
            .await
            .expect("the flush runs");
        if let Err(error) = flushed {
            verdict = Err(format!("flush failed: {error}"));
        } else {
            tree = Tree {
                spans: otlp
                    .collector
                    .spans
                    .lock()
                    .expect("not poisoned")
                    .iter()
                    .filter(|span| span.trace_id == trace_id)
                    .cloned()
                    .collect(),
            };
            verdict = common_checks(&tree, &client_parent).and_then(|()| checks(&tree));
            if provider == Provider::Outage {
                // Nothing ships, so the participants' check of common_checks is replaced by
                // what the outage leaves: the provider answered (503) inside the trace.
                verdict = checks(&tree).and(verdict.or_else(|problem| {
                    if problem.contains("no span of shipping") {
                        Ok(())
                    } else {
                        Err(problem)
                    }
                }));
            }
            if verdict.is_ok() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if let Err(problem) = verdict {
        panic!("{problem}\nthe trace {trace_id}:\n{}", tree.describe());
    }
    // TRELLIS_TRACE_DUMP=1 prints the tree of a passing run too (with --nocapture).
    if std::env::var_os("TRELLIS_TRACE_DUMP").is_some() {
        eprintln!("the trace {trace_id} ({style:?}):\n{}", tree.describe());
    }
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_orchestrated_order_is_one_trace_across_every_service() {
    // Goal: the spans of one order placed through the gateway, exported over OTLP by the
    // in-process shop, form one tree from the gateway to every participant and the provider,
    // each span under its own service's name. Method: a real OTLP/gRPC receiver in the test.
    one_order_one_trace(SagaStyle::Orchestrated, orchestrated_checks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_choreographed_order_is_one_trace_across_the_bus() {
    // Goal: with the saga run by events, the trace crosses every bus hop: a PRODUCER span
    // publishes, and each participant consumes in a CONSUMER span of the same trace.
    one_order_one_trace(SagaStyle::Choreography, choreographed_checks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_outage_shows_as_retries_on_the_payment_span_and_a_compensation() {
    // Goal: resilience is visible in the trace: with the provider down, each retry of a charge
    // is an event on the payments service's call span and an attempt span of its own, the
    // breaker's refusals are events too, and the saga's compensations are in the same trace.
    one_order_traced(SagaStyle::Orchestrated, Provider::Outage, outage_checks).await;
}
