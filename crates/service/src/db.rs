//! A database chosen by URL: SQLite (embedded default) or PostgreSQL.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, SqlitePool};

/// Most connections a PostgreSQL pool opens.
pub const POOL_CONNECTIONS_MAX: u32 = 16;

/// The environment variable that caps every PostgreSQL pool of a process (replicas sharing one
/// server's `max_connections`: `trellis up --processes --replicas` sets it for its children).
pub const PG_POOL_MAX_ENV: &str = "TRELLIS_PG_POOL_MAX";

/// `default`, or less when [`PG_POOL_MAX_ENV`] says so (a positive number; anything else is
/// ignored).
pub fn pg_pool_max(default: u32) -> u32 {
    std::env::var(PG_POOL_MAX_ENV)
        .ok()
        .and_then(|value| value.trim().parse::<u32>().ok())
        .filter(|&cap| cap > 0)
        .map_or(default, |cap| cap.min(default))
}

/// Most connections a SQLite pool opens. Each one is a thread that sqlx hands every
/// statement to; SQLite takes one writer at a time and WAL readers do not block it, so two
/// connections keep a service busy, and more only spread its statements over more threads to
/// wake (the shop's load benchmark: 16 per pool held 80–90 orders/s under 100 ms p99 with the
/// other changes of that day not yet made; 4 and 2 both reach 400–500/s, 2 with lower maxima).
pub const SQLITE_CONNECTIONS_MAX: u32 = 2;
/// How long SQLite waits for a lock held by another connection before failing.
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a caller waits for a free pooled connection.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection pool on one of the two engines.
///
/// Run queries with [`on_db!`](crate::on_db), which compiles the same body for each variant.
#[derive(Debug, Clone)]
pub enum Db {
    /// An embedded SQLite file in WAL mode.
    Sqlite(SqlitePool),
    /// A PostgreSQL server.
    Postgres(PgPool),
}

/// Why a database could not be opened or prepared.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL names neither `sqlite://` nor `postgres://` (the caller's to fix). It holds
    /// the URL as [`redact_url`] shows it.
    #[error("unsupported database URL {0:?}: expected sqlite://PATH or postgres://…")]
    UnsupportedUrl(String),
    /// The SQLite file's directory could not be created.
    #[error("cannot create the directory for {path}: {source}")]
    CreateDir {
        /// The directory.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The driver failed.
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
}

impl DbError {
    /// Whether trying again may succeed: the server did not answer in time, a connection
    /// broke, or the pool had none free. A bad URL, a missing directory that cannot be made,
    /// a refused login or a schema the engine rejects stay that way.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::UnsupportedUrl(_) | Self::CreateDir { .. } => false,
            Self::Sqlx(e) => is_transient(e),
        }
    }
}

/// Whether a driver error is one that trying again may cure: a broken or closed connection,
/// no pooled connection in time, a PostgreSQL server shutting down, restarting or cutting
/// connections (SQLSTATE class 08, 57P01–57P03), a serialization failure or deadlock
/// (40001, 40P01), or SQLite busy or locked.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08")
                || matches!(
                    code.as_ref(),
                    "57P01" | "57P02" | "57P03" | "40001" | "40P01" | "5" | "6" | "517" | "262"
                )
        }),
        _ => false,
    }
}

/// Why [`Db::open_with_schema`] could not make a service's database ready. Both variants
/// name the database by its URL with the password hidden ([`redact_url`]), so the message
/// can go to a log or a terminal as it is.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The database could not be opened (bad URL, unreachable server, refused login, a
    /// directory that cannot be made).
    #[error("cannot open {url}: {source}")]
    Connect {
        /// The database URL, password hidden.
        url: String,
        /// The cause.
        source: DbError,
    },
    /// The database opened but the schema script failed.
    #[error("cannot apply the schema to {url}: {source}")]
    Schema {
        /// The database URL, password hidden.
        url: String,
        /// The cause.
        source: DbError,
    },
}

impl OpenError {
    /// The database URL, password hidden.
    pub fn url(&self) -> &str {
        match self {
            Self::Connect { url, .. } | Self::Schema { url, .. } => url,
        }
    }

    /// Whether trying again may succeed (see [`DbError::is_retryable`]).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Connect { source, .. } | Self::Schema { source, .. } => source.is_retryable(),
        }
    }
}

