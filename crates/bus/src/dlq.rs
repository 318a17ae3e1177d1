//! The dead-letter queue as a product: list, inspect, group by failure fingerprint, redrive,
//! discard and archive, every action logged.
//! (Over 600 lines: the filter, the dead-letter bookkeeping the three backends share and their
//! tests belong together.)
//!
//! Listing is paged in the store ([`DeadLetters::list_page`] with [`DeadLetterFilter::cursor`]):
//! a queue can grow to any size during an incident, and a listing that read it whole (or
//! silently stopped after a fixed number of letters, as the NATS backend once did) would be
//! slow exactly when it is needed, or would hide letters.
//!
//! Every backend implements [`DeadLetters`]; [`DeadLetters::failure_groups`],
//! [`DeadLetters::redrive_matching`] and [`DeadLetters::redrive_group`] are built on its
//! required methods. A redriven message goes back to its topic for the group that failed it
//! (other groups already handled it), with [`crate::REDRIVE_COUNT_HEADER`] incremented and its
//! original `traceparent`, so its consumer's span joins the original trace.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::bus::Message;
use crate::envelope::Envelope;
use crate::error::BusError;
use crate::topic;

/// Most dead letters one list call returns.
pub const LIST_LIMIT_MAX: usize = 1_000;
/// Most dead letters one bulk redrive moves.
pub const REDRIVE_BATCH_MAX: usize = 1_000;
/// Longest error text kept with a dead letter, in bytes.
pub const ERROR_TEXT_BYTES_MAX: usize = 4_096;
/// Longest actor name or action detail kept in the action log, in bytes.
pub const ACTION_TEXT_BYTES_MAX: usize = 256;

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterReason {
    /// The handler failed on the last allowed delivery.
    MaxDeliveries,
    /// The last allowed delivery was never settled (consumer crash or ack timeout).
    AckTimeout,
    /// The data did not decode: retrying cannot help.
    Poison,
    /// The consumer terminated it (a permanent failure).
    Rejected,
}

impl DeadLetterReason {
    /// The snake_case name used in storage and JSON.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxDeliveries => "max_deliveries",
            Self::AckTimeout => "ack_timeout",
            Self::Poison => "poison",
            Self::Rejected => "rejected",
        }
    }

    /// Parses [`DeadLetterReason::as_str`].
    ///
    /// # Errors
    /// [`BusError::Corrupt`] for an unknown name.
    pub fn parse(name: &str) -> Result<Self, BusError> {
        Ok(match name {
            "max_deliveries" => Self::MaxDeliveries,
            "ack_timeout" => Self::AckTimeout,
            "poison" => Self::Poison,
            "rejected" => Self::Rejected,
            other => return Err(BusError::corrupt(format!("dead-letter reason {other:?}"))),
        })
    }
}

/// Whether a dead letter waits for a decision or was archived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterState {
    /// Waiting in the queue.
    #[default]
    Dead,
    /// Kept for the record, out of the working queue.
    Archived,
}

impl DeadLetterState {
    /// The snake_case name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dead => "dead",
            Self::Archived => "archived",
        }
    }

    /// Parses [`DeadLetterState::as_str`].
    ///
    /// # Errors
    /// [`BusError::Corrupt`] for an unknown name.
    pub fn parse(name: &str) -> Result<Self, BusError> {
        match name {
            "dead" => Ok(Self::Dead),
            "archived" => Ok(Self::Archived),
            other => Err(BusError::corrupt(format!("dead-letter state {other:?}"))),
        }
    }
}

/// A message that will not be delivered again until someone redrives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// This dead letter's id (not the message's).
    pub id: Uuid,
    /// The consumer group that gave up on it.
    pub group: String,
    /// The topic it was published on.
    pub topic: String,
    /// The message as delivered.
    pub envelope: Envelope,
    /// Why it is here.
    pub reason: DeadLetterReason,
    /// How many deliveries were made.
    pub attempts: u32,
    /// When the first delivery failed.
    pub first_failure_at: DateTime<Utc>,
    /// When the last delivery failed.
    pub last_failure_at: DateTime<Utc>,
    /// The last error's kind (a handler's error kind, `decode`, `ack_timeout`, ...).
    pub error_kind: String,
    /// The last error's text.
    pub error: String,
    /// `error_kind` plus the error text with numbers, ids and quoted values normalised, so
    /// the same failure on different messages groups together.
    pub fingerprint: String,
    /// Dead or archived.
    pub state: DeadLetterState,
    /// How many times the message had been redriven before it landed here again.
    pub redrive_count: u32,
}

