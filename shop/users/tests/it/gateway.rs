//! The gateway verifies the service's tokens through the JWKS it publishes.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::StatusCode;
use serde_json::Value;
use trellis_gateway::{Config, Gateway, GatewayHooks, HookDecision, RequestCtx};
use trellis_service::auth::{IDENTITY_HEADER, Signer};

use crate::helpers::sqlite;

/// What the shop's gateway hooks do for the users service: sign the identity the gateway
/// verified, so the service (which reads no identity header) knows its caller.
#[derive(Debug)]
struct SignIdentity(Signer);

impl GatewayHooks for SignIdentity {
    fn request_filter(
        &self,
        _ctx: &mut RequestCtx,
        _request: &mut axum::http::request::Parts,
    ) -> HookDecision {
        HookDecision::Continue
    }

    fn upstream_request_filter(&self, ctx: &RequestCtx, request: &mut axum::http::request::Parts) {
        request.headers.remove(IDENTITY_HEADER);
        let header = |name: &str| request.headers.get(name).and_then(|v| v.to_str().ok());
        if let (Some(_), Some(id)) = (&ctx.subject, header("x-user-id")) {
            let role = header("x-user-role").unwrap_or("customer");
            let token = self.0.token(id, role).expect("signs");
            request.headers.insert(IDENTITY_HEADER, token);
        }
    }
}

/// A gateway in front of `users` as the shop configures it for sessions: tokens checked
/// against the JWKS (refetched on any unknown kid, refreshed every second) and the
/// revocation feed (polled every 100 ms); answers its address and its stop switch.
pub(crate) async fn session_gateway(
    users: &crate::helpers::Service,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let config = Config::from_toml(&format!(
        r#"
        [server]
        listen = "127.0.0.1:0"

        [clusters.users]
        endpoints = ["{addr}"]

        [auth.users]
        type = "jwt"
        jwks_url = "http://{addr}/.well-known/jwks.json"
        jwks_refresh_ms = 1000
        jwks_refetch_min_interval_ms = 0
        issuers = ["trellis-shop"]
        audiences = ["trellis-shop"]
        claims_to_headers = {{ sub = "x-user-id", role = "x-user-role" }}
        revocations_url = "http://{addr}/api/auth/revocations"
        revocations_refresh_ms = 100

        [[routes]]
        name = "open"
        path_prefix = "/api/auth/token"
        cluster = "users"

        [[routes]]
        name = "refresh"
        path_prefix = "/api/auth/refresh"
        cluster = "users"

        [[routes]]
        name = "authenticated"
        path_prefix = "/api"
        cluster = "users"
        auth = ["users"]
        "#,
        addr = users.addr,
    ))
    .expect("gateway config");
    let gateway = Gateway::from_config(config)
        .await
        .expect("gateway")
        .with_hooks(std::sync::Arc::new(SignIdentity(
            crate::helpers::key().signer("gateway"),
        )));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gateway.serve(listener, async {
        let _ = stopped.await;
    }));
    (addr, stop)
}

/// A token from `/api/auth/token` passes a gateway route that requires a JWT (the gateway
/// fetched the key from `/.well-known/jwks.json` and forwards the caller's id and role); a
/// tampered or missing token is 401; a route requiring the admin role admits an admin's
/// token and refuses a customer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_accepts_issued_tokens_and_refuses_tampered_ones() {
    let users = sqlite().await.expect("sqlite");
    let config = Config::from_toml(&format!(
        r#"
        [server]
        listen = "127.0.0.1:0"

        [clusters.users]
        endpoints = ["{addr}"]

        [auth.users]
        type = "jwt"
        jwks_url = "http://{addr}/.well-known/jwks.json"
        issuers = ["trellis-shop"]
        audiences = ["trellis-shop"]
        claims_to_headers = {{ sub = "x-user-id", role = "x-user-role" }}

        [[routes]]
        name = "admin-only"
        path_prefix = "/openapi.json"
        cluster = "users"
        auth = ["users"]
        required_roles = ["admin"]

        [[routes]]
        name = "me"
        path_prefix = "/api/users/me"
        cluster = "users"
        auth = ["users"]
        "#,
        addr = users.addr,
    ))
    .expect("gateway config");
    let gateway = Gateway::from_config(config)
        .await
        .expect("gateway")
        .with_hooks(std::sync::Arc::new(SignIdentity(
            crate::helpers::key().signer("gateway"),
        )));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway_addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gateway.serve(listener, async {
        let _ = stopped.await;
    }));

    let user = users
        .register("hal@example.com", "ample-sofa-1", "Hal")
        .await
        .body;
    let token = users.login("hal@example.com", "ample-sofa-1").await.body["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let me = |bearer: Option<String>| {
        let mut request = users
            .http
            .get(format!("http://{gateway_addr}/api/users/me"));
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        request.send()
    };

    let answer = me(Some(token.clone())).await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body, user);

    // Flip one character of the signature.
    let (head, signature) = token.rsplit_once('.').unwrap();
    let mut chars: Vec<char> = signature.chars().collect();
    chars[10] = if chars[10] == 'A' { 'B' } else { 'A' };
    let tampered = format!("{head}.{}", chars.into_iter().collect::<String>());
    let answer = me(Some(tampered)).await.unwrap();
    assert_eq!(answer.status(), StatusCode::UNAUTHORIZED);

    // Claims changed (role: admin) under the original signature.
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    claims["role"] = "admin".into();
    let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    let forged = format!("{}.{forged_payload}.{}", parts[0], parts[2]);
    assert_eq!(
        me(Some(forged)).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );

    assert_eq!(me(None).await.unwrap().status(), StatusCode::UNAUTHORIZED);

    // The role claim is what the gateway's role checks read.
    assert!(
        shop_users::ensure_admin(&users.db, "root@example.com", "admin password", "Root")
            .await
            .unwrap()
    );
    let admin_token = users.login("root@example.com", "admin password").await.body["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let admin_only = |token: String| {
        users
            .http
            .get(format!("http://{gateway_addr}/openapi.json"))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(
        admin_only(token).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        admin_only(admin_token).await.unwrap().status(),
        StatusCode::OK
    );
    let _ = stop.send(());
}
