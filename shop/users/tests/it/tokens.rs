//! Logins, the tokens they answer, the JWKS that verifies them, and the key's persistence.

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{Answer, Service, start};
use crate::on_both;

/// Verifies a token with the service's published JWKS, as a relying party would, and answers
/// its claims.
pub(crate) async fn verified_claims(service: &Service, token: &str) -> Value {
    let jwks: JwkSet = serde_json::from_value(service.jwks().await).expect("a JWK set");
    let header = jsonwebtoken::decode_header(token).expect("a JWT header");
    assert_eq!(header.alg, Algorithm::EdDSA);
    let kid = header.kid.expect("tokens name their key");
    let jwk = jwks.find(&kid).expect("the JWKS has the token's key");
    let key = DecodingKey::from_jwk(jwk).expect("an Ed25519 key");
    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.set_issuer(&["trellis-shop"]);
    validation.set_audience(&["trellis-shop"]);
    jsonwebtoken::decode::<Value>(token, &key, &validation)
        .expect("the token verifies")
        .claims
}

/// A login answers a 15-minute Bearer token whose claims name the user, the token (`jti`) and
/// its session (`sid`), and a refresh token; emails match in any case.
async fn login_issues_verifiable_tokens(service: Service) {
    let user = service
        .register("eve@example.com", "ample-sofa-1", "Eve")
        .await
        .body;
    let answer = service.login("EVE@example.com ", "ample-sofa-1").await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(answer.body["token_type"], "Bearer");
    assert_eq!(answer.body["expires_in"], 900);
    assert_eq!(answer.body["refresh_expires_in"], 30 * 24 * 3600);
    assert!(answer.body["refresh_token"].as_str().unwrap().len() >= 43);
    let claims = verified_claims(&service, answer.body["access_token"].as_str().unwrap()).await;
    assert_eq!(claims["sub"], user["id"]);
    assert_eq!(claims["email"], "eve@example.com");
    assert_eq!(claims["role"], "customer");
    assert_eq!(claims["iss"], "trellis-shop");
    assert_eq!(claims["aud"], "trellis-shop");
    let (iat, exp) = (
        claims["iat"].as_u64().unwrap(),
        claims["exp"].as_u64().unwrap(),
    );
    assert_eq!(exp - iat, 900);
    assert!(claims["jti"].is_string() && claims["sid"].is_string());

    let jwks = service.jwks().await;
    let key = &jwks["keys"][0];
    assert_eq!(key["kty"], "OKP");
    assert_eq!(key["crv"], "Ed25519");
    assert_eq!(key["alg"], "EdDSA");
    assert_eq!(key["use"], "sig");
    assert!(key["kid"].is_string() && key["x"].is_string());
}
on_both!(login_issues_verifiable_tokens);

/// A wrong password and an unknown email get the same 401.
async fn bad_credentials_are_indistinguishable(service: Service) {
    service
        .register("fay@example.com", "ample-sofa-1", "Fay")
        .await;
    let wrong = service.login("fay@example.com", "password2").await;
    let unknown = service.login("nobody@example.com", "ample-sofa-1").await;
    for answer in [&wrong, &unknown] {
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        assert_eq!(answer.code(), "invalid_credentials");
    }
    assert_eq!(wrong.body, unknown.body);
    let huge = service.login("fay@example.com", &"p".repeat(10_000)).await;
    assert_eq!(huge.status, StatusCode::UNAUTHORIZED);
}
on_both!(bad_credentials_are_indistinguishable);

/// The signing key lives in the database: after a restart the JWKS is the same and tokens
/// issued before still verify.
async fn restarts_keep_tokens_valid(service: Service) {
    service
        .register("gus@example.com", "ample-sofa-1", "Gus")
        .await;
    let token = service.login("gus@example.com", "ample-sofa-1").await.body["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let jwks_before = service.jwks().await;
    // A second instance on the same database (as after a restart) publishes the same key.
    let (addr, _db, _stop) = start(&service.url).await;
    let jwks_after: Value = reqwest::get(format!("http://{addr}/.well-known/jwks.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jwks_before, jwks_after);
    assert_eq!(jwks_after["keys"].as_array().unwrap().len(), 1);
    verified_claims(&service, &token).await;
}
on_both!(restarts_keep_tokens_valid);

/// Logs in at `addr` (another replica of `service`).
async fn login_at(service: &Service, addr: std::net::SocketAddr, password: &str) -> Answer {
    service
        .send(
            service
                .http
                .post(format!("http://{addr}/api/auth/token"))
                .json(&serde_json::json!({"email": "hux@example.com", "password": password})),
        )
        .await
}

/// Failed logins lock an account across replicas, with backoff: the first
/// `LOGIN_FAILURES_FREE` failures (spread over two replicas on one database, so neither
/// replica's own limit is reached) are 401; past them the account is locked: 429 with
/// `Retry-After` on either replica, even with the right password; once the lock has passed
/// the right password logs in and the count starts again.
async fn failed_logins_lock_the_account_on_every_replica(service: Service) {
    service
        .register("hux@example.com", "ample-sofa-1", "Hux")
        .await;
    let (other, _db, _stop) = start(&service.url).await;
    let replicas = [service.addr, other];
    let free = usize::try_from(shop_users::LOGIN_FAILURES_FREE).unwrap();
    for i in 0..=free {
        let answer = login_at(&service, replicas[i % 2], "not-his-password").await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "failure {i}");
    }
    // The failure past the free ones is counted after its answer: wrong guesses until one is
    // refused as locked (a few at most; each doubles the lock).
    let mut guesses = 0;
    let locked = loop {
        let answer = login_at(&service, replicas[guesses % 2], "not-his-password").await;
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            break answer;
        }
        guesses += 1;
        assert!(guesses < 5, "never locked: {:?}", answer.body);
    };
    assert_eq!(locked.code(), "too_many_attempts");
    let refused = service
        .http
        .post(format!("http://{other}/api/auth/token"))
        .json(&serde_json::json!({"email": "hux@example.com", "password": "ample-sofa-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        refused.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "the right password, locked"
    );
    let wait: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=8).contains(&wait), "retry after {wait} s");
    // A refused attempt counts nothing, so the right password may be tried until the lock
    // (perhaps doubled by a failure still being counted when Retry-After was read) passes.
    tokio::time::sleep(std::time::Duration::from_secs(wait)).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let answer = login_at(&service, service.addr, "ample-sofa-1").await;
        if answer.status == StatusCode::OK {
            break;
        }
        assert_eq!(answer.code(), "too_many_attempts", "{:?}", answer.body);
        assert!(tokio::time::Instant::now() < deadline, "still locked");
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let answer = login_at(&service, other, "not-his-password").await;
    assert_eq!(
        answer.status,
        StatusCode::UNAUTHORIZED,
        "the count started again"
    );
}
on_both!(failed_logins_lock_the_account_on_every_replica);
