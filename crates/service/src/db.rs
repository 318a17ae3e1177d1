//! A database chosen by URL: SQLite (embedded default) or PostgreSQL.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::SqlitePoolOptions;
use sqlx::{PgPool, SqlitePool};

/// Most connections a PostgreSQL pool opens.
pub const POOL_CONNECTIONS_MAX: u32 = 16;
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
    /// The URL names neither `sqlite://` nor `postgres://`.
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

impl Db {
    /// Opens the database a URL names: `sqlite://PATH` (created with its directory when
    /// missing; `sqlite::memory:` for a private in-memory database) or `postgres://…`.
    pub async fn connect(url: &str) -> Result<Self, DbError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let options = PgConnectOptions::from_str(url)?;
            let pool = PgPoolOptions::new()
                .max_connections(POOL_CONNECTIONS_MAX)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect_with(options)
                .await?;
            return Ok(Self::Postgres(pool));
        }
        if !trellis_sqlite::is_sqlite_url(url) {
            return Err(DbError::UnsupportedUrl(url.to_owned()));
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
        let pool = SqlitePoolOptions::new()
            // One connection for an in-memory database: each connection would see its own.
            .max_connections(if memory { 1 } else { SQLITE_CONNECTIONS_MAX })
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        Ok(Self::Sqlite(pool))
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
    }
}
