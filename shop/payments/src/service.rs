//! The rules: charge at most once per order, refund at most once, settle unknown outcomes.

use std::time::Duration;

use shop_contracts::proto::payments_server::Payments;
use shop_contracts::proto::{
    ChargeRequest, ChargeResponse, OrderRef, PaymentState, RefundResponse,
};
use tonic::{Request, Response, Status};
use trellis_service::Db;

use crate::locks::{LockError, OrderLocks};
use crate::provider::{CallError, ChargeOutcome, ProviderClient, RefundOutcome};
use crate::store::{self, Status as Recorded};

/// Longest order or user id, in bytes.
pub const ID_BYTES_MAX: usize = 128;
/// Largest amount one order may be charged, in cents.
pub const AMOUNT_CENTS_MAX: i64 = 1_000_000_000_000;
/// How long a call waits for another call on the same order to finish.
const ORDER_LOCK_WAIT: Duration = Duration::from_secs(10);

/// The gRPC `Payments` service.
#[derive(Debug, Clone)]
pub(crate) struct PaymentsService {
    pub(crate) db: Db,
    pub(crate) provider: ProviderClient,
    pub(crate) locks: OrderLocks,
}

fn check_id(field: &str, value: &str) -> Result<(), Status> {
    if value.trim().is_empty() || value.len() > ID_BYTES_MAX {
        return Err(Status::invalid_argument(format!(
            "{field} must be 1 to {ID_BYTES_MAX} bytes"
        )));
    }
    Ok(())
}

fn db_error(e: sqlx::Error) -> Status {
    tracing::error!(error = %e, "payments database error");
    Status::unavailable("the payments database failed")
}

fn charge_answer(
    status: &str,
    payment_id: Option<&str>,
    message: impl Into<String>,
) -> ChargeResponse {
    metrics::counter!("shop_payments_charges_total", "outcome" => status.to_owned()).increment(1);
    ChargeResponse {
        status: status.to_owned(),
        payment_id: payment_id.unwrap_or_default().to_owned(),
        message: message.into(),
    }
}

fn refund_answer(status: &'static str) -> RefundResponse {
    metrics::counter!("shop_payments_refunds_total", "outcome" => status).increment(1);
    RefundResponse {
        status: status.to_owned(),
    }
}

impl PaymentsService {
    async fn lock(&self, order_id: &str) -> Result<crate::locks::OrderGuard, Status> {
        self.locks
            .lock(order_id, ORDER_LOCK_WAIT)
            .await
            .map_err(|e| match e {
                LockError::Busy => Status::unavailable(format!(
                    "another call for order {order_id} is still in progress"
                )),
                LockError::Full => Status::resource_exhausted("too many payments in progress"),
                LockError::Database => Status::unavailable("the payments database failed"),
            })
    }