/// A database URL fit for an error message or a log: the password in the user info
/// (`postgres://user:secret@host/db`) and a `password=` query parameter are replaced with
/// `***`; anything else is kept, so the reader can still tell which database it was.
///
/// # Examples
/// ```
/// use trellis_service::redact_url;
///
/// assert_eq!(redact_url("postgres://shop:s3cret@db:5432/orders"), "postgres://shop:***@db:5432/orders");
/// assert_eq!(redact_url("postgres://db/orders?user=shop&password=s3cret"), "postgres://db/orders?user=shop&password=***");
/// assert_eq!(redact_url("sqlite://data/users.db"), "sqlite://data/users.db");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // The authority ends at the path, the query or the fragment; its user info ends at the
    // last `@` in it, so an unescaped `@` in the password does not leave a piece visible.
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        None => tail.to_owned(),
        Some((path, query)) => {
            let (query, fragment) = match query.split_once('#') {
                Some((query, fragment)) => (query, Some(fragment)),
                None => (query, None),
            };
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) if name.eq_ignore_ascii_case("password") => {
                        format!("{name}=***")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            let mut tail = format!("{path}?{}", query.join("&"));
            if let Some(fragment) = fragment {
                tail.push('#');
                tail.push_str(fragment);
            }
            tail
        }
    };
    format!("{scheme}://{authority}{tail}")
}

