//! Sessions: refresh tokens that work once, a reuse that ends the session, logout refused at
//! the gateway, and signing-key rotation seen by a second replica and by the gateway.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{Answer, Service, sqlite, start};
use crate::on_both;
use crate::tokens::verified_claims;

fn text<'a>(answer: &'a Answer, field: &str) -> &'a str {
    answer.body[field]
        .as_str()
        .unwrap_or_else(|| panic!("no {field} in {:?}", answer.body))
}

async fn refresh(service: &Service, refresh_token: &str) -> Answer {
    service
        .post(
            "/api/auth/refresh",
            json!({ "refresh_token": refresh_token }),
        )
        .await
}

async fn revoked_jtis(service: &Service) -> Vec<String> {
    let feed = service
        .send(service.http.get(service.endpoint("/api/auth/revocations")))
        .await;
    assert_eq!(feed.status, StatusCode::OK, "{:?}", feed.body);
    feed.body["revoked"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|r| r["jti"].as_str().expect("a jti").to_owned())
        .collect()
}

/// A refresh answers the session's next pair and spends the refresh token sent; sending it
/// again ends the session: the next refresh token is refused too, and both access tokens are
/// in the revocation feed. A new login starts a new session.
async fn a_refresh_token_works_once_and_its_reuse_ends_the_session(service: Service) {
    service
        .register("ivy@example.com", "ample-sofa-1", "Ivy")
        .await;
    let first = service.login("ivy@example.com", "ample-sofa-1").await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    let second = refresh(&service, text(&first, "refresh_token")).await;
    assert_eq!(second.status, StatusCode::OK, "{:?}", second.body);
    assert_ne!(
        text(&second, "refresh_token"),
        text(&first, "refresh_token")
    );
    let first_claims = verified_claims(&service, text(&first, "access_token")).await;
    let second_claims = verified_claims(&service, text(&second, "access_token")).await;
    assert_eq!(first_claims["sid"], second_claims["sid"], "one session");
    assert_ne!(first_claims["jti"], second_claims["jti"]);
    assert!(revoked_jtis(&service).await.is_empty());

    let reused = refresh(&service, text(&first, "refresh_token")).await;
    assert_eq!(reused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reused.code(), "refresh_token_reused");
    let after_reuse = refresh(&service, text(&second, "refresh_token")).await;
    assert_eq!(after_reuse.status, StatusCode::UNAUTHORIZED);
    assert_eq!(after_reuse.code(), "session_revoked");
    let revoked = revoked_jtis(&service).await;
    for claims in [&first_claims, &second_claims] {
        let jti = claims["jti"].as_str().unwrap().to_owned();
        assert!(revoked.contains(&jti), "{jti} not in {revoked:?}");
    }

    let unknown = refresh(&service, "not-a-refresh-token").await;
    assert_eq!(unknown.code(), "invalid_refresh_token");
    let again = service.login("ivy@example.com", "ample-sofa-1").await;
    let next = refresh(&service, text(&again, "refresh_token")).await;
    assert_eq!(next.status, StatusCode::OK, "a new login is a new session");
}
on_both!(a_refresh_token_works_once_and_its_reuse_ends_the_session);

/// Calls `GET /api/users/me` through the gateway with `token`.
async fn me(service: &Service, gateway: std::net::SocketAddr, token: &str) -> StatusCode {
    service
        .http
        .get(format!("http://{gateway}/api/users/me"))
        .bearer_auth(token)
        .send()
        .await
        .expect("the gateway answers")
        .status()
}

