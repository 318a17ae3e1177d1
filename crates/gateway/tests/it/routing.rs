//! Routing, rewriting, forwarding headers, admin endpoints, h2c, upstream failures.

use http::{Method, StatusCode};

use crate::helpers::{TestGateway, Upstream, WAIT, get, send};

fn config(a: &Upstream, b: &Upstream) -> String {
    format!(
        r#"
        [clusters.a]
        endpoints = ["{a}"]
        [clusters.b]
        endpoints = ["{b}"]

        [[routes]]
        name = "host-b"
        host = "*.b.test"
        cluster = "b"

        [[routes]]
        name = "order"
        path_template = "/api/orders/{{id}}"
        methods = ["GET"]
        cluster = "b"
        strip_prefix = "/api"
        add_prefix = "/v2"

        [[routes]]
        name = "beta"
        path_prefix = "/api"
        headers = {{ x-beta = "1" }}
        cluster = "b"

        [[routes]]
        name = "api"
        path_prefix = "/api"
        cluster = "a"

        [[routes]]
        name = "exact"
        path_exact = "/ping"
        cluster = "a"
        "#,
        a = a.addr,
        b = b.addr
    )
}

#[tokio::test]
async fn requests_are_routed_by_host_path_method_and_header() {
    // Goal: each match criterion picks its route; checked by which upstream answers.
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let gw = TestGateway::start(&config(&a, &b)).await;

    let by_host = get(&gw.url("/anything"), &[("host", "x.b.test")]).await;
    assert_eq!(by_host.json()["upstream"], "b");

    let template = get(&gw.url("/api/orders/42?full=1"), &[]).await;
    assert_eq!(template.json()["upstream"], "b");
    assert_eq!(template.json()["path"], "/v2/orders/42?full=1");

    let post_falls_through = send(Method::POST, &gw.url("/api/orders/42"), &[], "").await;
    assert_eq!(
        post_falls_through.json()["upstream"],
        "a",
        "the template route is GET only"
    );

    let header = get(&gw.url("/api/things"), &[("x-beta", "1")]).await;
    assert_eq!(header.json()["upstream"], "b");

    let prefix = get(&gw.url("/api/things"), &[]).await;
    assert_eq!(prefix.json()["upstream"], "a");
    assert_eq!(prefix.json()["path"], "/api/things");

    let exact = get(&gw.url("/ping"), &[]).await;
    assert_eq!(exact.status, StatusCode::OK);
    let not_exact = get(&gw.url("/ping/more"), &[]).await;
    assert_eq!(not_exact.status, StatusCode::NOT_FOUND);
    assert_eq!(not_exact.error_code(), "no_route");
    assert!(not_exact.headers.contains_key("x-request-id"));
}