impl DeadLetter {
    /// The dead letter a backend stores when `message`'s delivery number `attempts` ends in
    /// `failure`. `first_failure_at` is the backend's record of the message's first failure
    /// (`None`: this is its first, so it is `failure.at`).
    pub(crate) fn from_failure(
        message: &Message,
        attempts: u32,
        failure: &Failure,
        first_failure_at: Option<DateTime<Utc>>,
    ) -> Self {
        Self {
            id: Uuid::now_v7(),
            group: message.group.clone(),
            topic: message.topic.clone(),
            envelope: message.envelope.clone(),
            reason: failure.reason,
            attempts,
            first_failure_at: first_failure_at.unwrap_or(failure.at),
            last_failure_at: failure.at,
            fingerprint: failure.fingerprint(),
            error_kind: failure.error_kind.clone(),
            error: failure.error.clone(),
            state: DeadLetterState::Dead,
            redrive_count: message.envelope.redrive_count(),
        }
    }
}

/// What a dead-letter failure looks like before it is stored.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) reason: DeadLetterReason,
    pub(crate) error_kind: String,
    pub(crate) error: String,
    pub(crate) at: DateTime<Utc>,
}

impl Failure {
    pub(crate) fn new(reason: DeadLetterReason, error_kind: &str, error: &str) -> Self {
        Self {
            reason,
            error_kind: truncate(error_kind, ACTION_TEXT_BYTES_MAX),
            error: truncate(error, ERROR_TEXT_BYTES_MAX),
            at: Utc::now(),
        }
    }

    pub(crate) fn fingerprint(&self) -> String {
        fingerprint(&self.error_kind, &self.error)
    }
}

/// Cuts `text` to at most `bytes_max` bytes on a character boundary.
pub(crate) fn truncate(text: &str, bytes_max: usize) -> String {
    if text.len() <= bytes_max {
        return text.to_owned();
    }
    let mut end = bytes_max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// The failure fingerprint: `kind: message` with runs of digits and hex ids replaced by `#`
/// and quoted values by `"…"`, so "order 17 not found" and "order 42 not found" group.
#[must_use]
pub fn fingerprint(error_kind: &str, error: &str) -> String {
    let mut normalised = String::with_capacity(error.len().min(256));
    let mut chars = error.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                // Skip to the closing quote (or the end).
                for next in chars.by_ref() {
                    if next == c {
                        break;
                    }
                }
                normalised.push(c);
                normalised.push('…');
                normalised.push(c);
            }
            c if c.is_ascii_alphanumeric() => {
                let mut word = String::from(c);
                while let Some(&next) = chars.peek() {
                    if next.is_ascii_alphanumeric() || next == '-' {
                        word.push(next);
                        chars.next();
                    } else {
                        break;
                    }
                }
                let has_digit = word.bytes().any(|b| b.is_ascii_digit());
                let is_hexish = word.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
                if has_digit && (is_hexish || word.bytes().all(|b| b.is_ascii_digit())) {
                    normalised.push('#');
                } else if has_digit {
                    normalised.push_str(&word.replace(|ch: char| ch.is_ascii_digit(), "#"));
                } else {
                    normalised.push_str(&word);
                }
            }
            c => normalised.push(c),
        }
        if normalised.len() >= 200 {
            break;
        }
    }
    format!("{error_kind}: {}", normalised.trim())
}

/// Which dead letters to list or redrive. Every field narrows the selection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeadLetterFilter {
    /// Only this consumer group.
    pub group: Option<String>,
    /// Only topics matching this pattern (`orders.*`).
    pub topic: Option<String>,
    /// Only this message type.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Only errors containing this text (case-sensitive).
    pub error_contains: Option<String>,
    /// Only this failure fingerprint.
    pub fingerprint: Option<String>,
    /// Only this reason.
    pub reason: Option<DeadLetterReason>,
    /// Only dead letters whose last failure is at least this old.
    #[serde(default, with = "optional_seconds")]
    pub older_than: Option<Duration>,
    /// Only dead letters whose last failure is at most this old.
    #[serde(default, with = "optional_seconds")]
    pub newer_than: Option<Duration>,
    /// Dead (the default) or archived.
    pub state: Option<DeadLetterState>,
    /// At most this many (default and maximum [`LIST_LIMIT_MAX`]), oldest first.
    pub limit: Option<usize>,
    /// Where a listing continues: the `next_cursor` of the previous [`DeadLetterPage`]
    /// (absent or empty: from the oldest). Opaque; only valid for the backend that made it.
    pub cursor: Option<String>,
}