    pub(crate) async fn charge_order(
        &self,
        request: ChargeRequest,
    ) -> Result<ChargeResponse, Status> {
        check_id("order_id", &request.order_id)?;
        check_id("user_id", &request.user_id)?;
        if !(1..=AMOUNT_CENTS_MAX).contains(&request.amount_cents) {
            return Err(Status::invalid_argument(format!(
                "amount_cents must be between 1 and {AMOUNT_CENTS_MAX}"
            )));
        }
        let order_id = request.order_id.as_str();
        let _guard = self.lock(order_id).await?;
        // The row is written before the provider is called, so a crash after the call leaves a
        // `pending` order that Refund settles.
        let created = store::insert_if_absent(
            &self.db,
            order_id,
            &request.user_id,
            request.amount_cents,
            Recorded::Pending,
        )
        .await
        .map_err(db_error)?;
        // A new row is what was just written; an existing one is read.
        let payment = if created {
            store::Payment {
                order_id: order_id.to_owned(),
                user_id: request.user_id.clone(),
                amount_cents: request.amount_cents,
                status: Recorded::Pending,
                provider_charge_id: None,
                updated_at: String::new(),
            }
        } else {
            store::get(&self.db, order_id)
                .await
                .map_err(db_error)?
                .ok_or_else(|| Status::internal("the payment row vanished"))?
        };
        match payment.status {
            Recorded::Captured => {
                return Ok(charge_answer(
                    "captured",
                    payment.provider_charge_id.as_deref(),
                    "captured earlier",
                ));
            }
            Recorded::Declined => {
                return Ok(charge_answer("declined", None, "declined earlier"));
            }
            Recorded::Refunded => {
                return Err(Status::failed_precondition(format!(
                    "order {order_id}'s payment was cancelled; it is not charged again"
                )));
            }
            Recorded::Pending | Recorded::Unavailable | Recorded::Failed => {}
        }
        if payment.amount_cents != request.amount_cents {
            return Err(Status::failed_precondition(format!(
                "order {order_id} is being charged {} cents, not {}",
                payment.amount_cents, request.amount_cents
            )));
        }
        // Whether no earlier call for this order may have reached the provider: the row is new,
        // or every earlier call was proven not to (`failed`). A `pending` row this call did not
        // create may be left by a call that crashed in flight, so its outcome stays unknown.
        let mut untouched = created;
        if payment.status == Recorded::Failed {
            // `pending` while this call is in flight, so a crash leaves an unknown outcome.
            untouched = store::transition(
                &self.db,
                order_id,
                &[Recorded::Failed],
                Recorded::Pending,
                None,
            )
            .await
            .map_err(db_error)?;
        }
        let unsettled = [Recorded::Pending, Recorded::Unavailable, Recorded::Failed];
        match self.provider.charge(order_id, request.amount_cents).await {
            Ok(ChargeOutcome::Charged(charge)) if charge.status == "refunded" => {
                store::transition(
                    &self.db,
                    order_id,
                    &unsettled,
                    Recorded::Refunded,
                    Some(&charge.id),
                )
                .await
                .map_err(db_error)?;
                Err(Status::failed_precondition(format!(
                    "order {order_id}'s charge {} was refunded",
                    charge.id
                )))
            }
            Ok(ChargeOutcome::Charged(charge)) => {
                store::transition(
                    &self.db,
                    order_id,
                    &unsettled,
                    Recorded::Captured,
                    Some(&charge.id),
                )
                .await
                .map_err(db_error)?;
                Ok(charge_answer("captured", Some(&charge.id), "captured"))
            }
            Ok(ChargeOutcome::Declined(message)) => {
                store::transition(&self.db, order_id, &unsettled, Recorded::Declined, None)
                    .await
                    .map_err(db_error)?;
                Ok(charge_answer("declined", None, message))
            }
            Err(error) if untouched && !error.may_have_reached() => {
                // Nothing reached the provider, now or before: nothing was captured, and a
                // Refund can settle the order without asking the provider.
                store::transition(
                    &self.db,
                    order_id,
                    &[Recorded::Pending],
                    Recorded::Failed,
                    None,
                )
                .await
                .map_err(db_error)?;
                Ok(charge_answer(
                    "unavailable",
                    None,
                    format!("{error} (nothing was charged)"),
                ))
            }
            Err(error) => {
                if let CallError::Unexpected(message) = &error {
                    tracing::error!(order_id, %message, "payment provider answered unexpectedly");
                }
                // The provider may have captured: the outcome stays unknown until settled.
                store::transition(
                    &self.db,
                    order_id,
                    &[Recorded::Pending, Recorded::Failed],
                    Recorded::Unavailable,
                    None,
                )
                .await
                .map_err(db_error)?;
                Ok(charge_answer("unavailable", None, error.to_string()))
            }
        }
    }

