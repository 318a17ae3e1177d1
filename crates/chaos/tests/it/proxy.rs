//! The fault proxy against real clients and real upstreams: a tokio echo server, an axum
//! HTTP server with a reqwest client, and the HTTP control endpoint. Timing asserts are lower
//! bounds only; every wait is bounded.

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::{Instant, timeout},
};
use trellis_chaos::proxy::{
    Bandwidth, Blackhole, Direction, Down, FaultProxy, Faults, Latency, Limits, Reset, Sample,
    Slice, serve_control,
};

/// The bound on any single wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

/// An echo server: every byte read is written back; FIN is answered with FIN.
struct Echo {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

async fn echo() -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut read, mut write) = socket.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    Echo { addr, accepted }
}

async fn proxy_to(upstream: SocketAddr, seed: u64) -> FaultProxy {
    FaultProxy::start("127.0.0.1:0", upstream.to_string(), seed)
        .await
        .unwrap()
}

async fn connect(proxy: &FaultProxy) -> TcpStream {
    timeout(WAIT, TcpStream::connect(proxy.local_addr()))
        .await
        .expect("connect timed out")
        .expect("connect failed")
}

/// Sends `data`, half-closes, and reads until EOF or an error (concurrently, so large
/// payloads do not deadlock on full buffers).
async fn round_trip(stream: TcpStream, data: &[u8]) -> (Vec<u8>, io::Result<()>) {
    let (mut read, mut write) = stream.into_split();
    let payload = data.to_vec();
    let writer = tokio::spawn(async move {
        write.write_all(&payload).await?;
        write.shutdown().await?;
        // Keep the write half alive until the reader is done.
        Ok::<_, io::Error>(write)
    });
    let mut got = Vec::new();
    let result = timeout(WAIT, read.read_to_end(&mut got))
        .await
        .expect("read timed out")
        .map(|_| ());
    let _ = timeout(WAIT, writer).await.expect("writer timed out");
    (got, result)
}

/// Reads until EOF or an error; returns the bytes and how it ended.
async fn read_until_end(stream: &mut TcpStream) -> (Vec<u8>, io::Result<()>) {
    let mut got = Vec::new();
    let result = timeout(WAIT, stream.read_to_end(&mut got))
        .await
        .expect("read timed out")
        .map(|_| ());
    (got, result)
}

fn assert_reset(result: io::Result<()>) {
    let error = result.expect_err("expected a connection reset, got a clean end");
    assert_eq!(
        error.kind(),
        io::ErrorKind::ConnectionReset,
        "expected a connection reset, got {error}"
    );
}

/// Writes a byte and expects a reset from the proxy (a write may already see it).
async fn expect_reset(stream: &mut TcpStream) {
    if let Err(error) = stream.write_all(b"x").await {
        assert!(
            matches!(
                error.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            "{error}"
        );
        return;
    }
    let (_, result) = read_until_end(stream).await;
    assert_reset(result);
}

/// Writes a byte and expects it echoed.
async fn expect_echo(stream: &mut TcpStream) {
    stream.write_all(b"e").await.unwrap();
    let mut byte = [0u8; 1];
    timeout(WAIT, stream.read_exact(&mut byte))
        .await
        .expect("echo timed out")
        .expect("echo failed");
    assert_eq!(&byte, b"e");
}

fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

/// Polls `check` until it holds, for at most `WAIT`.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn pass_through_is_byte_exact_both_ways() {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr, 1).await;
    let data = payload(1 << 20, 1);
    let (got, result) = round_trip(connect(&proxy).await, &data).await;
    result.unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "the echoed bytes differ");
    let stats = proxy.stats();
    assert_eq!(stats.connections, 1);
    assert_eq!(stats.bytes_to_upstream, data.len() as u64);
    assert_eq!(stats.bytes_to_client, data.len() as u64);
    assert_eq!(stats.faults, Default::default());
    eventually("the connection to close", || proxy.stats().active == 0).await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn latency_adds_at_least_the_configured_delay() {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr, 2).await;
    // Both ways, jitter per chunk: a round trip pays the delay twice.
    proxy
        .set(Faults {
            latency: Some(Latency::new(100, 50)),
            ..Faults::none()
        })
        .unwrap();
    let mut stream = connect(&proxy).await;
    for _ in 0..3 {
        let started = Instant::now();
        expect_echo(&mut stream).await;
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "round trip took {:?}",
            started.elapsed()
        );
    }
    // One way, sampled once per direction.
    proxy
        .set(Faults {
            latency: Some(Latency {
                sample: Sample::PerDirection,
                ..Latency::new(150, 30).with_direction(Direction::Upstream)
            }),
            ..Faults::none()
        })
        .unwrap();
    let mut stream = connect(&proxy).await;
    let started = Instant::now();
    expect_echo(&mut stream).await;
    assert!(started.elapsed() >= Duration::from_millis(150));
    // The latency keeps the bytes intact.
    let data = payload(100_000, 2);
    let (got, result) = round_trip(connect(&proxy).await, &data).await;
    result.unwrap();
    assert!(got == data);
    assert_eq!(proxy.stats().faults.latency, 3);
}

