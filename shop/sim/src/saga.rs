//! The order saga, step for step as `shop/orders/src/saga.rs` defines it (its `definition`
//! and `Participants` are private to shop-orders, so they are mirrored here; a test fails when
//! the original changes, see [`crate::MIRRORED_SAGA_FNV`]). The only differences: the gRPC
//! clients' channel is the simulated network ([`crate::net::Channel`] behind the same
//! `ServiceIdentityClient`), and [`Safeguards`] can turn one safeguard off to prove the
//! simulation notices.

use std::sync::Arc;
use std::time::Duration;

use shop_contracts::api::reason;
use shop_contracts::proto::inventory_client::InventoryClient;
use shop_contracts::proto::payments_client::PaymentsClient;
use shop_contracts::proto::shipping_client::ShippingClient;
use shop_contracts::proto::{
    ChargeRequest, CreateShipmentRequest, Line as ProtoLine, OrderRef, ReserveRequest,
};
use shop_orders::aggregate::{Line, Order, OrderCommand, OrderError, SharedClock};
use shop_orders::saga::{
    MUST_FINISH_ATTEMPTS, OrderSagaContext, SAGA_NAME, SAGA_VERSIONS, STEP_ATTEMPTS, STEP_TIMEOUT,
};
use trellis_eventstore::{AnyStore, Metadata, Repository, RepositoryError};
use trellis_resilience::Backoff;
use trellis_saga::{SagaDefinition, Step, StepContext, StepError, StepRetry};
use trellis_service::auth::ServiceIdentityClient;

/// The orders process's channel to a participant: the simulated network, carrying the
/// orders service's identity as a production channel does.
pub(crate) type GrpcChannel = ServiceIdentityClient<crate::net::Channel>;

/// Safeguards of the order flow that a test may turn off, to prove the simulation finds the
/// violation that follows. All on by default; production has no such switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Safeguards {
    /// The payment step's compensation refunds the order's charge.
    pub refund_on_compensation: bool,
    /// The payment provider dedupes charges by idempotency key (the order id).
    pub provider_idempotency: bool,
}

impl Default for Safeguards {
    fn default() -> Self {
        Self {
            refund_on_compensation: true,
            provider_idempotency: true,
        }
    }
}

/// Everything the steps call.
#[derive(Clone)]
pub(crate) struct Participants {
    pub(crate) orders: Arc<Repository<Order, AnyStore>>,
    /// The time the order's events record.
    pub(crate) clock: SharedClock,
    pub(crate) inventory: InventoryClient<GrpcChannel>,
    pub(crate) payments: PaymentsClient<GrpcChannel>,
    pub(crate) shipping: ShippingClient<GrpcChannel>,
    pub(crate) safeguards: Safeguards,
}

impl std::fmt::Debug for Participants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Participants").finish_non_exhaustive()
    }
}

impl Participants {
    async fn order(&self, order_id: &str, command: OrderCommand) -> Result<Order, StepError> {
        let metadata = Metadata {
            correlation_id: uuid::Uuid::parse_str(order_id).ok(),
            // The original puts the saga step's traceparent here, so the read model's update
            // joins the order's trace; the simulation records no traces, so it stays unset.
            ..Metadata::default()
        };
        let command = command.at(self.clock.now());
        match self.orders.execute(order_id, command, metadata).await {
            Ok(executed) => Ok(executed.state),
            Err(RepositoryError::Domain(error)) => Err(domain(error)),
            Err(error) => Err(StepError::retryable(format!("event store: {error}"))),
        }
    }

    async fn load(&self, order_id: &str) -> Result<Order, StepError> {
        self.orders
            .load(order_id)
            .await
            .map(|loaded| loaded.state)
            .map_err(|e| StepError::retryable(format!("event store: {e}")))
    }

    async fn record(&self, order_id: &str, step: &str, outcome: &str) -> Result<(), StepError> {
        self.order(
            order_id,
            OrderCommand::Record {
                step: step.to_owned(),
                outcome: outcome.to_owned(),
            },
        )
        .await
        .map(drop)
    }

    /// Notes the reason and fails the step for good.
    async fn fail(&self, order_id: &str, why: &str, message: String) -> StepError {
        if let Err(e) = self
            .order(order_id, OrderCommand::NoteFailure(why.to_owned()))
            .await
        {
            // The note could not be written: let the step run again rather than lose it.
            return e;
        }
        StepError::permanent(message)
    }

