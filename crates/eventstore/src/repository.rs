//! Repositories: load an aggregate (snapshot plus newer events), run a command, append its
//! events with the expected version, retry on a conflict, snapshot by policy; optionally keep
//! recently used aggregates in memory ([`Repository::with_cache`]).

use std::collections::{HashMap, VecDeque};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use crate::aggregate::{Aggregate, decode, encode};
use crate::error::EventStoreError;
use crate::store::EventStore;
use crate::types::{Direction, ExpectedVersion, Metadata, Snapshot, StreamId};
use crate::upcast::{UpcastChainError, Upcasters};

/// Events read per query while loading an aggregate.
const LOAD_BATCH: usize = 1_000;
/// The most times a command is retried after version conflicts, unless configured.
pub const CONFLICT_RETRIES_DEFAULT: u32 = 3;

/// An aggregate as loaded.
#[derive(Debug, Clone)]
pub struct Loaded<A> {
    /// The state.
    pub state: A,
    /// The stream version the state includes (0: no events).
    pub version: u64,
    /// Events read from the store to build it (after the snapshot, if one was used).
    pub events_read: u64,
    /// The version of the snapshot the load started from, if any.
    pub snapshot_version: Option<u64>,
}

/// The outcome of a command that was accepted.
#[derive(Debug, Clone)]
pub struct Executed<A: Aggregate> {
    /// The events the command produced (empty: nothing to do, nothing appended).
    pub events: Vec<A::Event>,
    /// The state after the events.
    pub state: A,
    /// The stream version after the append.
    pub version: u64,
    /// Attempts made (more than 1 after version conflicts).
    pub attempts: u32,
}

/// Why a command did not go through.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryError<E: std::error::Error + 'static> {
    /// The aggregate refused the command.
    #[error("command refused: {0}")]
    Domain(#[source] E),
    /// The stream kept changing under us: every attempt hit a version conflict.
    #[error("gave up after {attempts} attempts: the stream kept changing concurrently")]
    Conflict {
        /// Attempts made.
        attempts: u32,
    },
    /// The store failed (including undecodable stored events).
    #[error(transparent)]
    Store(#[from] EventStoreError),
}

impl<E: std::error::Error + 'static> RepositoryError<E> {
    /// Whether retrying later can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Domain(_) => false,
            Self::Conflict { .. } => true,
            Self::Store(error) => error.is_retryable(),
        }
    }
}

/// Recently used aggregates: state and version per stream, evicted oldest-inserted first.
struct StateCache<A> {
    capacity: usize,
    copy: fn(&A) -> A,
    entries: Mutex<CacheEntries<A>>,
}

struct CacheEntries<A> {
    states: HashMap<StreamId, (A, u64)>,
    order: VecDeque<StreamId>,
}

impl<A> StateCache<A> {
    fn get(&self, stream: &StreamId) -> Option<(A, u64)> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .states
            .get(stream)
            .map(|(state, version)| ((self.copy)(state), *version))
    }

    /// Keeps `state` at `version` unless a newer version is cached already.
    fn put(&self, stream: &StreamId, state: &A, version: u64) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        match entries.states.get_mut(stream) {
            Some(entry) if entry.1 >= version => {}
            Some(entry) => *entry = ((self.copy)(state), version),
            None => {
                entries
                    .states
                    .insert(stream.clone(), ((self.copy)(state), version));
                entries.order.push_back(stream.clone());
                while entries.states.len() > self.capacity {
                    let Some(oldest) = entries.order.pop_front() else {
                        break;
                    };
                    entries.states.remove(&oldest);
                }
            }
        }
    }

    fn forget(&self, stream: &StreamId) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.states.remove(stream);
        // Its key stays in `order` until it reaches the front; removing a missing key then is
        // a no-op, and `order` never holds more than twice the capacity.
        if entries.order.len() > self.capacity.saturating_mul(2) {
            let CacheEntries { states, order } = &mut *entries;
            order.retain(|key| states.contains_key(key));
        }
    }
}