#[tokio::test]
async fn reset_at_accept_gives_the_client_a_connection_reset() {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr, 3).await;
    proxy
        .set(Faults {
            reset: Some(Reset::at_accept()),
            ..Faults::none()
        })
        .unwrap();
    let mut stream = connect(&proxy).await;
    expect_reset(&mut stream).await;
    assert_eq!(
        echo.accepted.load(Ordering::SeqCst),
        0,
        "upstream contacted"
    );
    assert_eq!(proxy.stats().faults.reset, 1);
}

#[tokio::test]
async fn reset_after_bytes_forwards_exactly_the_budget() {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr, 4).await;
    proxy
        .set(Faults {
            reset: Some(Reset::after_bytes(1000)),
            ..Faults::none()
        })
        .unwrap();
    let mut stream = connect(&proxy).await;
    stream.write_all(&payload(4000, 4)).await.unwrap();
    let (got, result) = read_until_end(&mut stream).await;
    assert_reset(result);
    assert!(got.len() <= 1000, "got {} bytes", got.len());
    let stats = proxy.stats();
    assert_eq!(stats.bytes_to_upstream + stats.bytes_to_client, 1000);
    assert_eq!(stats.faults.reset, 1);
}

#[tokio::test]
async fn reset_after_a_delay() {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr, 5).await;
    proxy
        .set(Faults {
            reset: Some(Reset::after_ms(300)),
            ..Faults::none()
        })
        .unwrap();
    let started = Instant::now();
    let mut stream = connect(&proxy).await;
    expect_echo(&mut stream).await;
    let (_, result) = read_until_end(&mut stream).await;
    assert_reset(result);
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn blackhole_times_the_client_out_and_the_upstream_sees_nothing() {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr, 6).await;
    proxy
        .set(Faults {
            blackhole: Some(Blackhole::new()),
            ..Faults::none()
        })
        .unwrap();
    let mut held = connect(&proxy).await;
    held.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 16];
    let read = timeout(Duration::from_millis(500), held.read(&mut buf)).await;
    assert!(read.is_err(), "expected the client's timeout, got {read:?}");
    assert_eq!(
        echo.accepted.load(Ordering::SeqCst),
        0,
        "upstream contacted"
    );
    eventually("the bytes to be discarded", || {
        proxy.stats().bytes_discarded == 5
    })
    .await;
    assert_eq!(proxy.stats().faults.blackhole, 1);
    // Lifting the blackhole releases the held connection (reset) and heals new ones.
    proxy.clear();
    let (_, result) = read_until_end(&mut held).await;
    assert_reset(result);
    expect_echo(&mut connect(&proxy).await).await;
    assert_eq!(echo.accepted.load(Ordering::SeqCst), 1);

    // The bound: held at most max_ms.
    proxy
        .set(Faults {
            blackhole: Some(Blackhole {
                max_ms: 300,
                ..Blackhole::new()
            }),
            ..Faults::none()
        })
        .unwrap();
    let started = Instant::now();
    let mut held = connect(&proxy).await;
    let (_, result) = read_until_end(&mut held).await;
    assert_reset(result);
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn bandwidth_bounds_throughput() {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr, 7).await;
    let rate = 50_000;
    proxy
        .set(Faults {
            bandwidth: Some(Bandwidth::new(rate).with_direction(Direction::Downstream)),
            ..Faults::none()
        })
        .unwrap();
    let data = payload(50_000, 7);
    let started = Instant::now();
    let (got, result) = round_trip(connect(&proxy).await, &data).await;
    result.unwrap();
    assert!(got == data);
    // The bucket starts with a tenth of a second's worth: the rest takes at least 0.9 s.
    let floor = Duration::from_secs_f64((data.len() as f64 - rate as f64 / 10.0) / rate as f64);
    assert!(
        started.elapsed() >= floor,
        "{} bytes at {rate} B/s took {:?}",
        data.len(),
        started.elapsed()
    );
    assert_eq!(proxy.stats().faults.bandwidth, 1);
}