impl Db {
    /// Opens the database a URL names: `sqlite://PATH` (created with its directory when
    /// missing; `sqlite::memory:` for a private in-memory database) or `postgres://…`.
    pub async fn connect(url: &str) -> Result<Self, DbError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let options = PgConnectOptions::from_str(url)?;
            let pool = PgPoolOptions::new()
                .max_connections(pg_pool_max(POOL_CONNECTIONS_MAX))
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect_with(options)
                .await?;
            return Ok(Self::Postgres(pool));
        }
        if !trellis_sqlite::is_sqlite_url(url) {
            return Err(DbError::UnsupportedUrl(redact_url(url)));
        }
        let memory = trellis_sqlite::is_memory_url(url);
        let options = trellis_sqlite::connect_options(url)
            .map_err(|e| match e {
                trellis_sqlite::OpenError::CreateDir { path, source } => {
                    DbError::CreateDir { path, source }
                }
                other => DbError::Sqlx(other.into()),
            })?
            .busy_timeout(SQLITE_BUSY_TIMEOUT);
        let pool = trellis_sqlite::pool_options()
            // One connection for an in-memory database: each connection would see its own.
            .max_connections(if memory { 1 } else { SQLITE_CONNECTIONS_MAX })
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        Ok(Self::Sqlite(pool))
    }

    /// Opens the database `url` names, as [`connect`](Self::connect) does, and applies the
    /// service's `schema` script with [`run_schema`](Self::run_schema): what a service does
    /// first when it starts, and what a tool working on its database without serving does
    /// too. Write the script so it can run on every start (`CREATE … IF NOT EXISTS`).
    ///
    /// # Examples
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), trellis_service::OpenError> {
    /// use trellis_service::Db;
    ///
    /// const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS notes (id TEXT PRIMARY KEY, body TEXT NOT NULL)";
    /// let db = Db::open_with_schema("sqlite::memory:", SCHEMA).await?;
    /// # let _ = db;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`OpenError::Connect`] when the database cannot be opened, [`OpenError::Schema`] when
    /// the script fails; both name the URL without its password.
    pub async fn open_with_schema(url: &str, schema: &str) -> Result<Self, OpenError> {
        let db = Self::connect(url)
            .await
            .map_err(|source| OpenError::Connect {
                url: redact_url(url),
                source,
            })?;
        if let Err(source) = db.run_schema(schema).await {
            db.close().await;
            return Err(OpenError::Schema {
                url: redact_url(url),
                source,
            });
        }
        Ok(db)
    }

    /// Whether this is PostgreSQL.
    pub fn is_postgres(&self) -> bool {
        matches!(self, Self::Postgres(_))
    }

    /// Runs a schema script: statements separated by `;`, each run on its own. Write DDL both
    /// engines accept (`TEXT`, `BIGINT`, `CREATE … IF NOT EXISTS`). On PostgreSQL the script
    /// runs under an advisory lock, so services starting together do not race on it.
    pub async fn run_schema(&self, script: &str) -> Result<(), DbError> {
        let statements: Vec<&str> = script
            .split(';')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        match self {
            Self::Sqlite(pool) => {
                for statement in statements {
                    sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                        .execute(pool)
                        .await?;
                }
            }
            Self::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock(7427011)")
                    .execute(&mut *tx)
                    .await?;
                for statement in statements {
                    sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// Checks the database answers (what `/readyz` asks).
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        crate::on_db!(self, |pool| sqlx::query("SELECT 1")
            .execute(pool)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Closes the pool, waiting for connections to be returned.
    pub async fn close(&self) {
        crate::on_db!(self, |pool| pool.close().await);
    }
}

/// The URL of database `name` on the PostgreSQL server `server_url` names: its path (the
/// database) replaced, its query kept.
///
/// ```
/// assert_eq!(
///     trellis_service::postgres_database_url("postgres://app@db:5432/postgres?sslmode=disable", "orders"),
///     "postgres://app@db:5432/orders?sslmode=disable"
/// );
/// ```
pub fn postgres_database_url(server_url: &str, name: &str) -> String {
    let (base, query) = server_url
        .split_once('?')
        .map_or((server_url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    }
}

/// Whether `name` can be a database name here without quoting surprises: 1 to 63 of
/// `[a-z0-9_]`, not starting with a digit.
fn plain_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Creates database `name` on the PostgreSQL server `server_url` names when it does not
/// exist yet (two callers racing both succeed), and returns its URL
/// ([`postgres_database_url`]). What a service's first start on a fresh server needs.
///
/// # Errors
/// [`DbError::UnsupportedUrl`] for a URL that is not `postgres://`, or a name outside
/// `[a-z0-9_]{1,63}`; [`DbError::Sqlx`] when the server refuses.
pub async fn create_postgres_database(server_url: &str, name: &str) -> Result<String, DbError> {
    use sqlx::Connection as _;
    if !(server_url.starts_with("postgres://") || server_url.starts_with("postgresql://"))
        || !plain_identifier(name)
    {
        return Err(DbError::UnsupportedUrl(format!(
            "{} (database {name:?})",
            redact_url(server_url)
        )));
    }
    let mut admin = sqlx::PgConnection::connect(server_url).await?;
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_optional(&mut admin)
        .await?;
    if exists.is_none() {
        let created = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await;
        match created {
            Ok(_) => {}
            // 42P04 duplicate_database, 23505 the catalog's unique index: another caller won.
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("42P04" | "23505")) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let _ = admin.close().await;
    Ok(postgres_database_url(server_url, name))
}

/// Drops database `name` on the server `server_url` names, closing its connections first
/// (`WITH (FORCE)`); nothing happens when it does not exist.
///
/// # Errors
/// As [`create_postgres_database`].
pub async fn drop_postgres_database(server_url: &str, name: &str) -> Result<(), DbError> {
    use sqlx::Connection as _;
    if !plain_identifier(name) {
        return Err(DbError::UnsupportedUrl(format!(
            "{} (database {name:?})",
            redact_url(server_url)
        )));
    }
    let mut admin = sqlx::PgConnection::connect(server_url).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    let _ = admin.close().await;
    Ok(())
}

/// Runs the same body against whichever pool a [`Db`] holds.
///
/// `on_db!(db, |pool| body)` binds `pool` to `&SqlitePool` or `&PgPool`;
/// `on_db!(db, |pool, begin| body)` also binds `begin` to the statement that opens a write
/// transaction (`BEGIN IMMEDIATE` on SQLite, so a transaction that reads before it writes
/// waits for the lock instead of failing with `SQLITE_BUSY`; `BEGIN` on PostgreSQL), for
/// `pool.begin_with(begin)`. Use `$1`-style placeholders: both drivers accept them.
///
/// Both arms must have one type: turn driver-specific results into plain values inside the
/// body (`.map(|r| r.rows_affected())`, `row.get::<String, _>("id")`).
#[macro_export]
macro_rules! on_db {
    ($db:expr, |$pool:ident| $body:expr) => {
        match $db {
            $crate::Db::Sqlite($pool) => $body,
            $crate::Db::Postgres($pool) => $body,
        }
    };
    ($db:expr, |$pool:ident, $begin:ident| $body:expr) => {
        match $db {
            $crate::Db::Sqlite($pool) => {
                let $begin = "BEGIN IMMEDIATE";
                $body
            }
            $crate::Db::Postgres($pool) => {
                let $begin = "BEGIN";
                $body
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Row;

    #[tokio::test]
    async fn sqlite_accepts_dollar_placeholders_and_immediate_transactions() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&format!("sqlite://{}/a/b.db", dir.path().display()))
            .await
            .unwrap();
        db.run_schema("CREATE TABLE t (k TEXT PRIMARY KEY, n BIGINT NOT NULL);")
            .await
            .unwrap();
        on_db!(&db, |pool, begin| {
            let mut tx = pool.begin_with(begin).await.unwrap();
            sqlx::query("INSERT INTO t (k, n) VALUES ($1, $2)")
                .bind("a")
                .bind(7_i64)
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
        });
        let n: i64 = on_db!(&db, |pool| {
            sqlx::query("SELECT n FROM t WHERE k = $1")
                .bind("a")
                .fetch_one(pool)
                .await
                .unwrap()
                .get("n")
        });
        assert_eq!(n, 7);
        db.ping().await.unwrap();
    }

    #[tokio::test]
    async fn an_unknown_scheme_is_refused() {
        let err = Db::connect("mysql://x").await.unwrap_err();
        assert!(err.to_string().contains("unsupported database URL"));
        assert!(!err.is_retryable());
    }

    #[tokio::test]
    async fn an_unknown_scheme_is_refused_without_showing_its_password() {
        // Goal: the URL in the refusal cannot leak a password; method: a URL with one.
        let err = Db::connect("mysql://shop:s3cret@db/x").await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains("mysql://shop:***@db/x"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
    }

    #[tokio::test]
    async fn open_with_schema_returns_a_database_with_the_schema_applied() {
        // Goal: one call opens and prepares; method: write to the table the schema made.
        let db = Db::open_with_schema(
            "sqlite::memory:",
            "CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY); CREATE INDEX IF NOT EXISTS t_k ON t (k)",
        )
        .await
        .expect("opens");
        let inserted = on_db!(&db, |pool| sqlx::query("INSERT INTO t (k) VALUES ($1)")
            .bind("a")
            .execute(pool)
            .await
            .map(|r| r.rows_affected()))
        .expect("the table exists");
        assert_eq!(inserted, 1);
    }

    #[tokio::test]
    async fn a_database_that_cannot_be_opened_is_named_by_its_redacted_url() {
        // Goal: the open error says which database and hides its password; method: a URL
        // with a password and a scheme the kit does not open.
        let err = Db::open_with_schema("oracle://admin:hunter22@x/db", "")
            .await
            .expect_err("unsupported");
        assert!(matches!(err, OpenError::Connect { .. }), "{err:?}");
        assert_eq!(err.url(), "oracle://admin:***@x/db");
        let text = err.to_string();
        assert!(
            text.starts_with("cannot open oracle://admin:***@x/db: "),
            "{text}"
        );
        assert!(!text.contains("hunter22"), "{text}");
        assert!(!err.is_retryable());
    }

    #[tokio::test]
    async fn a_schema_the_engine_rejects_is_a_schema_error_naming_the_url() {
        // Goal: a failing script is told apart from a failing open; method: invalid DDL.
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/s.db", dir.path().display());
        let err = Db::open_with_schema(&url, "CREATE TABLE (")
            .await
            .expect_err("bad DDL");
        assert!(matches!(err, OpenError::Schema { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with(&format!("cannot apply the schema to {url}: ")),
            "{err}"
        );
        assert!(!err.is_retryable());
    }

    #[test]
    fn a_password_in_the_user_info_is_hidden() {
        assert_eq!(
            redact_url("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(redact_url("postgresql://:secret@h"), "postgresql://:***@h");
        // An unescaped `@` in the password does not leave its tail visible.
        assert_eq!(
            redact_url("postgres://u:p@ss@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
    }

    #[test]
    fn a_password_query_parameter_is_hidden() {
        assert_eq!(
            redact_url("postgres://h/db?user=u&password=secret&sslmode=require"),
            "postgres://h/db?user=u&password=***&sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://h/db?PASSWORD=secret#frag"),
            "postgres://h/db?PASSWORD=***#frag"
        );
    }

    #[test]
    fn urls_without_a_password_are_kept_as_they_are() {
        for url in [
            "sqlite://data/users.db",
            "sqlite::memory:",
            "postgres://u@h/db",
            "postgres://h/db?user=u",
            "not a url",
        ] {
            assert_eq!(redact_url(url), url);
        }
    }
}