/// One page of dead letters and where the next one starts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeadLetterPage {
    /// The letters, oldest first, at most the filter's limit.
    pub dead_letters: Vec<DeadLetter>,
    /// Pass as [`DeadLetterFilter::cursor`] for the next page; `None` when this page reached
    /// the end. A page may hold fewer letters than the limit and still have a next one (a
    /// backend stops scanning after a bounded amount of work).
    pub next_cursor: Option<String>,
}

mod optional_seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(duration) => serializer.serialize_some(&duration.as_secs()),
            None => serializer.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(deserializer)?.map(Duration::from_secs))
    }
}

impl DeadLetterFilter {
    /// The effective limit.
    #[must_use]
    pub fn limit(&self) -> usize {
        self.limit
            .unwrap_or(LIST_LIMIT_MAX)
            .clamp(1, LIST_LIMIT_MAX)
    }

    /// Checks the filter's topic pattern.
    ///
    /// # Errors
    /// [`BusError::InvalidName`] for a malformed pattern.
    pub fn validate(&self) -> Result<(), BusError> {
        if let Some(pattern) = &self.topic {
            topic::validate_pattern(pattern)?;
        }
        Ok(())
    }

    /// Whether `letter` passes the filter at time `now` (the limit is not applied).
    #[must_use]
    pub fn accepts(&self, letter: &DeadLetter, now: DateTime<Utc>) -> bool {
        let age = (now - letter.last_failure_at).to_std().unwrap_or_default();
        self.group.as_ref().is_none_or(|g| *g == letter.group)
            && self
                .topic
                .as_ref()
                .is_none_or(|p| topic::matches(p, &letter.topic))
            && self
                .kind
                .as_ref()
                .is_none_or(|k| *k == letter.envelope.kind)
            && self
                .error_contains
                .as_ref()
                .is_none_or(|e| letter.error.contains(e.as_str()))
            && self
                .fingerprint
                .as_ref()
                .is_none_or(|f| *f == letter.fingerprint)
            && self.reason.is_none_or(|r| r == letter.reason)
            && self.older_than.is_none_or(|min| age >= min)
            && self.newer_than.is_none_or(|max| age <= max)
            && self.state.unwrap_or_default() == letter.state
    }
}

/// Splits the letters a backend scanned (each with the cursor that resumes after it) into a
/// page: at most `limit` letters; a next cursor when more were found than fit, or when the
/// scan stopped early at `resume`.
pub(crate) fn page_of(
    mut found: Vec<(DeadLetter, String)>,
    limit: usize,
    resume: Option<String>,
) -> DeadLetterPage {
    let next_cursor = if found.len() > limit {
        found.truncate(limit);
        found.last().map(|(_, cursor)| cursor.clone())
    } else {
        resume
    };
    DeadLetterPage {
        dead_letters: found.into_iter().map(|(letter, _)| letter).collect(),
        next_cursor,
    }
}

/// The position a filter's cursor holds, as the backend wrote it (`None`: from the start).
/// Memory and SQLite write dead-letter ids, NATS stream sequences.
pub(crate) fn cursor<T: std::str::FromStr>(
    filter: &DeadLetterFilter,
) -> Result<Option<T>, BusError> {
    match filter.cursor.as_deref() {
        None | Some("") => Ok(None),
        Some(text) => text
            .parse::<T>()
            .map(Some)
            .map_err(|_| BusError::invalid("cursor", text, "is not a cursor of this backend")),
    }
}

/// The dead-letter id a memory or SQLite cursor holds (`None`: from the start).
pub(crate) fn id_cursor(filter: &DeadLetterFilter) -> Result<Option<Uuid>, BusError> {
    cursor::<Uuid>(filter)
}

/// The error for a dead-letter id that is not (or no longer) in the queue.
pub(crate) fn not_found(id: Uuid) -> BusError {
    BusError::NotFound {
        what: "dead letter",
        id: id.to_string(),
    }
}

/// Dead letters that failed the same way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureGroup {
    /// The shared fingerprint.
    pub fingerprint: String,
    /// The error kind.
    pub error_kind: String,
    /// One example error text.
    pub sample_error: String,
    /// How many dead letters share it.
    pub count: usize,
    /// The topics they came from, with counts.
    pub topics: BTreeMap<String, usize>,
    /// The oldest last-failure time in the group.
    pub first_at: DateTime<Utc>,
    /// The newest last-failure time in the group.
    pub last_at: DateTime<Utc>,
}

