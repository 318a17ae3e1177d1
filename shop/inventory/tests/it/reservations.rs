//! Reserve, Release, Commit and SetStock over gRPC: no overselling under concurrency,
//! all-or-nothing lines, idempotent repeats.

use tonic::Code;

use crate::helpers::{Service, level, order, reserve_request, set_stock};
use crate::on_both;

/// 50 concurrent one-unit reservations against 10 units: exactly 10 succeed, the rest are
/// refused as out of stock, and the counts add up.
async fn concurrent_reserves_never_oversell(service: Service) {
    let mut client = service.grpc();
    set_stock(&mut client, "p-hot", 10).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let mut client = service.grpc();
        tasks.push(tokio::spawn(async move {
            client
                .reserve(reserve_request(&format!("order-{i}"), &[("p-hot", 1)]))
                .await
                .expect("Reserve answers")
                .into_inner()
        }));
    }
    let mut reserved = 0;
    for task in tasks {
        let answer = task.await.expect("task");
        if answer.reserved {
            reserved += 1;
        } else {
            assert_eq!(answer.reason, "out_of_stock");
        }
    }
    assert_eq!(reserved, 10);
    let (total, held, available) = level(&mut client, "p-hot").await;
    assert_eq!((total, held, available), (10, 10, 0));
    assert_eq!(held + available, total);
}
on_both!(concurrent_reserves_never_oversell);

