//! A property test: random sequences of reserve, release, commit and set-stock calls agree
//! with a simple in-memory model, and the stock invariants hold after every call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use shop_contracts::proto::inventory_client::InventoryClient;
use shop_contracts::proto::{GetStockRequest, SetStockRequest};
use tonic::Code;

use crate::helpers::{Service, order, reserve_request};

const PRODUCTS: usize = 3;
const ORDERS: usize = 4;

#[derive(Debug, Clone)]
enum Op {
    Reserve(usize, Vec<(usize, i64)>),
    Release(usize),
    Commit(usize),
    SetStock(usize, i64),
}

fn op() -> impl Strategy<Value = Op> {
    let lines =
        proptest::collection::vec(proptest::option::of(1_i64..=5), PRODUCTS).prop_map(|qs| {
            let lines: Vec<(usize, i64)> = qs
                .into_iter()
                .enumerate()
                .filter_map(|(p, q)| q.map(|q| (p, q)))
                .collect();
            if lines.is_empty() {
                vec![(0, 1)]
            } else {
                lines
            }
        });
    prop_oneof![
        3 => (0..ORDERS, lines).prop_map(|(o, l)| Op::Reserve(o, l)),
        1 => (0..ORDERS).prop_map(Op::Release),
        1 => (0..ORDERS).prop_map(Op::Commit),
        2 => (0..PRODUCTS, 0_i64..=12).prop_map(|(p, t)| Op::SetStock(p, t)),
    ]
}

/// `(product index, quantity)` per line.
type Lines = Vec<(usize, i64)>;

