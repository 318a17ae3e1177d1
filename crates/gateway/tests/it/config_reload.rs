//! Broken configurations, reload without dropping in-flight requests, graceful shutdown.

use std::time::Duration;

use http::StatusCode;
use trellis_gateway::{Config, ConfigError, Gateway, GatewayError};

use crate::helpers::{TestGateway, Upstream, get};

#[tokio::test]
async fn a_broken_config_is_reported_with_the_bad_key() {
    // Goal: each kind of mistake names the key at fault, and the file path when unreadable.
    let cases = [
        (
            "[clusters.app]\nendpoints = [\"127.0.0.1:1\"]\n[[routes]]\nname = \"r\"\ncluster = \"nope\"\n",
            "routes[0].cluster",
        ),
        (
            "[clusters.app]\nendpoints = [\"not an address\"]\n[[routes]]\nname = \"r\"\ncluster = \"app\"\n",
            "clusters.app.endpoints[0]",
        ),
        (
            "[clusters.app]\nendpoints = [\"127.0.0.1:1\"]\n[[routes]]\nname = \"r\"\ncluster = \"app\"\ntimeout_ms = 0\n",
            "routes[0].timeout_ms",
        ),
        (
            "[clusters.app]\nendpoints = [\"127.0.0.1:1\"]\n[[routes]]\nname = \"r\"\ncluster = \"app\"\npath_template = \"/a/{id\"\n",
            "routes[0].path_template",
        ),
        (
            "[clusters.app]\nendpoints = [\"127.0.0.1:1\"]\n[auth.j]\ntype = \"jwt\"\nkeys = [{ alg = \"none\", secret = \"0123456789abcdef0123456789abcdef\" }]\n[[routes]]\nname = \"r\"\ncluster = \"app\"\n",
            "auth.j.keys[0].alg",
        ),
        (
            "[server]\nlisten = \"localhost\"\n[clusters.app]\nendpoints = [\"127.0.0.1:1\"]\n[[routes]]\nname = \"r\"\ncluster = \"app\"\n",
            "server.listen",
        ),
        (
            "[clusters.app]\nendpoints = [\"127.0.0.1:1\"]\ntimeout = 5\n[[routes]]\nname = \"r\"\ncluster = \"app\"\n",
            "timeout",
        ),
    ];
    for (text, key) in cases {
        let error = Config::from_toml(text)
            .expect_err("broken config")
            .to_string();
        assert!(error.contains(key), "expected `{key}` in: {error}");
    }
    let missing = Gateway::from_file("/nonexistent/gateway.toml")
        .await
        .expect_err("no file");
    assert!(matches!(
        missing,
        GatewayError::Config(ConfigError::Read { .. })
    ));
    assert!(missing.to_string().contains("/nonexistent/gateway.toml"));
}

fn routes_to(upstream: &Upstream) -> String {
    format!(
        "[clusters.app]\nendpoints = [\"{}\"]\n[[routes]]\nname = \"r\"\ncluster = \"app\"\n",
        upstream.addr
    )
}

#[tokio::test]
async fn a_reload_switches_routes_without_dropping_a_request_in_flight() {
    // Goal: a slow request started before a reload completes on the old upstream, and the
    // next request goes to the new one; an invalid reload keeps the running table.
    let (old, new) = (Upstream::start("old").await, Upstream::start("new").await);
    let gw = TestGateway::start(&routes_to(&old)).await;
    let slow_url = gw.url("/slow/300");
    let in_flight = tokio::spawn(async move { get(&slow_url, &[]).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    gw.gateway
        .reload(Config::from_toml(&routes_to(&new)).expect("valid"))
        .await
        .expect("reload");
    let after = get(&gw.url("/x"), &[]).await;
    assert_eq!(after.json()["upstream"], "new");
    let slow = in_flight.await.expect("task");
    assert_eq!(slow.status, StatusCode::OK);
    assert_eq!(slow.json()["upstream"], "old");

    let mut broken = Config::from_toml(&routes_to(&old)).expect("valid");
    broken.routes[0].cluster = "missing".to_owned();
    assert!(gw.gateway.reload(broken).await.is_err());
    assert_eq!(get(&gw.url("/x"), &[]).await.json()["upstream"], "new");

    // The SIGHUP path: re-read a file; a broken file is refused, a good one applied.
    let file = std::env::temp_dir().join(format!("trellis-gw-reload-{}.toml", std::process::id()));
    std::fs::write(&file, "[[routes]]\nname = \"r\"\ncluster = \"nowhere\"\n").expect("write");
    let refused = gw
        .gateway
        .reload_from_file(&file)
        .await
        .expect_err("broken file");
    assert!(
        refused.to_string().contains("routes[0].cluster"),
        "{refused}"
    );
    std::fs::write(&file, routes_to(&old)).expect("write");
    gw.gateway
        .reload_from_file(&file)
        .await
        .expect("reload from file");
    assert_eq!(get(&gw.url("/x"), &[]).await.json()["upstream"], "old");
    let _ = std::fs::remove_file(&file);
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    // Goal: a request in flight when shutdown starts still gets its answer, and serve returns.
    let up = Upstream::start("app").await;
    let mut gw = TestGateway::start(&routes_to(&up)).await;
    let slow_url = gw.url("/slow/300");
    let in_flight = tokio::spawn(async move { get(&slow_url, &[]).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    gw.shutdown();
    let answer = in_flight.await.expect("task");
    assert_eq!(answer.status, StatusCode::OK);
    tokio::time::timeout(Duration::from_secs(5), &mut gw.served)
        .await
        .expect("serve returns after draining")
        .expect("serve task");
}

#[test]
fn the_example_config_is_valid() {
    // Goal: the shipped examples/gateway.toml stays in step with the schema.
    let path = format!("{}/examples/gateway.toml", env!("CARGO_MANIFEST_DIR"));
    let config = Config::from_file(&path).expect("the example config validates");
    assert!(config.routes.len() >= 5);
}

#[tokio::test]
async fn thread_per_core_serving_answers_and_stops_on_shutdown() {
    // Goal: serve_threads (what `run` uses) with two worker runtimes proxies requests,
    // shares the table (a reload reaches every worker) and returns after shutdown.
    let (old, new) = (Upstream::start("old").await, Upstream::start("new").await);
    let text = format!("[server]\nworker_threads = 2\n{}", routes_to(&old));
    let gateway = Gateway::from_config(Config::from_toml(&text).expect("valid"))
        .await
        .expect("builds");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = gateway.clone();
    let served = tokio::spawn(serving.serve_threads(listener, async {
        let _ = stopped.await;
    }));
    for _ in 0..10 {
        assert_eq!(
            get(&format!("http://{addr}/x"), &[]).await.json()["upstream"],
            "old"
        );
    }
    let text = format!("[server]\nworker_threads = 2\n{}", routes_to(&new));
    gateway
        .reload(Config::from_toml(&text).expect("valid"))
        .await
        .expect("reload");
    for _ in 0..10 {
        assert_eq!(
            get(&format!("http://{addr}/x"), &[]).await.json()["upstream"],
            "new"
        );
    }
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("workers stop")
        .expect("task")
        .expect("serve_threads");
}
