//! The DESIGN.md invariants, checked on a settled run: the orders' states, the saga log, and
//! the participants' and provider's durable state and effect counts.

use std::collections::BTreeMap;

use shop_contracts::api::OrderStatus;
use shop_orders::aggregate::{Line, Order};
use trellis_saga::SagaStatus;

use crate::host::{Facts, Service};

/// An order the run placed (or meant to).
#[derive(Debug, Clone)]
pub(crate) struct PlacedOrder {
    pub(crate) id: String,
    pub(crate) user_id: String,
    pub(crate) lines: Vec<Line>,
    pub(crate) placed: bool,
}

/// How one saga ended.
#[derive(Debug, Clone)]
pub(crate) struct SagaEnd {
    pub(crate) order_id: String,
    pub(crate) saga_id: String,
    pub(crate) status: SagaStatus,
}

/// Every invariant; each violation is one line pushed to `violations`.
pub(crate) fn all(
    orders: &[PlacedOrder],
    states: &BTreeMap<String, Order>,
    sagas: &[SagaEnd],
    facts: &Facts,
    initial_stock: &BTreeMap<String, i64>,
    violations: &mut Vec<String>,
) {
    let mut v = |line: String| violations.push(line);

    // No saga stuck after recovery (and the operator's retry once faults ended).
    for saga in sagas {
        if !matches!(saga.status, SagaStatus::Completed | SagaStatus::Failed) {
            v(format!(
                "saga {} of order {} ended {:?}",
                saga.saga_id, saga.order_id, saga.status
            ));
        }
    }

    // Effects applied at most once per order.
    let mut counts: BTreeMap<(Service, &str, &str), u32> = BTreeMap::new();
    for (service, order, effect) in &facts.effects {
        *counts.entry((*service, order, effect)).or_default() += 1;
    }
    for ((service, order, effect), count) in &counts {
        // A payment row may go pending → failed → pending (a repeated Charge of a failed
        // order tries again); captures and refunds happen once.
        let once = match service {
            Service::Payments => effect.ends_with("captured") || effect.ends_with("refunded"),
            _ => true,
        };
        if once && *count > 1 {
            v(format!(
                "{} applied {effect:?} {count} times for order {order}",
                service.name()
            ));
        }
    }
    let mut captures_recorded: BTreeMap<&str, u32> = BTreeMap::new();
    for (service, order, effect) in &facts.effects {
        if *service == Service::Payments && effect.ends_with("captured") {
            *captures_recorded.entry(order).or_default() += 1;
        }
    }
    for (order, count) in &captures_recorded {
        if *count > 1 {
            v(format!(
                "payments recorded {count} captures for order {order}"
            ));
        }
    }

    // The provider: one capture per key, one refund per charge.
    for (key, charges) in &facts.charges {
        let captured = charges.iter().filter(|c| c.status != "declined").count();
        if captured > 1 {
            v(format!(
                "the provider captured {captured} times for order {key}"
            ));
        }
    }
    for (charge, refunds) in &facts.refunds {
        if *refunds > 1 {
            v(format!("charge {charge} refunded {refunds} times"));
        }
    }

    // Each order: terminal, and the participants agree with how it ended.
    for order in orders.iter().filter(|o| o.placed) {
        let id = order.id.as_str();
        let Some(state) = states.get(id) else {
            v(format!("order {id} is missing"));
            continue;
        };
        let held_charges = facts
            .charges
            .get(id)
            .map_or(0, |c| c.iter().filter(|c| c.status == "captured").count());
        let payment = facts.payments.get(id).map(|p| p.0.as_str());
        let shipment = facts.shipments.get(id).map(|s| s.1.as_str());
        let reservation = facts.reservations.get(id).map(|r| r.0.as_str());
        let completed = sagas
            .iter()
            .filter(|s| s.order_id == id && s.status == SagaStatus::Completed)
            .count();
        match state.status() {
            OrderStatus::Confirmed => {
                if held_charges != 1 || payment != Some("captured") {
                    v(format!(
                        "confirmed order {id}: {held_charges} capture(s) held at the provider, payment row {payment:?}"
                    ));
                }
                if shipment != Some("created") {
                    v(format!("confirmed order {id}: shipment {shipment:?}"));
                }
                if reservation != Some("committed") {
                    v(format!("confirmed order {id}: reservation {reservation:?}"));
                }
                if completed != 1 {
                    v(format!("confirmed order {id}: {completed} completed sagas"));
                }
            }
            OrderStatus::Cancelled => {
                if held_charges != 0 {
                    v(format!(
                        "cancelled order {id} ({:?}): {held_charges} capture(s) not refunded",
                        state.reason
                    ));
                }
                if payment == Some("captured") {
                    v(format!("cancelled order {id}: payment row still captured"));
                }
                if shipment.is_some_and(|s| s != "cancelled") {
                    v(format!("cancelled order {id}: live shipment {shipment:?}"));
                }
                if matches!(reservation, Some("reserved" | "committed")) {
                    v(format!(
                        "cancelled order {id} ({:?}): stock still {reservation:?}",
                        state.reason
                    ));
                }
                if completed != 0 {
                    v(format!("cancelled order {id}: a saga completed"));
                }
            }
            status => v(format!(
                "order {id} is {status:?} after quiescence (saga {:?})",
                state.saga_id
            )),
        }
    }

    // Stock: reserved + available = total (available = total - reserved, never negative),
    // the ledger adds up, and nothing is held once every order ended.
    for (product, &initial) in initial_stock {
        let (total, reserved) = facts.stock.get(product).copied().unwrap_or_default();
        let mut held = 0;
        let mut sold = 0;
        for (state, lines) in facts.reservations.values() {
            for (p, quantity) in lines {
                if p == product {
                    match state.as_str() {
                        "reserved" => held += quantity,
                        "committed" => sold += quantity,
                        _ => {}
                    }
                }
            }
        }
        if reserved < 0 || reserved > total || total < 0 {
            v(format!("{product}: total {total}, reserved {reserved}"));
        }
        if reserved != held {
            v(format!(
                "{product}: reserved {reserved} but reservations hold {held}"
            ));
        }
        if total != initial - sold {
            v(format!(
                "{product}: total {total} but {initial} stocked and {sold} sold"
            ));
        }
        if reserved != 0 {
            v(format!(
                "{product}: {reserved} unit(s) still reserved once every order ended"
            ));
        }
    }
}
