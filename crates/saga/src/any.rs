//! [`AnySagaStore`]: the saga log chosen by URL at run time, as `trellis-eventstore` and
//! `trellis-bus` choose theirs, so a binary (the `trellis saga` CLI, a service) needs no
//! generic code; and [`AnyChoreographyLog`] (feature `bus`), the choreography log likewise.

use chrono::{DateTime, Utc};

use crate::error::SagaError;
use crate::store::{
    InMemorySagaStore, Lease, PostgresSagaStore, SagaFilter, SagaId, SagaInstance, SagaRecord,
    SagaStore, SagaSummary, SqliteSagaStore,
};

/// The backend a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    /// `memory:` or `memory://`.
    Memory,
    /// `sqlite://PATH` (anything `sqlite:`).
    Sqlite,
    /// `postgres://…` or `postgresql://…`.
    Postgres,
}

impl Scheme {
    /// The backend `url` names.
    ///
    /// # Errors
    /// [`SagaError::InvalidUrl`] for another scheme.
    fn of(url: &str) -> Result<Self, SagaError> {
        if url == "memory:" || url == "memory://" {
            Ok(Self::Memory)
        } else if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres)
        } else {
            Err(SagaError::InvalidUrl(format!(
                "unsupported saga log URL {url:?}: use memory://, sqlite://PATH or postgres://…"
            )))
        }
    }
}

/// One of the saga log's backends, picked by URL: `memory://`, `sqlite://PATH` or
/// `postgres://…`. It implements [`SagaStore`], so `SagaEngine<AnySagaStore>` and
/// `Inspector<AnySagaStore>` run on whichever the configuration names.
///
/// # Examples
/// ```
/// use trellis_saga::{AnySagaStore, SagaEngine};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), trellis_saga::SagaError> {
/// let engine = SagaEngine::new(AnySagaStore::open("memory://").await?);
/// engine.recover().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum AnySagaStore {
    /// [`InMemorySagaStore`].
    Memory(InMemorySagaStore),
    /// [`SqliteSagaStore`].
    Sqlite(SqliteSagaStore),
    /// [`PostgresSagaStore`].
    Postgres(PostgresSagaStore),
}

impl AnySagaStore {
    /// Opens the saga log `url` names: `memory://` (or `memory:`), `sqlite://PATH` (created if
    /// missing) or `postgres://…` (`postgresql://` too).
    ///
    /// # Errors
    /// [`SagaError::InvalidUrl`] for another scheme, or the backend's own error.
    pub async fn open(url: &str) -> Result<Self, SagaError> {
        Ok(match Scheme::of(url)? {
            Scheme::Memory => Self::Memory(InMemorySagaStore::new()),
            Scheme::Sqlite => Self::Sqlite(SqliteSagaStore::open(url).await?),
            Scheme::Postgres => Self::Postgres(PostgresSagaStore::connect(url).await?),
        })
    }
}

macro_rules! each {
    ($self:ident, $store:ident => $body:expr) => {
        match $self {
            AnySagaStore::Memory($store) => $body,
            AnySagaStore::Sqlite($store) => $body,
            AnySagaStore::Postgres($store) => $body,
        }
    };
}

impl SagaStore for AnySagaStore {
    async fn create(
        &self,
        id: SagaId,
        definition: &str,
        version: u32,
        first: &SagaRecord,
        lease: &Lease,
    ) -> Result<(), SagaError> {
        each!(self, store => store.create(id, definition, version, first, lease).await)
    }

    async fn append(
        &self,
        id: SagaId,
        record: &SagaRecord,
        lease: &Lease,
    ) -> Result<(), SagaError> {
        each!(self, store => store.append(id, record, lease).await)
    }

    async fn load(&self, id: SagaId) -> Result<Option<SagaInstance>, SagaError> {
        each!(self, store => store.load(id).await)
    }

    async fn list_active(&self, limit: usize) -> Result<Vec<SagaId>, SagaError> {
        each!(self, store => store.list_active(limit).await)
    }

    async fn claim_next(
        &self,
        lease: &Lease,
        after: Option<SagaId>,
    ) -> Result<Option<SagaId>, SagaError> {
        each!(self, store => store.claim_next(lease, after).await)
    }

    async fn claim(&self, id: SagaId, lease: &Lease) -> Result<(), SagaError> {
        each!(self, store => store.claim(id, lease).await)
    }

    async fn renew(&self, id: SagaId, lease: &Lease) -> Result<bool, SagaError> {
        each!(self, store => store.renew(id, lease).await)
    }

    async fn release(&self, id: SagaId, owner: &str) -> Result<(), SagaError> {
        each!(self, store => store.release(id, owner).await)
    }

    async fn list(&self, filter: &SagaFilter) -> Result<Vec<SagaSummary>, SagaError> {
        each!(self, store => store.list(filter).await)
    }

    async fn purge(&self, before: DateTime<Utc>) -> Result<u64, SagaError> {
        each!(self, store => store.purge(before).await)
    }
}

#[cfg(feature = "bus")]
pub use choreography::AnyChoreographyLog;

