//! Security headers on every answer (OWASP API8, security misconfiguration): whatever answers,
//! an upstream or the gateway itself, the client gets `X-Content-Type-Options: nosniff` and
//! an `x-request-id`; the gateway's own error answers also carry a strict
//! Content-Security-Policy and `Cache-Control: no-store`.

use http::{Method, StatusCode};

use crate::helpers::{Answer, TestGateway, Upstream, get, send};

async fn gateway(up: &Upstream) -> TestGateway {
    TestGateway::start(&format!(
        r#"
        [clusters.app]
        endpoints = ["{app}"]

        [auth.partners]
        type = "api_key"
        keys = {{ partner-a = "a-key-long-enough-for-a-partner" }}

        [rate_limits.one]
        key = "ip"
        requests_per_second = 1
        burst = 1

        [[routes]]
        name = "open"
        path_prefix = "/open"
        cluster = "app"

        [[routes]]
        name = "partners"
        path_prefix = "/partners"
        cluster = "app"
        auth = ["partners"]

        [[routes]]
        name = "limited"
        path_prefix = "/limited"
        cluster = "app"
        rate_limit = "one"

        [[routes]]
        name = "upload"
        path_prefix = "/upload"
        cluster = "app"
        body_bytes_max = 4
        "#,
        app = up.addr
    ))
    .await
}

fn assert_hardened(what: &str, answer: &Answer) {
    assert_eq!(
        answer
            .headers
            .get("x-content-type-options")
            .map(|v| v.to_str().unwrap_or_default()),
        Some("nosniff"),
        "{what}: {:?}",
        answer.headers
    );
    assert!(
        answer.headers.contains_key("x-request-id"),
        "{what}: no request id in {:?}",
        answer.headers
    );
}

fn assert_strict_error(what: &str, answer: &Answer) {
    assert_hardened(what, answer);
    let csp = answer
        .headers
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
        "{what}: Content-Security-Policy {csp:?}"
    );
    assert_eq!(
        answer
            .headers
            .get("cache-control")
            .map(|v| v.to_str().unwrap_or_default()),
        Some("no-store"),
        "{what}"
    );
}

#[tokio::test]
async fn every_answer_carries_the_security_headers() {
    // Goal: a proxied success and every kind of answer the gateway makes itself (no route, no
    // credential, rate limited, body too large, a path it refuses) carry the headers; the
    // gateway's own errors also forbid framing and caching.
    let up = Upstream::start("app").await;
    let gw = gateway(&up).await;

    let proxied = get(&gw.url("/open/thing"), &[]).await;
    assert_eq!(proxied.status, StatusCode::OK);
    assert_hardened("a proxied answer", &proxied);

    let no_route = get(&gw.url("/nowhere"), &[]).await;
    assert_eq!(no_route.status, StatusCode::NOT_FOUND);
    assert_strict_error("no route", &no_route);

    let no_credential = get(&gw.url("/partners/x"), &[]).await;
    assert_eq!(no_credential.status, StatusCode::UNAUTHORIZED);
    assert_strict_error("no credential", &no_credential);

    let _ = get(&gw.url("/limited/a"), &[]).await;
    let limited = get(&gw.url("/limited/b"), &[]).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_strict_error("rate limited", &limited);

    let too_large = send(
        Method::POST,
        &gw.url("/upload"),
        &[("content-length", "9")],
        "123456789",
    )
    .await;
    assert_eq!(too_large.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_strict_error("body too large", &too_large);

    let refused_path = get(&gw.url("/open/%2e%2e/secret"), &[]).await;
    assert!(
        refused_path.status.is_client_error(),
        "{:?}",
        refused_path.status
    );
    assert_strict_error("a refused path", &refused_path);
}