/// Groups dead letters by fingerprint, largest group first.
#[must_use]
pub fn group_by_fingerprint(letters: &[DeadLetter]) -> Vec<FailureGroup> {
    let mut groups: BTreeMap<&str, FailureGroup> = BTreeMap::new();
    for letter in letters {
        let group = groups
            .entry(letter.fingerprint.as_str())
            .or_insert_with(|| FailureGroup {
                fingerprint: letter.fingerprint.clone(),
                error_kind: letter.error_kind.clone(),
                sample_error: letter.error.clone(),
                count: 0,
                topics: BTreeMap::new(),
                first_at: letter.last_failure_at,
                last_at: letter.last_failure_at,
            });
        group.count += 1;
        *group.topics.entry(letter.topic.clone()).or_default() += 1;
        group.first_at = group.first_at.min(letter.last_failure_at);
        group.last_at = group.last_at.max(letter.last_failure_at);
    }
    let mut groups: Vec<FailureGroup> = groups.into_values().collect();
    groups.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then(a.fingerprint.cmp(&b.fingerprint))
    });
    groups
}

/// What was done to a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DlqActionKind {
    /// Sent back to its topic for its group.
    Redrive,
    /// Deleted.
    Discard,
    /// Moved out of the working queue, kept.
    Archive,
}

impl DlqActionKind {
    /// The snake_case name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Redrive => "redrive",
            Self::Discard => "discard",
            Self::Archive => "archive",
        }
    }

    /// Parses [`DlqActionKind::as_str`].
    ///
    /// # Errors
    /// [`BusError::Corrupt`] for an unknown name.
    pub fn parse(name: &str) -> Result<Self, BusError> {
        match name {
            "redrive" => Ok(Self::Redrive),
            "discard" => Ok(Self::Discard),
            "archive" => Ok(Self::Archive),
            other => Err(BusError::corrupt(format!("dlq action {other:?}"))),
        }
    }
}

/// One entry of the DLQ's action log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DlqAction {
    /// When.
    pub at: DateTime<Utc>,
    /// What.
    pub action: DlqActionKind,
    /// Which dead letter.
    pub dead_letter_id: Uuid,
    /// The message's id.
    pub message_id: Uuid,
    /// Who asked (a user name, `cli`, `http`, ...).
    pub actor: String,
}

impl DlqAction {
    /// The log entry for `action` on `letter` by `actor`, now (the actor cut to
    /// [`ACTION_TEXT_BYTES_MAX`]).
    pub(crate) fn new(action: DlqActionKind, letter: &DeadLetter, actor: &str) -> Self {
        Self {
            at: Utc::now(),
            action,
            dead_letter_id: letter.id,
            message_id: letter.envelope.id,
            actor: truncate(actor, ACTION_TEXT_BYTES_MAX),
        }
    }
}

/// Most actions one [`DeadLetters::actions`] call returns.
pub const ACTIONS_LIMIT_MAX: usize = 1_000;

/// How many dead letters wait in one group's queue, and since when: what
/// [`DeadLetters::stats`] reports for operators and [`crate::DlqGauges`] exports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterStats {
    /// The consumer group.
    pub group: String,
    /// Dead letters in state `dead` (archived ones are out of the working queue).
    pub dead: u64,
    /// When the oldest of them was dead-lettered (its last failure); `None` when there are none.
    pub oldest_dead_lettered_at: Option<DateTime<Utc>>,
}

/// Folds `letters` into per-group stats (groups in name order).
pub(crate) fn stats_of<'a>(
    letters: impl IntoIterator<Item = &'a DeadLetter>,
) -> Vec<DeadLetterStats> {
    let mut groups: BTreeMap<&str, DeadLetterStats> = BTreeMap::new();
    for letter in letters {
        if letter.state != DeadLetterState::Dead {
            continue;
        }
        let stats = groups
            .entry(letter.group.as_str())
            .or_insert_with(|| DeadLetterStats {
                group: letter.group.clone(),
                dead: 0,
                oldest_dead_lettered_at: None,
            });
        stats.dead += 1;
        stats.oldest_dead_lettered_at = Some(
            stats
                .oldest_dead_lettered_at
                .map_or(letter.last_failure_at, |oldest| {
                    oldest.min(letter.last_failure_at)
                }),
        );
    }
    groups.into_values().collect()
}