    /// Fails for good when the customer asked to cancel. The cached order may miss a cancel
    /// taken by another orders process; `StartShipping` (a versioned append) still sees it.
    async fn check_cancel(&self, order_id: &str) -> Result<(), StepError> {
        let order = self
            .orders
            .load_cached(order_id)
            .await
            .map_err(|e| StepError::retryable(format!("event store: {e}")))?
            .state;
        if order.cancel_requested {
            return Err(self
                .fail(
                    order_id,
                    reason::CANCELLED_BY_USER,
                    "the customer cancelled".into(),
                )
                .await);
        }
        Ok(())
    }
}

fn domain(error: OrderError) -> StepError {
    StepError::permanent(error.to_string())
}

fn transport(service: &str, status: &tonic::Status) -> StepError {
    StepError::retryable(format!("{service}: {}", status.message()))
}

fn proto_lines(lines: &[Line]) -> Vec<ProtoLine> {
    lines
        .iter()
        .map(|l| ProtoLine {
            product_id: l.product_id.clone(),
            quantity: l.quantity,
        })
        .collect()
}

fn retry() -> StepRetry {
    StepRetry::new(
        STEP_ATTEMPTS,
        Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(2),
            multiplier: 2.0,
            full_jitter: true,
        },
    )
}

fn must_finish() -> StepRetry {
    StepRetry::new(
        MUST_FINISH_ATTEMPTS,
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
            multiplier: 2.0,
            full_jitter: true,
        },
    )
}

/// Whether this attempt is the step's last.
fn last_attempt(step: &StepContext) -> bool {
    step.attempt() >= STEP_ATTEMPTS
}

macro_rules! step_fn {
    ($p:ident, |$ctx:ident, $step:ident| $body:block) => {{
        let $p = $p.clone();
        move |$ctx: &mut OrderSagaContext, $step: StepContext| {
            let $p = $p.clone();
            Box::pin(async move { $body })
        }
    }};
}

/// Every version of the saga definition over the participants ([`SAGA_VERSIONS`]).
pub(crate) fn definitions(
    p: &Participants,
) -> Result<Vec<SagaDefinition<OrderSagaContext>>, trellis_saga::SagaError> {
    SAGA_VERSIONS
        .iter()
        .map(|&version| definition(p, version))
        .collect()
}

/// An undo (a compensation) as the engine takes it; passing the closure through here gives
/// it that signature where it is written, before it is handed to [`guarded`].
fn undo<F>(undo: F) -> F
where
    F: for<'a> Fn(&'a mut OrderSagaContext, StepContext) -> trellis_saga::StepFuture<'a>
        + Send
        + Sync
        + 'static,
{
    undo
}

/// A step whose undo must also run when it fails for good. Version 1 carries the undo on a
/// no-op guard step before it (a failed step was not compensated then); later versions on the
/// step itself, with `compensate_on_failure`.
fn guarded<F>(
    builder: trellis_saga::SagaDefinitionBuilder<OrderSagaContext>,
    version: u32,
    step: Step<OrderSagaContext>,
    undo: F,
    pivot: bool,
) -> trellis_saga::SagaDefinitionBuilder<OrderSagaContext>
where
    F: for<'a> Fn(&'a mut OrderSagaContext, StepContext) -> trellis_saga::StepFuture<'a>
        + Send
        + Sync
        + 'static,
{
    let (builder, step) = if version == 1 {
        let guard = Step::new(
            format!("{}-guard", step.name()),
            |_ctx: &mut OrderSagaContext, _step: StepContext| Box::pin(async { Ok(()) }),
        )
        .compensate(undo)
        .retry(retry())
        .compensate_retry(must_finish())
        .timeout(STEP_TIMEOUT);
        (builder.step(guard), step)
    } else {
        (builder, step.compensate(undo).compensate_on_failure())
    };
    if pivot {
        builder.pivot_step(step)
    } else {
        builder.step(step)
    }
}

