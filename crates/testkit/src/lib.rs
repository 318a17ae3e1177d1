//! Test helpers shared by trellis crates: a fresh PostgreSQL database or a unique NATS prefix
//! per test, dropped afterwards, and one rule for unreachable servers.
//!
//! Tests read `TRELLIS_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`)
//! and `TRELLIS_TEST_NATS_URL` (default `nats://127.0.0.1:4222`). When the server does not
//! answer, the helper returns `None` after printing why, so the test can return early, except
//! when `CI=true`: then an unreachable server is a failure (the helper panics with the reason).
//!
//! ```no_run
//! # async fn demo() {
//! let Some(db) = trellis_testkit::postgres("appends_are_atomic").await else { return };
//! let pool = sqlx::PgPool::connect(&db.url).await.expect("connect");
//! // ... the database is dropped when `db` goes out of scope.
//! # drop(pool);
//! # }
//! ```
#![forbid(unsafe_code)]

use std::time::Duration;

use futures_util::StreamExt;
use sqlx::Connection;

/// The PostgreSQL server tests use unless `TRELLIS_TEST_POSTGRES_URL` says otherwise.
pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// The NATS server tests use unless `TRELLIS_TEST_NATS_URL` says otherwise.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// How long a helper waits for a server before calling it unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether this run is CI (`CI=true`), where a missing server fails instead of skipping.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A name unique to this test run: the test's name in lower-case letters, digits and
/// underscores, plus a random suffix. Safe as a PostgreSQL identifier or a NATS token.
pub fn unique_name(test_name: &str) -> String {
    let mut base: String = test_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    if !base.starts_with(|c: char| c.is_ascii_lowercase()) {
        base.insert(0, 't');
    }
    format!("{base}_{:08x}", fastrand::u32(..))
}

/// Says why the test is skipped outside CI; panics in CI.
fn skip_or_fail(what: &str, url: &str, error: &dyn std::fmt::Display, test_name: &str) {
    let message = format!("{what} at {url} is unreachable ({error})");
    assert!(
        !in_ci(),
        "CI=true and {message}: start it (see .ci/run) or fix the URL"
    );
    eprintln!("skipping {test_name}: {message}");
}

/// A fresh PostgreSQL database, dropped (with its connections) when this value is dropped.
#[derive(Debug)]
pub struct TestPostgres {
    /// Connection URL of the fresh database.
    pub url: String,
    /// The database's name.
    pub database: String,
    admin_url: String,
}

/// Creates a fresh database for `test_name`, or `None` when PostgreSQL is unreachable outside CI.
///
/// # Panics
/// In CI when the server is unreachable, and whenever the server answers but refuses to
/// create the database.
pub async fn postgres(test_name: &str) -> Option<TestPostgres> {
    let admin_url = std::env::var("TRELLIS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_owned());
    let mut admin = match tokio::time::timeout(
        CONNECT_TIMEOUT,
        sqlx::PgConnection::connect(&admin_url),
    )
    .await
    {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => {
            skip_or_fail("PostgreSQL", &admin_url, &error, test_name);
            return None;
        }
        Err(_) => {
            skip_or_fail("PostgreSQL", &admin_url, &"no answer within 5 s", test_name);
            return None;
        }
    };
    let database = unique_name(test_name);
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE \"{database}\""
    )))
    .execute(&mut admin)
    .await
    .unwrap_or_else(|error| panic!("creating test database {database}: {error}"));
    let _ = admin.close().await;
    let url = with_database(&admin_url, &database);
    Some(TestPostgres {
        url,
        database,
        admin_url,
    })
}

/// Replaces the database part of a PostgreSQL URL.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let database = self.database.clone();
        // Drop runs inside the test's runtime, which cannot be blocked on: use a thread with
        // its own small runtime.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut admin = sqlx::PgConnection::connect(&admin_url).await.ok()?;
                let sql = format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)");
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&mut admin)
                    .await
                    .ok()?;
                admin.close().await.ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(()))) {
            eprintln!("warning: could not drop test database {}", self.database);
        }
    }
}

