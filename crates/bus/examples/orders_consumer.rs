//! A consumer group on the SQLite log: publish a few orders, handle them with
//! `Subscription::run`, watch one go to the dead-letter queue, then redrive it.
//!
//! Run: `cargo run -p trellis-bus --example orders_consumer`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use trellis_bus::sqlite::SqliteBus;
use trellis_bus::{
    Bus, DeadLetterFilter, DeadLetters, Envelope, HandlerError, Message, SubscribeOptions,
};

#[derive(Debug, serde::Deserialize)]
struct OrderPlaced {
    order_id: String,
    total_cents: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("trellis-bus-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let bus = SqliteBus::open_path(dir.join("bus.db")).await?;
    let billing = bus
        .subscribe("orders.*", "billing", SubscribeOptions::default())
        .await?;

    for (n, total) in [(1, 1_299), (2, 0), (3, 4_500)] {
        let order = serde_json::json!({ "order_id": format!("o-{n}"), "total_cents": total });
        let envelope = Envelope::new("order.placed", "orders", format!("o-{n}"), order);
        bus.publish("orders.placed", envelope).await?;
    }

    // Free orders are refused until someone fixes the pricing rule (the flag below).
    let free_orders_allowed = Arc::new(AtomicBool::new(false));
    let allowed = Arc::clone(&free_orders_allowed);
    let handler = move |message: Arc<Message>| {
        let allowed = Arc::clone(&allowed);
        async move {
            let order: OrderPlaced = message.envelope.decode()?;
            if order.total_cents == 0 && !allowed.load(Ordering::Relaxed) {
                return Err(HandlerError::permanent("pricing", "order total is zero"));
            }
            println!("billed {} for {} cents", order.order_id, order.total_cents);
            Ok(())
        }
    };
    let consumer = tokio::spawn(billing.run(handler, tokio::time::sleep(Duration::from_secs(2))));

    tokio::time::sleep(Duration::from_millis(500)).await;
    for group in bus.failure_groups(&DeadLetterFilter::default()).await? {
        println!("dead letters: {} x {}", group.count, group.fingerprint);
        free_orders_allowed.store(true, Ordering::Relaxed);
        bus.redrive_group(&group.fingerprint, "example").await?;
    }
    consumer.await??;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
