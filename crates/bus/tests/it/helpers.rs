//! Shared fixtures: temporary SQLite files and NATS buses per test.

use std::path::PathBuf;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::sqlite::SqlitePoolOptions;

/// A temporary directory removed (with everything in it) on drop.
#[derive(Debug)]
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(test: &str) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(trellis_testkit::unique_name(test));
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }

    pub(crate) fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A service's own database, `dir/service.db`, opened as trellis opens every SQLite file
/// (trellis-sqlite), with `busy_timeout` and `schema` applied.
pub(crate) async fn service_db(
    dir: &TempDir,
    busy_timeout: Duration,
    schema: &str,
) -> anyhow::Result<SqlitePool> {
    let url = format!("sqlite://{}", dir.file("service.db").display());
    let options = trellis_sqlite::connect_options(&url)?.busy_timeout(busy_timeout);
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(schema))
        .execute(&pool)
        .await?;
    Ok(pool)
}

/// Installs telemetry once for this test binary, so spans carry OpenTelemetry trace ids.
pub(crate) fn telemetry() {
    use std::sync::OnceLock;

    use trellis_telemetry::{TelemetryConfig, TelemetryGuard};

    static GUARD: OnceLock<TelemetryGuard> = OnceLock::new();
    GUARD.get_or_init(|| {
        trellis_telemetry::init(TelemetryConfig::new("trellis-bus-it").with_filter("warn"))
            .expect("the first init in this binary succeeds")
    });
}
