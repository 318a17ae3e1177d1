//! [`ChoreographyDb`]: what a choreography needs of its database (inbox, outbox, log), for
//! SQLite and PostgreSQL.

use std::fmt;

use sqlx::Row as _;
use trellis_bus::inbox::{Handled, PgInbox, SqliteInbox};
use trellis_bus::outbox::{PgOutbox, SqliteOutbox};
use trellis_bus::{BusError, Envelope, HandlerError, Message};
use uuid::Uuid;

use super::{BoxFuture, ChoreographyLogEntry, Loaded, Postgres, Run, Sqlite, Tx};

mod sealed {
    /// Only this crate implements [`super::ChoreographyDb`].
    #[allow(unreachable_pub)]
    pub trait Sealed {}
    impl Sealed for sqlx::Sqlite {}
    impl Sealed for sqlx::Postgres {}
}

/// A database a [`Choreography`](super::Choreography) runs on, with its bus inbox and outbox:
/// [`Sqlite`] ([`SqliteInbox`], [`SqliteOutbox`]) or [`Postgres`] ([`PgInbox`], [`PgOutbox`]).
/// Sealed.
pub trait ChoreographyDb: sqlx::Database + sealed::Sealed {
    /// The bus inbox on this database, which
    /// [`Choreography::handle`](super::Choreography::handle) takes.
    type Inbox: fmt::Debug + Send + Sync;

    /// The connection an effect gets (inside the inbox's transaction) as a [`Tx`], so an
    /// effect declared in a function generic over `D` writes its SQL once for both databases.
    fn tx(connection: &mut Self::Connection) -> Tx<'_>;

    /// Runs `run` once per message id and consumer group in the inbox's transaction.
    #[doc(hidden)]
    fn handle_once<'a>(
        inbox: &'a Self::Inbox,
        message: &'a Message,
        run: Run<'a, Self>,
    ) -> BoxFuture<'a, Result<Handled<()>, HandlerError>>;

    /// Writes `event` to the outbox in the caller's transaction.
    #[doc(hidden)]
    fn enqueue<'t>(
        tx: &'t mut Self::Connection,
        topic: &'t str,
        event: &'t Envelope,
    ) -> BoxFuture<'t, Result<(), BusError>>;

    /// Creates the choreography tables if missing; records `definition`'s steps if given.
    #[doc(hidden)]
    fn install<'t>(
        tx: &'t mut Self::Connection,
        definition: Option<(&'t str, &'t str)>,
    ) -> BoxFuture<'t, Result<(), sqlx::Error>>;

    /// Appends one handler run to the log in the caller's transaction.
    #[doc(hidden)]
    fn record<'t>(
        tx: &'t mut Self::Connection,
        entry: &'t ChoreographyLogEntry,
    ) -> BoxFuture<'t, Result<(), sqlx::Error>>;

    /// The log entries of one correlation id in order, and the declared steps (JSON) of the
    /// choreography they name.
    #[doc(hidden)]
    fn load(
        pool: &sqlx::Pool<Self>,
        correlation_id: Uuid,
    ) -> BoxFuture<'_, Result<Loaded, sqlx::Error>>;
}

/// How each engine stores the log's ids and times; everything else about the log is written
/// once, in [`choreography_db!`].
mod sqlite_columns {
    use chrono::{DateTime, Utc};
    use sqlx::Row as _;
    use sqlx::sqlite::SqliteRow;
    use uuid::Uuid;

    /// Ids as TEXT, times as milliseconds since the epoch.
    pub(super) const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS saga_choreography_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    choreography TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    step TEXT NOT NULL,
    compensating INTEGER NOT NULL,
    outcome TEXT,
    error TEXT,
    at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS saga_choreography_log_by_correlation
    ON saga_choreography_log (correlation_id, id);
CREATE TABLE IF NOT EXISTS saga_choreographies (name TEXT PRIMARY KEY, steps TEXT NOT NULL)";

    pub(super) fn id(id: Uuid) -> String {
        id.to_string()
    }

    pub(super) fn at(at: DateTime<Utc>) -> i64 {
        at.timestamp_millis()
    }

    pub(super) fn event_id(row: &SqliteRow) -> Result<Uuid, sqlx::Error> {
        let text: String = row.try_get("event_id")?;
        Uuid::parse_str(&text).map_err(|error| sqlx::Error::Decode(Box::new(error)))
    }

    pub(super) fn at_of(row: &SqliteRow) -> Result<DateTime<Utc>, sqlx::Error> {
        let at_ms: i64 = row.try_get("at_ms")?;
        Ok(DateTime::from_timestamp_millis(at_ms).unwrap_or_default())
    }
}

/// See [`sqlite_columns`].
mod pg_columns {
    use chrono::{DateTime, Utc};
    use sqlx::Row as _;
    use sqlx::postgres::PgRow;
    use uuid::Uuid;

