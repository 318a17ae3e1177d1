//! The dead-letter queue in SQLite: storing letters, listing pages, acting on them.

use std::time::Duration;

use chrono::Utc;
use sqlx::sqlite::SqliteRow;
use sqlx::{Connection, Row, SqliteConnection};
use uuid::Uuid;

use super::SqliteBus;
use crate::bus::{duration_millis, from_millis, millis};
use crate::dlq::{
    ACTIONS_LIMIT_MAX, DeadLetter, DeadLetterFilter, DeadLetterPage, DeadLetterReason,
    DeadLetterState, DeadLetterStats, DeadLetters, DlqAction, DlqActionKind, id_cursor, log_action,
    not_found, page_of, redriven_envelope,
};
use crate::error::BusError;

/// Most dead-letter rows one list page reads (only a topic pattern's wildcards are checked
/// outside SQL); past it the page ends early, with a cursor to continue.
const DLQ_SCAN_MAX: i64 = 100_000;

/// A `LIKE` pattern for the topics a topic pattern can match: its literal part up to the
/// first wildcard token, then anything (`orders.*` → `orders.%`).
fn like_prefix(pattern: &str) -> String {
    let literal_end = pattern
        .split('.')
        .take_while(|token| *token != "*" && *token != ">")
        .map(|token| token.len() + 1)
        .sum::<usize>()
        .min(pattern.len());
    let mut like = String::with_capacity(literal_end + 2);
    for c in pattern[..literal_end].chars() {
        if matches!(c, '%' | '_' | '\\') {
            like.push('\\');
        }
        like.push(c);
    }
    like.push('%');
    like
}