/// The saga definition over the participants, at `version`.
pub(crate) fn definition(
    p: &Participants,
    version: u32,
) -> Result<SagaDefinition<OrderSagaContext>, trellis_saga::SagaError> {
    let order = Step::new(
        "order",
        step_fn!(p, |ctx, step| {
            let saga_id = step.saga_id().to_string();
            p.order(&ctx.order_id, OrderCommand::AttachSaga(saga_id))
                .await
                .map(drop)
        }),
    )
    .compensate(step_fn!(p, |ctx, step| {
        // Only the saga driving the order may end it.
        let order = p.load(&ctx.order_id).await?;
        if order.saga_id.as_deref() != Some(step.saga_id().to_string().as_str()) {
            return Ok(());
        }
        p.order(
            &ctx.order_id,
            OrderCommand::Cancel {
                fallback: "cancelled".to_owned(),
            },
        )
        .await
        .map(drop)
    }))
    .retry(retry())
    .compensate_retry(must_finish())
    .timeout(STEP_TIMEOUT);

    // Releasing undoes a reservation by the order's key. It also runs when the inventory step
    // fails for good (the customer cancelled, or its last attempt got no answer): an earlier
    // attempt's Reserve may have held the stock with its answer lost (and a Reserve arriving
    // after the release is refused).
    let release = undo(step_fn!(p, |ctx, _step| {
        let request = OrderRef {
            order_id: ctx.order_id.clone(),
        };
        match p.inventory.clone().release(request).await {
            Ok(answer) if answer.get_ref().state == "released" => {
                p.record(&ctx.order_id, "inventory", "released").await
            }
            Ok(_) => Ok(()),
            Err(status) => Err(transport("inventory", &status)),
        }
    }));

    let inventory = Step::new(
        "inventory",
        step_fn!(p, |ctx, step| {
            p.check_cancel(&ctx.order_id).await?;
            let request = ReserveRequest {
                order_id: ctx.order_id.clone(),
                lines: proto_lines(&ctx.lines),
            };
            match p.inventory.clone().reserve(request).await {
                Ok(answer) if answer.get_ref().reserved => {
                    p.record(&ctx.order_id, "inventory", "reserved").await
                }
                Ok(answer) => {
                    let why = answer.into_inner().reason;
                    p.record(&ctx.order_id, "inventory", &why).await?;
                    Err(p.fail(&ctx.order_id, reason::OUT_OF_STOCK, why).await)
                }
                Err(status) if last_attempt(&step) => Err(p
                    .fail(
                        &ctx.order_id,
                        "inventory_unavailable",
                        status.message().to_owned(),
                    )
                    .await),
                Err(status) => Err(transport("inventory", &status)),
            }
        }),
    )
    .retry(retry())
    .compensate_retry(must_finish())
    .timeout(STEP_TIMEOUT);

    // Refunding reconciles with the provider by the order's key. It also runs when the payment
    // step fails for good: a charge that failed may still have captured (its answer lost), so
    // no cancelled order keeps a charge.
    let refund = undo(step_fn!(p, |ctx, _step| {
        if !p.safeguards.refund_on_compensation {
            return Ok(()); // the safeguard a test turns off
        }
        let request = OrderRef {
            order_id: ctx.order_id.clone(),
        };
        match p.payments.clone().refund(request).await {
            Ok(answer) => match answer.get_ref().status.as_str() {
                "refunded" => p.record(&ctx.order_id, "payment", "refunded").await,
                "none" => Ok(()),
                other => Err(StepError::retryable(format!("refund {other}"))),
            },
            Err(status) => Err(transport("payments", &status)),
        }
    }));

    let payment = Step::new(
        "payment",
        step_fn!(p, |ctx, step| {
            p.check_cancel(&ctx.order_id).await?;
            let request = ChargeRequest {
                order_id: ctx.order_id.clone(),
                user_id: ctx.user_id.clone(),
                amount_cents: ctx.total_cents,
            };
            match p.payments.clone().charge(request).await {
                Ok(answer) => {
                    let answer = answer.into_inner();
                    match answer.status.as_str() {
                        "captured" => p.record(&ctx.order_id, "payment", "captured").await,
                        "declined" => {
                            p.record(&ctx.order_id, "payment", "declined").await?;
                            Err(p
                                .fail(&ctx.order_id, reason::PAYMENT_DECLINED, answer.message)
                                .await)
                        }
                        _ if last_attempt(&step) => {
                            p.record(&ctx.order_id, "payment", "unavailable").await?;
                            Err(p
                                .fail(&ctx.order_id, reason::PAYMENT_UNAVAILABLE, answer.message)
                                .await)
                        }
                        other => Err(StepError::retryable(format!(
                            "payment {other}: {}",
                            answer.message
                        ))),
                    }
                }
                Err(status) if last_attempt(&step) => Err(p
                    .fail(
                        &ctx.order_id,
                        reason::PAYMENT_UNAVAILABLE,
                        status.message().to_owned(),
                    )
                    .await),
                Err(status) => Err(transport("payments", &status)),
            }
        }),
    )
    .retry(retry())
    .compensate_retry(must_finish())
    .timeout(STEP_TIMEOUT);

    // The shipping step is the pivot: when it fails for good its shipment may still exist (an
    // attempt's answer lost) or arrive later (a delayed request). Its compensation, which runs
    // only for that failure, cancels the shipment by the order's key, with the step's retries
    // (a cancellation before any shipment is recorded and refuses a late one).
    let cancel_shipment = undo(step_fn!(p, |ctx, _step| {
        let request = OrderRef {
            order_id: ctx.order_id.clone(),
        };
        match p.shipping.clone().cancel_shipment(request).await {
            Ok(answer) if answer.get_ref().status == "cancelled" => {
                p.record(&ctx.order_id, "shipping", "cancelled").await
            }
            // None was created; the cancellation is recorded against a late create.
            Ok(answer) if answer.get_ref().status == "none" => Ok(()),
            Ok(answer) => Err(StepError::retryable(format!(
                "shipment is {}",
                answer.get_ref().status
            ))),
            Err(status) => Err(transport("shipping", &status)),
        }
    }));

    let shipping = Step::new(
        "shipping",
        step_fn!(p, |ctx, step| {
            match p.order(&ctx.order_id, OrderCommand::StartShipping).await {
                Err(_) if p.load(&ctx.order_id).await?.cancel_requested => {
                    return Err(p
                        .fail(
                            &ctx.order_id,
                            reason::CANCELLED_BY_USER,
                            "the customer cancelled".into(),
                        )
                        .await);
                }
                other => other.map(drop)?,
            }
            let request = CreateShipmentRequest {
                order_id: ctx.order_id.clone(),
                user_id: ctx.user_id.clone(),
                lines: proto_lines(&ctx.lines),
            };
            match p.shipping.clone().create_shipment(request).await {
                Ok(answer) if answer.get_ref().status == "created" => {
                    p.record(&ctx.order_id, "shipping", "created").await
                }
                Ok(answer) => Err(StepError::permanent(format!(
                    "shipment is {}",
                    answer.get_ref().status
                ))),
                Err(status) if last_attempt(&step) => {
                    // The shipment may exist with its answer lost: the step's own
                    // compensation cancels it.
                    Err(p
                        .fail(
                            &ctx.order_id,
                            reason::SHIPPING_FAILED,
                            status.message().to_owned(),
                        )
                        .await)
                }
                Err(status) => Err(transport("shipping", &status)),
            }
        }),
    )
    .retry(retry())
    .compensate_retry(must_finish())
    .timeout(STEP_TIMEOUT);

    // Committing the stock and confirming the order are one step after the pivot: both are
    // idempotent, and one step is two saga-log writes fewer per order.
    let complete = Step::new(
        "complete",
        step_fn!(p, |ctx, _step| {
            let request = OrderRef {
                order_id: ctx.order_id.clone(),
            };
            match p.inventory.clone().commit(request).await {
                Ok(_) => p.record(&ctx.order_id, "inventory", "committed").await?,
                Err(status) => return Err(transport("inventory", &status)),
            }
            p.order(&ctx.order_id, OrderCommand::Confirm)
                .await
                .map(drop)
        }),
    )
    .retry(must_finish())
    .timeout(STEP_TIMEOUT);

    let builder = SagaDefinition::builder(SAGA_NAME, version).step(order);
    let builder = guarded(builder, version, inventory, release, false);
    let builder = guarded(builder, version, payment, refund, false);
    let builder = guarded(builder, version, shipping, cancel_shipment, true);
    builder.step(complete).build()
}
