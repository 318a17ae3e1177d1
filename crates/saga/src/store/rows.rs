//! Row decoding shared by the SQLite and PostgreSQL saga stores: one implementation of
//! row → [`SagaRecord`], [`SagaInstance`] and [`SagaSummary`], generic over sqlx's row type,
//! so a fix lands once. Only the saga id's column differs (TEXT on SQLite, UUID on
//! PostgreSQL): callers decode it and pass it in.

use chrono::{DateTime, Utc};
use sqlx::{ColumnIndex, Database, Decode, Row, Type};

use super::{SagaId, SagaInstance, SagaRecord, SagaStatus, SagaSummary, Transition};
use crate::error::SagaError;

/// What the SQLite store writes in a `saga_log` row's `context` (a NOT NULL column) when the
/// context equals the previous record's: never valid JSON, so never a real context.
pub(super) const SAME_CONTEXT: &str = "";

/// A row of either engine, read by column name and type: what the decoders below need. The
/// sqlx bounds are stated once, in the blanket impl.
pub(super) trait SagaRow {
    /// An INTEGER / BIGINT column.
    fn int(&self, column: &str) -> Result<i64, sqlx::Error>;
    /// A TEXT column.
    fn text(&self, column: &str) -> Result<String, sqlx::Error>;
    /// A nullable TEXT column.
    fn optional_text(&self, column: &str) -> Result<Option<String>, sqlx::Error>;
    /// A timestamp column.
    fn time(&self, column: &str) -> Result<DateTime<Utc>, sqlx::Error>;
}

impl<R: Row> SagaRow for R
where
    for<'c> &'c str: ColumnIndex<R>,
    i64: Column<R::Database>,
    String: Column<R::Database>,
    Option<String>: Column<R::Database>,
    DateTime<Utc>: Column<R::Database>,
{
    fn int(&self, column: &str) -> Result<i64, sqlx::Error> {
        self.try_get(column)
    }

    fn text(&self, column: &str) -> Result<String, sqlx::Error> {
        self.try_get(column)
    }

    fn optional_text(&self, column: &str) -> Result<Option<String>, sqlx::Error> {
        self.try_get(column)
    }

    fn time(&self, column: &str) -> Result<DateTime<Utc>, sqlx::Error> {
        self.try_get(column)
    }
}

/// A column type both engines decode.
trait Column<DB: Database>: for<'r> Decode<'r, DB> + Type<DB> {}

impl<DB: Database, T: for<'r> Decode<'r, DB> + Type<DB>> Column<DB> for T {}

/// Decodes one `saga_log` row (`seq`, `transition` and `context` as JSON text, `at`). A
/// context stored as [`SAME_CONTEXT`] (SQLite) or NULL (PostgreSQL) is `previous`'s: the
/// stores keep a context only when it differs from the record before (see
/// [`crate::store::SagaStore`]'s contract), so a saga whose context never changes stores it once.
fn record<R: SagaRow>(
    id: SagaId,
    row: &R,
    previous: Option<&SagaRecord>,
) -> Result<SagaRecord, SagaError> {
    let seq: i64 = row.int("seq")?;
    let transition: String = row.text("transition")?;
    let context = match row.optional_text("context")? {
        Some(text) if text != SAME_CONTEXT => {
            serde_json::from_str(&text).map_err(|error| SagaError::CorruptLog {
                id,
                reason: format!("unreadable context: {error}"),
            })?
        }
        _ => previous
            .ok_or_else(|| SagaError::CorruptLog {
                id,
                reason: format!("record {seq} keeps its predecessor's context but has none"),
            })?
            .context
            .clone(),
    };
    Ok(SagaRecord {
        seq: to_u64(id, seq)?,
        transition: decode_transition(id, &transition)?,
        context,
        at: row.time("at")?,
    })
}

/// Assembles an instance from its `saga_instances` row (`definition`, `version`, `status`)
/// and its `saga_log` rows in order, checking the log has no gap.
pub(super) fn instance<R: SagaRow>(
    id: SagaId,
    head: &R,
    log: &[R],
) -> Result<SagaInstance, SagaError> {
    let corrupt = |reason: String| SagaError::CorruptLog { id, reason };
    let (version, status) = version_and_status(id, head)?;
    let mut records: Vec<SagaRecord> = Vec::with_capacity(log.len());
    for row in log {
        let decoded = record(id, row, records.last())?;
        records.push(decoded);
    }
    if records.is_empty() {
        return Err(corrupt("empty log".to_owned()));
    }
    for (index, record) in records.iter().enumerate() {
        if record.seq != index as u64 + 1 {
            return Err(corrupt(format!("gap before sequence {}", record.seq)));
        }
    }
    Ok(SagaInstance {
        id,
        definition: head.text("definition")?,
        version,
        status,
        records,
    })
}

/// Decodes a `saga_instances` row as a summary; `id` is its decoded `id` column.
pub(super) fn summary<R: SagaRow>(id: SagaId, row: &R) -> Result<SagaSummary, SagaError> {
    let (version, status) = version_and_status(id, row)?;
    let last_seq: i64 = row.int("last_seq")?;
    Ok(SagaSummary {
        id,
        definition: row.text("definition")?,
        version,
        status,
        transitions: to_u64(id, last_seq)?,
        created_at: row.time("created_at")?,
        updated_at: row.time("updated_at")?,
        lease_owner: row.optional_text("lease_owner")?,
    })
}

/// Decodes a `saga_instances` row's `version` and `status`.
fn version_and_status<R: SagaRow>(id: SagaId, row: &R) -> Result<(u32, SagaStatus), SagaError> {
    let corrupt = |reason: String| SagaError::CorruptLog { id, reason };
    let version: i64 = row.int("version")?;
    let status: String = row.text("status")?;
    Ok((
        u32::try_from(version).map_err(|_| corrupt(format!("version {version}")))?,
        SagaStatus::parse(&status).ok_or_else(|| corrupt(format!("status {status}")))?,
    ))
}

/// Decodes a transition stored as JSON text.
fn decode_transition(id: SagaId, text: &str) -> Result<Transition, SagaError> {
    serde_json::from_str(text).map_err(|error| SagaError::CorruptLog {
        id,
        reason: format!("unreadable transition: {error}"),
    })
}

/// Converts a sequence number or count for a signed 64-bit column.
pub(super) fn to_i64(id: SagaId, value: u64) -> Result<i64, SagaError> {
    i64::try_from(value).map_err(|_| SagaError::CorruptLog {
        id,
        reason: format!("sequence {value} out of range"),
    })
}

/// Converts a signed 64-bit column back.
fn to_u64(id: SagaId, value: i64) -> Result<u64, SagaError> {
    u64::try_from(value).map_err(|_| SagaError::CorruptLog {
        id,
        reason: format!("negative sequence {value}"),
    })
}
