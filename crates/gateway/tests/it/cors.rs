//! CORS: closed by default; with `[cors]`, preflights of allowed origins, methods and headers
//! are answered before authentication, anything else is refused, and answers (errors too)
//! carry the allowance only for allowed origins.

use http::{Method, StatusCode};
use trellis_gateway::Config;

use crate::helpers::{TestGateway, Upstream, get, send};

const SHOP: &str = "https://shop.example";
const EVIL: &str = "https://evil.example";

fn config(app: &Upstream, cors: &str) -> String {
    format!(
        r#"
        [clusters.app]
        endpoints = ["{app}"]

        [auth.keys]
        type = "api_key"
        keys = {{ web = "web-key-0123456789" }}

        [[routes]]
        name = "private"
        path_prefix = "/private"
        cluster = "app"
        auth = ["keys"]

        [[routes]]
        name = "api"
        path_prefix = "/api"
        cluster = "app"
        {cors}
        "#,
        app = app.addr,
    )
}

async fn preflight(
    gw: &TestGateway,
    origin: &str,
    method: &str,
    headers: &str,
) -> crate::helpers::Answer {
    send(
        Method::OPTIONS,
        &gw.url("/private/orders"),
        &[
            ("origin", origin),
            ("access-control-request-method", method),
            ("access-control-request-headers", headers),
        ],
        "",
    )
    .await
}

#[tokio::test]
async fn without_a_cors_section_no_origin_is_allowed() {
    // Goal: closed by default: no answer, preflight or not, tells a browser another origin
    // may read it.
    let app = Upstream::start("app").await;
    let gw = TestGateway::start(&config(&app, "")).await;
    let answer = preflight(&gw, SHOP, "POST", "authorization").await;
    assert!(!answer.headers.contains_key("access-control-allow-origin"));
    let answer = get(&gw.url("/api/x"), &[("origin", SHOP)]).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(!answer.headers.contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn an_allowed_origin_gets_its_preflight_and_its_answers_errors_included() {
    // Goal: a page on an allowed origin can call the API: its preflight is answered before
    // authentication (a preflight carries no credential), and the answers it gets, a 401
    // included, let it read them (and the request id), varying by origin.
    let app = Upstream::start("app").await;
    let gw = TestGateway::start(&config(
        &app,
        &format!("\n[cors]\nallowed_origins = [\"{SHOP}\"]\nmax_age_s = 300\n"),
    ))
    .await;
    let answer = preflight(&gw, SHOP, "POST", "Authorization, content-type").await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.body);
    assert_eq!(answer.headers["access-control-allow-origin"], SHOP);
    let methods = answer.headers["access-control-allow-methods"]
        .to_str()
        .unwrap();
    assert!(methods.contains("POST"), "{methods}");
    let headers = answer.headers["access-control-allow-headers"]
        .to_str()
        .unwrap();
    assert!(headers.contains("authorization"), "{headers}");
    assert_eq!(answer.headers["access-control-max-age"], "300");
    assert_eq!(answer.headers["vary"], "Origin");
    assert!(
        !answer
            .headers
            .contains_key("access-control-allow-credentials")
    );
    assert_eq!(app.hits(), 0, "a preflight never reaches the upstream");

    let refused = get(&gw.url("/private/orders"), &[("origin", SHOP)]).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(refused.headers["access-control-allow-origin"], SHOP);
    let exposed = refused.headers["access-control-expose-headers"]
        .to_str()
        .unwrap();
    assert!(exposed.contains("x-request-id"), "{exposed}");
    let served = get(&gw.url("/api/x"), &[("origin", SHOP)]).await;
    assert_eq!(served.status, StatusCode::OK);
    assert_eq!(served.headers["access-control-allow-origin"], SHOP);
}

#[tokio::test]
async fn another_origin_method_or_header_is_refused() {
    // Goal: only what is configured is allowed: a preflight from another origin, for a
    // method or a header not listed, gets 403 `cors_refused` without an allowance, and a
    // plain request from another origin is answered without one (the browser hides it).
    let app = Upstream::start("app").await;
    let gw = TestGateway::start(&config(
        &app,
        &format!(
            "\n[cors]\nallowed_origins = [\"{SHOP}\"]\nallowed_methods = [\"GET\", \"POST\"]\n"
        ),
    ))
    .await;
    for (origin, method, headers, reason) in [
        (EVIL, "POST", "authorization", "origin"),
        (SHOP, "DELETE", "authorization", "method"),
        (SHOP, "POST", "authorization, x-evil", "x-evil"),
        ("https://shop.example.evil.example", "GET", "", "origin"),
    ] {
        let answer = preflight(&gw, origin, method, headers).await;
        assert_eq!(
            answer.status,
            StatusCode::FORBIDDEN,
            "{origin} {method} {headers}"
        );
        assert_eq!(answer.error_code(), "cors_refused");
        assert!(answer.body.contains(reason), "{}", answer.body);
        assert!(!answer.headers.contains_key("access-control-allow-origin"));
    }
    let answer = get(&gw.url("/api/x"), &[("origin", EVIL)]).await;
    assert!(!answer.headers.contains_key("access-control-allow-origin"));
    assert_eq!(answer.headers["vary"], "Origin");
}

#[test]
fn a_wildcard_or_an_origin_with_a_path_is_refused_in_the_configuration() {
    for (origins, key) in [
        ("\"*\"", "cors.allowed_origins[0]"),
        ("\"https://shop.example/app\"", "cors.allowed_origins[0]"),
        ("\"shop.example\"", "cors.allowed_origins[0]"),
        ("", "cors.allowed_origins"),
    ] {
        let toml = format!(
            "[clusters.app]\nendpoints = [\"127.0.0.1:1\"]\n[[routes]]\nname = \"a\"\npath_prefix = \"/\"\ncluster = \"app\"\n[cors]\nallowed_origins = [{origins}]\n"
        );
        let error = Config::from_toml(&toml).expect_err(origins);
        assert!(error.to_string().contains(key), "{error}");
    }
}
