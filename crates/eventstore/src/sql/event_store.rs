//! The `EventStore` impl both SQL engines share, written once as a macro.
//!
//! The statements are one text for both engines: `$1` placeholders (SQLite accepts them),
//! `CAST(… AS TEXT)` where the column types differ (PostgreSQL's `UUID` and `JSONB`, SQLite's
//! `TEXT`), and the engine's [`Dialect`](super::writer::Dialect) for what differs
//! outright (where positions live, how the head is read). The macro expands this body once per
//! engine, against its concrete pool and row types.
//!
//! Why a macro and not a `impl<D: sqlx::Database>`: every bound value and every decoded
//! column needs its own `Encode`/`Decode`/`Type` bound, plus higher-ranked `Executor` and
//! `IntoArguments` bounds, and Rust does not carry `where` clauses of a trait to its users, so
//! the bounds would be repeated on every function and outweigh the queries. A macro keeps the
//! queries plain sqlx code, each expansion is type-checked against a real driver, and errors
//! name real types; `trellis_service::on_db!` made the same choice for services. sqlx's `Any`
//! driver is out (no uuid/json types).

/// Implements [`EventStore`](crate::EventStore) for `$store`, a struct with the fields
/// `pool: $pool` (a [`Dialect`](super::writer::Dialect)), `writers` (a `Writers`); `$row` is the
/// engine's row type.
macro_rules! sql_event_store {
    ($store:ty, $pool:ty, $row:ty) => {
        /// Decodes a row of an event read (see `select_event`).
        fn raw_event(row: &$row) -> Result<$crate::sql::RawEvent, sqlx::Error> {
            use sqlx::Row as _;
            let id: String = row.try_get("event_id")?;
            let data: String = row.try_get("data")?;
            let metadata: String = row.try_get("metadata")?;
            Ok($crate::sql::RawEvent {
                position: row.try_get("position")?,
                stream: row.try_get("stream_id")?,
                version: row.try_get("version")?,
                id: uuid::Uuid::parse_str(&id).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
                event_type: row.try_get("event_type")?,
                schema_version: row.try_get("schema_version")?,
                data: serde_json::from_str(&data).map_err(|e| e.to_string()),
                metadata: serde_json::from_str::<$crate::types::Metadata>(&metadata)
                    .map_err(|e| e.to_string()),
                recorded_at: row.try_get("recorded_at")?,
            })
        }

        impl $crate::store::EventStore for $store {
            async fn append(
                &self,
                stream: &$crate::types::StreamId,
                expected: $crate::types::ExpectedVersion,
                events: Vec<$crate::types::NewEvent>,
            ) -> Result<$crate::types::AppendResult, $crate::error::EventStoreError> {
                self.writers.append(stream, expected, events).await
            }

            async fn read_stream(
                &self,
                stream: &$crate::types::StreamId,
                from: u64,
                direction: $crate::types::Direction,
                limit: usize,
            ) -> Result<Vec<$crate::types::RecordedEvent>, $crate::error::EventStoreError> {
                use $crate::sql::writer::to_i64;
                $crate::types::validate_limit(limit)?;
                let Some(info) = self.stream_info(stream).await? else {
                    return Ok(Vec::new());
                };
                let first = info.metadata.first_visible(info.version);
                let select = $crate::sql::select_event::<$pool>();
                let rows = match direction {
                    $crate::types::Direction::Forwards => {
                        sqlx::query(sqlx::AssertSqlSafe(format!(
                            "{select} WHERE e.stream_id = $1 AND e.version >= $2 ORDER BY e.version LIMIT $3"
                        )))
                        .bind(stream.as_str())
                        .bind(to_i64(from.max(first)))
                        .bind(to_i64(limit as u64))
                        .fetch_all(&self.pool)
                        .await?
                    }
                    $crate::types::Direction::Backwards => {
                        sqlx::query(sqlx::AssertSqlSafe(format!(
                            "{select} WHERE e.stream_id = $1 AND e.version <= $2 AND e.version >= $3 ORDER BY e.version DESC LIMIT $4"
                        )))
                        .bind(stream.as_str())
                        .bind(to_i64(from))
                        .bind(to_i64(first))
                        .bind(to_i64(limit as u64))
                        .fetch_all(&self.pool)
                        .await?
                    }
                };
                rows.iter().map(|row| raw_event(row)?.into_event()).collect()
            }

            async fn read_all(
                &self,
                from: u64,
                limit: usize,
            ) -> Result<Vec<$crate::types::RecordedEvent>, $crate::error::EventStoreError> {
                use $crate::sql::writer::to_i64;
                $crate::types::validate_limit(limit)?;
                let select = $crate::sql::select_event::<$pool>();
                let position = <$pool as $crate::sql::writer::Dialect>::POSITION;
                let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "{select} WHERE {position} >= $1 ORDER BY {position} LIMIT $2"
                )))
                .bind(to_i64(from))
                .bind(to_i64(limit as u64))
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(|row| raw_event(row)?.into_event()).collect()
            }

            async fn stream_info(
                &self,
                stream: &$crate::types::StreamId,
            ) -> Result<Option<$crate::types::StreamInfo>, $crate::error::EventStoreError> {
                use sqlx::Row as _;
                use $crate::sql::writer::to_u64;
                let row = sqlx::query(
                    "SELECT version, max_count, truncate_before, deleted FROM es_streams WHERE stream_id = $1",
                )
                .bind(stream.as_str())
                .fetch_optional(&self.pool)
                .await?;
                let Some(row) = row else { return Ok(None) };
                let max_count: Option<i64> = row.try_get("max_count")?;
                let truncate_before: Option<i64> = row.try_get("truncate_before")?;
                Ok(Some($crate::types::StreamInfo {
                    version: to_u64(row.try_get("version")?),
                    metadata: $crate::types::StreamMetadata {
                        max_count: max_count.map(to_u64),
                        truncate_before: truncate_before.map(to_u64),
                        deleted: row.try_get("deleted")?,
                    },
                }))
            }

            async fn set_stream_metadata(
                &self,
                stream: &$crate::types::StreamId,
                metadata: $crate::types::StreamMetadata,
            ) -> Result<(), $crate::error::EventStoreError> {
                use $crate::sql::writer::to_i64;
                sqlx::query(
                    "INSERT INTO es_streams (stream_id, version, max_count, truncate_before, deleted) VALUES ($1, 0, $2, $3, $4)
                     ON CONFLICT (stream_id) DO UPDATE SET max_count = excluded.max_count,
                         truncate_before = excluded.truncate_before, deleted = excluded.deleted",
                )
                .bind(stream.as_str())
                .bind(metadata.max_count.map(to_i64))
                .bind(metadata.truncate_before.map(to_i64))
                .bind(metadata.deleted)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn head(&self) -> Result<u64, $crate::error::EventStoreError> {
                use $crate::sql::writer::Dialect as _;
                Ok(self.pool.read_head().await?)
            }

            fn watch_head(&self) -> tokio::sync::watch::Receiver<u64> {
                self.writers.watch_head()
            }

            async fn load_snapshot(
                &self,
                stream: &$crate::types::StreamId,
            ) -> Result<Option<$crate::types::Snapshot>, $crate::error::EventStoreError> {
                use sqlx::Row as _;
                let row = sqlx::query(
                    "SELECT version, schema_version, CAST(state AS TEXT) AS state FROM es_snapshots WHERE stream_id = $1",
                )
                .bind(stream.as_str())
                .fetch_optional(&self.pool)
                .await?;
                let Some(row) = row else { return Ok(None) };
                let state: String = row.try_get("state")?;
                let Ok(state) = serde_json::from_str(&state) else {
                    // A snapshot is a cache: an unreadable one is ignored and rebuilt.
                    tracing::warn!(stream = %stream, "ignoring a snapshot whose stored JSON is malformed");
                    return Ok(None);
                };
                Ok(Some($crate::types::Snapshot {
                    version: $crate::sql::writer::to_u64(row.try_get("version")?),
                    schema_version: u32::try_from(row.try_get::<i32, _>("schema_version")?)
                        .unwrap_or(0),
                    state,
                }))
            }

            async fn save_snapshot(
                &self,
                stream: &$crate::types::StreamId,
                snapshot: $crate::types::Snapshot,
            ) -> Result<(), $crate::error::EventStoreError> {
                sqlx::query(
                    "INSERT INTO es_snapshots (stream_id, version, schema_version, state) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version,
                         schema_version = excluded.schema_version, state = excluded.state
                     WHERE excluded.version >= es_snapshots.version",
                )
                .bind(stream.as_str())
                .bind($crate::sql::writer::to_i64(snapshot.version))
                .bind(i32::try_from(snapshot.schema_version).unwrap_or(i32::MAX))
                .bind(sqlx::types::Json(&snapshot.state))
                .execute(&self.pool)
                .await?;
                Ok(())
            }
        }
    };
}
