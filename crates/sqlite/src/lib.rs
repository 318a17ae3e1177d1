//! How trellis opens a SQLite database: one set of settings for every embedded backend (the
//! event store, the bus's durable log, the saga log, a service's own tables), so a change to
//! durability or locking lands once.
//!
//! [`connect_options`] turns a `sqlite://path` URL (also `sqlite:path`, and `sqlite::memory:`
//! for tests) into sqlx connect options with:
//! - **WAL** journaling (readers never block the writer; not for an in-memory database);
//! - **`synchronous = FULL`**: a commit is on disk when it returns (about 5,000 commits/s
//!   measured here; NORMAL is ten times faster but can lose the last commits on power loss,
//!   see ../shared/DEPENDENCIES.md). Callers that want NORMAL say so where they call it;
//! - a **busy timeout** of [`BUSY_TIMEOUT`], so a writer waits for another process's write
//!   instead of failing at once (writers still take `BEGIN IMMEDIATE` themselves);
//! - **foreign keys** on, and the file (and its parent directory) created when missing;
//! - each connection's thread (sqlx runs a SQLite connection on a thread of its own) named
//!   after the file, so `top -H` and `perf` say which database is busy.
//!
//! [`pool_options`] gives the pool settings to use with them (no ping before each acquire).
//!
//! Why a crate of its own: the four backends live in four crates with no common dependency
//! below them, and this is the one thing they must agree on.
//!
//! # Example
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let url = format!("sqlite://{}/data/app.db", dir.path().display());
//! let options = trellis_sqlite::connect_options(&url)?;
//! let pool = sqlx::sqlite::SqlitePoolOptions::new()
//!     .max_connections(2)
//!     .connect_with(options)
//!     .await?;
//! let mode: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&pool).await?;
//! assert_eq!(mode, "wal");
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

/// How long a connection waits for another connection's write lock before `SQLITE_BUSY`.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The name of a connection's thread: the file's stem and the connection's number, cut to the
/// 15 bytes Linux keeps, so `top -H` and `perf` show which database a thread works for.
fn thread_name(stem: &str, id: u64) -> String {
    let suffix = format!("#{id}");
    let mut name: String = stem
        .chars()
        .scan(0, |bytes, c| {
            *bytes += c.len_utf8();
            (*bytes + suffix.len() <= THREAD_NAME_BYTES_MAX).then_some(c)
        })
        .collect();
    name.push_str(&suffix);
    name
}

/// How many bytes of a thread's name Linux keeps (16 with the terminating zero).
const THREAD_NAME_BYTES_MAX: usize = 15;

/// Options for a pool of connections opened with [`connect_options`]: sqlx's defaults, except
/// that a connection is not pinged before the pool hands it out.
///
/// Why: sqlx runs each SQLite connection on a thread of its own, and its default check
/// (`test_before_acquire`) sends that thread a ping and waits for the answer on every acquire:
/// a round trip to another thread (two wake-ups) before every statement or transaction, to
/// test a connection to a local file that cannot have hung up. Without it the shop made 7-15%
/// fewer context switches per order (docs/BENCHMARKS.md, issue 19). A connection that did
/// fail still fails the statement run on it, with the error. (sqlx also pings a connection when it goes back to the pool, to
/// flush a cancelled statement; that one has no switch and stays.)
///
/// # Examples
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = trellis_sqlite::pool_options()
///     .max_connections(1)
///     .connect_with(trellis_sqlite::connect_options("sqlite::memory:")?)
///     .await?;
/// let one: i64 = sqlx::query_scalar("SELECT 1").fetch_one(&pool).await?;
/// assert_eq!(one, 1);
/// # Ok(()) }
/// ```
pub fn pool_options() -> SqlitePoolOptions {
    SqlitePoolOptions::new().test_before_acquire(false)
}