#[cfg(feature = "bus")]
mod choreography {
    use uuid::Uuid;

    use super::Scheme;
    use crate::choreography::{ChoreographyLog, ChoreographyLogEntry, Postgres, Sqlite};
    use crate::error::SagaError;
    use crate::inspector::SagaTimeline;

    /// A [`ChoreographyLog`] on the database a URL names: `sqlite://PATH` or `postgres://…`
    /// (the service's own database, where its bus inbox lives). There is no in-memory
    /// choreography log: the log is written in the inbox's transaction.
    #[derive(Debug)]
    #[non_exhaustive]
    pub enum AnyChoreographyLog {
        /// On SQLite.
        Sqlite(ChoreographyLog<Sqlite>),
        /// On PostgreSQL.
        Postgres(ChoreographyLog<Postgres>),
    }

    impl AnyChoreographyLog {
        /// Connects to `url` (`sqlite://PATH` or `postgres://…`) and creates the log's tables
        /// if missing.
        ///
        /// # Errors
        /// [`SagaError::InvalidUrl`] for another scheme (`memory://` included), or the
        /// database's error.
        pub async fn connect(url: &str) -> Result<Self, SagaError> {
            match Scheme::of(url)? {
                Scheme::Sqlite => Ok(Self::Sqlite(ChoreographyLog::connect(url).await?)),
                Scheme::Postgres => Ok(Self::Postgres(ChoreographyLog::connect(url).await?)),
                Scheme::Memory => Err(SagaError::InvalidUrl(format!(
                    "choreography log URL {url:?}: the log lives in the service's database, \
                     use sqlite://PATH or postgres://…"
                ))),
            }
        }

        /// [`ChoreographyLog::entries`].
        ///
        /// # Errors
        /// Database errors.
        pub async fn entries(
            &self,
            correlation_id: Uuid,
        ) -> Result<Vec<ChoreographyLogEntry>, SagaError> {
            match self {
                Self::Sqlite(log) => log.entries(correlation_id).await,
                Self::Postgres(log) => log.entries(correlation_id).await,
            }
        }

        /// [`ChoreographyLog::timeline`].
        ///
        /// # Errors
        /// [`SagaError::NotFound`] when nothing was recorded for `correlation_id`; database
        /// errors.
        pub async fn timeline(&self, correlation_id: Uuid) -> Result<SagaTimeline, SagaError> {
            match self {
                Self::Sqlite(log) => log.timeline(correlation_id).await,
                Self::Postgres(log) => log.timeline(correlation_id).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_urls_name_the_in_memory_store() {
        assert_eq!(Scheme::of("memory://").ok(), Some(Scheme::Memory));
        assert_eq!(Scheme::of("memory:").ok(), Some(Scheme::Memory));
    }

    #[test]
    fn sqlite_urls_name_the_sqlite_store() {
        assert_eq!(Scheme::of("sqlite://saga.db").ok(), Some(Scheme::Sqlite));
        assert_eq!(
            Scheme::of("sqlite:///tmp/saga.db?mode=rwc").ok(),
            Some(Scheme::Sqlite)
        );
    }

    #[test]
    fn both_postgres_spellings_name_the_postgres_store() {
        assert_eq!(
            Scheme::of("postgres://user@host/db").ok(),
            Some(Scheme::Postgres)
        );
        assert_eq!(
            Scheme::of("postgresql://user@host/db").ok(),
            Some(Scheme::Postgres)
        );
    }

    #[test]
    fn an_unknown_scheme_is_refused_naming_the_url_and_the_choices() {
        for url in [
            "mysql://host/db",
            "saga.db",
            "",
            "memory://x",
            "nats://localhost",
        ] {
            let error = Scheme::of(url).expect_err(url);
            assert!(matches!(error, SagaError::InvalidUrl(_)), "{url}: {error}");
            assert!(!error.is_retryable());
            let message = error.to_string();
            assert!(message.contains(&format!("{url:?}")), "{message}");
            assert!(message.contains("sqlite://PATH"), "{message}");
        }
    }

    #[tokio::test]
    async fn a_memory_url_opens_a_working_in_memory_store() {
        let store = AnySagaStore::open("memory://").await.expect("memory store");
        assert!(matches!(store, AnySagaStore::Memory(_)));
        assert!(store.list_active(10).await.expect("list").is_empty());
    }

    #[tokio::test]
    async fn a_sqlite_url_opens_the_sqlite_store() {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("saga.db").display());
        let store = AnySagaStore::open(&url).await.expect("sqlite store");
        assert!(matches!(store, AnySagaStore::Sqlite(_)));
        assert!(store.list_active(10).await.expect("list").is_empty());
    }

    #[cfg(feature = "bus")]
    #[tokio::test]
    async fn the_choreography_log_refuses_a_memory_url() {
        let error = AnyChoreographyLog::connect("memory://")
            .await
            .expect_err("no in-memory choreography log");
        assert!(matches!(error, SagaError::InvalidUrl(_)), "{error}");
    }
}
