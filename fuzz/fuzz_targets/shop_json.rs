//! The shop's JSON request bodies (shop-contracts), decoded as the services' handlers decode
//! them, and the order service's validation of `PlaceOrder`.
//!
//! Properties: never panics; a decoded body serialises and decodes back to an equal one;
//! `PlaceOrder::validate` gives the same answer after the round trip, and an order it accepts
//! has 1..=ORDER_LINES_MAX lines, each with a product id and a quantity in range, no product
//! twice.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;
use shop_contracts::api::{
    CreateProduct, LINE_QUANTITY_MAX, ORDER_LINES_MAX, PlaceOrder, RegisterUser, SetStock,
    TokenRequest,
};

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
    data: &[u8],
) -> Option<T> {
    let value: T = serde_json::from_slice(data).ok()?;
    let bytes = serde_json::to_vec(&value).expect("a decoded body serialises");
    let again: T = serde_json::from_slice(&bytes).expect("its own bytes decode");
    assert_eq!(again, value, "the body changed in one round trip");
    Some(value)
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 5 {
        0 => {
            let Some(order) = round_trip::<PlaceOrder>(body) else {
                return;
            };
            let verdict = order.validate();
            if verdict.is_ok() {
                assert!((1..=ORDER_LINES_MAX).contains(&order.items.len()));
                let mut seen = HashSet::new();
                for item in &order.items {
                    assert!(!item.product_id.trim().is_empty() && item.product_id.len() <= 64);
                    assert!((1..=LINE_QUANTITY_MAX).contains(&item.quantity));
                    assert!(seen.insert(item.product_id.as_str()), "a product twice");
                }
            }
        }
        1 => {
            round_trip::<RegisterUser>(body);
        }
        2 => {
            round_trip::<TokenRequest>(body);
        }
        3 => {
            round_trip::<CreateProduct>(body);
        }
        _ => {
            round_trip::<SetStock>(body);
        }
    }
});
