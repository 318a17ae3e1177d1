//! The shop's agent tools (shop-agent) against a whole shop, through its gateway: each tool
//! works for a customer, acts only as that customer, and refuses what the customer may not do.
//!
//! The tools are called through their registry, as the agent loop and the MCP server call
//! them: arguments validated against each tool's schema, then run with a caller's token.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use trellis_agent::{Caller, ToolContext, ToolFailure, ToolRegistry};

use crate::harness::TestShop;
use crate::on_both_backends;

/// The tools of `shop`, as an agent of its users gets them.
fn tools(shop: &TestShop) -> ToolRegistry {
    shop_agent::registry(&shop.base).expect("the gateway URL is good")
}

/// A call context acting as the holder of `token`, with the call's idempotency `key`.
fn acting_as(token: &str, role: &str, key: &str) -> ToolContext {
    // The subject is what a log would show; the tools act only with the token.
    let caller = Caller::new("agent-test", role).with_bearer(token);
    ToolContext::new(caller, Duration::from_secs(30), key)
}

fn customer(token: &str) -> ToolContext {
    acting_as(token, "customer", &uuid::Uuid::now_v7().to_string())
}

async fn call(tools: &ToolRegistry, ctx: &ToolContext, tool: &str, args: Value) -> Value {
    match tools.call(tool, args.clone(), ctx).await {
        Ok(value) => value,
        Err(failure) => panic!("{tool} {args}: {failure}"),
    }
}

async fn refused(tools: &ToolRegistry, ctx: &ToolContext, tool: &str, args: Value) -> String {
    match tools.call(tool, args.clone(), ctx).await {
        Err(ToolFailure::Failed(message)) => message,
        other => panic!("{tool} {args}: expected a refusal, got {other:?}"),
    }
}

fn order_ids(found: &Value) -> Vec<String> {
    found["orders"]
        .as_array()
        .expect("orders")
        .iter()
        .map(|o| o["id"].as_str().expect("id").to_owned())
        .collect()
}

