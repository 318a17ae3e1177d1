//! Row decoding shared by the SQLite and PostgreSQL saga stores: one implementation of
//! row → [`SagaRecord`], [`SagaInstance`] and [`SagaSummary`], generic over sqlx's row type,
//! so a fix lands once. Only the saga id's column differs (TEXT on SQLite, UUID on
//! PostgreSQL): callers decode it and pass it in.

use chrono::{DateTime, Utc};
use sqlx::{ColumnIndex, Database, Decode, Row, Type};

use super::{SagaId, SagaInstance, SagaRecord, SagaStatus, SagaSummary, Transition};
use crate::error::SagaError;

/// A column type that decodes the same way on both engines (the bounds every function here
/// repeats: Rust does not carry a where clause of a helper trait to its users).
pub(super) trait Column<DB: Database>: for<'r> Decode<'r, DB> + Type<DB> {}

impl<DB: Database, T: for<'r> Decode<'r, DB> + Type<DB>> Column<DB> for T {}

/// Decodes one `saga_log` row (`seq`, `transition` and `context` as JSON text, `at`).
pub(super) fn record<R>(id: SagaId, row: &R) -> Result<SagaRecord, SagaError>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    i64: Column<R::Database>,
    String: Column<R::Database>,
    Option<String>: Column<R::Database>,
    DateTime<Utc>: Column<R::Database>,
{
    let seq: i64 = row.try_get("seq")?;
    let transition: String = row.try_get("transition")?;
    let context: String = row.try_get("context")?;
    Ok(SagaRecord {
        seq: to_u64(id, seq)?,
        transition: decode_transition(id, &transition)?,
        context: serde_json::from_str(&context).map_err(|error| SagaError::CorruptLog {
            id,
            reason: format!("unreadable context: {error}"),
        })?,
        at: row.try_get("at")?,
    })
}

/// Assembles an instance from its `saga_instances` row (`definition`, `version`, `status`)
/// and its `saga_log` rows in order, checking the log has no gap.
pub(super) fn instance<R>(id: SagaId, head: &R, log: &[R]) -> Result<SagaInstance, SagaError>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    i64: Column<R::Database>,
    String: Column<R::Database>,
    Option<String>: Column<R::Database>,
    DateTime<Utc>: Column<R::Database>,
{
    let corrupt = |reason: String| SagaError::CorruptLog { id, reason };
    let (version, status) = version_and_status(id, head)?;
    let records = log
        .iter()
        .map(|row| record(id, row))
        .collect::<Result<Vec<_>, _>>()?;
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
        definition: head.try_get("definition")?,
        version,
        status,
        records,
    })
}

/// Decodes a `saga_instances` row as a summary; `id` is its decoded `id` column.
pub(super) fn summary<R>(id: SagaId, row: &R) -> Result<SagaSummary, SagaError>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    i64: Column<R::Database>,
    String: Column<R::Database>,
    Option<String>: Column<R::Database>,
    DateTime<Utc>: Column<R::Database>,
{
    let (version, status) = version_and_status(id, row)?;
    let last_seq: i64 = row.try_get("last_seq")?;
    Ok(SagaSummary {
        id,
        definition: row.try_get("definition")?,
        version,
        status,
        transitions: to_u64(id, last_seq)?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        lease_owner: row.try_get("lease_owner")?,
    })
}

/// Decodes a `saga_instances` row's `version` and `status`.
fn version_and_status<R>(id: SagaId, row: &R) -> Result<(u32, SagaStatus), SagaError>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    i64: Column<R::Database>,
    String: Column<R::Database>,
    Option<String>: Column<R::Database>,
    DateTime<Utc>: Column<R::Database>,
{
    let corrupt = |reason: String| SagaError::CorruptLog { id, reason };
    let version: i64 = row.try_get("version")?;
    let status: String = row.try_get("status")?;
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