impl<A> std::fmt::Debug for StateCache<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        f.debug_struct("StateCache")
            .field("capacity", &self.capacity)
            .field("len", &entries.states.len())
            .finish()
    }
}

/// Loads and changes aggregates of type `A` in store `S`.
#[derive(Debug)]
pub struct Repository<A, S> {
    store: S,
    upcasters: Arc<Upcasters>,
    snapshot_every: Option<u64>,
    conflict_retries: u32,
    cache: Option<Arc<StateCache<A>>>,
    aggregate: PhantomData<fn() -> A>,
}

impl<A, S: Clone> Clone for Repository<A, S> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            upcasters: self.upcasters.clone(),
            snapshot_every: self.snapshot_every,
            conflict_retries: self.conflict_retries,
            cache: self.cache.clone(),
            aggregate: PhantomData,
        }
    }
}

impl<A: Aggregate + Clone, S: EventStore> Repository<A, S> {
    /// Keeps the state and version of up to `capacity` recently used aggregates in memory
    /// (shared by the repository's clones; 0 turns it off).
    ///
    /// [`execute`](Self::execute) then reads nothing before appending: the command runs on
    /// the cached state and the append expects the cached version, so a write from elsewhere
    /// (another process) shows as a version conflict, which drops the entry and reloads. A
    /// refusal or a no-op decided on a cached state is checked against a fresh load before it
    /// is answered. [`load`](Self::load) reads only the events after the cached version.
    #[must_use]
    pub fn with_cache(mut self, capacity: usize) -> Self {
        self.cache = (capacity > 0).then(|| {
            Arc::new(StateCache {
                capacity,
                copy: A::clone,
                entries: Mutex::new(CacheEntries {
                    states: HashMap::new(),
                    order: VecDeque::new(),
                }),
            })
        });
        self
    }
}

impl<A: Aggregate, S: EventStore> Repository<A, S> {
    /// A repository without snapshots or upcasters, retrying conflicts
    /// [`CONFLICT_RETRIES_DEFAULT`] times.
    pub fn new(store: S) -> Self {
        Self {
            store,
            upcasters: Arc::new(Upcasters::new()),
            snapshot_every: None,
            conflict_retries: CONFLICT_RETRIES_DEFAULT,
            cache: None,
            aggregate: PhantomData,
        }
    }

    /// Saves a snapshot each time the stream crosses a multiple of `every` events (0: never).
    #[must_use]
    pub fn with_snapshots(mut self, every: u64) -> Self {
        self.snapshot_every = (every > 0).then_some(every);
        self
    }

    /// How many times a command is retried after version conflicts.
    #[must_use]
    pub fn with_conflict_retries(mut self, retries: u32) -> Self {
        self.conflict_retries = retries;
        self
    }

    /// The upcasters this repository reads with, shared: other readers of the same events (a
    /// relay, a projection) decode with these, so an upcaster registered here reaches them too.
    pub fn upcasters(&self) -> Arc<Upcasters> {
        self.upcasters.clone()
    }

