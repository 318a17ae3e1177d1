//! The `EventStore` trait every backend implements.

use std::future::Future;

use tokio::sync::watch;

use crate::error::EventStoreError;
use crate::types::{
    AppendResult, Direction, ExpectedVersion, NewEvent, RecordedEvent, Snapshot, StreamId,
    StreamInfo, StreamMetadata,
};

/// An append-only store of event streams with a global, commit-ordered log.
///
/// # Contract
/// - [`append`](Self::append) is atomic: all of the batch is stored or none of it. It checks
///   `expected` against the stream's version and fails with
///   [`EventStoreError::WrongExpectedVersion`] carrying the actual version. Re-sending an append
///   whose event ids are all already stored, in that stream, in that order, succeeds with the
///   original result and stores nothing (a retry after a lost answer); a batch of which only
///   some ids are stored, or stored elsewhere, fails with
///   [`EventStoreError::IdempotencyConflict`].
/// - Positions are assigned in commit order: once a reader has seen position `p`, no event
///   with a position below `p` can appear later. [`read_all`](Self::read_all) therefore never
///   skips an event when it continues from the last position it saw.
/// - Reads of a stream honour its [`StreamMetadata`] (soft delete, truncate-before, max count);
///   `read_all` is the raw log and returns every event.
///
/// Backends: [`MemoryStore`](crate::MemoryStore), [`SqliteStore`](crate::SqliteStore),
/// [`PostgresStore`](crate::PostgresStore); [`AnyStore`](crate::AnyStore) picks one by URL.
pub trait EventStore: Clone + Send + Sync + 'static {
    /// Appends `events` to `stream` if the stream is at `expected`.
    ///
    /// # Errors
    /// [`EventStoreError::WrongExpectedVersion`], [`EventStoreError::IdempotencyConflict`],
    /// [`EventStoreError::InvalidInput`] (empty, oversize or duplicate ids), or a backend error.
    fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> impl Future<Output = Result<AppendResult, EventStoreError>> + Send;

    /// Reads up to `limit` events of `stream` starting at version `from` (inclusive).
    ///
    /// # Errors
    /// [`EventStoreError::InvalidInput`] for a limit of 0 or above
    /// [`READ_LIMIT_MAX`](crate::READ_LIMIT_MAX), or a backend error.
    fn read_stream(
        &self,
        stream: &StreamId,
        from: u64,
        direction: Direction,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<RecordedEvent>, EventStoreError>> + Send;

    /// Reads up to `limit` events of the global log starting at position `from` (inclusive;
    /// positions start at 1), in commit order.
    ///
    /// # Errors
    /// As [`read_stream`](Self::read_stream).
    fn read_all(
        &self,
        from: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<RecordedEvent>, EventStoreError>> + Send;

    /// The stream's version and settings, `None` if it was never written or configured.
    ///
    /// # Errors
    /// A backend error.
    fn stream_info(
        &self,
        stream: &StreamId,
    ) -> impl Future<Output = Result<Option<StreamInfo>, EventStoreError>> + Send;

    /// Replaces the stream's settings (creating an empty stream if needed).
    ///
    /// # Errors
    /// A backend error.
    fn set_stream_metadata(
        &self,
        stream: &StreamId,
        metadata: StreamMetadata,
    ) -> impl Future<Output = Result<(), EventStoreError>> + Send;

    /// The position of the newest event (0 when the log is empty).
    ///
    /// # Errors
    /// A backend error.
    fn head(&self) -> impl Future<Output = Result<u64, EventStoreError>> + Send;

    /// A receiver told the head position after each append this store instance (and, for
    /// PostgreSQL, any instance) commits. Subscriptions wait on it instead of polling hot.
    fn watch_head(&self) -> watch::Receiver<u64>;

    /// The latest snapshot stored for `stream`.
    ///
    /// # Errors
    /// A backend error.
    fn load_snapshot(
        &self,
        stream: &StreamId,
    ) -> impl Future<Output = Result<Option<Snapshot>, EventStoreError>> + Send;

    /// Stores a snapshot for `stream`, replacing an older one (a snapshot for a lower version
    /// than the stored one is ignored).
    ///
    /// # Errors
    /// A backend error.
    fn save_snapshot(
        &self,
        stream: &StreamId,
        snapshot: Snapshot,
    ) -> impl Future<Output = Result<(), EventStoreError>> + Send;

    /// Soft-deletes the stream if it is at `expected`: reads return nothing; appending again
    /// undeletes it, and numbering continues.
    ///
    /// # Errors
    /// [`EventStoreError::WrongExpectedVersion`] or a backend error.
    fn delete_stream(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
    ) -> impl Future<Output = Result<(), EventStoreError>> + Send {
        async move {
            let info = self.stream_info(stream).await?;
            let (version, metadata) =
                info.map_or((0, StreamMetadata::default()), |i| (i.version, i.metadata));
            if !expected.matches(version) {
                return Err(EventStoreError::WrongExpectedVersion {
                    stream: stream.clone(),
                    expected,
                    actual: version,
                });
            }
            self.set_stream_metadata(
                stream,
                StreamMetadata {
                    deleted: true,
                    ..metadata
                },
            )
            .await
        }
    }
}