/// Why a SQLite URL could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Not a `sqlite:` URL.
    #[error("not a SQLite URL: {0:?} (expected sqlite://PATH)")]
    NotSqlite(String),
    /// sqlx refused the URL.
    #[error("bad SQLite URL {url:?}: {source}")]
    Url {
        /// The URL.
        url: String,
        /// sqlx's reason.
        source: sqlx::Error,
    },
    /// The directory of the database file could not be created.
    #[error("cannot create the directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

impl OpenError {
    /// Never: a bad URL or an unwritable directory stays so.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

impl From<OpenError> for sqlx::Error {
    /// sqlx's own error back for a URL it refused; a configuration error otherwise, so crates
    /// whose errors wrap `sqlx::Error` need no new variant.
    fn from(error: OpenError) -> Self {
        match error {
            OpenError::Url { source, .. } => source,
            other => Self::Configuration(Box::new(other)),
        }
    }
}

/// Whether `url` names a SQLite database.
pub fn is_sqlite_url(url: &str) -> bool {
    url.starts_with("sqlite:")
}

/// Whether `url` names an in-memory database (one per connection: use a pool of one).
pub fn is_memory_url(url: &str) -> bool {
    matches!(url, "sqlite::memory:" | "sqlite://:memory:")
}

/// The connect options for `url` with trellis's settings (see the crate docs); creates the
/// file's parent directory.
///
/// # Errors
/// [`OpenError`] for a URL that is not SQLite or that sqlx refuses, or a directory that
/// cannot be created.
pub fn connect_options(url: &str) -> Result<SqliteConnectOptions, OpenError> {
    let Some(rest) = url.strip_prefix("sqlite:") else {
        return Err(OpenError::NotSqlite(url.to_owned()));
    };
    let url_err = |source| OpenError::Url {
        url: url.to_owned(),
        source,
    };
    let options = if is_memory_url(url) {
        SqliteConnectOptions::from_str("sqlite::memory:").map_err(url_err)?
    } else {
        // Keep sqlx's own parsing for query parameters (`?mode=ro`, …).
        let path = rest.trim_start_matches("//");
        let file = path.split('?').next().unwrap_or(path);
        if let Some(dir) = Path::new(file).parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|source| OpenError::CreateDir {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let stem = Path::new(file)
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .unwrap_or_default();
        SqliteConnectOptions::from_str(&format!("sqlite://{path}"))
            .map_err(url_err)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .thread_name(move |id| thread_name(&stem, id))
    };
    Ok(options
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_that_is_not_sqlite_is_refused() {
        assert!(matches!(
            connect_options("postgres://x/y"),
            Err(OpenError::NotSqlite(_))
        ));
    }

    #[tokio::test]
    async fn a_file_in_a_missing_directory_is_created_in_wal_with_full_sync() {
        let dir = tempfile::tempdir().expect("tempdir");
        for url in [
            format!("sqlite://{}/a/b.db", dir.path().display()),
            format!("sqlite:{}/c/d.db", dir.path().display()),
        ] {
            let pool = sqlx::sqlite::SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(connect_options(&url).expect("options"))
                .await
                .expect("opens");
            let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
                .fetch_one(&pool)
                .await
                .expect("pragma");
            let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
                .fetch_one(&pool)
                .await
                .expect("pragma");
            assert_eq!((mode.as_str(), sync), ("wal", 2), "{url}");
            pool.close().await;
        }
    }

    #[test]
    fn a_thread_name_keeps_the_number_and_fits_linux() {
        assert_eq!(thread_name("orders-saga", 3), "orders-saga#3");
        assert_eq!(thread_name("inventory-events", 12), "inventory-ev#12");
        assert_eq!(thread_name("ééééééé", 1), "éééééé#1");
        for (stem, id) in [("a-very-long-database-name", 12345), ("", 0), ("ü", 7)] {
            assert!(thread_name(stem, id).len() <= THREAD_NAME_BYTES_MAX);
        }
    }

    #[tokio::test]
    async fn an_in_memory_database_opens() {
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(connect_options("sqlite::memory:").expect("options"))
            .await
            .expect("opens");
        let one: i64 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&pool)
            .await
            .expect("query");
        assert_eq!(one, 1);
    }
}