async fn provider_latency(shop: &TestShop, latency_ms: u64) {
    let (status, body) = shop
        .call(
            Method::PUT,
            "/api/admin/provider",
            Some(shop.admin()),
            Some(json!({ "latency_ms": latency_ms })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

async fn user_id(shop: &TestShop, token: &str) -> String {
    let (status, me) = shop
        .call(Method::GET, "/api/users/me", Some(token), None)
        .await;
    assert_eq!(status, 200, "{me}");
    me["id"].as_str().expect("id").to_owned()
}

/// What the orders API shows the owner, read directly (not through the tools).
async fn order_as(shop: &TestShop, token: &str, id: &str) -> Value {
    let (status, order) = shop
        .call(Method::GET, &format!("/api/orders/{id}"), Some(token), None)
        .await;
    assert_eq!(status, 200, "{order}");
    order
}

async fn listed(shop: &TestShop, tools: &ToolRegistry, ctx: &ToolContext, id: &str) {
    // The listing reads the read model, which follows the event log: wait for it.
    for _ in 0..300 {
        if order_ids(&call(tools, ctx, "search_orders", json!({"limit": 100})).await)
            .contains(&id.to_owned())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = shop;
    panic!("order {id} never listed");
}

async fn another_customers_order(shop: &TestShop) {
    // Alice places an order that stays pending (a slow payment provider), so a cancel of it
    // would take effect. Bob's tools, with Bob's token, then search, read and cancel it. The
    // tools send Bob's token through the gateway and the orders service decides from the
    // identity the gateway verified, so every attempt must fail and Alice's order must go on
    // to be confirmed, untouched.
    //
    // Why this test would fail if the tools took a shortcut: a tool that called the orders
    // service directly with an identity it made up itself (say, signed with the shop's
    // service key as an admin, or as whatever `Caller::subject` claims) would be answered
    // as that identity. An admin identity sees and cancels any order, so get_order would
    // return Alice's order, search_orders would list it and cancel_order would answer 202;
    // Alice's order would then end CANCELLED (cancelled_by_user) instead of CONFIRMED. A
    // tool that trusted the `subject` of the context (here "agent-test") would also see no
    // order of Bob's own, which the last assertion checks he does see.
    let tools = tools(shop);
    let alice = shop.customer("alice").await;
    let bob = shop.customer("bob").await;
    let alice_id = user_id(shop, &alice).await;
    let product = shop.product("Kettle", 3_000, 10).await;

    provider_latency(shop, 3_000).await;
    let placed = call(
        &tools,
        &customer(&alice),
        "place_order",
        json!({"items": [{"product_id": product, "quantity": 1}]}),
    )
    .await;
    let order = placed["order_id"].as_str().expect("order id").to_owned();
    listed(shop, &tools, &customer(&alice), &order).await;

    let as_bob = customer(&bob);
    let found = call(&tools, &as_bob, "search_orders", json!({"limit": 100})).await;
    assert!(!order_ids(&found).contains(&order), "{found}");
    let found = call(
        &tools,
        &as_bob,
        "search_orders",
        json!({"status": "pending", "placed_from": "2000-01-01"}),
    )
    .await;
    assert!(!order_ids(&found).contains(&order), "{found}");
    let message = refused(
        &tools,
        &as_bob,
        "search_orders",
        json!({"customer_id": alice_id}),
    )
    .await;
    assert!(message.contains("only an admin"), "{message}");
    let message = refused(&tools, &as_bob, "get_order", json!({"order_id": order})).await;
    assert_eq!(message, "no such order");
    let message = refused(&tools, &as_bob, "cancel_order", json!({"order_id": order})).await;
    assert_eq!(message, "no such order");
    // An undo is a cancel too, and Bob's token cannot make it either.
    let undo = tools
        .undo(
            "place_order",
            json!({"items": [{"product_id": product, "quantity": 1}]}),
            json!({"order_id": order, "status": "pending"}),
            &as_bob,
        )
        .await;
    assert!(undo.is_err(), "Bob's undo of Alice's order: {undo:?}");

    // Alice's order is untouched: no cancel was requested, and it is confirmed once the
    // provider answers.
    let seen = order_as(shop, &alice, &order).await;
    let timeline = seen["timeline"].to_string();
    assert!(!timeline.contains("cancel"), "{seen}");
    provider_latency(shop, 0).await;
    let settled = shop.settled(&alice, &order).await;
    assert_eq!(settled["status"], "CONFIRMED", "{settled}");

    // Bob's tools do act as Bob: his own order is his to see.
    let bobs = call(
        &tools,
        &as_bob,
        "place_order",
        json!({"items": [{"product_id": product, "quantity": 1}]}),
    )
    .await;
    let bobs = bobs["order_id"].as_str().expect("id");
    let details = call(&tools, &as_bob, "get_order", json!({"order_id": bobs})).await;
    assert_eq!(details["id"], bobs);
}
on_both_backends!(
    one_customers_tools_cannot_see_or_cancel_anothers_order,
    another_customers_order
);

async fn admin_searches(shop: &TestShop) {
    // An admin's search_orders may name any customer and shows exactly that customer's
    // orders; without a customer it shows everyone's.
    let tools = tools(shop);
    let alice = shop.customer("alice").await;
    let bob = shop.customer("bob").await;
    let alice_id = user_id(shop, &alice).await;
    let product = shop.product("Teapot", 2_000, 10).await;
    let alices = shop.order(&alice, &product, 1).await;
    let bobs = shop.order(&bob, &product, 1).await;
    shop.settled(&alice, &alices).await;
    shop.settled(&bob, &bobs).await;

    let admin = acting_as(shop.admin(), "admin", "admin-search");
    listed(shop, &tools, &admin, &bobs).await;
    let found = call(
        &tools,
        &admin,
        "search_orders",
        json!({"customer_id": alice_id, "limit": 100}),
    )
    .await;
    assert_eq!(order_ids(&found), vec![alices.clone()], "{found}");
    assert_eq!(found["orders"][0]["customer_id"], alice_id.as_str());
    let everyone = call(&tools, &admin, "search_orders", json!({"limit": 100})).await;
    let everyone = order_ids(&everyone);
    assert!(everyone.contains(&alices) && everyone.contains(&bobs));
}
on_both_backends!(an_admin_searches_any_customers_orders, admin_searches);

async fn customer_flow(shop: &TestShop) {
    // A customer's agent finds a product, checks its stock, orders it, finds the order by
    // status and placement date, reads it and cancels it while it is pending.
    let tools = tools(shop);
    let carol = shop.customer("carol").await;
    let ctx = customer(&carol);
    let product = shop.product("Blue Lamp", 4_500, 7).await;
    shop.product("Red Chair", 9_900, 3).await;

    let listed_products = call(&tools, &ctx, "list_products", json!({"query": "lamp"})).await;
    assert_eq!(
        listed_products,
        json!({"products": [{"id": product, "name": "Blue Lamp", "price_cents": 4_500, "available": 7}]})
    );
    let stock = call(&tools, &ctx, "check_stock", json!({"product_id": product})).await;
    assert_eq!(
        stock,
        json!({"product_id": product, "name": "Blue Lamp", "available": 7, "in_stock": true})
    );

    let placed = call(
        &tools,
        &ctx,
        "place_order",
        json!({"items": [{"product_id": product, "quantity": 2}]}),
    )
    .await;
    assert_eq!(placed["status"], "pending");
    let first = placed["order_id"].as_str().expect("id").to_owned();
    let confirmed = shop.settled(&carol, &first).await;
    assert_eq!(confirmed["status"], "CONFIRMED", "{confirmed}");
    let stock = call(&tools, &ctx, "check_stock", json!({"product_id": product})).await;
    assert_eq!(stock["available"], 5);

    let details = call(&tools, &ctx, "get_order", json!({"order_id": first})).await;
    assert_eq!(details["status"], "confirmed");
    assert_eq!(details["total_cents"], 9_000);
    assert_eq!(
        details["items"],
        json!([{"product_id": product, "quantity": 2, "price_cents": 4_500}])
    );
    let placed_at = details["placed_at"].as_str().expect("placed_at").to_owned();
    let day = &placed_at[..10];

    // A second order, kept pending by a slow provider, is cancelled by the tool.
    provider_latency(shop, 3_000).await;
    // A call of its own: its own idempotency key (reusing the first call's key with another
    // body is refused by the shop).
    let second = call(
        &tools,
        &customer(&carol),
        "place_order",
        json!({"items": [{"product_id": product, "quantity": 1}]}),
    )
    .await;
    let second = second["order_id"].as_str().expect("id").to_owned();
    listed(shop, &tools, &ctx, &second).await;
    let pending = call(&tools, &ctx, "search_orders", json!({"status": "pending"})).await;
    assert_eq!(order_ids(&pending), vec![second.clone()], "{pending}");
    assert_eq!(pending["orders"][0]["units"], 1);
    let cancelled = call(&tools, &ctx, "cancel_order", json!({"order_id": second})).await;
    assert_eq!(
        cancelled,
        json!({"order_id": second, "status": "cancellation_requested"})
    );
    provider_latency(shop, 0).await;
    let ended = shop.settled(&carol, &second).await;
    assert_eq!(ended["status"], "CANCELLED", "{ended}");
    assert_eq!(ended["reason"], "cancelled_by_user");
    let message = refused(&tools, &ctx, "cancel_order", json!({"order_id": second})).await;
    assert_eq!(message, "the order already ended as CANCELLED");

    // Dates: the day both were placed finds them, the day before finds neither.
    let on_the_day = call(
        &tools,
        &ctx,
        "search_orders",
        json!({"placed_from": day, "placed_to": day}),
    )
    .await;
    assert_eq!(order_ids(&on_the_day).len(), 2, "{on_the_day}");
    let confirmed = call(
        &tools,
        &ctx,
        "search_orders",
        json!({"status": "confirmed", "placed_from": placed_at, "placed_to": placed_at}),
    )
    .await;
    assert_eq!(order_ids(&confirmed), vec![first.clone()], "{confirmed}");
    let before = call(
        &tools,
        &ctx,
        "search_orders",
        json!({"placed_to": "2000-01-01"}),
    )
    .await;
    assert_eq!(before, json!({"orders": []}));
    let message = refused(
        &tools,
        &ctx,
        "search_orders",
        json!({"placed_from": "last tuesday"}),
    )
    .await;
    assert!(message.contains("placed_from"), "{message}");

    // A page of one has a cursor to the next.
    let page = call(&tools, &ctx, "search_orders", json!({"limit": 1})).await;
    assert_eq!(order_ids(&page), vec![second.clone()]);
    let cursor = page["next_cursor"].as_str().expect("a next page");
    let next = call(
        &tools,
        &ctx,
        "search_orders",
        json!({"limit": 1, "cursor": cursor}),
    )
    .await;
    assert_eq!(order_ids(&next), vec![first]);
}
on_both_backends!(each_tool_works_for_a_customer, customer_flow);

async fn idempotent_placement(shop: &TestShop) {
    // One call retried (same idempotency key, as a resumed durable run retries it) places one
    // order; its undo cancels that order, and undoing it again is accepted.
    let tools = tools(shop);
    let dave = shop.customer("dave").await;
    let product = shop.product("Clock", 1_500, 10).await;
    let args = json!({"items": [{"product_id": product, "quantity": 3}]});
    let ctx = acting_as(&dave, "customer", "run-7:call-2");

    provider_latency(shop, 3_000).await;
    let first = call(&tools, &ctx, "place_order", args.clone()).await;
    let again = call(&tools, &ctx, "place_order", args.clone()).await;
    assert_eq!(first, again);
    let order = first["order_id"].as_str().expect("id").to_owned();
    listed(shop, &tools, &ctx, &order).await;
    let all = call(&tools, &ctx, "search_orders", json!({"limit": 100})).await;
    assert_eq!(order_ids(&all), vec![order.clone()], "one order: {all}");

    tools
        .undo("place_order", args.clone(), first.clone(), &ctx)
        .await
        .expect("undo cancels the pending order");
    provider_latency(shop, 0).await;
    let ended = shop.settled(&dave, &order).await;
    assert_eq!(ended["status"], "CANCELLED", "{ended}");
    assert_eq!(ended["reason"], "cancelled_by_user");
    tools
        .undo("place_order", args, first, &ctx)
        .await
        .expect("undoing a cancelled order again is accepted");
    let stock = call(&tools, &ctx, "check_stock", json!({"product_id": product})).await;
    assert_eq!(stock["available"], 10, "the stock is released");
}
crate::shop_test!(
    place_order_retried_places_one_order_and_undo_cancels_it,
    Sqlite,
    Orchestrated,
    "agent_idempotent",
    idempotent_placement
);

async fn bad_arguments(shop: &TestShop) {
    // Arguments that do not fit a tool's schema are refused before the tool runs, with a
    // message naming the problem; a caller without a token is told to log in.
    let tools = tools(shop);
    let erin = shop.customer("erin").await;
    let ctx = customer(&erin);
    let product = uuid::Uuid::now_v7().to_string();
    for (tool, args) in [
        ("get_order", json!({"order_id": "../users/me"})),
        ("get_order", json!({})),
        ("cancel_order", json!({"order_id": 42})),
        ("search_orders", json!({"status": "shipped"})),
        ("search_orders", json!({"limit": 1000})),
        ("search_orders", json!({"customer": "someone"})),
        ("place_order", json!({"items": []})),
        (
            "place_order",
            json!({"items": [{"product_id": product, "quantity": 0}]}),
        ),
        (
            "place_order",
            json!({"items": [{"product_id": "lamp", "quantity": 1}]}),
        ),
        ("check_stock", json!({"product_id": "not-an-id"})),
        ("list_products", json!({"limit": 0})),
    ] {
        match tools.call(tool, args.clone(), &ctx).await {
            Err(ToolFailure::InvalidArguments(message)) => {
                assert!(!message.is_empty(), "{tool} {args}");
            }
            other => panic!("{tool} {args}: expected invalid arguments, got {other:?}"),
        }
    }
    let anonymous = ToolContext::new(
        Caller::new("nobody", "customer"),
        Duration::from_secs(5),
        "k",
    );
    let message = refused(&tools, &anonymous, "search_orders", json!({})).await;
    assert_eq!(message, "not logged in");
    let message = refused(&tools, &ctx, "check_stock", json!({"product_id": product})).await;
    assert!(message.contains("no product"), "{message}");
    let message = refused(
        &tools,
        &ctx,
        "place_order",
        json!({"items": [{"product_id": product, "quantity": 1}]}),
    )
    .await;
    assert!(!message.is_empty());
    let none = call(&tools, &ctx, "search_orders", json!({})).await;
    assert_eq!(none, json!({"orders": []}), "nothing was placed");
}
crate::shop_test!(
    invalid_arguments_are_refused_before_a_tool_runs,
    Sqlite,
    Orchestrated,
    "agent_bad_arguments",
    bad_arguments
);
