//! Registration, the caller's profile, the admin account, gRPC GetUser.

use reqwest::StatusCode;
use serde_json::json;
use shop_contracts::proto::GetUserRequest;
use tonic::Code;

use crate::helpers::Service;
use crate::on_both;

/// A registration answers 201 with the profile; the email is stored lowercased and a second
/// registration with it, in any case, is 409 `email_taken`.
async fn registration_and_duplicates(service: Service) {
    let answer = service
        .register(" Ann@Example.COM", "correct horse", "Ann")
        .await;
    assert_eq!(answer.status, StatusCode::CREATED, "{:?}", answer.body);
    assert_eq!(answer.body["email"], "ann@example.com");
    assert_eq!(answer.body["name"], "Ann");
    assert_eq!(answer.body["role"], "customer");
    assert!(uuid::Uuid::parse_str(answer.body["id"].as_str().unwrap()).is_ok());

    let again = service
        .register("ANN@example.com", "another pass", "Ann 2")
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert_eq!(again.code(), "email_taken");
}
on_both!(registration_and_duplicates);

/// Bad input is a 400 naming the problem, and nothing is stored.
async fn bad_registrations_name_the_problem(service: Service) {
    let long_name = "n".repeat(101);
    let long_password = "p".repeat(129);
    let cases = [
        ("not-an-email", "ample-sofa-1", "Ann", "invalid_email"),
        ("ann@", "ample-sofa-1", "Ann", "invalid_email"),
        ("ann@example.com", "short7!", "Ann", "password_too_short"),
        (
            "ann@example.com",
            long_password.as_str(),
            "Ann",
            "password_too_long",
        ),
        ("ann@example.com", "ample-sofa-1", "   ", "invalid_name"),
        (
            "ann@example.com",
            "ample-sofa-1",
            long_name.as_str(),
            "invalid_name",
        ),
    ];
    for (email, password, name, code) in cases {
        let answer = service.register(email, password, name).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{email} {name}");
        assert_eq!(answer.code(), code, "{:?}", answer.body);
    }
    // The limits themselves are accepted.
    let ok = service
        .register("ann@example.com", &"p".repeat(128), &"n".repeat(100))
        .await;
    assert_eq!(ok.status, StatusCode::CREATED, "{:?}", ok.body);
    let unknown_field = service
        .post(
            "/api/users",
            json!({"email": "bob@example.com", "password": "ample-sofa-1", "name": "Bob", "role": "admin"}),
        )
        .await;
    assert_eq!(unknown_field.status, StatusCode::BAD_REQUEST);
    assert_eq!(unknown_field.code(), "invalid_json");
}
on_both!(bad_registrations_name_the_problem);

/// `GET /api/users/me` shows the caller; 401 without a caller; 404 for a vanished account.
async fn me_shows_the_caller(service: Service) {
    let created = service
        .register("cy@example.com", "ample-sofa-1", "Cy")
        .await
        .body;
    let id = created["id"].as_str().unwrap();
    let me = service
        .send(service.http.get(service.endpoint("/api/users/me")).header(
            trellis_service::auth::IDENTITY_HEADER,
            crate::helpers::identity(id, "customer"),
        ))
        .await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.body, created);
    let anonymous = service
        .send(service.http.get(service.endpoint("/api/users/me")))
        .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    let gone = service
        .send(service.http.get(service.endpoint("/api/users/me")).header(
            trellis_service::auth::IDENTITY_HEADER,
            crate::helpers::identity(&uuid::Uuid::now_v7().to_string(), "customer"),
        ))
        .await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
}
on_both!(me_shows_the_caller);

