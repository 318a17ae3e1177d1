//! The DLQ's JSON HTTP endpoints, called through the router with `oneshot`.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use axum::body::Body;
use http::{Method, Request, StatusCode};
use serde_json::Value;
use tower::ServiceExt as _;
use trellis_bus::{Bus, Envelope, HandlerError, InMemoryBus, SubscribeOptions};

async fn call(
    app: &axum::Router,
    method: Method,
    uri: &str,
    body: Option<Value>,
) -> anyhow::Result<(StatusCode, Value)> {
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .header("x-actor", "ops-alice");
    let body = match body {
        Some(json) => {
            request = request.header("content-type", "application/json");
            Body::from(serde_json::to_vec(&json)?)
        }
        None => Body::empty(),
    };
    let response = app.clone().oneshot(request.body(body)?).await?;
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1024 * 1024).await?;
    let json = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)?
    };
    Ok((status, json))
}

/// Dead-letters three messages: two with the same failure (different numbers), one other.
async fn bus_with_dead_letters() -> anyhow::Result<InMemoryBus> {
    let bus = InMemoryBus::new();
    let mut sub = bus
        .subscribe("payments.*", "billing", SubscribeOptions::default())
        .await?;
    for n in 0..3 {
        let envelope = Envelope::new(
            "payment.requested",
            "orders",
            format!("p{n}"),
            serde_json::json!({ "n": n }),
        );
        bus.publish("payments.requested", envelope).await?;
    }
    let deliveries = sub.fetch(3, Duration::from_secs(1)).await?;
    ensure!(deliveries.len() == 3);
    for delivery in deliveries {
        let n = delivery.envelope().data["n"].as_u64().context("n")?;
        let error = if n < 2 {
            HandlerError::permanent("card", format!("card {n}4242 declined"))
        } else {
            HandlerError::permanent("config", "merchant account missing")
        };
        delivery.fail(&error).await?;
    }
    Ok(bus)
}

#[tokio::test]
async fn the_dlq_endpoints_list_group_show_redrive_and_discard() -> anyhow::Result<()> {
    // Goal: an operator can find dead letters by filter and by failure group, inspect one,
    // redrive a group, discard one, and read the action log with their name in it.
    let bus = bus_with_dead_letters().await?;
    let app = trellis_bus::http::router(bus.clone());

    let (status, all) = call(&app, Method::GET, "/dead-letters", None).await?;
    ensure!(status == StatusCode::OK && all.as_array().map(Vec::len) == Some(3));
    let (_, declined) = call(
        &app,
        Method::GET,
        "/dead-letters?error_contains=declined&topic=payments.*",
        None,
    )
    .await?;
    ensure!(declined.as_array().map(Vec::len) == Some(2), "{declined}");
    let (_, none_old) = call(&app, Method::GET, "/dead-letters?older_than=3600", None).await?;
    ensure!(none_old.as_array().map(Vec::len) == Some(0));

    let (_, groups) = call(&app, Method::GET, "/dead-letters/groups", None).await?;
    let groups = groups.as_array().context("groups")?;
    ensure!(
        groups.len() == 2 && groups[0]["count"] == 2 && groups[1]["count"] == 1,
        "{groups:?}"
    );
    let fingerprint = groups[0]["fingerprint"]
        .as_str()
        .context("fingerprint")?
        .to_owned();
    ensure!(fingerprint == "card: card # declined", "{fingerprint}");

    let other_id = groups_other_id(&all)?;
    let (status, shown) = call(
        &app,
        Method::GET,
        &format!("/dead-letters/{other_id}"),
        None,
    )
    .await?;
    ensure!(status == StatusCode::OK && shown["error"] == "merchant account missing");
    ensure!(shown["reason"] == "rejected" && shown["attempts"] == 1);

    let (status, redriven) = call(
        &app,
        Method::POST,
        "/dead-letters/redrive",
        Some(serde_json::json!({ "fingerprint": fingerprint })),
    )
    .await?;
    ensure!(status == StatusCode::OK && redriven["redriven"].as_array().map(Vec::len) == Some(2));

    let (status, _) = call(
        &app,
        Method::DELETE,
        &format!("/dead-letters/{other_id}"),
        None,
    )
    .await?;
    ensure!(status == StatusCode::NO_CONTENT);
    let (status, missing) = call(
        &app,
        Method::GET,
        &format!("/dead-letters/{other_id}"),
        None,
    )
    .await?;
    ensure!(status == StatusCode::NOT_FOUND && missing["error"]["code"] == "dead_letter_not_found");

    let (_, actions) = call(&app, Method::GET, "/dead-letters/actions?limit=10", None).await?;
    let actions = actions.as_array().context("actions")?;
    ensure!(actions.len() == 3, "{actions:?}");
    ensure!(actions.iter().all(|a| a["actor"] == "ops-alice"));
    ensure!(actions[0]["action"] == "discard");
    Ok(())
}