#[derive(Debug, Default)]
struct Model {
    total: [i64; PRODUCTS],
    reserved: [i64; PRODUCTS],
    /// Per order: its state and its lines.
    orders: HashMap<usize, (&'static str, Lines)>,
}

fn fail(message: String) -> TestCaseError {
    TestCaseError::fail(message)
}

/// Runs one sequence with ids unique to `case`, checking each answer and the stock after it.
async fn run(
    client: &mut InventoryClient<crate::helpers::Grpc>,
    case: usize,
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    let product = |p: usize| format!("c{case}-p{p}");
    let order_id = |o: usize| format!("c{case}-o{o}");
    let mut model = Model::default();
    for (step, op) in ops.into_iter().enumerate() {
        let context = format!("step {step}: {op:?}");
        match &op {
            Op::Reserve(o, lines) => {
                let names: Vec<String> = lines.iter().map(|(p, _)| product(*p)).collect();
                let pairs: Vec<(&str, i64)> = names
                    .iter()
                    .map(String::as_str)
                    .zip(lines.iter().map(|l| l.1))
                    .collect();
                let answer = client.reserve(reserve_request(&order_id(*o), &pairs)).await;
                // Ok(reserved?) or the gRPC code of a refusal.
                let expected: Result<bool, Code> = match model.orders.get(o) {
                    // Released before it was ever reserved: refused.
                    Some((state, recorded)) if *state == "released" && recorded.is_empty() => {
                        Err(Code::FailedPrecondition)
                    }
                    Some((_, recorded)) if recorded != lines => Err(Code::AlreadyExists),
                    Some((state, _)) => match *state {
                        "rejected" => Ok(false),
                        "released" => Err(Code::FailedPrecondition),
                        _ => Ok(true),
                    },
                    None => {
                        let fits = lines
                            .iter()
                            .all(|(p, q)| model.total[*p] - model.reserved[*p] >= *q);
                        if fits {
                            for (p, q) in lines {
                                model.reserved[*p] += q;
                            }
                        }
                        model.orders.insert(
                            *o,
                            (if fits { "reserved" } else { "rejected" }, lines.clone()),
                        );
                        Ok(fits)
                    }
                };
                let answer = answer
                    .map(|a| a.into_inner().reserved)
                    .map_err(|status| status.code());
                prop_assert_eq!(answer, expected, "{}", context);
            }
            Op::Release(o) => {
                let state = client
                    .release(order(&order_id(*o)))
                    .await
                    .map_err(|e| fail(format!("{context}: {e}")))?
                    .into_inner()
                    .state;
                let expected = match model.orders.get_mut(o) {
                    Some((state, lines)) if *state == "reserved" => {
                        for (p, q) in lines.iter() {
                            model.reserved[*p] -= q;
                        }
                        *state = "released";
                        "released"
                    }
                    Some((state, _)) => *state,
                    // An unknown order is recorded as released: a later Reserve is refused.
                    None => {
                        model.orders.insert(*o, ("released", Vec::new()));
                        "released"
                    }
                };
                prop_assert_eq!(state.as_str(), expected, "{}", context);
            }
            Op::Commit(o) => {
                let answer = client.commit(order(&order_id(*o))).await;
                match model.orders.get_mut(o) {
                    Some((state, lines)) if *state == "reserved" => {
                        for (p, q) in lines.iter() {
                            model.reserved[*p] -= q;
                            model.total[*p] -= q;
                        }
                        *state = "committed";
                        let state = answer
                            .map_err(|e| fail(format!("{context}: {e}")))?
                            .into_inner()
                            .state;
                        prop_assert_eq!(state.as_str(), "committed", "{}", context);
                    }
                    Some((state, _)) if *state == "committed" => {
                        let state = answer
                            .map_err(|e| fail(format!("{context}: {e}")))?
                            .into_inner()
                            .state;
                        prop_assert_eq!(state.as_str(), "committed", "{}", context);
                    }
                    Some(_) => {
                        let code = answer.err().map(|e| e.code());
                        prop_assert_eq!(code, Some(Code::FailedPrecondition), "{}", context);
                    }
                    None => {
                        let code = answer.err().map(|e| e.code());
                        prop_assert_eq!(code, Some(Code::NotFound), "{}", context);
                    }
                }
            }
            Op::SetStock(p, total) => {
                let answer = client
                    .set_stock(SetStockRequest {
                        product_id: product(*p),
                        total: *total,
                    })
                    .await;
                if *total < model.reserved[*p] {
                    let code = answer.err().map(|e| e.code());
                    prop_assert_eq!(code, Some(Code::FailedPrecondition), "{}", context);
                } else {
                    answer.map_err(|e| fail(format!("{context}: {e}")))?;
                    model.total[*p] = *total;
                }
            }
        }
        let stock = client
            .get_stock(GetStockRequest {
                product_ids: (0..PRODUCTS).map(product).collect(),
            })
            .await
            .map_err(|e| fail(format!("{context}: GetStock: {e}")))?
            .into_inner()
            .stock;
        for (p, s) in stock.iter().enumerate() {
            prop_assert!(
                0 <= s.reserved && s.reserved <= s.total,
                "{}: {:?}",
                context,
                s
            );
            prop_assert_eq!(s.reserved + s.available, s.total, "{}", context);
            prop_assert_eq!(
                (s.total, s.reserved),
                (model.total[p], model.reserved[p]),
                "{}: product {}",
                context,
                p
            );
        }
    }
    Ok(())
}

fn check_against_model(runtime: &tokio::runtime::Runtime, service: &Service, cases: u32) {
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let case = AtomicUsize::new(0);
    let strategy = proptest::collection::vec(op(), 1..30);
    let result = runner.run(&strategy, |ops| {
        let n = case.fetch_add(1, Ordering::Relaxed);
        runtime.block_on(async {
            let mut client = service.grpc();
            run(&mut client, n, ops).await
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn random_sequences_agree_with_the_model_on_sqlite() {
    let runtime = runtime();
    let service = runtime.block_on(crate::helpers::sqlite()).expect("sqlite");
    check_against_model(&runtime, &service, 48);
    runtime.block_on(async move { drop(service) });
}

#[test]
fn random_sequences_agree_with_the_model_on_postgres() {
    let runtime = runtime();
    let Some(service) = runtime.block_on(crate::helpers::postgres("inventory_model")) else {
        return;
    };
    check_against_model(&runtime, &service, 24);
    runtime.block_on(async move { drop(service) });
}