/// A backend's dead-letter queue.
///
/// Mutations are logged (see [`DeadLetters::actions`]) and traced at INFO level. A mutation on
/// an id that is not (or no longer) in the queue is [`BusError::NotFound`].
pub trait DeadLetters: Send + Sync {
    /// One page of the dead letters `filter` selects, oldest first, at most
    /// `filter.limit()`, starting at `filter.cursor`. The store filters and pages: a listing
    /// costs work in proportion to the page, not to the queue.
    ///
    /// # Errors
    /// [`BusError::InvalidConfig`] for a cursor this backend did not make; storage faults.
    fn list_page(
        &self,
        filter: &DeadLetterFilter,
    ) -> impl Future<Output = Result<DeadLetterPage, BusError>> + Send;

    /// The letters of [`DeadLetters::list_page`] without the cursor: the first page (or the
    /// page at `filter.cursor`).
    fn list(
        &self,
        filter: &DeadLetterFilter,
    ) -> impl Future<Output = Result<Vec<DeadLetter>, BusError>> + Send {
        async move { Ok(self.list_page(filter).await?.dead_letters) }
    }

    /// One dead letter, whatever its state.
    fn get(&self, id: Uuid) -> impl Future<Output = Result<DeadLetter, BusError>> + Send;

    /// Sends a dead letter back to its topic for its group and removes it from the queue.
    fn redrive(&self, id: Uuid, actor: &str) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Deletes a dead letter.
    fn discard(&self, id: Uuid, actor: &str) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Moves a dead letter to the archived state.
    fn archive(&self, id: Uuid, actor: &str) -> impl Future<Output = Result<(), BusError>> + Send;