fn groups_other_id(all: &Value) -> anyhow::Result<String> {
    all.as_array()
        .context("list")?
        .iter()
        .find(|letter| letter["error_kind"] == "config")
        .and_then(|letter| letter["id"].as_str())
        .map(str::to_owned)
        .context("the config failure")
}

#[tokio::test]
async fn bad_ids_and_filters_get_a_json_400() -> anyhow::Result<()> {
    // Goal: malformed input is answered with a clear JSON error, not a panic or plain text.
    let app = trellis_bus::http::router(InMemoryBus::new());
    let (status, body) = call(&app, Method::GET, "/dead-letters/not-a-uuid", None).await?;
    ensure!(status == StatusCode::BAD_REQUEST && body["error"]["code"] == "invalid_input");
    let (status, body) = call(&app, Method::GET, "/dead-letters?topic=a..b", None).await?;
    ensure!(status == StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = call(&app, Method::GET, "/dead-letters?reason=bored", None).await?;
    ensure!(status == StatusCode::BAD_REQUEST && body["error"]["message"].is_string());
    let (status, _) = call(
        &app,
        Method::POST,
        "/dead-letters/redrive",
        Some(serde_json::json!({"limit": "x"})),
    )
    .await?;
    ensure!(status == StatusCode::BAD_REQUEST);
    Ok(())
}

#[tokio::test]
async fn any_bus_picks_the_backend_by_url_and_refuses_unknown_schemes() -> anyhow::Result<()> {
    // Goal: a binary opens the bus from a URL: a SQLite file works end to end through the
    // DLQ API, and an unknown scheme is a clear configuration error.
    let dir = crate::helpers::TempDir::new("any_bus")?;
    let url = format!("sqlite://{}", dir.file("bus.db").display());
    let bus = trellis_bus::AnyBus::connect(&url, "unused").await?;
    ensure!(matches!(bus, trellis_bus::AnyBus::Sqlite(_)));
    let mut sub = bus
        .subscribe("x.*", "g", SubscribeOptions::default())
        .await?;
    bus.publish("x.y", Envelope::new("t", "s", "k", serde_json::json!(1)))
        .await?;
    let delivery = sub
        .fetch(1, Duration::from_secs(2))
        .await?
        .pop()
        .context("delivery")?;
    delivery.term("no").await?;
    let letters = trellis_bus::DeadLetters::list(&bus, &Default::default()).await?;
    ensure!(letters.len() == 1);
    let refused = trellis_bus::AnyBus::connect("kafka://x", "p").await;
    ensure!(matches!(
        refused,
        Err(trellis_bus::BusError::InvalidConfig(_))
    ));
    Ok(())
}

#[tokio::test]
async fn the_dlq_list_endpoint_pages_with_a_cursor_and_keeps_its_array_shape() -> anyhow::Result<()>
{
    // Goal: without `cursor` the list is still a JSON array (the next page's cursor in a
    // header); with `cursor` it is a page object, and following `next_cursor` lists every
    // letter once.
    let bus = bus_with_dead_letters().await?;
    let app = trellis_bus::http::router(bus.clone());
    let request = Request::builder()
        .uri("/dead-letters?limit=2")
        .body(Body::empty())?;
    let response = app.clone().oneshot(request).await?;
    ensure!(response.status() == StatusCode::OK);
    let next = response
        .headers()
        .get(trellis_bus::http::NEXT_CURSOR_HEADER)
        .context("a next-cursor header")?
        .to_str()?
        .to_owned();
    let bytes = axum::body::to_bytes(response.into_body(), 1024 * 1024).await?;
    let first: Value = serde_json::from_slice(&bytes)?;
    ensure!(first.as_array().map(Vec::len) == Some(2), "{first}");

    let (status, page) = call(&app, Method::GET, "/dead-letters?limit=2&cursor=", None).await?;
    ensure!(
        status == StatusCode::OK && page["dead_letters"] == first,
        "{page}"
    );
    ensure!(page["next_cursor"] == next.as_str(), "{page}");
    let (_, last) = call(
        &app,
        Method::GET,
        &format!("/dead-letters?limit=2&cursor={next}"),
        None,
    )
    .await?;
    let rest = last["dead_letters"].as_array().context("a page")?;
    ensure!(rest.len() == 1 && last["next_cursor"].is_null(), "{last}");
    let mut ids: Vec<&Value> = first.as_array().context("list")?.iter().collect();
    ids.extend(rest.iter());
    let ids: std::collections::HashSet<&str> = ids
        .iter()
        .filter_map(|letter| letter["id"].as_str())
        .collect();
    ensure!(ids.len() == 3);
    let (status, _) = call(&app, Method::GET, "/dead-letters?cursor=nope", None).await?;
    ensure!(status == StatusCode::BAD_REQUEST);
    Ok(())
}