    pub(crate) async fn refund_order(&self, order_id: &str) -> Result<RefundResponse, Status> {
        check_id("order_id", order_id)?;
        let _guard = self.lock(order_id).await?;
        let Some(payment) = store::get(&self.db, order_id).await.map_err(db_error)? else {
            // Never charged here. Record the cancellation so a late Charge cannot capture.
            store::insert_if_absent(&self.db, order_id, "", 0, Recorded::Refunded)
                .await
                .map_err(db_error)?;
            return Ok(refund_answer("none"));
        };
        let charge_id = match payment.status {
            Recorded::Refunded if payment.provider_charge_id.is_some() => {
                return Ok(refund_answer("refunded"));
            }
            Recorded::Refunded | Recorded::Declined => return Ok(refund_answer("none")),
            Recorded::Failed => {
                // No Charge reached the provider: nothing to refund, even while it is down.
                // Recorded as cancelled, so a late Charge cannot capture.
                let settled = store::transition(
                    &self.db,
                    order_id,
                    &[Recorded::Failed],
                    Recorded::Refunded,
                    None,
                )
                .await
                .map_err(db_error)?;
                // Changed meanwhile (another process charging it): not settled, try later.
                return Ok(refund_answer(if settled { "none" } else { "unavailable" }));
            }
            Recorded::Captured => match payment.provider_charge_id {
                Some(id) => id,
                None => return Err(Status::internal("a captured payment without a charge id")),
            },
            Recorded::Pending | Recorded::Unavailable => {
                // The outcome is unknown: the provider may have captured and the answer been
                // lost. Ask it what happened under the order's key.
                let found = match self.provider.find_charge(order_id).await {
                    Ok(found) => found,
                    Err(error) => {
                        tracing::warn!(order_id, %error, "cannot settle an unknown payment outcome yet");
                        return Ok(refund_answer("unavailable"));
                    }
                };
                let unsettled = [Recorded::Pending, Recorded::Unavailable];
                match found {
                    None => {
                        store::transition(&self.db, order_id, &unsettled, Recorded::Refunded, None)
                            .await
                            .map_err(db_error)?;
                        return Ok(refund_answer("none"));
                    }
                    Some(charge) if charge.status == "declined" => {
                        store::transition(&self.db, order_id, &unsettled, Recorded::Declined, None)
                            .await
                            .map_err(db_error)?;
                        return Ok(refund_answer("none"));
                    }
                    Some(charge) if charge.status == "refunded" => {
                        store::transition(
                            &self.db,
                            order_id,
                            &unsettled,
                            Recorded::Refunded,
                            Some(&charge.id),
                        )
                        .await
                        .map_err(db_error)?;
                        return Ok(refund_answer("refunded"));
                    }
                    Some(charge) => {
                        // Captured: record it before refunding, so a crash in between leaves a
                        // `captured` row that the next Refund refunds.
                        store::transition(
                            &self.db,
                            order_id,
                            &unsettled,
                            Recorded::Captured,
                            Some(&charge.id),
                        )
                        .await
                        .map_err(db_error)?;
                        charge.id
                    }
                }
            }
        };
        match self.provider.refund(order_id, &charge_id).await {
            Ok(RefundOutcome::Refunded) => {
                store::transition(
                    &self.db,
                    order_id,
                    &[Recorded::Captured],
                    Recorded::Refunded,
                    None,
                )
                .await
                .map_err(db_error)?;
                Ok(refund_answer("refunded"))
            }
            Ok(RefundOutcome::NotCaptured) => {
                store::transition(
                    &self.db,
                    order_id,
                    &[Recorded::Captured],
                    Recorded::Declined,
                    None,
                )
                .await
                .map_err(db_error)?;
                Ok(refund_answer("none"))
            }
            Err(error) => {
                tracing::warn!(order_id, %error, "refund not done yet");
                Ok(refund_answer("unavailable"))
            }
        }
    }
}

#[tonic::async_trait]
impl Payments for PaymentsService {
    async fn charge(
        &self,
        request: Request<ChargeRequest>,
    ) -> Result<Response<ChargeResponse>, Status> {
        self.charge_order(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn refund(&self, request: Request<OrderRef>) -> Result<Response<RefundResponse>, Status> {
        self.refund_order(&request.into_inner().order_id)
            .await
            .map(Response::new)
    }

    async fn get_payment(
        &self,
        request: Request<OrderRef>,
    ) -> Result<Response<PaymentState>, Status> {
        let order_id = request.into_inner().order_id;
        check_id("order_id", &order_id)?;
        let state = match store::get(&self.db, &order_id).await.map_err(db_error)? {
            None => PaymentState {
                status: "none".to_owned(),
                ..PaymentState::default()
            },
            Some(payment) => PaymentState {
                status: payment.status.as_str().to_owned(),
                amount_cents: payment.amount_cents,
                provider_charge_id: payment.provider_charge_id.unwrap_or_default(),
            },
        };
        Ok(Response::new(state))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(check_id("order_id", "o-1").is_ok());
        assert_eq!(
            check_id("order_id", " ").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert!(check_id("order_id", &"x".repeat(ID_BYTES_MAX + 1)).is_err());
    }
}