    /// Native UUID and TIMESTAMPTZ columns.
    pub(super) const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS saga_choreography_log (
    id BIGSERIAL PRIMARY KEY,
    choreography TEXT NOT NULL,
    correlation_id UUID NOT NULL,
    event_id UUID NOT NULL,
    event_type TEXT NOT NULL,
    step TEXT NOT NULL,
    compensating BOOLEAN NOT NULL,
    outcome TEXT,
    error TEXT,
    at TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS saga_choreography_log_by_correlation
    ON saga_choreography_log (correlation_id, id);
CREATE TABLE IF NOT EXISTS saga_choreographies (name TEXT PRIMARY KEY, steps TEXT NOT NULL)";

    pub(super) fn id(id: Uuid) -> Uuid {
        id
    }

    pub(super) fn at(at: DateTime<Utc>) -> DateTime<Utc> {
        at
    }

    pub(super) fn event_id(row: &PgRow) -> Result<Uuid, sqlx::Error> {
        row.try_get("event_id")
    }

    pub(super) fn at_of(row: &PgRow) -> Result<DateTime<Utc>, sqlx::Error> {
        row.try_get("at")
    }
}

const UPSERT_DEFINITION: &str = "INSERT INTO saga_choreographies (name, steps) VALUES ($1, $2) \
     ON CONFLICT (name) DO UPDATE SET steps = excluded.steps";

/// Implements [`ChoreographyDb`] for one engine: the body is written once and compiled per
/// engine (as [`on_tx!`](crate::on_tx) does for effects), with `$columns` saying how the
/// engine stores ids and times and `$at` naming its time column.
macro_rules! choreography_db {
    ($db:ident, $inbox:ident, $outbox:ident, $columns:ident, $at:literal) => {
        impl ChoreographyDb for $db {
            type Inbox = $inbox;

            fn tx(connection: &mut <$db as sqlx::Database>::Connection) -> Tx<'_> {
                Tx::$db(connection)
            }

            fn handle_once<'a>(
                inbox: &'a $inbox,
                message: &'a Message,
                run: Run<'a, Self>,
            ) -> BoxFuture<'a, Result<Handled<()>, HandlerError>> {
                Box::pin(inbox.handle_once(message, move |tx| run(tx)))
            }

            fn enqueue<'t>(
                tx: &'t mut <$db as sqlx::Database>::Connection,
                topic: &'t str,
                event: &'t Envelope,
            ) -> BoxFuture<'t, Result<(), BusError>> {
                Box::pin($outbox::enqueue(tx, topic, event))
            }

            fn install<'t>(
                tx: &'t mut <$db as sqlx::Database>::Connection,
                definition: Option<(&'t str, &'t str)>,
            ) -> BoxFuture<'t, Result<(), sqlx::Error>> {
                Box::pin(async move {
                    sqlx::raw_sql($columns::SCHEMA).execute(&mut *tx).await?;
                    if let Some((name, steps)) = definition {
                        sqlx::query(UPSERT_DEFINITION)
                            .bind(name)
                            .bind(steps)
                            .execute(&mut *tx)
                            .await?;
                    }
                    Ok(())
                })
            }

            fn record<'t>(
                tx: &'t mut <$db as sqlx::Database>::Connection,
                entry: &'t ChoreographyLogEntry,
            ) -> BoxFuture<'t, Result<(), sqlx::Error>> {
                Box::pin(async move {
                    sqlx::query(concat!(
                        "INSERT INTO saga_choreography_log (choreography, correlation_id, \
                         event_id, event_type, step, compensating, outcome, error, ",
                        $at,
                        ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
                    ))
                    .bind(&entry.choreography)
                    .bind($columns::id(entry.correlation_id))
                    .bind($columns::id(entry.event_id))
                    .bind(&entry.event_type)
                    .bind(&entry.step)
                    .bind(entry.compensating)
                    .bind(&entry.outcome)
                    .bind(&entry.error)
                    .bind($columns::at(entry.at))
                    .execute(&mut *tx)
                    .await?;
                    Ok(())
                })
            }

            fn load(
                pool: &sqlx::Pool<$db>,
                correlation_id: Uuid,
            ) -> BoxFuture<'_, Result<Loaded, sqlx::Error>> {
                Box::pin(async move {
                    let rows = sqlx::query(concat!(
                        "SELECT choreography, event_id, event_type, step, compensating, \
                         outcome, error, ",
                        $at,
                        " FROM saga_choreography_log WHERE correlation_id = $1 ORDER BY id"
                    ))
                    .bind($columns::id(correlation_id))
                    .fetch_all(pool)
                    .await?;
                    let mut entries = Vec::with_capacity(rows.len());
                    for row in rows {
                        entries.push(ChoreographyLogEntry {
                            choreography: row.try_get("choreography")?,
                            correlation_id,
                            event_id: $columns::event_id(&row)?,
                            event_type: row.try_get("event_type")?,
                            step: row.try_get("step")?,
                            compensating: row.try_get("compensating")?,
                            outcome: row.try_get("outcome")?,
                            error: row.try_get("error")?,
                            at: $columns::at_of(&row)?,
                        });
                    }
                    let steps = match entries.first() {
                        Some(entry) => {
                            sqlx::query_scalar(
                                "SELECT steps FROM saga_choreographies WHERE name = $1",
                            )
                            .bind(&entry.choreography)
                            .fetch_optional(pool)
                            .await?
                        }
                        None => None,
                    };
                    Ok((entries, steps))
                })
            }
        }
    };
}

choreography_db!(Sqlite, SqliteInbox, SqliteOutbox, sqlite_columns, "at_ms");
choreography_db!(Postgres, PgInbox, PgOutbox, pg_columns, "at");