    /// The most recent actions, newest first, at most `limit` (capped at [`ACTIONS_LIMIT_MAX`]).
    fn actions(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<DlqAction>, BusError>> + Send;

    /// How many dead letters wait in each group's queue (state `dead`) and the time the oldest
    /// was dead-lettered; groups with none are absent.
    ///
    /// The provided method pages through the whole queue, so it costs work in proportion to
    /// the queue (the memory and NATS backends use it); the SQLite backend answers with one
    /// aggregate query. Meant for a periodic sampler ([`crate::DlqGauges`]), not for every
    /// request.
    ///
    /// # Errors
    /// Storage faults.
    fn stats(&self) -> impl Future<Output = Result<Vec<DeadLetterStats>, BusError>> + Send {
        async move {
            let mut filter = DeadLetterFilter::default();
            let mut letters = Vec::new();
            loop {
                let page = self.list_page(&filter).await?;
                letters.extend(page.dead_letters);
                match page.next_cursor {
                    Some(cursor) => filter.cursor = Some(cursor),
                    None => return Ok(stats_of(&letters)),
                }
            }
        }
    }

    /// The selected dead letters grouped by failure fingerprint, largest group first.
    fn failure_groups(
        &self,
        filter: &DeadLetterFilter,
    ) -> impl Future<Output = Result<Vec<FailureGroup>, BusError>> + Send {
        async move { Ok(group_by_fingerprint(&self.list(filter).await?)) }
    }

    /// Redrives every dead letter `filter` selects (at most [`REDRIVE_BATCH_MAX`]); returns
    /// the ids redriven.
    fn redrive_matching(
        &self,
        filter: &DeadLetterFilter,
        actor: &str,
    ) -> impl Future<Output = Result<Vec<Uuid>, BusError>> + Send {
        async move {
            let mut filter = filter.clone();
            filter.limit = Some(filter.limit().min(REDRIVE_BATCH_MAX));
            let mut redriven = Vec::new();
            for letter in self.list(&filter).await? {
                match self.redrive(letter.id, actor).await {
                    Ok(()) => redriven.push(letter.id),
                    // Someone else acted on it meanwhile.
                    Err(BusError::NotFound { .. }) => {}
                    Err(error) => return Err(error),
                }
            }
            Ok(redriven)
        }
    }

    /// Redrives every dead letter with this fingerprint.
    fn redrive_group(
        &self,
        fingerprint: &str,
        actor: &str,
    ) -> impl Future<Output = Result<Vec<Uuid>, BusError>> + Send {
        let filter = DeadLetterFilter {
            fingerprint: Some(fingerprint.to_owned()),
            ..DeadLetterFilter::default()
        };
        async move { self.redrive_matching(&filter, actor).await }
    }
}

/// The envelope a redrive publishes: the same message, redrive count plus one.
pub(crate) fn redriven_envelope(letter: &DeadLetter) -> Envelope {
    let mut envelope = letter.envelope.clone();
    let count = envelope.redrive_count().saturating_add(1);
    envelope.headers.insert(
        crate::envelope::REDRIVE_COUNT_HEADER.to_owned(),
        count.to_string(),
    );
    envelope
}

pub(crate) fn log_action(action: DlqActionKind, letter: &DeadLetter, actor: &str) {
    tracing::info!(
        action = action.as_str(),
        dead_letter_id = %letter.id,
        message_id = %letter.envelope.id,
        group = %letter.group,
        topic = %letter.topic,
        actor,
        "dead-letter action"
    );
    metrics::counter!("trellis_bus_dlq_actions_total", "action" => action.as_str()).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_ignore_numbers_ids_and_quoted_values() {
        let a = fingerprint(
            "http",
            "order 17 not found for \"alice\" (id 0190a1b2-c3d4)",
        );
        let b = fingerprint("http", "order 42 not found for \"bob\" (id 0190ffff-0000)");
        assert_eq!(a, b);
        assert_eq!(a, "http: order # not found for \"…\" (id #)");
        assert_ne!(
            a,
            fingerprint("db", "order 17 not found for \"alice\" (id 0190a1b2-c3d4)")
        );
    }

    #[test]
    fn a_dead_letter_keeps_the_first_failure_its_backend_recorded() {
        // Every backend builds its letters here: the first failure defaults to this one.
        let message = Message {
            topic: "orders.created".to_owned(),
            group: "billing".to_owned(),
            envelope: Envelope::new("order.created", "orders", "o-1", serde_json::json!({})),
        };
        let failure = Failure::new(DeadLetterReason::MaxDeliveries, "http", "order 17 gone");
        let fresh = DeadLetter::from_failure(&message, 5, &failure, None);
        assert_eq!(fresh.first_failure_at, failure.at);
        assert_eq!(fresh.fingerprint, "http: order # gone");
        let earlier = failure.at - chrono::Duration::minutes(3);
        let retried = DeadLetter::from_failure(&message, 5, &failure, Some(earlier));
        assert_eq!(retried.first_failure_at, earlier);
        assert_eq!(retried.last_failure_at, failure.at);
        assert_eq!(
            (retried.attempts, retried.state),
            (5, DeadLetterState::Dead)
        );
    }

    #[test]
    fn an_action_entry_cuts_a_long_actor_name() {
        let message = Message {
            topic: "t".to_owned(),
            group: "g".to_owned(),
            envelope: Envelope::new("k", "s", "x", serde_json::json!({})),
        };
        let failure = Failure::new(DeadLetterReason::Rejected, "k", "e");
        let letter = DeadLetter::from_failure(&message, 1, &failure, None);
        let entry = DlqAction::new(DlqActionKind::Archive, &letter, &"a".repeat(1_000));
        assert_eq!(entry.actor.len(), ACTION_TEXT_BYTES_MAX);
        assert_eq!(entry.message_id, message.envelope.id);
    }

    #[test]
    fn stats_count_only_dead_letters_and_keep_the_oldest_per_group() {
        // Two dead letters of one group, an archived one and another group's: the archived one
        // is out of the working queue, and the oldest is the earliest dead-lettering.
        let message = Message {
            topic: "orders.created".to_owned(),
            group: "billing".to_owned(),
            envelope: Envelope::new("t", "s", "subject", serde_json::json!({})),
        };
        let failure = Failure::new(DeadLetterReason::Rejected, "kind", "error");
        let at = |seconds: i64| DateTime::from_timestamp(seconds, 0).expect("a valid time");
        let letter = |group: &str, dead_lettered: i64, state: DeadLetterState| {
            let mut letter = DeadLetter::from_failure(&message, 1, &failure, None);
            letter.group = group.to_owned();
            letter.last_failure_at = at(dead_lettered);
            letter.state = state;
            letter
        };
        let letters = [
            letter("billing", 200, DeadLetterState::Dead),
            letter("billing", 100, DeadLetterState::Dead),
            letter("billing", 50, DeadLetterState::Archived),
            letter("audit", 300, DeadLetterState::Dead),
        ];
        assert_eq!(
            stats_of(&letters),
            vec![
                DeadLetterStats {
                    group: "audit".to_owned(),
                    dead: 1,
                    oldest_dead_lettered_at: Some(at(300)),
                },
                DeadLetterStats {
                    group: "billing".to_owned(),
                    dead: 2,
                    oldest_dead_lettered_at: Some(at(100)),
                },
            ]
        );
    }

    #[test]
    fn truncation_respects_character_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