    /// Uses `upcasters` on read, after checking their chains against `A::Event`.
    ///
    /// # Errors
    /// The first chain with a gap.
    pub fn with_upcasters(mut self, upcasters: Upcasters) -> Result<Self, UpcastChainError> {
        upcasters.check::<A::Event>()?;
        self.upcasters = Arc::new(upcasters);
        Ok(self)
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The stream of aggregate `id`: `{A::TYPE}-{id}`.
    ///
    /// # Errors
    /// [`EventStoreError::InvalidInput`] when the name is not a valid stream id.
    pub fn stream_id(id: &str) -> Result<StreamId, EventStoreError> {
        StreamId::new(format!("{}-{id}", A::TYPE))
    }

    /// Loads aggregate `id`: the latest usable snapshot, then the events after it. A snapshot
    /// of another schema (or unreadable) is ignored, and a fresh one is saved once the state
    /// has been rebuilt from events (when snapshots are on).
    ///
    /// # Errors
    /// A store error, including [`EventStoreError::Decode`] for an event that cannot be read.
    pub async fn load(&self, id: &str) -> Result<Loaded<A>, EventStoreError> {
        let stream = Self::stream_id(id)?;
        let cached = self.cache.as_ref().and_then(|cache| cache.get(&stream));
        let from_cache = cached.is_some();
        let loaded = self.load_stream(&stream, cached).await?;
        if let Some(cache) = &self.cache {
            cache.put(&stream, &loaded.state, loaded.version);
        }
        if let Some(every) = self.snapshot_every
            && !from_cache
            && loaded.snapshot_version.is_none()
            && loaded.version >= every
        {
            self.save_snapshot(&stream, &loaded.state, loaded.version)
                .await?;
        }
        Ok(loaded)
    }

    /// The stream's current state: from the cache and the events after it, or from the
    /// store; the cache keeps the result.
    async fn load_fresh(&self, stream: &StreamId) -> Result<Loaded<A>, EventStoreError> {
        let cached = self.cache.as_ref().and_then(|cache| cache.get(stream));
        let loaded = self.load_stream(stream, cached).await?;
        if let Some(cache) = &self.cache {
            cache.put(stream, &loaded.state, loaded.version);
        }
        Ok(loaded)
    }

    /// The cached state of aggregate `id` when the repository has one (it may miss writes
    /// made elsewhere since: use it for hints and for what never changes), otherwise a
    /// [`load`](Self::load).
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub async fn load_cached(&self, id: &str) -> Result<Loaded<A>, EventStoreError> {
        let stream = Self::stream_id(id)?;
        if let Some((state, version)) = self.cache.as_ref().and_then(|cache| cache.get(&stream)) {
            return Ok(Loaded {
                state,
                version,
                events_read: 0,
                snapshot_version: None,
            });
        }
        self.load(id).await
    }

    /// Rebuilds the state from `start` (a cached state and its version) or from the latest
    /// snapshot, then the events after it.
    async fn load_stream(
        &self,
        stream: &StreamId,
        start: Option<(A, u64)>,
    ) -> Result<Loaded<A>, EventStoreError> {
        let mut state = A::default();
        let mut version = 0;
        let mut snapshot_version = None;
        let snapshot = match (&start, self.snapshot_every) {
            (None, Some(_)) => self.store.load_snapshot(stream).await?,
            _ => None,
        };
        if let Some((cached, cached_version)) = start {
            state = cached;
            version = cached_version;
        }
        if let Some(snapshot) = snapshot {
            if snapshot.schema_version == A::SNAPSHOT_SCHEMA {
                match serde_json::from_value::<A>(snapshot.state) {
                    Ok(restored) => {
                        state = restored;
                        version = snapshot.version;
                        snapshot_version = Some(snapshot.version);
                    }
                    Err(error) => {
                        tracing::warn!(%stream, %error, "ignoring an unreadable snapshot")
                    }
                }
            } else {
                tracing::info!(%stream, stored = snapshot.schema_version, current = A::SNAPSHOT_SCHEMA,
                    "ignoring a snapshot of another schema; rebuilding from events");
            }
        }
        let mut events_read = 0;
        loop {
            let batch = self
                .store
                .read_stream(stream, version + 1, Direction::Forwards, LOAD_BATCH)
                .await?;
            let Some(last) = batch.last() else { break };
            let last_version = last.version;
            for recorded in &batch {
                let event: A::Event = decode(recorded, &self.upcasters)?;
                state.apply(&event);
            }
            events_read += batch.len() as u64;
            version = last_version;
            if batch.len() < LOAD_BATCH {
                break;
            }
        }
        Ok(Loaded {
            state,
            version,
            events_read,
            snapshot_version,
        })
    }

    async fn save_snapshot(
        &self,
        stream: &StreamId,
        state: &A,
        version: u64,
    ) -> Result<(), EventStoreError> {
        let state = serde_json::to_value(state)
            .map_err(|e| EventStoreError::Internal(format!("state does not serialize: {e}")))?;
        self.store
            .save_snapshot(
                stream,
                Snapshot {
                    version,
                    schema_version: A::SNAPSHOT_SCHEMA,
                    state,
                },
            )
            .await
    }

    /// [`execute`](Self::execute) for an aggregate whose id was just made (a fresh UUID):
    /// the command runs on the empty state and its events are appended expecting no stream,
    /// without reading the store first. If the stream exists after all (the append
    /// conflicts), or the empty state refuses the command or has nothing to do, this falls
    /// back to [`execute`](Self::execute).
    ///
    /// # Errors
    /// As [`execute`](Self::execute).
    pub async fn execute_on_new(
        &self,
        id: &str,
        command: A::Command,
        metadata: Metadata,
    ) -> Result<Executed<A>, RepositoryError<A::Error>> {
        self.execute_from(id, command, metadata, Some((A::default(), 0)))
            .await
    }

    /// Runs `command` against aggregate `id` and appends the events it produces, expecting
    /// the version it loaded; on a version conflict it reloads and runs the command again, up
    /// to the retry limit.
    ///
    /// # Errors
    /// [`RepositoryError::Domain`] when the aggregate refuses, [`RepositoryError::Conflict`]
    /// when every attempt conflicted, [`RepositoryError::Store`] otherwise.
    pub async fn execute(
        &self,
        id: &str,
        command: A::Command,
        metadata: Metadata,
    ) -> Result<Executed<A>, RepositoryError<A::Error>> {
        let stream = Self::stream_id(id)?;
        let cached = self.cache.as_ref().and_then(|cache| cache.get(&stream));
        self.execute_from(id, command, metadata, cached).await
    }

    /// [`execute`](Self::execute) whose first attempt starts from `start` (a state and its
    /// version believed current) instead of a load. A refusal or a no-op on it is decided
    /// again on a fresh load, and a stale start shows as a version conflict, so a wrong guess
    /// never answers for the stream.
    async fn execute_from(
        &self,
        id: &str,
        command: A::Command,
        metadata: Metadata,
        mut start: Option<(A, u64)>,
    ) -> Result<Executed<A>, RepositoryError<A::Error>> {
        let stream = Self::stream_id(id)?;
        let attempts_max = self.conflict_retries + 1;
        for attempt in 1..=attempts_max {
            let (mut state, version, decided) = match start.take() {
                Some((state, version)) => match state.handle(command.clone()) {
                    Ok(events) if !events.is_empty() => (state, version, Some(events)),
                    _ => {
                        let loaded = self.load_fresh(&stream).await?;
                        (loaded.state, loaded.version, None)
                    }
                },
                None => {
                    let loaded = self.load_fresh(&stream).await?;
                    (loaded.state, loaded.version, None)
                }
            };
            let events = match decided {
                Some(events) => events,
                None => state
                    .handle(command.clone())
                    .map_err(RepositoryError::Domain)?,
            };
            if events.is_empty() {
                return Ok(Executed {
                    events,
                    state,
                    version,
                    attempts: attempt,
                });
            }
            let new_events = events
                .iter()
                .map(|event| encode(event).map(|e| e.with_metadata(metadata.clone())))
                .collect::<Result<Vec<_>, _>>()?;
            let expected = if version == 0 {
                ExpectedVersion::NoStream
            } else {
                ExpectedVersion::Exact(version)
            };
            match self.store.append(&stream, expected, new_events).await {
                Ok(result) => {
                    for event in &events {
                        state.apply(event);
                    }
                    if let Some(cache) = &self.cache {
                        cache.put(&stream, &state, result.next_version);
                    }
                    if let Some(every) = self.snapshot_every
                        && result.next_version / every > version / every
                    {
                        self.save_snapshot(&stream, &state, result.next_version)
                            .await?;
                    }
                    return Ok(Executed {
                        events,
                        state,
                        version: result.next_version,
                        attempts: attempt,
                    });
                }
                Err(error) if error.is_conflict() => {
                    if let Some(cache) = &self.cache {
                        cache.forget(&stream);
                    }
                    tracing::debug!(%stream, attempt, "version conflict; reloading and retrying the command");
                }
                Err(error) => return Err(error.into()),
            }
        }
        Err(RepositoryError::Conflict {
            attempts: attempts_max,
        })
    }
}