/// Calls [`me`] until it answers `status`, for at most 5 s; the last status.
async fn me_eventually(
    service: &Service,
    gateway: std::net::SocketAddr,
    token: &str,
    status: StatusCode,
) -> StatusCode {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let got = me(service, gateway, token).await;
        if got == status || tokio::time::Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

/// A logout through the gateway ends the session: the gateway refuses its access token
/// within its revocation poll (100 ms here), its refresh token is refused, and another
/// session of the same user goes on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_is_refused_at_the_gateway_and_ends_only_its_session() {
    let users = sqlite().await.expect("sqlite");
    let (gateway, stop) = crate::gateway::session_gateway(&users).await;
    users
        .register("jon@example.com", "ample-sofa-1", "Jon")
        .await;
    let phone = users.login("jon@example.com", "ample-sofa-1").await;
    let laptop = users.login("jon@example.com", "ample-sofa-1").await;
    let token = text(&phone, "access_token");
    assert_eq!(me(&users, gateway, token).await, StatusCode::OK);

    let logout = users
        .http
        .post(format!("http://{gateway}/api/auth/logout"))
        .bearer_auth(token)
        .send()
        .await
        .expect("the gateway answers");
    assert_eq!(logout.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        me_eventually(&users, gateway, token, StatusCode::UNAUTHORIZED).await,
        StatusCode::UNAUTHORIZED,
        "the logged-out token still passes the gateway"
    );
    let refreshed = refresh(&users, text(&phone, "refresh_token")).await;
    assert_eq!(refreshed.code(), "session_revoked");
    assert_eq!(
        me(&users, gateway, text(&laptop, "access_token")).await,
        StatusCode::OK
    );
    let anonymous = users
        .http
        .post(format!("http://{gateway}/api/auth/logout"))
        .send()
        .await
        .expect("the gateway answers");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let _ = stop.send(());
}

fn kid(token: &str) -> String {
    jsonwebtoken::decode_header(token)
        .expect("a JWT")
        .kid
        .expect("a kid")
}

fn kids(jwks: &Value) -> Vec<String> {
    jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["kid"].as_str().expect("kid").to_owned())
        .collect()
}

/// An administrator rotates the signing key: the new key is published at once by every
/// replica (a second one on the same database here), new tokens name it, and tokens of the
/// old key keep passing the gateway; a rotation that retires the previous keys (a leaked
/// key) makes the gateway refuse their tokens, cached or not. A customer may not rotate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_signs_new_tokens_and_retiring_it_stops_the_old_ones() {
    let users = sqlite().await.expect("sqlite");
    let (replica, _replica_db, _replica_stop) = start(&users.url).await;
    let (gateway, stop) = crate::gateway::session_gateway(&users).await;
    shop_users::ensure_admin(&users.db, "root@example.com", "ample-root-1", "Root")
        .await
        .expect("admin");
    users
        .register("kay@example.com", "ample-sofa-1", "Kay")
        .await;
    let admin = users.login("root@example.com", "ample-root-1").await;
    let admin = text(&admin, "access_token").to_owned();
    let before = users.login("kay@example.com", "ample-sofa-1").await;
    let before = text(&before, "access_token").to_owned();
    assert_eq!(me(&users, gateway, &before).await, StatusCode::OK);

    let rotate = |token: String, body: Value| {
        users
            .http
            .post(format!("http://{gateway}/api/auth/keys/rotate"))
            .bearer_auth(token)
            .json(&body)
            .send()
    };
    let refused = rotate(before.clone(), json!({"activate_in_s": 0}))
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let rotated = rotate(admin.clone(), json!({"activate_in_s": 0}))
        .await
        .unwrap();
    assert_eq!(rotated.status(), StatusCode::OK);
    let rotated: Value = rotated.json().await.unwrap();
    let new_kid = rotated["kid"].as_str().unwrap().to_owned();
    let replica_jwks: Value = users
        .http
        .get(format!("http://{replica}/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(kids(&replica_jwks), [kid(&before), new_kid.clone()]);

    let after = users.login("kay@example.com", "ample-sofa-1").await;
    let after = text(&after, "access_token").to_owned();
    assert_eq!(kid(&after), new_kid);
    assert_eq!(me(&users, gateway, &after).await, StatusCode::OK);
    assert_eq!(me(&users, gateway, &before).await, StatusCode::OK);

    let leaked = rotate(
        admin.clone(),
        json!({"activate_in_s": 0, "retire_previous": true}),
    )
    .await
    .unwrap();
    assert_eq!(leaked.status(), StatusCode::OK);
    let leaked: Value = leaked.json().await.unwrap();
    assert_eq!(leaked["retired"], 2);
    assert_eq!(kids(&users.jwks().await), [leaked["kid"].as_str().unwrap()]);
    for token in [&before, &after] {
        assert_eq!(
            me_eventually(&users, gateway, token, StatusCode::UNAUTHORIZED).await,
            StatusCode::UNAUTHORIZED,
            "a token of a retired key still passes the gateway"
        );
    }
    let fresh = users.login("kay@example.com", "ample-sofa-1").await;
    assert_eq!(
        me(&users, gateway, text(&fresh, "access_token")).await,
        StatusCode::OK
    );
    let _ = stop.send(());
}
