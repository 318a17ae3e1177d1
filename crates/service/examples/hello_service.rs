//! A tiny service on the kit: notes kept per caller on a database, behind identity tokens.
//!
//! - `POST /notes` `{"body": "…"}` stores a note for the caller (401 without a valid identity
//!   token, 400 `invalid_note` for an empty or too long body, 400 `invalid_json` for a bad
//!   body).
//! - `GET /notes` lists the caller's notes.
//! - `GET /admin/notes/count` counts everyone's notes, for callers with the admin role only.
//! - `/healthz`, `/readyz` (pings the database) and a JSON 404 come from [`serve`].
//!
//! Run it with `cargo run -p trellis-service --example hello_service`. It opens
//! `DATABASE_URL` (default: a private in-memory SQLite database), listens on `LISTEN_ADDR`
//! (default `127.0.0.1:8080`), prints a customer's and an administrator's token (each valid
//! for a minute) with `curl` lines that use them, and serves until Ctrl-C. In a deployment
//! the tokens come from the gateway, signed with the key all services share.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use trellis_service::auth::{IDENTITY_HEADER, ServiceKey, admin_only, protect};
use trellis_service::{ApiError, ApiJson, Caller, Db, ROLE_ADMIN, ROLE_CUSTOMER, on_db, serve};

/// The notes table; safe to apply on every start.
pub(crate) const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS notes (
    author TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS notes_author ON notes (author)";

/// Longest note, in bytes.
pub(crate) const NOTE_BYTES_MAX: usize = 1_000;

/// A note as sent and as answered.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Note {
    /// What the note says.
    pub(crate) body: String,
}

/// The router: the notes routes for any verified caller, the count for administrators.
pub(crate) fn app(db: Db, key: &ServiceKey) -> Router {
    let admin = admin_only(
        Router::new()
            .route("/admin/notes/count", get(count_notes))
            .with_state(db.clone()),
    );
    let notes = Router::new()
        .route("/notes", get(list_notes).post(add_note))
        .with_state(db);
    // `protect` goes outside `admin_only`: it verifies the caller `admin_only` checks.
    protect(notes.merge(admin), key)
}

async fn add_note(
    caller: Caller,
    State(db): State<Db>,
    ApiJson(note): ApiJson<Note>,
) -> Result<(StatusCode, axum::Json<Note>), ApiError> {
    if note.body.trim().is_empty() || note.body.len() > NOTE_BYTES_MAX {
        return Err(ApiError::bad_request(
            "invalid_note",
            format!("a note has 1 to {NOTE_BYTES_MAX} bytes of text"),
        ));
    }
    on_db!(&db, |pool| sqlx::query(
        "INSERT INTO notes (author, body) VALUES ($1, $2)"
    )
    .bind(&caller.user_id)
    .bind(&note.body)
    .execute(pool)
    .await
    .map(|r| r.rows_affected()))?;
    Ok((StatusCode::CREATED, axum::Json(note)))
}

async fn list_notes(
    caller: Caller,
    State(db): State<Db>,
) -> Result<axum::Json<Vec<Note>>, ApiError> {
    let bodies: Vec<String> = on_db!(&db, |pool| sqlx::query(
        "SELECT body FROM notes WHERE author = $1"
    )
    .bind(&caller.user_id)
    .fetch_all(pool)
    .await
    .map(|rows| rows.iter().map(|row| row.get("body")).collect()))?;
    Ok(axum::Json(
        bodies.into_iter().map(|body| Note { body }).collect(),
    ))
}

async fn count_notes(State(db): State<Db>) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let count: i64 = on_db!(&db, |pool| sqlx::query_scalar("SELECT COUNT(*) FROM notes")
        .fetch_one(pool)
        .await)?;
    Ok(axum::Json(serde_json::json!({ "count": count })))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "sqlite::memory:".to_owned());
    let addr = std::env::var("LISTEN_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".to_owned());
    let db = Db::open_with_schema(&url, SCHEMA).await?;
    // One process here; services of one deployment share the key (`ServiceKey::from_env_or_file`).
    let key = ServiceKey::generate()?;
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let base = format!("http://{}", listener.local_addr()?);
    let signer = key.signer("example");
    let customer = signer.token("alice", ROLE_CUSTOMER)?;
    let admin = signer.token("root", ROLE_ADMIN)?;
    let header = IDENTITY_HEADER;
    println!("serving {url} on {base} (Ctrl-C stops); tokens are valid for a minute");
    println!(
        "curl -H '{header}: {}' -H 'content-type: application/json' -d '{{\"body\":\"hello\"}}' {base}/notes",
        customer.to_str()?
    );
    println!("curl -H '{header}: {}' {base}/notes", customer.to_str()?);
    println!(
        "curl -H '{header}: {}' {base}/admin/notes/count",
        admin.to_str()?
    );
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    serve(
        listener,
        app(db.clone(), &key),
        Some(db.clone()),
        None,
        shutdown,
    )
    .await?;
    db.close().await;
    Ok(())
}