#[tokio::test]
async fn slicing_delivers_the_same_bytes_in_many_small_reads() {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr, 8).await;
    proxy
        .set(Faults {
            slice: Some(Slice::new(7, 1).with_direction(Direction::Downstream)),
            ..Faults::none()
        })
        .unwrap();
    let data = payload(700, 8);
    let mut stream = connect(&proxy).await;
    stream.write_all(&data).await.unwrap();
    let mut got = Vec::new();
    let mut reads = 0;
    let mut buf = vec![0u8; 4096];
    while got.len() < data.len() {
        let n = timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("read timed out")
            .unwrap();
        assert!(n > 0, "early EOF after {} bytes", got.len());
        got.extend_from_slice(&buf[..n]);
        reads += 1;
    }
    assert!(got == data);
    assert!(reads >= 20, "only {reads} reads for 100 slices");

    // Both ways, no delay, bytes intact.
    proxy
        .set(Faults {
            slice: Some(Slice::new(5, 0)),
            ..Faults::none()
        })
        .unwrap();
    let data = payload(16 * 1024, 9);
    let (got, result) = round_trip(connect(&proxy).await, &data).await;
    result.unwrap();
    assert!(got == data);
    assert_eq!(proxy.stats().faults.slice, 2);
}

/// Which of 200 sequential connections a `probability: 0.5` reset picks.
async fn chosen(seed: u64) -> Vec<bool> {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr, seed).await;
    proxy
        .set(Faults {
            reset: Some(Reset::at_accept().with_probability(0.5)),
            ..Faults::none()
        })
        .unwrap();
    let mut picked = Vec::new();
    for _ in 0..200 {
        let mut stream = connect(&proxy).await;
        let outcome = async {
            stream.write_all(b"x").await?;
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await
        };
        match timeout(WAIT, outcome).await.expect("connection timed out") {
            Ok(_) => picked.push(false),
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                ) =>
            {
                picked.push(true)
            }
            Err(error) => panic!("unexpected {error}"),
        }
    }
    let resets = picked.iter().filter(|&&p| p).count() as u64;
    assert_eq!(proxy.stats().faults.reset, resets);
    proxy.shutdown().await;
    picked
}

#[tokio::test]
async fn a_probability_picks_a_seeded_share_of_connections() {
    let first = chosen(42).await;
    let count = first.iter().filter(|&&p| p).count();
    assert!((60..=140).contains(&count), "{count} of 200 reset");
    assert_eq!(chosen(42).await, first, "the same seed picked differently");
    assert_ne!(chosen(43).await, first, "another seed picked the same");
}

