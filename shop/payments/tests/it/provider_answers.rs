//! What the provider answers is checked before it is believed (OWASP API10, unsafe consumption
//! of APIs): an answer that is not JSON, too large, of another shape, with a status or charge
//! id payments does not know, or a redirect elsewhere, never records a capture; the outcome
//! stays unknown (`unavailable`) so the saga compensates and a refund settles it later.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use shop_payment_provider::ProviderConfig;

use crate::{Backend, Front, on_both_backends, start_behind};

on_both_backends!(
    a_malformed_oversized_or_unknown_answer_never_records_a_capture,
    a_redirect_from_the_provider_is_not_followed,
);

/// A stand-in provider answering every request with `status`, `content_type` and `body`
/// (and `location`, when given); it counts the requests it gets.
async fn fake_provider(
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    location: Option<String>,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&hits);
    let router = axum::Router::new().fallback(move || {
        counted.fetch_add(1, Ordering::SeqCst);
        let body = body.clone();
        let location = location.clone();
        async move {
            let mut response: Response = (
                StatusCode::from_u16(status).expect("a status"),
                [(header::CONTENT_TYPE, content_type)],
                body,
            )
                .into_response();
            if let Some(location) = location {
                response.headers_mut().insert(
                    header::LOCATION,
                    HeaderValue::from_str(&location).expect("a header value"),
                );
            }
            response
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (addr, hits)
}

async fn a_malformed_oversized_or_unknown_answer_never_records_a_capture(backend: Backend) {
    // Goal: payments acts on a provider answer only when it is one it understands. Method: a
    // stand-in provider gives one kind of bad answer per case; the charge must answer
    // `unavailable` (or `declined`), never `captured`, with the payment not recorded as
    // captured, and the service must keep answering. The control, a well-formed capture from
    // the same stand-in, is `captured`.
    let json = "application/json";
    let padded = |status: &str| {
        format!(
            r#"{{"id":"ch_1","status":"{status}","pad":"{}"}}"#,
            "x".repeat(1024 * 1024)
        )
        .into_bytes()
    };
    let cases: Vec<(&str, u16, &str, Vec<u8>)> = vec![
        (
            "HTML with 200",
            200,
            "text/html",
            b"<html><body>OK</body></html>".to_vec(),
        ),
        ("an empty 201", 201, json, Vec::new()),
        ("JSON null", 201, json, b"null".to_vec()),
        (
            "truncated JSON",
            201,
            json,
            br#"{"id":"ch_1","status":"capt"#.to_vec(),
        ),
        (
            "another shape",
            201,
            json,
            br#"{"charge":{"id":"ch_1","state":"ok"}}"#.to_vec(),
        ),
        (
            "a numeric id",
            201,
            json,
            br#"{"id":1,"status":"captured"}"#.to_vec(),
        ),
        (
            "an empty id",
            201,
            json,
            br#"{"id":"","status":"captured"}"#.to_vec(),
        ),
        (
            "status pending",
            201,
            json,
            br#"{"id":"ch_1","status":"pending"}"#.to_vec(),
        ),
        (
            "status declined with 201",
            201,
            json,
            br#"{"id":"ch_1","status":"declined"}"#.to_vec(),
        ),
        (
            "status failed",
            200,
            json,
            br#"{"id":"ch_1","status":"failed"}"#.to_vec(),
        ),
        ("a 1 MiB capture", 201, json, padded("captured")),
        ("a 1 MiB decline", 402, json, padded("declined")),
        ("an unexpected 204", 204, json, Vec::new()),
        (
            "an unexpected 404",
            404,
            "text/plain",
            b"no such route".to_vec(),
        ),
    ];
    for (i, (what, status, content_type, body)) in cases.into_iter().enumerate() {
        let (addr, hits) = fake_provider(status, content_type, body, None).await;
        let Some(h) = start_behind(
            backend,
            &format!("provider_answer_{i}"),
            ProviderConfig::default(),
            |_| {},
            Front::Elsewhere(addr),
        )
        .await
        else {
            return;
        };
        let order = format!("order-{i}");
        let answer = h.charge(&order, 700).await;
        assert!(
            hits.load(Ordering::SeqCst) >= 1,
            "{what}: the stand-in was not called"
        );
        match &answer {
            Ok(answer) => assert!(
                answer.status == "unavailable" || answer.status == "declined",
                "{what}: the charge answered {answer:?}"
            ),
            Err(status) => panic!("{what}: the charge failed as a call: {status:?}"),
        }
        let recorded = h.payment_status(&order).await;
        assert!(
            recorded != "captured",
            "{what}: the payment was recorded {recorded}"
        );
    }

    // The control: the same stand-in with a capture payments understands.
    let (addr, _) = fake_provider(
        201,
        json,
        br#"{"id":"ch_control","status":"captured","amount_cents":700}"#.to_vec(),
        None,
    )
    .await;
    let Some(h) = start_behind(
        backend,
        "provider_answer_control",
        ProviderConfig::default(),
        |_| {},
        Front::Elsewhere(addr),
    )
    .await
    else {
        return;
    };
    let answer = h.charge("order-control", 700).await.expect("charge");
    assert_eq!(answer.status, "captured", "{answer:?}");
    assert_eq!(h.payment_status("order-control").await, "captured");
}

async fn a_redirect_from_the_provider_is_not_followed(backend: Backend) {
    // Goal: the provider cannot send payments' charge (amount and key) to another address.
    // Method: a stand-in provider answers every call with a 307 or 302 to a second server run
    // by the test; that server must never be called, and the charge must not be captured.
    let (elsewhere, elsewhere_hits) = fake_provider(
        201,
        "application/json",
        br#"{"id":"ch_stolen","status":"captured"}"#.to_vec(),
        None,
    )
    .await;
    for (i, status) in [307_u16, 302, 308].into_iter().enumerate() {
        let (addr, hits) = fake_provider(
            status,
            "text/plain",
            Vec::new(),
            Some(format!("http://{elsewhere}/v1/charges")),
        )
        .await;
        let Some(h) = start_behind(
            backend,
            &format!("provider_redirect_{i}"),
            ProviderConfig::default(),
            |_| {},
            Front::Elsewhere(addr),
        )
        .await
        else {
            return;
        };
        let order = format!("order-{i}");
        let answer = h.charge(&order, 700).await.expect("charge");
        assert!(
            hits.load(Ordering::SeqCst) >= 1,
            "{status}: the stand-in was not called"
        );
        assert_eq!(
            elsewhere_hits.load(Ordering::SeqCst),
            0,
            "a {status} from the provider was followed"
        );
        assert_ne!(answer.status, "captured", "{status}: {answer:?}");
        assert_ne!(h.payment_status(&order).await, "captured", "{status}");
    }
}