/// A NATS connection URL and a prefix unique to one test. Streams whose names start with the
/// prefix (upper-cased, as stream names usually are) are deleted when this value is dropped.
#[derive(Debug)]
pub struct TestNats {
    /// The server URL.
    pub url: String,
    /// A unique prefix for this test's subjects and stream names (`[a-z0-9_]`).
    pub prefix: String,
}

/// A unique NATS prefix for `test_name`, or `None` when NATS is unreachable outside CI.
///
/// # Panics
/// In CI when the server is unreachable.
pub async fn nats(test_name: &str) -> Option<TestNats> {
    let url =
        std::env::var("TRELLIS_TEST_NATS_URL").unwrap_or_else(|_| DEFAULT_NATS_URL.to_owned());
    let connect = async_nats::ConnectOptions::new()
        .connection_timeout(CONNECT_TIMEOUT)
        .connect(&url);
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(client)) => {
            let _ = client.drain().await;
        }
        Ok(Err(error)) => {
            skip_or_fail("NATS", &url, &error, test_name);
            return None;
        }
        Err(_) => {
            skip_or_fail("NATS", &url, &"no answer within 5 s", test_name);
            return None;
        }
    }
    Some(TestNats {
        url,
        prefix: unique_name(test_name),
    })
}

impl Drop for TestNats {
    fn drop(&mut self) {
        let url = self.url.clone();
        let prefixes = [self.prefix.clone(), self.prefix.to_ascii_uppercase()];
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let client = async_nats::connect(&url).await.ok()?;
                let jetstream = async_nats::jetstream::new(client.clone());
                let mut names = jetstream.stream_names();
                let mut doomed = Vec::new();
                while let Some(Ok(name)) = names.next().await {
                    if prefixes.iter().any(|p| name.starts_with(p.as_str())) {
                        doomed.push(name);
                    }
                }
                for name in doomed {
                    let _ = jetstream.delete_stream(&name).await;
                }
                client.drain().await.ok()
            })
        })
        .join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_are_identifiers_and_differ() {
        let a = unique_name("Appends are Atomic!");
        let b = unique_name("Appends are Atomic!");
        assert_ne!(a, b);
        assert!(a.starts_with("appends_are_atomic_"));
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        );
        assert!(unique_name("1st").starts_with('t'));
    }

    #[test]
    fn the_database_part_of_a_url_is_replaced() {
        assert_eq!(
            with_database("postgres://u@h:5432/test", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            with_database("postgres://u@h:5432/test?sslmode=disable", "x"),
            "postgres://u@h:5432/x?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://u@h:5432", "x"),
            "postgres://u@h:5432/x"
        );
    }

    #[tokio::test]
    async fn a_fresh_database_is_created_and_dropped() {
        let Some(db) = postgres("testkit_roundtrip").await else {
            return;
        };
        let mut connection = sqlx::PgConnection::connect(&db.url)
            .await
            .expect("connect to the fresh database");
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&mut connection)
            .await
            .expect("query");
        assert_eq!(one, 1);
        connection.close().await.expect("close");
        let (admin_url, name) = (db.admin_url.clone(), db.database.clone());
        drop(db);
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .expect("admin");
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(&name)
                .fetch_one(&mut admin)
                .await
                .expect("query");
        assert!(!exists, "the test database is dropped");
    }

    #[tokio::test]
    async fn nats_answers_with_jetstream() {
        let Some(nats) = nats("testkit_nats").await else {
            return;
        };
        let client = async_nats::connect(&nats.url).await.expect("connect");
        let jetstream = async_nats::jetstream::new(client);
        let stream = jetstream
            .create_stream(async_nats::jetstream::stream::Config {
                name: nats.prefix.to_ascii_uppercase(),
                subjects: vec![format!("{}.>", nats.prefix)],
                ..Default::default()
            })
            .await
            .expect("JetStream is enabled");
        drop(stream);
    }
}