/// Repeating Reserve, Release and Commit changes nothing after the first call.
async fn repeats_are_no_ops(service: Service) {
    let mut client = service.grpc();
    set_stock(&mut client, "p", 5).await;

    for _ in 0..3 {
        let answer = client
            .reserve(reserve_request("o1", &[("p", 2)]))
            .await
            .unwrap()
            .into_inner();
        assert!(answer.reserved);
    }
    assert_eq!(level(&mut client, "p").await, (5, 2, 3));

    // A refusal is recorded: more stock later does not change the answer to a repeat.
    let refused = client
        .reserve(reserve_request("o2", &[("p", 10)]))
        .await
        .unwrap()
        .into_inner();
    assert!(!refused.reserved);
    assert_eq!(refused.reason, "out_of_stock");
    set_stock(&mut client, "p", 20).await;
    let again = client
        .reserve(reserve_request("o2", &[("p", 10)]))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.reserved);
    assert_eq!(level(&mut client, "p").await, (20, 2, 18));

    for _ in 0..3 {
        let state = client
            .release(order("o1"))
            .await
            .unwrap()
            .into_inner()
            .state;
        assert_eq!(state, "released");
    }
    assert_eq!(level(&mut client, "p").await, (20, 0, 20));
    // A released order stays released: a repeat of its Reserve holds nothing, and says so.
    let err = client
        .reserve(reserve_request("o1", &[("p", 2)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(level(&mut client, "p").await, (20, 0, 20));

    assert!(
        client
            .reserve(reserve_request("o3", &[("p", 3)]))
            .await
            .unwrap()
            .into_inner()
            .reserved
    );
    for _ in 0..3 {
        let state = client.commit(order("o3")).await.unwrap().into_inner().state;
        assert_eq!(state, "committed");
    }
    assert_eq!(level(&mut client, "p").await, (17, 0, 17));
    // Releasing a sale gives nothing back.
    let state = client
        .release(order("o3"))
        .await
        .unwrap()
        .into_inner()
        .state;
    assert_eq!(state, "committed");
    assert_eq!(level(&mut client, "p").await, (17, 0, 17));

    let state = client
        .release(order("unknown"))
        .await
        .unwrap()
        .into_inner()
        .state;
    // Released before any reservation: recorded, so a Reserve arriving later is refused.
    assert_eq!(state, "released");
    let err = client
        .reserve(reserve_request("unknown", &[("p", 1)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = client.commit(order("never")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client.commit(order("unknown")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = client.commit(order("o1")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(level(&mut client, "p").await, (17, 0, 17));
}
on_both!(repeats_are_no_ops);

/// One short line refuses the whole order and holds nothing of the others.
async fn reservations_are_all_or_nothing(service: Service) {
    let mut client = service.grpc();
    set_stock(&mut client, "a", 5).await;
    set_stock(&mut client, "b", 1).await;
    let answer = client
        .reserve(reserve_request("o", &[("a", 2), ("b", 2)]))
        .await
        .unwrap()
        .into_inner();
    assert!(!answer.reserved);
    assert_eq!(level(&mut client, "a").await, (5, 0, 5));
    assert_eq!(level(&mut client, "b").await, (1, 0, 1));
    // A product never stocked has nothing to reserve.
    let answer = client
        .reserve(reserve_request("o-ghost", &[("a", 1), ("ghost", 1)]))
        .await
        .unwrap()
        .into_inner();
    assert!(!answer.reserved);
    assert_eq!(level(&mut client, "a").await, (5, 0, 5));
    assert_eq!(level(&mut client, "ghost").await, (0, 0, 0));
}
on_both!(reservations_are_all_or_nothing);

/// SetStock refuses totals below what is reserved, negative or too large.
async fn set_stock_keeps_reserved_covered(service: Service) {
    let mut client = service.grpc();
    set_stock(&mut client, "p", 5).await;
    assert!(
        client
            .reserve(reserve_request("o", &[("p", 3)]))
            .await
            .unwrap()
            .into_inner()
            .reserved
    );
    let below = shop_contracts::proto::SetStockRequest {
        product_id: "p".into(),
        total: 2,
    };
    let err = client.set_stock(below).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("below_reserved"),
        "{}",
        err.message()
    );
    for total in [-1, shop_contracts::api::STOCK_MAX + 1] {
        let err = client
            .set_stock(shop_contracts::proto::SetStockRequest {
                product_id: "p".into(),
                total,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }
    assert_eq!(level(&mut client, "p").await, (5, 3, 2));
    set_stock(&mut client, "p", 3).await;
    assert_eq!(level(&mut client, "p").await, (3, 3, 0));
}
on_both!(set_stock_keeps_reserved_covered);

/// Malformed reservations are refused with INVALID_ARGUMENT, holding nothing.
async fn bad_reservations_are_invalid_arguments(service: Service) {
    let mut client = service.grpc();
    set_stock(&mut client, "p", 5).await;
    let long = "x".repeat(65);
    let cases = [
        reserve_request("o", &[]),
        reserve_request("", &[("p", 1)]),
        reserve_request("o", &[("p", 0)]),
        reserve_request("o", &[("p", -3)]),
        reserve_request("o", &[("p", 1), ("p", 1)]),
        reserve_request("o", &[(long.as_str(), 1)]),
    ];
    for request in cases {
        let err = client.reserve(request.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{request:?}");
    }
    assert_eq!(level(&mut client, "p").await, (5, 0, 5));
    // None of them claimed the order id.
    assert!(
        client
            .reserve(reserve_request("o", &[("p", 1)]))
            .await
            .unwrap()
            .into_inner()
            .reserved
    );
}
on_both!(bad_reservations_are_invalid_arguments);

/// A repeated Reserve of a released order must not answer "reserved": its stock is no longer
/// held, and a caller told yes would charge for goods nobody holds. Method: reserve, release,
/// repeat the same Reserve; the answer is FAILED_PRECONDITION and the stock stays free.
async fn a_repeated_reserve_of_a_released_order_is_refused(service: Service) {
    let mut client = service.grpc();
    set_stock(&mut client, "p", 4).await;
    let first = client
        .reserve(reserve_request("o-r", &[("p", 3)]))
        .await
        .unwrap()
        .into_inner();
    assert!(first.reserved);
    client.release(order("o-r")).await.unwrap();
    let err = client
        .reserve(reserve_request("o-r", &[("p", 3)]))
        .await
        .expect_err("a released reservation is not held");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("released"), "{}", err.message());
    assert_eq!(level(&mut client, "p").await, (4, 0, 4));
}
on_both!(a_repeated_reserve_of_a_released_order_is_refused);

/// A Reserve that reuses an order id with other lines is a conflict, not the first call's
/// answer. Method: reserve lines A, then the same order id with a different quantity, another
/// product, and an extra line; each is ALREADY_EXISTS, and only the first lines are held. The
/// same request repeated still answers yes.
async fn a_repeated_reserve_with_other_lines_is_a_conflict(service: Service) {
    let mut client = service.grpc();
    set_stock(&mut client, "a", 10).await;
    set_stock(&mut client, "b", 10).await;
    let first = client
        .reserve(reserve_request("o-m", &[("a", 2), ("b", 1)]))
        .await
        .unwrap()
        .into_inner();
    assert!(first.reserved);
    for other in [
        reserve_request("o-m", &[("a", 5), ("b", 1)]),
        reserve_request("o-m", &[("a", 2)]),
        reserve_request("o-m", &[("a", 2), ("b", 1), ("c", 1)]),
    ] {
        let err = client
            .reserve(other.clone())
            .await
            .expect_err("other lines under a used order id");
        assert_eq!(err.code(), Code::AlreadyExists, "{other:?}: {err:?}");
        assert!(
            err.message().contains("reservation_mismatch"),
            "{}",
            err.message()
        );
    }
    // The same lines in another order are the same request.
    let again = client
        .reserve(reserve_request("o-m", &[("b", 1), ("a", 2)]))
        .await
        .unwrap()
        .into_inner();
    assert!(again.reserved);
    assert_eq!(level(&mut client, "a").await, (10, 2, 8));
    assert_eq!(level(&mut client, "b").await, (10, 1, 9));
}
on_both!(a_repeated_reserve_with_other_lines_is_a_conflict);
