//! The choreographed order saga as events: the chain on the bus, the participants' logs, and
//! a flow cut off by a stop finished by the next start.

use reqwest::Method;
use shop_app::SagaStyle;

use crate::harness::{Backend, TestShop, stock_ok};

/// The happy path's events, in the order the flow must produce them.
const CHAIN: [&str; 7] = [
    "order.created",
    "inventory.reserved",
    "payment.completed",
    "order.shipping_started",
    "shipment.created",
    "inventory.committed",
    "order.confirmed",
];

async fn chain_on_the_bus(backend: Backend, test: &str) {
    let Some(shop) = TestShop::start_styled(backend, SagaStyle::Choreography, test).await else {
        return;
    };
    let lou = shop.customer("lou").await;
    let product = shop.product("Globe", 3_100, 4).await;
    let id = shop.order(&lou, &product, 2).await;
    let order = shop.settled(&lou, &id).await;
    assert_eq!(order["status"], "CONFIRMED", "{order}");
    let messages = shop
        .bus_messages(">", "e2e_chain", &id, |seen| {
            seen.iter().any(|e| e.kind == "order.confirmed")
        })
        .await;
    let kinds: Vec<&str> = messages.iter().map(|e| e.kind.as_str()).collect();
    // Every step once, in the flow's order (the bus keeps one subject's order).
    assert_eq!(kinds, CHAIN, "{kinds:?}");
    for envelope in &messages {
        assert_eq!(
            envelope.correlation_id.map(|c| c.to_string()),
            Some(id.clone()),
            "{envelope:?}"
        );
    }
    // Each event is caused by the event its service reacted to.
    for (cause, effect) in [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6)] {
        assert_eq!(
            messages[effect].causation_id,
            Some(messages[cause].id),
            "{} follows {}",
            messages[effect].kind,
            messages[cause].kind
        );
    }
    assert_eq!(messages[1].data["total_cents"], 6_200);
    assert_eq!(shop.payment(&id).await, "captured");
    assert_eq!(shop.shipment(&id).await, "created");
    assert_eq!(stock_ok(&shop, &product).await, (2, 0, 2));
    // No orchestrated saga ran: the orders service opened no saga log.
    if backend == Backend::Sqlite {
        assert!(!shop.dir.path().join("orders-saga.db").exists());
        // The inventory's choreography log shows its two steps for the order.
        let log = trellis_saga::choreography::ChoreographyLog::<trellis_saga::choreography::Sqlite>::connect(
            &format!("sqlite://{}", shop.dir.path().join("inventory.db").display()),
        )
        .await
        .expect("inventory database");
        let entries = log
            .entries(uuid::Uuid::parse_str(&id).expect("uuid"))
            .await
            .expect("log");
        let steps: Vec<(&str, Option<&str>)> = entries
            .iter()
            .map(|e| (e.step.as_str(), e.outcome.as_deref()))
            .collect();
        assert_eq!(
            steps,
            [
                ("inventory", Some("inventory.reserved")),
                ("commit", Some("inventory.committed"))
            ]
        );
    }
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_choreographed_order_is_a_chain_of_events_on_sqlite() {
    chain_on_the_bus(Backend::Sqlite, "chain").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_choreographed_order_is_a_chain_of_events_on_postgres_and_nats() {
    chain_on_the_bus(Backend::Postgres, "chain").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_choreographed_flow_cut_off_by_a_stop_is_finished_by_the_next_start() {
    let shop = TestShop::start_styled(Backend::Sqlite, SagaStyle::Choreography, "ch_crash")
        .await
        .expect("sqlite");
    let mia = shop.customer("mia").await;
    let product = shop.product("Compass", 2_500, 2).await;
    // The provider is slow: payments is mid-charge when the shop stops. The stop lets that
    // delivery finish (the charge captures) and stops the rest of the flow where it is: the
    // next event waits in payments' outbox or on the bus.
    let (status, _) = shop
        .call(
            Method::PUT,
            "/api/admin/provider",
            Some(shop.admin()),
            Some(serde_json::json!({"latency_ms": 1500})),
        )
        .await;
    assert_eq!(status, 200);
    let id = shop.order(&mia, &product, 1).await;
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    let dir = shop.stop().await;
    let restarted_at = chrono::Utc::now();

    // A fresh process: the outbox relays what was left and the participants carry on.
    let shop = TestShop::start_in_styled(Backend::Sqlite, SagaStyle::Choreography, "ch_crash", dir)
        .await
        .expect("sqlite");
    let order = shop.settled(&mia, &id).await;
    assert_eq!(order["status"], "CONFIRMED", "{order}");
    // The first process stopped before the shipment: the second one created it.
    let shipped_at = order["timeline"]
        .as_array()
        .and_then(|t| t.iter().find(|e| e["step"] == "shipping"))
        .and_then(|e| e["at"].as_str())
        .and_then(|at| chrono::DateTime::parse_from_rfc3339(at).ok())
        .expect("the timeline shows the shipment");
    assert!(shipped_at > restarted_at, "{order}");
    assert_eq!(shop.payment(&id).await, "captured");
    assert_eq!(shop.shipment(&id).await, "created");
    assert_eq!(stock_ok(&shop, &product).await, (1, 0, 1));
    shop.stop().await;
}
