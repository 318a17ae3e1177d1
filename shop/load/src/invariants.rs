//! DESIGN.md's invariants, checked through the admin API once the orders have settled:
//! payments and shipments agree with each order's outcome, and stock adds up.

use std::collections::BTreeSet;

use shop_contracts::api::StockView;
use tokio::task::JoinSet;

use crate::client::{Api, Failure, segment};
use crate::driver::{Placed, Settled};
use crate::report::Invariants;

/// Admin reads in flight at once.
const CHECK_CONCURRENCY: usize = 16;

/// The `status` of a payment or shipment (`GET /api/payments/{id}`, `/api/shipments/{id}`).
#[derive(serde::Deserialize)]
struct StatusOnly {
    status: String,
}

/// What one check found: `(subject, id, reason)` per violation.
type Found = Vec<(&'static str, String, String)>;

/// The status of a payment or shipment; `None` on 404.
async fn status_of(api: &Api, token: &str, path: String) -> Result<Option<String>, Failure> {
    let answer = api.get(&path, &[], Some(token)).await?;
    if answer.status == 404 {
        return Ok(None);
    }
    answer.json::<StatusOnly>(&[200]).map(|s| Some(s.status))
}

async fn check_order(api: Api, token: String, id: String, state: Settled) -> Found {
    let mut found = Found::new();
    let payment = status_of(&api, &token, format!("/api/payments/{}", segment(&id))).await;
    let shipment = status_of(&api, &token, format!("/api/shipments/{}", segment(&id))).await;
    let mut violate = |reason: String| found.push(("order", id.clone(), reason));
    match state {
        Settled::Confirmed => {
            match payment {
                Ok(Some(s)) if s == "captured" => {}
                Ok(Some(s)) => violate(format!(
                    "CONFIRMED but payment status is {s:?}, not \"captured\""
                )),
                Ok(None) => violate("CONFIRMED but has no payment (404)".into()),
                Err(f) => violate(format!("CONFIRMED; payment could not be read: {f}")),
            }
            match shipment {
                Ok(Some(s)) if s == "created" => {}
                Ok(Some(s)) => violate(format!(
                    "CONFIRMED but shipment status is {s:?}, not \"created\""
                )),
                Ok(None) => violate("CONFIRMED but has no shipment (404)".into()),
                Err(f) => violate(format!("CONFIRMED; shipment could not be read: {f}")),
            }
        }
        Settled::Cancelled(_) => {
            match payment {
                Ok(None) => {}
                Ok(Some(s))
                    if matches!(s.as_str(), "none" | "declined" | "refunded" | "unavailable") => {}
                Ok(Some(s)) => violate(format!(
                    "CANCELLED but payment status is {s:?} (a net charge)"
                )),
                Err(f) => violate(format!("CANCELLED; payment could not be read: {f}")),
            }
            match shipment {
                Ok(None) => {}
                Ok(Some(s)) if matches!(s.as_str(), "cancelled" | "none") => {}
                Ok(Some(s)) => violate(format!(
                    "CANCELLED but shipment status is {s:?} (still live)"
                )),
                Err(f) => violate(format!("CANCELLED; shipment could not be read: {f}")),
            }
        }
        // Reported already by the settle step.
        Settled::Pending | Settled::Missing => {}
    }
    found
}

async fn check_product(api: Api, token: String, id: String, all_terminal: bool) -> Found {
    let mut found = Found::new();
    let mut violate = |reason: String| found.push(("product", id.clone(), reason));
    let stock: StockView = match api
        .get(
            &format!("/api/inventory/{}", segment(&id)),
            &[],
            Some(&token),
        )
        .await
        .and_then(|a| a.json(&[200]))
    {
        Ok(stock) => stock,
        Err(f) => {
            violate(format!("stock could not be read: {f}"));
            return found;
        }
    };
    let StockView {
        total,
        reserved,
        available,
        ..
    } = stock;
    if total < 0 {
        violate(format!("total {total} is negative"));
    }
    if reserved < 0 {
        violate(format!("reserved {reserved} is negative"));
    }
    if available < 0 {
        violate(format!("available {available} is negative"));
    }
    if reserved.checked_add(available) != Some(total) {
        violate(format!(
            "reserved {reserved} + available {available} != total {total}"
        ));
    }
    if all_terminal && reserved != 0 {
        violate(format!(
            "reserved {reserved} != 0 although every order is terminal (held stock)"
        ));
    }
    found
}

/// Runs the admin checks of every terminal order and every product ordered, adding what it
/// finds to `inv`. `all_terminal` enables "nothing reserved once every order is terminal"
/// (which assumes no other client is ordering meanwhile).
pub(crate) async fn check(
    api: &Api,
    admin_token: &str,
    placed: &[Placed],
    settled: &[Settled],
    products: &BTreeSet<String>,
    all_terminal: bool,
    inv: &mut Invariants,
) {
    inv.admin_checked = true;
    inv.products_checked = products.len() as u64;
    let mut jobs = placed
        .iter()
        .zip(settled)
        .filter(|(_, s)| s.is_terminal())
        .map(|(p, s)| Job::Order(p.id.clone(), s.clone()))
        .chain(products.iter().map(|p| Job::Product(p.clone())));
    let mut tasks = JoinSet::new();
    let mut results: Vec<(usize, Found)> = Vec::new();
    let mut next = 0usize;
    loop {
        while tasks.len() < CHECK_CONCURRENCY {
            let Some(job) = jobs.next() else { break };
            let (api, token, i) = (api.clone(), admin_token.to_owned(), next);
            next += 1;
            tasks.spawn(async move {
                let found = match job {
                    Job::Order(id, state) => check_order(api, token, id, state).await,
                    Job::Product(id) => check_product(api, token, id, all_terminal).await,
                };
                (i, found)
            });
        }
        let Some(joined) = tasks.join_next().await else {
            break;
        };
        match joined {
            Ok(result) => results.push(result),
            Err(e) => inv.violate("check", "-", format!("a check task failed: {e}")),
        }
    }
    // Report in a stable order: orders as placed, then products by id.
    results.sort_by_key(|(i, _)| *i);
    for (subject, id, reason) in results.into_iter().flat_map(|(_, f)| f) {
        inv.violate(subject, &id, reason);
    }
}

enum Job {
    Order(String, Settled),
    Product(String),
}