#[tokio::test]
async fn forwarding_headers_are_set_and_hop_by_hop_headers_dropped() {
    // Goal: the upstream sees x-request-id (kept), x-forwarded-*, traceparent, and no
    // hop-by-hop headers, including those the Connection header names.
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let gw = TestGateway::start(&config(&a, &b)).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let answer = get(
        &gw.url("/api/x"),
        &[
            ("x-request-id", "req-123"),
            ("traceparent", traceparent),
            ("connection", "x-private"),
            ("x-private", "secret"),
            ("keep-alive", "timeout=5"),
            ("x-forwarded-for", "10.0.0.1"),
        ],
    )
    .await;
    let seen = &answer.json()["headers"];
    assert_eq!(seen["x-request-id"], "req-123");
    assert_eq!(answer.headers["x-request-id"], "req-123");
    assert_eq!(seen["traceparent"], traceparent);
    assert_eq!(seen["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert!(seen.get("x-private").is_none(), "{seen}");
    assert!(seen.get("keep-alive").is_none(), "{seen}");

    let fresh = get(&gw.url("/api/x"), &[]).await;
    let id = fresh.json()["headers"]["x-request-id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(id.len(), 36, "a UUID is made when the client sends none");
    assert_eq!(fresh.headers["x-request-id"], id.as_str());
}

#[tokio::test]
async fn health_and_readiness_endpoints_answer() {
    // Goal: /healthz is always 200; /readyz is 200 while every cluster has an endpoint.
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let gw = TestGateway::start(&config(&a, &b)).await;
    assert_eq!(get(&gw.url("/healthz"), &[]).await.status, StatusCode::OK);
    assert_eq!(get(&gw.url("/readyz"), &[]).await.status, StatusCode::OK);
}

#[tokio::test]
async fn h2c_works_from_the_client_and_to_the_upstream() {
    // Goal: an HTTP/2 prior-knowledge client is served, and an h2c cluster is spoken to in
    // HTTP/2; the upstream reports the version it got.
    let up = Upstream::start_h2c("h2").await;
    let gw = TestGateway::start(&format!(
        r#"
        [clusters.h2]
        endpoints = ["{}"]
        protocol = "h2c"
        [[routes]]
        name = "all"
        cluster = "h2"
        "#,
        up.addr
    ))
    .await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let response = client
        .request(
            http::Request::get(gw.url("/x"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .expect("request"),
        )
        .await
        .expect("h2c answer");
    assert_eq!(response.version(), http::Version::HTTP_2);
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .expect("body")
        .to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(json["version"], "HTTP/2.0");
}

#[tokio::test]
async fn an_unreachable_upstream_gives_502_and_a_slow_one_504() {
    // Goal: upstream failures map to 502 (connect refused) and 504 (route timeout), with a
    // JSON body naming the cause.
    // Bound, never listening: connections are refused and the port stays reserved.
    let dead = tokio::net::TcpSocket::new_v4().expect("socket");
    dead.bind("127.0.0.1:0".parse().expect("address"))
        .expect("bind");
    let dead_addr = dead.local_addr().expect("addr");
    let slow = Upstream::start("slow").await;
    let gw = TestGateway::start(&format!(
        r#"
        [clusters.dead]
        endpoints = ["{dead_addr}"]
        [clusters.slow]
        endpoints = ["{}"]
        [[routes]]
        name = "dead"
        path_prefix = "/dead"
        cluster = "dead"
        [[routes]]
        name = "slow"
        path_prefix = "/slow"
        cluster = "slow"
        timeout_ms = 100
        "#,
        slow.addr
    ))
    .await;
    let refused = get(&gw.url("/dead"), &[]).await;
    assert_eq!(refused.status, StatusCode::BAD_GATEWAY);
    assert_eq!(refused.error_code(), "upstream_unreachable");
    assert!(refused.body.contains("dead"), "{}", refused.body);

    let timed_out = get(&gw.url("/slow/1000"), &[]).await;
    assert_eq!(timed_out.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(timed_out.error_code(), "upstream_timeout");
}

#[tokio::test]
async fn bodies_stream_through_both_ways() {
    // Goal: a request body reaches the upstream and its echo comes back unchanged.
    let up = Upstream::start("echo").await;
    let gw = TestGateway::start(&format!(
        "[clusters.e]\nendpoints = [\"{}\"]\n[[routes]]\nname = \"e\"\ncluster = \"e\"\n",
        up.addr
    ))
    .await;
    let answer = send(
        Method::POST,
        &gw.url("/echo"),
        &[],
        "hello through the gateway",
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, "hello through the gateway");
}

#[derive(Debug)]
struct DenyBlocked;

impl trellis_gateway::GatewayHooks for DenyBlocked {
    fn request_filter(
        &self,
        ctx: &mut trellis_gateway::RequestCtx,
        request: &mut http::request::Parts,
    ) -> trellis_gateway::HookDecision {
        if request.headers.contains_key("x-blocked") {
            let mut response = http::Response::new(http_body_util::BodyExt::boxed(
                http_body_util::BodyExt::map_err(
                    http_body_util::Full::new(bytes::Bytes::from_static(b"blocked")),
                    |never| match never {},
                ),
            ));
            *response.status_mut() = StatusCode::FORBIDDEN;
            return trellis_gateway::HookDecision::Respond(response);
        }
        ctx.subject = Some("hooked".to_owned());
        trellis_gateway::HookDecision::Continue
    }

    fn upstream_request_filter(
        &self,
        ctx: &trellis_gateway::RequestCtx,
        request: &mut http::request::Parts,
    ) {
        let value = http::HeaderValue::from_str(&ctx.route).expect("route names are ASCII");
        request.headers.insert("x-hook-route", value);
    }
}

#[tokio::test]
async fn hooks_can_answer_a_request_or_change_the_upstream_request() {
    // Goal: request_filter short-circuits with its own answer (upstream untouched), and
    // upstream_request_filter adds a header the upstream sees.
    let up = Upstream::start("app").await;
    let config = trellis_gateway::Config::from_toml(&format!(
        "[clusters.app]\nendpoints = [\"{}\"]\n[[routes]]\nname = \"hooked\"\ncluster = \"app\"\n",
        up.addr
    ))
    .expect("valid");
    let gateway = trellis_gateway::Gateway::from_config(config)
        .await
        .expect("builds")
        .with_hooks(std::sync::Arc::new(DenyBlocked));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(gateway.serve(listener, async {
        let _ = stopped.await;
    }));

    let blocked = get(&format!("http://{addr}/x"), &[("x-blocked", "1")]).await;
    assert_eq!(blocked.status, StatusCode::FORBIDDEN);
    assert_eq!(blocked.body, "blocked");
    assert_eq!(up.hits(), 0);

    let passed = get(&format!("http://{addr}/x"), &[]).await;
    assert_eq!(passed.json()["headers"]["x-hook-route"], "hooked");

    let _ = stop.send(());
    served.await.expect("task").expect("serve");
}

#[tokio::test]
async fn metrics_count_requests_per_route_and_status_class() {
    // Goal: with the Prometheus recorder installed, /metrics shows the route's request
    // counter by status class and the upstream latency histogram.
    let handle = trellis_telemetry::metrics::install_prometheus().expect("recorder");
    let up = Upstream::start("app").await;
    let config = trellis_gateway::Config::from_toml(&format!(
        "[clusters.metered]\nendpoints = [\"{}\"]\n[[routes]]\nname = \"metered\"\ncluster = \"metered\"\n",
        up.addr
    ))
    .expect("valid");
    let gateway = trellis_gateway::Gateway::from_config(config)
        .await
        .expect("builds")
        .with_metrics(handle);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(gateway.serve(listener, async {
        let _ = stopped.await;
    }));
    for _ in 0..3 {
        assert_eq!(
            get(&format!("http://{addr}/x"), &[]).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        get(&format!("http://{addr}/status/503"), &[]).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let metrics = get(&format!("http://{addr}/metrics"), &[]).await.body;
    assert!(
        metrics
            .contains("trellis_gateway_requests_total{route=\"metered\",status_class=\"2xx\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("trellis_gateway_requests_total{route=\"metered\",status_class=\"5xx\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("trellis_gateway_upstream_duration_seconds_bucket{cluster=\"metered\""),
        "{metrics}"
    );
    let _ = stop.send(());
    served.await.expect("task").expect("serve");
}

/// An upstream that answers every request with headers promising 100 bytes, sends five, and
/// then sends nothing more while the connection stays open.
async fn stalling_upstream() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut head = Vec::new();
            let mut buffer = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buffer[..n]),
                }
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhello")
                .await;
            held.push(stream);
        }
    });
    (addr, task)
}

#[tokio::test]
async fn an_upstream_that_stalls_mid_body_is_cut_off_by_the_body_timeout() {
    // Goal: headers arrive, then the body stalls; the route's response_body_timeout_ms (200
    // ms) ends the client's body with an error instead of holding the connection forever.
    // Real sockets, so a real (short) timeout; the client's wait is bounded by WAIT.
    let (upstream, _task) = stalling_upstream().await;
    let gw = TestGateway::start(&format!(
        r#"
        [clusters.stall]
        endpoints = ["{upstream}"]
        [[routes]]
        name = "stall"
        cluster = "stall"
        response_body_timeout_ms = 200
        "#
    ))
    .await;
    let request = http::Request::get(gw.url("/download"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    let response = tokio::time::timeout(WAIT, crate::helpers::client().request(request))
        .await
        .expect("headers within the wait")
        .expect("headers");
    assert_eq!(response.status(), StatusCode::OK);
    let body = tokio::time::timeout(WAIT, http_body_util::BodyExt::collect(response.into_body()))
        .await
        .expect("the body ends within the wait");
    assert!(body.is_err(), "a truncated body must end with an error");
}

#[tokio::test]
async fn metrics_are_not_served_on_the_public_listener_when_an_operator_listener_is_set() {
    // Goal: with `admin_listen` set, /metrics, /healthz and /readyz (in any spelling) answer
    // 404 JSON on the public listener even behind a catch-all route, and are served on the
    // operator listener, which serves nothing else.
    let handle = trellis_telemetry::metrics::install_prometheus().expect("recorder");
    let up = Upstream::start("app").await;
    let config = trellis_gateway::Config::from_toml(&format!(
        r#"
        [server]
        admin_listen = "127.0.0.1:0"
        [clusters.app]
        endpoints = ["{}"]
        [[routes]]
        name = "everything"
        cluster = "app"
        "#,
        up.addr
    ))
    .expect("valid");
    let gateway = trellis_gateway::Gateway::from_config(config)
        .await
        .expect("builds")
        .with_metrics(handle);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let public = listener.local_addr().expect("addr");
    let admin_listener = gateway
        .bind_admin()
        .await
        .expect("binds")
        .expect("an operator listener is configured");
    let operator = admin_listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(gateway.clone().serve(listener, async {
        let _ = stopped.await;
    }));
    let served_admin = tokio::spawn(gateway.serve_admin(admin_listener, async {
        let _ = admin_stopped.await;
    }));

    for path in ["/metrics", "/healthz", "/readyz", "//metrics", "/./metrics"] {
        let answer = get(&format!("http://{public}{path}"), &[]).await;
        assert_eq!(
            answer.status,
            StatusCode::NOT_FOUND,
            "{path}: {}",
            answer.body
        );
        assert_eq!(answer.error_code(), "no_route", "{path}");
    }
    assert_eq!(up.hits(), 0, "admin paths are not forwarded either");
    let routed = get(&format!("http://{public}/x"), &[]).await;
    assert_eq!(routed.json()["upstream"], "app");

    let metrics = get(&format!("http://{operator}/metrics"), &[]).await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(
        metrics.body.contains("trellis_gateway_"),
        "{}",
        metrics.body
    );
    assert_eq!(
        get(&format!("http://{operator}/healthz"), &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&format!("http://{operator}/readyz"), &[]).await.status,
        StatusCode::OK
    );
    let elsewhere = get(&format!("http://{operator}/x"), &[]).await;
    assert_eq!(elsewhere.status, StatusCode::NOT_FOUND);
    assert_eq!(elsewhere.error_code(), "no_route");
    assert_eq!(up.hits(), 1, "the operator listener forwards nothing");

    let _ = stop.send(());
    let _ = stop_admin.send(());
    served.await.expect("task").expect("serve");
    served_admin.await.expect("task").expect("serve admin");
}
