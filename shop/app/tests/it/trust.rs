//! The services believe no one on their word: a process that reaches a service's port
//! directly, with forged identity headers or a token it signed itself, is refused.

use reqwest::Method;
use serde_json::json;
use shop_contracts::proto::inventory_client::InventoryClient;
use shop_contracts::proto::payments_client::PaymentsClient;
use shop_contracts::proto::users_client::UsersClient;
use shop_contracts::proto::{ChargeRequest, GetUserRequest, SetStockRequest};
use tonic::transport::{Channel, Endpoint};
use trellis_service::auth::{IDENTITY_HEADER, ServiceIdentityClient, ServiceKey};

use crate::harness::{Backend, TestShop};

fn direct(shop: &TestShop, service: &str, path: &str) -> String {
    format!("http://{}{path}", shop.shop.addrs()[service])
}

fn channel(shop: &TestShop, service: &str) -> Channel {
    Endpoint::from_shared(format!("http://{}", shop.shop.addrs()[service]))
        .expect("uri")
        .connect_lazy()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_identity_headers_are_refused() {
    // Goal: `x-user-id` / `x-user-role: admin` sent straight to a service's port make no one
    // an admin. Method: call every service's protected REST routes directly, with forged
    // headers and with a well-formed token signed by a key that is not the shop's; each must
    // answer 401 and change nothing, while the same calls through the gateway work.
    let shop = TestShop::start(Backend::Sqlite, "forged-headers")
        .await
        .expect("sqlite");
    let product = shop.product("Lamp", 1_500, 4).await;
    let stranger = ServiceKey::generate()
        .expect("randomness")
        .signer("gateway")
        .token("intruder", "admin")
        .expect("signs");
    let calls = [
        (
            Method::POST,
            "products",
            "/api/products".to_owned(),
            Some(json!({"name": "Free", "price_cents": 1, "stock": 1})),
        ),
        (
            Method::PUT,
            "inventory",
            format!("/api/inventory/{product}"),
            Some(json!({"total": 0})),
        ),
        (Method::GET, "users", "/api/users/me".to_owned(), None),
        (Method::GET, "orders", "/api/orders".to_owned(), None),
        (
            Method::POST,
            "orders",
            "/api/orders".to_owned(),
            Some(json!({"items": [{"product_id": product, "quantity": 1}]})),
        ),
        (
            Method::GET,
            "payments",
            format!("/api/payments/{}", uuid::Uuid::now_v7()),
            None,
        ),
        (
            Method::GET,
            "shipping",
            format!("/api/shipments/{}", uuid::Uuid::now_v7()),
            None,
        ),
        (
            Method::PUT,
            "payment-provider",
            "/admin/config".to_owned(),
            Some(json!({"outage": true})),
        ),
    ];
    for (method, service, path, body) in calls {
        for forged in [false, true] {
            let mut request = shop
                .http
                .request(method.clone(), direct(&shop, service, &path))
                .header("x-user-id", "intruder")
                .header("x-user-role", "admin")
                .header("idempotency-key", uuid::Uuid::now_v7().to_string());
            if forged {
                request = request.header(IDENTITY_HEADER, stranger.clone());
            }
            if let Some(body) = &body {
                request = request.json(body);
            }
            let response = request.send().await.expect("the service answers");
            let status = response.status().as_u16();
            let answer: serde_json::Value = response.json().await.unwrap_or_default();
            assert_eq!(
                status, 401,
                "{method} {service}{path} (foreign token: {forged}) answered {answer}"
            );
            assert_eq!(answer["error"]["code"], "unauthenticated", "{answer}");
        }
    }
    // Nothing changed: the stock, the provider's settings, the catalog.
    assert_eq!(shop.stock(&product).await["total"], 4);
    assert!(!shop.shop.provider().config().outage);
    let (_, page) = shop
        .call(Method::GET, "/api/products?q=Free", None, None)
        .await;
    assert_eq!(page["items"].as_array().map(Vec::len), Some(0), "{page}");
    // Through the gateway, the admin's own token still works.
    let (status, _) = shop
        .call(
            Method::PUT,
            &format!("/api/inventory/{product}"),
            Some(shop.admin()),
            Some(json!({"total": 5})),
        )
        .await;
    assert_eq!(status, 200);
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_calls_need_a_service_identity() {
    // Goal: the services' gRPC methods (charge, reserve, set stock, read a user) answer only
    // another service of the shop. Method: call them on the service ports with no identity,
    // with a user's identity (even an admin's) and with a service identity signed by a foreign
    // key; then once with the shop's own service identity, which must work.
    let shop = TestShop::start(Backend::Sqlite, "grpc-identity")
        .await
        .expect("sqlite");
    let product = shop.product("Desk", 9_000, 2).await;
    let foreign = ServiceKey::generate().expect("randomness");

    let mut payments = PaymentsClient::new(channel(&shop, "payments"));
    let charge = ChargeRequest {
        order_id: uuid::Uuid::now_v7().to_string(),
        user_id: "intruder".to_owned(),
        amount_cents: 100,
    };
    let status = payments.charge(charge.clone()).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");

    let mut as_foreign = PaymentsClient::new(ServiceIdentityClient::new(
        channel(&shop, "payments"),
        foreign.service_identity("orders"),
    ));
    let status = as_foreign
        .charge(charge.clone())
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");

    let mut request = tonic::Request::new(SetStockRequest {
        product_id: product.clone(),
        total: 0,
    });
    let admin = shop
        .shop
        .service_key()
        .signer("gateway")
        .token("someone", "admin")
        .expect("signs");
    request.metadata_mut().insert(
        "x-trellis-identity",
        admin.to_str().expect("ascii").parse().expect("metadata"),
    );
    let mut inventory = InventoryClient::new(channel(&shop, "inventory"));
    let status = inventory.set_stock(request).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    let mut users = UsersClient::new(channel(&shop, "users"));
    let status = users
        .get_user(GetUserRequest {
            id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");

    assert_eq!(
        shop.stock(&product).await["total"],
        2,
        "the stock is unchanged"
    );
    assert_eq!(
        shop.shop.provider().stats().captures,
        0,
        "nothing was charged"
    );

    // The shop's own service identity passes.
    let mut as_orders = InventoryClient::new(ServiceIdentityClient::new(
        channel(&shop, "inventory"),
        shop.shop.service_key().service_identity("orders"),
    ));
    let stock = as_orders
        .get_stock(shop_contracts::proto::GetStockRequest {
            product_ids: vec![product.clone()],
        })
        .await
        .expect("a service may read the stock");
    assert_eq!(stock.into_inner().stock.len(), 1);
    shop.stop().await;
}

/// A client whose connections come from `ip` (any 127.0.0.0/8 address is local on Linux).
fn client_from(ip: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(std::net::IpAddr::from(ip))
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .expect("client")
}

async fn register(shop: &TestShop, email: &str, password: &str) {
    let (status, body) = shop
        .call(
            Method::POST,
            "/api/users",
            None,
            Some(json!({"email": email, "password": password, "name": "Someone"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

async fn login_from(
    client: &reqwest::Client,
    shop: &TestShop,
    email: &str,
    password: &str,
) -> reqwest::Response {
    client
        .post(shop.url("/api/auth/token"))
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .expect("the gateway answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_flooding_client_leaves_another_users_login_working() {
    // Goal: a client flooding the login endpoint cannot take the password-hashing capacity
    // from everyone else. Method: 300 concurrent logins from one address (wrong passwords on
    // made-up accounts); while they run, another user logs in from another address. The flood
    // must be answered 429 with Retry-After past its address's share (never 503), and the other
    // user's login must succeed.
    let shop = TestShop::start(Backend::Sqlite, "login-flood")
        .await
        .expect("sqlite");
    register(&shop, "vera@example.com", "password-vera").await;
    let flooder = client_from([127, 0, 0, 2]);
    let mut flood = Vec::new();
    for i in 0..300 {
        let flooder = flooder.clone();
        let url = shop.url("/api/auth/token");
        flood.push(tokio::spawn(async move {
            let response = flooder
                .post(url)
                .json(
                    &json!({"email": format!("nobody{i}@example.com"), "password": "guess-guess"}),
                )
                .send()
                .await
                .expect("the gateway answers");
            let retry_after = response.headers().get("retry-after").cloned();
            let status = response.status().as_u16();
            let body: serde_json::Value = response.json().await.unwrap_or_default();
            (status, retry_after, body)
        }));
    }
    let victim = client_from([127, 0, 0, 3]);
    let answer = login_from(&victim, &shop, "vera@example.com", "password-vera").await;
    let status = answer.status().as_u16();
    assert_eq!(status, 200, "{:?}", answer.text().await);
    let mut limited = 0;
    for task in flood {
        let (status, retry_after, body) = task.await.expect("task");
        match status {
            401 => {}
            429 => {
                limited += 1;
                assert!(retry_after.is_some(), "429 without Retry-After: {body}");
                assert!(body["error"]["code"].is_string(), "{body}");
            }
            other => panic!("a flooded login answered {other}: {body}"),
        }
    }
    assert!(limited > 0, "the flood was never limited");
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn guessing_one_accounts_password_is_limited_whatever_the_address() {
    // Goal: spreading guesses over many addresses does not buy more guesses on one account.
    // Method: wrong passwords for one account, each from its own loopback address; past the
    // account's burst the answer is 429 `too_many_attempts` with Retry-After, before any hash.
    let shop = TestShop::start(Backend::Sqlite, "login-guess")
        .await
        .expect("sqlite");
    register(&shop, "walt@example.com", "password-walt").await;
    let burst = shop_users::LOGIN_ATTEMPTS_BURST;
    for i in 0..burst {
        let client = client_from([127, 0, 1, u8::try_from(i + 1).expect("small")]);
        let answer = login_from(&client, &shop, "walt@example.com", "not-his-password").await;
        assert_eq!(answer.status().as_u16(), 401, "guess {i}");
    }
    let client = client_from([127, 0, 2, 1]);
    let answer = login_from(&client, &shop, "walt@example.com", "password-walt").await;
    assert_eq!(answer.status().as_u16(), 429);
    assert!(answer.headers().contains_key("retry-after"));
    let body: serde_json::Value = answer.json().await.expect("json");
    assert_eq!(body["error"]["code"], "too_many_attempts", "{body}");
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_surfaces_refuse_customers_and_anonymous_callers() {
    // Goal: the dead-letter queue and the provider's fault switches answer administrators
    // only. Method: call each through the gateway with no token and with a customer's token,
    // and the DLQ on the orders service's own port with forged headers; then as the admin.
    let shop = TestShop::start(Backend::Sqlite, "operator-surfaces")
        .await
        .expect("sqlite");
    let customer = shop.customer("olga").await;
    for (method, path) in [
        (Method::GET, "/api/admin/dlq/dead-letters"),
        (Method::GET, "/api/admin/dlq/dead-letters/groups"),
        (Method::POST, "/api/admin/dlq/dead-letters/redrive"),
        (Method::GET, "/api/admin/provider"),
        (Method::PUT, "/api/admin/provider"),
    ] {
        let body = (method != Method::GET).then(|| json!({}));
        let (status, answer) = shop.call(method.clone(), path, None, body.clone()).await;
        assert_eq!(status, 401, "{method} {path} anonymous: {answer}");
        let (status, answer) = shop.call(method.clone(), path, Some(&customer), body).await;
        assert_eq!(status, 403, "{method} {path} as a customer: {answer}");
    }
    let direct = shop
        .http
        .get(direct(&shop, "orders", "/admin/dlq/dead-letters"))
        .header("x-user-id", "intruder")
        .header("x-user-role", "admin")
        .send()
        .await
        .expect("orders answers");
    assert_eq!(direct.status().as_u16(), 401);

    let (status, letters) = shop
        .call(
            Method::GET,
            "/api/admin/dlq/dead-letters",
            Some(shop.admin()),
            None,
        )
        .await;
    assert_eq!(status, 200, "{letters}");
    assert!(
        letters.is_array() || letters["items"].is_array(),
        "{letters}"
    );
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gateways_metrics_are_served_only_on_the_operator_listener() {
    // Goal: the gateway's /metrics (and health endpoints) are not on the public port, where
    // any client could read the shop's traffic figures. Method: ask the public listener for
    // them (with and without an admin token), then the operator listener.
    let shop = TestShop::start(Backend::Sqlite, "operator-listener")
        .await
        .expect("sqlite");
    for path in ["/metrics", "/healthz", "/readyz", "//metrics", "/metrics/"] {
        for token in [None, Some(shop.admin())] {
            let (status, body) = shop.call(Method::GET, path, token, None).await;
            assert_eq!(status, 404, "public {path}: {body}");
        }
    }
    for path in ["/metrics", "/healthz", "/readyz"] {
        let answer = shop
            .http
            .get(format!("{}{path}", shop.shop.operator_url()))
            .send()
            .await
            .expect("the operator listener answers");
        assert_ne!(answer.status().as_u16(), 404, "operator {path}");
    }
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_admin_route_refuses_a_customer_and_an_anonymous_caller() {
    // Goal (OWASP API5, broken function level authorization): no route the gateway keeps for
    // administrators answers a customer or a caller without a credential. Method: the routes
    // come from the shop's own gateway configuration (every route requiring the admin role,
    // so a route added later is covered), each called with each of its methods on a sample
    // path: a customer's token gets 403, no token 401 (the console: a redirect to its login
    // page), both with nothing from the upstream.
    let shop = TestShop::start(Backend::Sqlite, "admin-routes")
        .await
        .expect("sqlite");
    let customer = shop.customer("mallory").await;
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 1));
    let addrs: std::collections::BTreeMap<&'static str, std::net::SocketAddr> = shop_app::SERVICES
        .into_iter()
        .chain([shop_app::CONSOLE])
        .map(|name| (name, loopback))
        .collect();
    let config =
        trellis_gateway::Config::from_toml(&shop_app::config_toml(loopback, loopback, &addrs))
            .expect("the shop's gateway configuration");
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let mut checked = 0;
    for route in config
        .routes
        .iter()
        .filter(|r| r.required_roles.iter().any(|role| role == "admin"))
    {
        let path = if let Some(exact) = &route.path_exact {
            exact.clone()
        } else if let Some(template) = &route.path_template {
            template
                .split('/')
                .map(|segment| {
                    if segment.starts_with('{') {
                        "probe"
                    } else {
                        segment
                    }
                })
                .collect::<Vec<_>>()
                .join("/")
        } else {
            format!(
                "{}/probe",
                route
                    .path_prefix
                    .as_deref()
                    .expect("a path")
                    .trim_end_matches('/')
            )
        };
        let methods: Vec<Method> = if route.methods.is_empty() {
            vec![Method::GET, Method::POST, Method::PUT, Method::DELETE]
        } else {
            route
                .methods
                .iter()
                .map(|m| m.parse().expect("a method"))
                .collect()
        };
        for method in methods {
            let what = format!("{method} {path} (route {})", route.name);
            let (status, body) = shop
                .call(method.clone(), &path, Some(&customer), Some(json!({})))
                .await;
            assert_eq!(status, 403, "{what} with a customer's token: {body}");
            assert!(
                body["error"]["code"].is_string(),
                "{what}: the gateway's JSON error, not an upstream's answer: {body}"
            );
            let anonymous = no_redirects
                .request(method.clone(), shop.url(&path))
                .json(&json!({}))
                .send()
                .await
                .expect("call");
            if route.name == shop_app::CONSOLE_ROUTE {
                assert_eq!(anonymous.status(), 303, "{what} without a credential");
                assert_eq!(
                    anonymous.headers()["location"],
                    shop_console::LOGIN_PATH,
                    "{what}"
                );
            } else {
                assert_eq!(anonymous.status(), 401, "{what} without a credential");
            }
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} admin calls checked");
    // And the configuration keeps these for administrators (a route that lost its role
    // would otherwise drop out of the loop above unnoticed).
    let admin_routes: Vec<&str> = config
        .routes
        .iter()
        .filter(|r| r.required_roles.iter().any(|role| role == "admin"))
        .map(|r| r.name.as_str())
        .collect();
    for name in [
        "products-write",
        "inventory",
        "payments",
        "shipments",
        "dlq",
        "saga-admin",
        "order-saga-admin",
        "provider-admin",
        shop_app::CONSOLE_ROUTE,
    ] {
        assert!(
            admin_routes.contains(&name),
            "the route {name} no longer requires the admin role: {admin_routes:?}"
        );
    }
    shop.stop().await;
}