#[tokio::test]
async fn the_control_endpoint_switches_faults_for_new_connections() {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr, 10).await;
    let control = serve_control(proxy.clone(), "127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", control.local_addr());
    let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();

    let faults: Value = http
        .get(format!("{base}/faults"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(faults["reset"], Value::Null);
    let mut before = connect(&proxy).await;
    expect_echo(&mut before).await;

    let response = http
        .put(format!("{base}/faults"))
        .json(&json!({ "reset": { "probability": 1.0 } }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["reset"]["probability"], 1.0);
    assert_eq!(proxy.faults().reset, Some(Reset::at_accept()));
    // New connections are reset; the one opened before keeps its clean plan.
    expect_reset(&mut connect(&proxy).await).await;
    expect_echo(&mut before).await;

    let stats: Value = http
        .get(format!("{base}/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["faults"]["reset"], 1);
    assert_eq!(stats["connections"], 2);

    let response = http.delete(format!("{base}/faults")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(proxy.faults().is_none());
    expect_echo(&mut connect(&proxy).await).await;
    control.shutdown().await;
}

#[tokio::test]
async fn bad_control_input_is_a_400_naming_the_field() {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr, 11).await;
    proxy
        .set(Faults {
            latency: Some(Latency::new(5, 0)),
            ..Faults::none()
        })
        .unwrap();
    let control = serve_control(proxy.clone(), "127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/faults", control.local_addr());
    let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let cases = [
        (
            json!({ "latency": { "probability": 1.5, "delay_ms": 10 } }),
            "latency.probability",
        ),
        (
            json!({ "reset": { "probability": -0.1 } }),
            "reset.probability",
        ),
        (
            json!({ "latency": { "delay_ms": 3_600_000 } }),
            "latency.delay_ms",
        ),
        (
            json!({ "bandwidth": { "bytes_per_sec": "fast" } }),
            "bandwidth.bytes_per_sec",
        ),
        (json!({ "bandwidth": {} }), "bandwidth.bytes_per_sec"),
        (json!({ "slice": { "max_bytes": 0 } }), "slice.max_bytes"),
        (json!({ "blackhole": { "max_ms": 0 } }), "blackhole.max_ms"),
        (
            json!({ "reset": { "after_ms": 10, "bogus": 1 } }),
            "reset.bogus",
        ),
        (json!({ "latncy": { "delay_ms": 10 } }), "latncy"),
        (json!({ "down": true }), "down"),
        (json!([1, 2]), "body"),
    ];
    for (body, field) in cases {
        let response = http.put(&url).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 400, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["field"], field, "{body}: {error}");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let response = http.put(&url).body("{not json").send().await.unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["field"], "body");
    // Nothing changed.
    assert_eq!(proxy.faults().latency, Some(Latency::new(5, 0)));
    // The Rust API refuses the same.
    let error = proxy
        .set(Faults {
            slice: Some(Slice::new(1, 60_000)),
            ..Faults::none()
        })
        .unwrap_err();
    assert_eq!(error.field, "slice.delay_ms");
    control.shutdown().await;
}

#[tokio::test]
async fn the_down_switch_partitions_and_heals() {
    let echo = echo().await;
    let proxy = proxy_to(echo.addr, 12).await;
    let mut open = connect(&proxy).await;
    expect_echo(&mut open).await;

    proxy
        .set(Faults {
            down: Some(Down::default()),
            ..Faults::none()
        })
        .unwrap();
    let (_, result) = read_until_end(&mut open).await;
    assert_reset(result);
    expect_reset(&mut connect(&proxy).await).await;
    eventually("the open connection to be counted", || {
        proxy.stats().faults.down >= 2
    })
    .await;
    assert!(proxy.stats().refused >= 1);

    proxy.clear();
    let mut healed = connect(&proxy).await;
    expect_echo(&mut healed).await;
    // Down without close_existing: open connections live on, new ones are refused.
    proxy
        .set(Faults {
            down: Some(Down {
                close_existing: false,
            }),
            ..Faults::none()
        })
        .unwrap();
    expect_reset(&mut connect(&proxy).await).await;
    expect_echo(&mut healed).await;
}

#[tokio::test]
async fn http_through_latency_slices_and_a_bandwidth_limit() {
    use axum::{Router, routing::get, routing::post};
    let big = payload(200_000, 13);
    let body = big.clone();
    let app = Router::new()
        .route("/big", get(move || async move { body }))
        .route("/echo", post(|body: axum::body::Bytes| async move { body }));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let proxy = proxy_to(upstream, 13).await;
    proxy
        .set(Faults {
            latency: Some(Latency::new(20, 10)),
            slice: Some(Slice::new(1000, 0)),
            bandwidth: Some(Bandwidth::new(2_000_000)),
            ..Faults::none()
        })
        .unwrap();
    let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let base = format!("http://{}", proxy.local_addr());
    let started = Instant::now();
    let response = http.get(format!("{base}/big")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.unwrap() == big);
    assert!(started.elapsed() >= Duration::from_millis(40));
    let sent = payload(50_000, 14);
    let response = http
        .post(format!("{base}/echo"))
        .body(sent.clone())
        .send()
        .await
        .unwrap();
    assert!(response.bytes().await.unwrap() == sent);

    // A reset at accept is an error for a fresh HTTP client, not a response.
    proxy
        .set(Faults {
            reset: Some(Reset::at_accept()),
            ..Faults::none()
        })
        .unwrap();
    let fresh = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let error = fresh.get(format!("{base}/big")).send().await.unwrap_err();
    assert!(!error.is_timeout(), "{error}");
    proxy.clear();
    let response = fresh.get(format!("{base}/big")).send().await.unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn limits_bound_connections_and_idle_time() {
    let echo = echo().await;
    let proxy = FaultProxy::start_with(
        "127.0.0.1:0",
        echo.addr.to_string(),
        14,
        Limits {
            max_connections: 2,
            idle_timeout: Duration::from_millis(300),
            ..Limits::default()
        },
    )
    .await
    .unwrap();
    let mut first = connect(&proxy).await;
    let mut second = connect(&proxy).await;
    expect_echo(&mut first).await;
    expect_echo(&mut second).await;
    expect_reset(&mut connect(&proxy).await).await;
    assert_eq!(proxy.stats().refused, 1);
    // Idle connections are closed (FIN), freeing their slots.
    let started = Instant::now();
    let (_, result) = read_until_end(&mut first).await;
    result.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(200));
    eventually("the slots to free", || proxy.stats().active == 0).await;
    expect_echo(&mut connect(&proxy).await).await;
}

#[tokio::test]
async fn an_unreachable_upstream_resets_the_client_and_shutdown_frees_the_port() {
    // A port nobody listens on.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = proxy_to(closed, 15).await;
    expect_reset(&mut connect(&proxy).await).await;
    assert_eq!(proxy.stats().upstream_errors, 1);

    let echo = echo().await;
    let proxy = proxy_to(echo.addr, 15).await;
    let addr = proxy.local_addr();
    let mut open = connect(&proxy).await;
    expect_echo(&mut open).await;
    timeout(WAIT, proxy.shutdown())
        .await
        .expect("shutdown hung");
    let (_, result) = read_until_end(&mut open).await;
    assert_reset(result);
    assert_eq!(proxy.stats().active, 0);
    // The port is free again.
    TcpListener::bind(addr).await.unwrap();
}
