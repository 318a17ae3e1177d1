//! The crate's one error type.

use std::time::Duration;

/// Everything that can go wrong on the bus, grouped by who has to act.
///
/// Bad input (`Invalid*`, [`BusError::MessageTooLarge`], [`BusError::Decode`]) is the
/// caller's to fix and never retried; [`BusError::LeaseLost`] and
/// [`BusError::NotFound`] describe a state the caller raced with; storage and network faults
/// are transient and [`BusError::is_retryable`] says so.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// A topic, topic pattern, group or subject is malformed.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        /// Which kind of name (`topic`, `topic pattern`, `group`, `subject`, ...).
        what: &'static str,
        /// The value given.
        value: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// The envelope breaks a rule (empty type, too many headers, ...).
    #[error("invalid envelope: {0}")]
    InvalidEnvelope(String),
    /// The serialized message is larger than the configured limit; it was not published.
    #[error("message of {size_bytes} bytes exceeds the limit of {limit_bytes} bytes")]
    MessageTooLarge {
        /// The serialized size.
        size_bytes: usize,
        /// The configured limit.
        limit_bytes: usize,
    },
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A message's data does not decode into the handler's type: a poison message.
    #[error("message data does not decode as {type_name}: {reason}")]
    Decode {
        /// The Rust type the data was decoded into.
        type_name: &'static str,
        /// The decoder's message.
        reason: String,
    },
    /// The group already exists with another topic pattern.
    #[error("group {group:?} already subscribes to {existing:?}, not {requested:?}")]
    GroupConflict {
        /// The group.
        group: String,
        /// The pattern it was created with.
        existing: String,
        /// The pattern asked for now.
        requested: String,
    },
    /// The delivery was already settled, or its ack deadline passed and the message was
    /// handed to another consumer: this settlement had no effect.
    #[error("the delivery's lease was lost (already settled, or its ack deadline passed)")]
    LeaseLost,
    /// No dead letter (or outbox row, ...) with this id.
    #[error("{what} {id} not found")]
    NotFound {
        /// What was looked up.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// A bounded store is full (the in-memory log, the outbox batch, ...).
    #[error("{what} is full ({limit} entries)")]
    Full {
        /// What is full.
        what: &'static str,
        /// Its limit.
        limit: usize,
    },
    /// A wait or network call hit its limit.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The bus was shut down.
    #[error("the bus is closed")]
    Closed,
    /// The SQL database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The storage backend failed for a batch of operations (group commit); the text says why.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The NATS server or connection failed.
    #[error("nats: {0}")]
    Nats(String),
    /// Stored data could not be read back: a bug or a foreign writer.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
}

impl BusError {
    /// Whether trying the same call again later may succeed (a transient fault).
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Timeout(_) | Self::Nats(_) | Self::Unavailable(_) => true,
            Self::Database(error) => matches!(
                error,
                sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed
                    | sqlx::Error::Database(_)
            ),
            _ => false,
        }
    }

    pub(crate) fn invalid(what: &'static str, value: &str, reason: &'static str) -> Self {
        Self::InvalidName {
            what,
            value: value.chars().take(200).collect(),
            reason,
        }
    }

    pub(crate) fn nats(error: impl std::fmt::Display) -> Self {
        Self::Nats(error.to_string())
    }

    pub(crate) fn corrupt(error: impl std::fmt::Display) -> Self {
        Self::Corrupt(error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_is_not_retryable_and_timeouts_are() {
        assert!(!BusError::invalid("topic", "a..b", "empty token").is_retryable());
        assert!(
            !BusError::MessageTooLarge {
                size_bytes: 2,
                limit_bytes: 1
            }
            .is_retryable()
        );
        assert!(BusError::Timeout(Duration::from_secs(1)).is_retryable());
        assert!(BusError::Database(sqlx::Error::PoolTimedOut).is_retryable());
    }
}