/// Stores a new dead letter.
pub(super) async fn insert_letter(
    tx: &mut SqliteConnection,
    letter: &DeadLetter,
) -> Result<(), BusError> {
    let envelope = serde_json::to_string(&letter.envelope).map_err(BusError::corrupt)?;
    sqlx::query(
        "INSERT INTO bus_dead_letters (id, grp, topic, envelope, reason, attempts, \
         first_failure_ms, last_failure_ms, error_kind, error, fingerprint, state, redrive_count) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(letter.id.to_string())
    .bind(&letter.group)
    .bind(&letter.topic)
    .bind(envelope)
    .bind(letter.reason.as_str())
    .bind(i64::from(letter.attempts))
    .bind(millis(letter.first_failure_at))
    .bind(millis(letter.last_failure_at))
    .bind(&letter.error_kind)
    .bind(&letter.error)
    .bind(&letter.fingerprint)
    .bind(letter.state.as_str())
    .bind(i64::from(letter.redrive_count))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

fn letter_from_row(row: &SqliteRow) -> Result<DeadLetter, BusError> {
    let id: String = row.try_get("id")?;
    let envelope: String = row.try_get("envelope")?;
    let reason: String = row.try_get("reason")?;
    let state: String = row.try_get("state")?;
    let attempts: i64 = row.try_get("attempts")?;
    let redrive_count: i64 = row.try_get("redrive_count")?;
    Ok(DeadLetter {
        id: Uuid::parse_str(&id).map_err(BusError::corrupt)?,
        group: row.try_get("grp")?,
        topic: row.try_get("topic")?,
        envelope: serde_json::from_str(&envelope).map_err(BusError::corrupt)?,
        reason: DeadLetterReason::parse(&reason)?,
        attempts: u32::try_from(attempts).map_err(BusError::corrupt)?,
        first_failure_at: from_millis(row.try_get("first_failure_ms")?),
        last_failure_at: from_millis(row.try_get("last_failure_ms")?),
        error_kind: row.try_get("error_kind")?,
        error: row.try_get("error")?,
        fingerprint: row.try_get("fingerprint")?,
        state: DeadLetterState::parse(&state)?,
        redrive_count: u32::try_from(redrive_count).map_err(BusError::corrupt)?,
    })
}

impl SqliteBus {
    async fn act(&self, id: Uuid, actor: &str, action: DlqActionKind) -> Result<(), BusError> {
        let mut connection = self.inner.pool.acquire().await?;
        let mut tx = connection.begin_with("BEGIN IMMEDIATE").await?;
        let row = sqlx::query("SELECT * FROM bus_dead_letters WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| not_found(id))?;
        let letter = letter_from_row(&row)?;
        let entry = DlqAction::new(action, &letter, actor);
        let now = millis(entry.at);
        match action {
            DlqActionKind::Redrive => {
                let envelope = serde_json::to_string(&redriven_envelope(&letter))
                    .map_err(BusError::corrupt)?;
                sqlx::query(
                    "INSERT INTO bus_log (topic, subject, only_group, envelope, published_ms) VALUES (?, ?, ?, ?, ?)",
                )
                .bind(&letter.topic)
                .bind(&letter.envelope.subject)
                .bind(&letter.group)
                .bind(envelope)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                sqlx::query("DELETE FROM bus_dead_letters WHERE id = ?")
                    .bind(id.to_string())
                    .execute(&mut *tx)
                    .await?;
            }
            DlqActionKind::Discard => {
                sqlx::query("DELETE FROM bus_dead_letters WHERE id = ?")
                    .bind(id.to_string())
                    .execute(&mut *tx)
                    .await?;
            }
            DlqActionKind::Archive => {
                sqlx::query("UPDATE bus_dead_letters SET state = 'archived' WHERE id = ?")
                    .bind(id.to_string())
                    .execute(&mut *tx)
                    .await?;
            }
        }
        sqlx::query(
            "INSERT INTO bus_dlq_actions (at_ms, action, dead_letter_id, message_id, actor) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(now)
        .bind(entry.action.as_str())
        .bind(entry.dead_letter_id.to_string())
        .bind(entry.message_id.to_string())
        .bind(&entry.actor)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        log_action(action, &letter, actor);
        self.inner.changed.notify_waiters();
        Ok(())
    }
}

impl DeadLetters for SqliteBus {
    async fn list_page(&self, filter: &DeadLetterFilter) -> Result<DeadLetterPage, BusError> {
        filter.validate()?;
        let mut after = id_cursor(filter)?.map(|id| id.to_string());
        let now = Utc::now();
        let age_bound =
            |age: Option<Duration>| age.map(|age| millis(now).saturating_sub(duration_millis(age)));
        let topic_prefix = filter.topic.as_deref().map(like_prefix);
        // Every filter but the topic pattern's wildcards runs in SQL; `accepts` checks the
        // rest. Rows are read in chunks of one page, until the page is full or the scan
        // budget is spent (then the page ends early with a cursor).
        let chunk = i64::try_from(filter.limit() + 1).unwrap_or(i64::MAX);
        let mut found = Vec::new();
        let mut scanned = 0_i64;
        loop {
            let rows = sqlx::query(
                "SELECT * FROM bus_dead_letters WHERE state = ?1 \
                 AND (?2 IS NULL OR grp = ?2) AND (?3 IS NULL OR fingerprint = ?3) \
                 AND (?4 IS NULL OR reason = ?4) AND (?5 IS NULL OR instr(error, ?5) > 0) \
                 AND (?6 IS NULL OR json_extract(envelope, '$.type') = ?6) \
                 AND (?7 IS NULL OR last_failure_ms <= ?7) \
                 AND (?8 IS NULL OR last_failure_ms >= ?8) \
                 AND (?9 IS NULL OR topic LIKE ?9 ESCAPE '\\') \
                 AND (?10 IS NULL OR id > ?10) \
                 ORDER BY id LIMIT ?11",
            )
            .bind(filter.state.unwrap_or_default().as_str())
            .bind(filter.group.as_deref())
            .bind(filter.fingerprint.as_deref())
            .bind(filter.reason.map(DeadLetterReason::as_str))
            .bind(filter.error_contains.as_deref())
            .bind(filter.kind.as_deref())
            .bind(age_bound(filter.older_than))
            .bind(age_bound(filter.newer_than))
            .bind(topic_prefix.as_deref())
            .bind(after.as_deref())
            .bind(chunk)
            .fetch_all(&self.inner.pool)
            .await?;
            let exhausted = i64::try_from(rows.len()).unwrap_or(i64::MAX) < chunk;
            for row in &rows {
                let letter = letter_from_row(row)?;
                let id = letter.id.to_string();
                after = Some(id.clone());
                scanned += 1;
                if filter.accepts(&letter, now) {
                    found.push((letter, id));
                    if found.len() > filter.limit() {
                        return Ok(page_of(found, filter.limit(), None));
                    }
                }
            }
            if exhausted {
                return Ok(page_of(found, filter.limit(), None));
            }
            if scanned >= DLQ_SCAN_MAX {
                return Ok(page_of(found, filter.limit(), after));
            }
        }
    }

    /// One aggregate query over the dead letters' state index, however long the queue.
    async fn stats(&self) -> Result<Vec<DeadLetterStats>, BusError> {
        let rows = sqlx::query(
            "SELECT grp, COUNT(*) AS dead, MIN(last_failure_ms) AS oldest_ms \
             FROM bus_dead_letters WHERE state = ?1 GROUP BY grp ORDER BY grp",
        )
        .bind(DeadLetterState::Dead.as_str())
        .fetch_all(&self.inner.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let dead: i64 = row.try_get("dead")?;
                let oldest: Option<i64> = row.try_get("oldest_ms")?;
                Ok(DeadLetterStats {
                    group: row.try_get("grp")?,
                    dead: u64::try_from(dead).unwrap_or_default(),
                    oldest_dead_lettered_at: oldest.map(from_millis),
                })
            })
            .collect()
    }

    async fn get(&self, id: Uuid) -> Result<DeadLetter, BusError> {
        let row = sqlx::query("SELECT * FROM bus_dead_letters WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.inner.pool)
            .await?
            .ok_or_else(|| not_found(id))?;
        letter_from_row(&row)
    }

    async fn redrive(&self, id: Uuid, actor: &str) -> Result<(), BusError> {
        self.act(id, actor, DlqActionKind::Redrive).await
    }

    async fn discard(&self, id: Uuid, actor: &str) -> Result<(), BusError> {
        self.act(id, actor, DlqActionKind::Discard).await
    }

    async fn archive(&self, id: Uuid, actor: &str) -> Result<(), BusError> {
        self.act(id, actor, DlqActionKind::Archive).await
    }

    async fn actions(&self, limit: usize) -> Result<Vec<DlqAction>, BusError> {
        let limit = i64::try_from(limit.min(ACTIONS_LIMIT_MAX)).unwrap_or(0);
        let rows = sqlx::query("SELECT * FROM bus_dlq_actions ORDER BY id DESC LIMIT ?")
            .bind(limit)
            .fetch_all(&self.inner.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let action: String = row.try_get("action")?;
                let dead_letter_id: String = row.try_get("dead_letter_id")?;
                let message_id: String = row.try_get("message_id")?;
                Ok(DlqAction {
                    at: from_millis(row.try_get("at_ms")?),
                    action: DlqActionKind::parse(&action)?,
                    dead_letter_id: Uuid::parse_str(&dead_letter_id).map_err(BusError::corrupt)?,
                    message_id: Uuid::parse_str(&message_id).map_err(BusError::corrupt)?,
                    actor: row.try_get("actor")?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_topic_pattern_narrows_the_sql_scan_to_its_literal_prefix() {
        assert_eq!(like_prefix("orders.*"), "orders.%");
        assert_eq!(like_prefix("orders.created"), "orders.created%");
        assert_eq!(like_prefix(">"), "%");
        assert_eq!(like_prefix("a_b.*.c"), "a\\_b.%");
    }
}
