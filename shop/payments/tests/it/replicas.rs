//! Two payments processes on one PostgreSQL database (replicas behind a load balancer): calls
//! for one order take turns across processes, not only within one.

use std::time::Duration;

use shop_contracts::proto::{ChargeRequest, OrderRef};
use shop_payment_provider::ProviderConfig;

use crate::{Backend, Front, start_behind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_on_another_replica_waits_for_the_charge_in_flight() {
    // Goal: no charge is kept for a cancelled order when the saga's Refund lands on another
    // replica than its Charge. Method: the Charge's first attempt hangs (it reaches the
    // provider only on its retry, 500 ms later); meanwhile the Refund goes to a second
    // replica. Without a lock the replicas share, the Refund finds no charge at the
    // provider, records the order refunded, and the retry then captures: the provider keeps
    // a capture nobody refunds.
    let Some(first) = start_behind(
        Backend::Postgres,
        "payments_replica_race",
        ProviderConfig::default(),
        |r| r.call_timeout = Duration::from_millis(500),
        Front::FirstConnectionHangs,
    )
    .await
    else {
        return;
    };
    let second = first.replica().await;
    let mut charging = first.client.clone();
    let charge = tokio::spawn(async move {
        charging
            .charge(ChargeRequest {
                order_id: "order-race".to_owned(),
                user_id: "user-1".to_owned(),
                amount_cents: 500,
            })
            .await
    });
    // The Charge has written its `pending` row: it is in flight.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while first.payment_status("order-race").await != "pending" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the charge never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refund = second
        .clone()
        .refund(OrderRef {
            order_id: "order-race".to_owned(),
        })
        .await
        .expect("the refund answers")
        .into_inner();
    let charged = charge.await.expect("joined");
    let stats = first.provider.stats();
    assert_eq!(
        stats.captures, stats.refunds,
        "the provider keeps a capture for a cancelled order (refund: {refund:?}, charge: {charged:?})"
    );
    assert_eq!(first.payment_status("order-race").await, "refunded");
}