/// `ensure_admin` creates the admin once, leaves an existing account alone, and refuses
/// input registration would refuse.
async fn ensure_admin_creates_once(service: Service) {
    let created =
        shop_users::ensure_admin(&service.db, "Root@Example.com", "admin password", "Root")
            .await
            .unwrap();
    assert!(created);
    let again = shop_users::ensure_admin(&service.db, "root@example.com", "other password", "Root")
        .await
        .unwrap();
    assert!(!again);
    // The first password still works; the second never replaced it.
    let token = service.login("root@example.com", "admin password").await;
    assert_eq!(token.status, StatusCode::OK);
    assert_eq!(
        service
            .login("root@example.com", "other password")
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );

    // An existing customer is not promoted.
    service
        .register("cust@example.com", "ample-sofa-1", "Cust")
        .await;
    assert!(
        !shop_users::ensure_admin(&service.db, "cust@example.com", "ample-sofa-1", "Cust")
            .await
            .unwrap()
    );
    let err = shop_users::ensure_admin(&service.db, "nope", "admin password", "Root")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("invalid_email"), "{err}");

    let mut grpc = service.grpc();
    let users = [
        ("root@example.com", "admin"),
        ("cust@example.com", "customer"),
    ];
    for (email, role) in users {
        let token = service
            .login(
                email,
                if role == "admin" {
                    "admin password"
                } else {
                    "ample-sofa-1"
                },
            )
            .await;
        let claims =
            crate::tokens::verified_claims(&service, token.body["access_token"].as_str().unwrap())
                .await;
        assert_eq!(claims["role"], role);
        let user = grpc
            .get_user(GetUserRequest {
                id: claims["sub"].as_str().unwrap().to_owned(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(user.role, role);
        assert_eq!(user.email, email);
    }
}
on_both!(ensure_admin_creates_once);

/// gRPC GetUser: the user, NOT_FOUND for an unknown id, INVALID_ARGUMENT for an empty one.
async fn grpc_get_user(service: Service) {
    let created = service
        .register("dee@example.com", "ample-sofa-1", "Dee")
        .await
        .body;
    let mut grpc = service.grpc();
    let user = grpc
        .get_user(GetUserRequest {
            id: created["id"].as_str().unwrap().to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (user.email.as_str(), user.name.as_str(), user.role.as_str()),
        ("dee@example.com", "Dee", "customer")
    );
    let missing = grpc
        .get_user(GetUserRequest {
            id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let empty = grpc
        .get_user(GetUserRequest { id: String::new() })
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
}
on_both!(grpc_get_user);

/// The service serves its OpenAPI document, naming its routes.
#[tokio::test]
async fn openapi_is_served() {
    let service = crate::helpers::sqlite().await.unwrap();
    let doc = service
        .send(service.http.get(service.endpoint("/openapi.json")))
        .await
        .body;
    assert!(doc["paths"]["/api/users"]["post"].is_object(), "{doc}");
    assert!(doc["paths"]["/api/auth/token"]["post"].is_object());
    assert_eq!(doc, serde_json::to_value(shop_users::openapi()).unwrap());
}

/// A database that cannot be opened is an error naming the URL and the cause.
#[tokio::test]
async fn a_bad_database_url_names_itself() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let url = format!("sqlite://{}/sub/users.db", file.display());
    let err = shop_users::app(shop_users::Config {
        database_url: url.clone(),
        service_key: crate::helpers::key(),
    })
    .await
    .unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with(&format!("cannot open {url}: ")), "{text}");
    assert!(text.contains("cannot create the directory"), "{text}");
}

/// A gRPC channel to two replicas (two users services on one database) serves every call
/// while both run; once one stops, at most one call fails (the one that found it gone) and
/// the rest go to the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_spread_over_replicas_and_pass_over_a_stopped_one() {
    let service = crate::helpers::sqlite().await.expect("sqlite");
    let created = service
        .register("eli@example.com", "ample-sofa-1", "Eli")
        .await
        .body;
    let id = created["id"].as_str().unwrap().to_owned();
    let (replica, _replica_db, stop_replica) = crate::helpers::start(&service.url).await;
    let channel = trellis_service::grpc_channel(
        &format!("{},{replica}", service.addr),
        trellis_service::GrpcClientConfig::default(),
        crate::helpers::key().service_identity("orders"),
    )
    .expect("a channel to two replicas");
    let grpc = shop_contracts::proto::users_client::UsersClient::new(channel);
    let call = || {
        let mut grpc = grpc.clone();
        let request = GetUserRequest { id: id.clone() };
        async move { grpc.get_user(request).await }
    };
    for _ in 0..6 {
        call().await.expect("both replicas answer");
    }
    let _ = stop_replica.send(());
    let mut failed = 0;
    for _ in 0..10 {
        if call().await.is_err() {
            failed += 1;
        }
    }
    assert!(
        failed <= 1,
        "{failed} of 10 calls failed with one replica left"
    );
}
