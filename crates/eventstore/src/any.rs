//! Choosing a backend by URL.

use tokio::sync::watch;

use crate::error::EventStoreError;
use crate::memory::MemoryStore;
use crate::sql::postgres::PostgresStore;
use crate::sql::sqlite::SqliteStore;
use crate::store::EventStore;
use crate::types::{
    AppendResult, Direction, ExpectedVersion, NewEvent, RecordedEvent, Snapshot, StreamId,
    StreamInfo, StreamMetadata,
};

/// One of the backends, chosen at run time by URL.
#[derive(Debug, Clone)]
pub enum AnyStore {
    /// `memory:`
    Memory(MemoryStore),
    /// `sqlite://path/to/file.db`
    Sqlite(SqliteStore),
    /// `postgres://user@host/db`
    Postgres(PostgresStore),
}

impl AnyStore {
    /// Opens the backend a URL names: `memory:`, `sqlite://…` or `postgres://…`
    /// (`postgresql://` too).
    ///
    /// # Errors
    /// [`EventStoreError::InvalidInput`] for another scheme, or the backend's error.
    pub async fn open(url: &str) -> Result<Self, EventStoreError> {
        if url == "memory:" {
            Ok(Self::Memory(MemoryStore::new()))
        } else if url.starts_with("sqlite:") {
            Ok(Self::Sqlite(SqliteStore::open(url).await?))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres(PostgresStore::open(url).await?))
        } else {
            Err(EventStoreError::invalid(format!(
                "unsupported event store URL `{url}`: use memory:, sqlite://PATH or postgres://…"
            )))
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            AnyStore::Memory($store) => $call,
            AnyStore::Sqlite($store) => $call,
            AnyStore::Postgres($store) => $call,
        }
    };
}

impl EventStore for AnyStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, EventStoreError> {
        dispatch!(self, s => s.append(stream, expected, events).await)
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from: u64,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, EventStoreError> {
        dispatch!(self, s => s.read_stream(stream, from, direction, limit).await)
    }

    async fn read_all(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, EventStoreError> {
        dispatch!(self, s => s.read_all(from, limit).await)
    }

    async fn stream_info(&self, stream: &StreamId) -> Result<Option<StreamInfo>, EventStoreError> {
        dispatch!(self, s => s.stream_info(stream).await)
    }

    async fn set_stream_metadata(
        &self,
        stream: &StreamId,
        metadata: StreamMetadata,
    ) -> Result<(), EventStoreError> {
        dispatch!(self, s => s.set_stream_metadata(stream, metadata).await)
    }

    async fn head(&self) -> Result<u64, EventStoreError> {
        dispatch!(self, s => s.head().await)
    }

    fn watch_head(&self) -> watch::Receiver<u64> {
        dispatch!(self, s => s.watch_head())
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, EventStoreError> {
        dispatch!(self, s => s.load_snapshot(stream).await)
    }

    async fn save_snapshot(
        &self,
        stream: &StreamId,
        snapshot: Snapshot,
    ) -> Result<(), EventStoreError> {
        dispatch!(self, s => s.save_snapshot(stream, snapshot).await)
    }
}
