//! An accepted order's steps after the 202: reserve, charge, record the payment, ship,
//! confirm, each committed before the next (see the crate docs), run by a bounded queue and
//! at most [`ORDERS_IN_FLIGHT_MAX`] orders at once.

use std::sync::Arc;
use std::time::Duration;

use shop_contracts::api::{OrderLineView, reason};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

use crate::provider::{Charge, Provider};
use crate::store::{self, Db, FailedPayment};

/// Orders accepted and waiting for a slot; `POST /api/orders` waits for room (up to
/// [`QUEUE_WAIT_MAX`](crate::api::QUEUE_WAIT_MAX)) before it accepts.
pub const ORDER_QUEUE_MAX: usize = 10_000;
/// Orders whose steps run at once: the shop's saga concurrency (`SAGA_CONCURRENCY_DEFAULT`).
pub const ORDERS_IN_FLIGHT_MAX: usize = 512;
/// Attempts of one database step before the order is left `PENDING` (and logged).
const STEP_ATTEMPTS: u32 = 3;
/// Pause between attempts of a database step.
const STEP_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// An accepted order, as its steps need it.
#[derive(Debug, Clone)]
pub(crate) struct PlacedOrder {
    pub(crate) id: String,
    pub(crate) user_id: String,
    pub(crate) lines: Vec<OrderLineView>,
    pub(crate) total_cents: i64,
}

/// What the steps use.
#[derive(Debug)]
pub(crate) struct Flow {
    db: Db,
    provider: Provider,
}

impl Flow {
    pub(crate) fn new(db: Db, provider: Provider) -> Self {
        Self { db, provider }
    }

    /// Runs an order's steps to `CONFIRMED` or `CANCELLED`. A database step that keeps
    /// failing leaves the order `PENDING`, logged.
    async fn run(&self, order: PlacedOrder) {
        let db = &self.db;
        let Some(reserved) = step("reserve", &order.id, || store::reserve(db, &order)).await else {
            return;
        };
        if !reserved {
            return;
        }
        match self.charge(&order).await {
            Ok(charge_id) => {
                let recorded = step("record payment", &order.id, || {
                    store::record_capture(db, &order, &charge_id)
                })
                .await;
                if recorded.is_none() {
                    return;
                }
            }
            Err(payment) => {
                step("cancel", &order.id, || {
                    store::cancel_unpaid(db, &order, &payment)
                })
                .await;
                return;
            }
        }
        let shipment_id = uuid::Uuid::now_v7().hyphenated().to_string();
        let shipped = step("ship", &order.id, || {
            store::create_shipment(db, &order, &shipment_id)
        })
        .await;
        if shipped.is_none() {
            return;
        }
        step("confirm", &order.id, || store::confirm(db, &order)).await;
    }

    /// The provider's charge id once captured, or how the payment ended otherwise. A lost
    /// answer is settled by looking the charge up once, under the same key: a capture found
    /// counts; nothing found, or no answer, cancels the order with the payment `unavailable`
    /// (shop/payments settles that case later with a refund; the healthy simulator the load
    /// runs against never loses an answer).
    async fn charge(&self, order: &PlacedOrder) -> Result<String, FailedPayment> {
        let declined = FailedPayment {
            status: Some("declined"),
            charge_id: None,
            reason: reason::PAYMENT_DECLINED,
        };
        let unavailable = |status| FailedPayment {
            status,
            charge_id: None,
            reason: reason::PAYMENT_UNAVAILABLE,
        };
        match self.provider.charge(&order.id, order.total_cents).await {
            Charge::Captured { charge_id } => Ok(charge_id),
            Charge::Declined => Err(declined),
            Charge::NotReached(why) => {
                tracing::warn!(order_id = %order.id, %why, "payment provider unavailable");
                Err(unavailable(None))
            }
            Charge::Unknown(why) => {
                tracing::warn!(order_id = %order.id, %why, "payment outcome unknown; settling");
                match self.provider.find_charge(&order.id).await {
                    Ok(Some(charge)) if charge.status == "captured" => Ok(charge.id),
                    Ok(Some(charge)) if charge.status == "declined" => Err(declined),
                    Ok(Some(charge)) if charge.status == "refunded" => Err(FailedPayment {
                        status: Some("refunded"),
                        charge_id: Some(charge.id),
                        reason: reason::PAYMENT_UNAVAILABLE,
                    }),
                    Ok(None) => Err(unavailable(Some("unavailable"))),
                    Ok(Some(charge)) => {
                        // A status payments cannot act on: try to undo whatever it is.
                        let refunded = self.provider.refund(&order.id, &charge.id).await.is_ok();
                        Err(FailedPayment {
                            status: Some(if refunded { "refunded" } else { "unavailable" }),
                            charge_id: Some(charge.id),
                            reason: reason::PAYMENT_UNAVAILABLE,
                        })
                    }
                    Err(why) => {
                        tracing::warn!(order_id = %order.id, %why, "payment could not be settled");
                        Err(unavailable(Some("unavailable")))
                    }
                }
            }
        }
    }
}

/// Runs one database step, retried up to [`STEP_ATTEMPTS`] times; `None` when it kept
/// failing.
async fn step<T, F, Fut>(name: &str, order_id: &str, mut run: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    for attempt in 1..=STEP_ATTEMPTS {
        match run().await {
            Ok(value) => return Some(value),
            Err(error) if attempt < STEP_ATTEMPTS => {
                tracing::warn!(%order_id, step = name, attempt, %error, "step failed; retrying");
                tokio::time::sleep(STEP_RETRY_PAUSE).await;
            }
            Err(error) => {
                tracing::error!(%order_id, step = name, %error, "step failed; order left PENDING");
            }
        }
    }
    None
}

/// The queue of accepted orders and the tasks that run them.
#[derive(Debug)]
pub(crate) struct OrderQueue {
    sender: mpsc::Sender<PlacedOrder>,
    slots: Arc<Semaphore>,
    dispatcher: JoinHandle<()>,
}

impl OrderQueue {
    /// Starts the dispatcher: one task per order taken from the queue, at most
    /// [`ORDERS_IN_FLIGHT_MAX`] at once.
    pub(crate) fn start(flow: Flow) -> Self {
        let (sender, mut receiver) = mpsc::channel::<PlacedOrder>(ORDER_QUEUE_MAX);
        let slots = Arc::new(Semaphore::new(ORDERS_IN_FLIGHT_MAX));
        let flow = Arc::new(flow);
        let dispatcher = {
            let slots = slots.clone();
            tokio::spawn(async move {
                while let Some(order) = receiver.recv().await {
                    let Ok(slot) = slots.clone().acquire_owned().await else {
                        return;
                    };
                    let flow = flow.clone();
                    tokio::spawn(async move {
                        flow.run(order).await;
                        drop(slot);
                    });
                }
            })
        };
        Self {
            sender,
            slots,
            dispatcher,
        }
    }

    /// Where the API puts accepted orders.
    pub(crate) fn sender(&self) -> mpsc::Sender<PlacedOrder> {
        self.sender.clone()
    }

    /// Stops taking orders from the queue and waits up to `grace` for those running.
    pub(crate) async fn drain(self, grace: Duration) {
        self.dispatcher.abort();
        let all = u32::try_from(ORDERS_IN_FLIGHT_MAX).expect("a small constant");
        if tokio::time::timeout(grace, self.slots.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = ORDERS_IN_FLIGHT_MAX - self.slots.available_permits(),
                "orders still running at shutdown are left PENDING"
            );
        }
    }
}
