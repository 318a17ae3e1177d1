//! [`AnyBus`]: the backend chosen by URL at run time (DESIGN.md: never by a recompile).

use uuid::Uuid;

use crate::bus::{Bus, Subscription};
use crate::dlq::{
    DeadLetter, DeadLetterFilter, DeadLetterPage, DeadLetterStats, DeadLetters, DlqAction,
};
use crate::envelope::Envelope;
use crate::error::BusError;
use crate::memory::InMemoryBus;
#[cfg(feature = "nats")]
use crate::nats::{NatsBus, NatsBusConfig};
use crate::policy::SubscribeOptions;
#[cfg(feature = "sqlite")]
use crate::sqlite::{SqliteBus, SqliteBusConfig};

/// One of the backends, picked by URL: `memory://`, `sqlite://path` or `nats://host:port`.
/// It implements [`Bus`] and [`DeadLetters`], so a binary (the `trellis dlq` CLI, a service)
/// needs no generic code.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum AnyBus {
    /// The in-memory backend.
    Memory(InMemoryBus),
    /// The SQLite log.
    #[cfg(feature = "sqlite")]
    Sqlite(SqliteBus),
    /// NATS JetStream.
    #[cfg(feature = "nats")]
    Nats(NatsBus),
}

impl AnyBus {
    /// Opens the backend `url` names. `nats_prefix` names the JetStream streams and subjects
    /// (`[a-z0-9_]`, e.g. `shop`); other backends ignore it.
    ///
    /// # Errors
    /// [`BusError::InvalidConfig`] for an unknown scheme; the backend's own errors.
    pub async fn connect(url: &str, nats_prefix: &str) -> Result<Self, BusError> {
        let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
        match scheme {
            "memory" => Ok(Self::Memory(InMemoryBus::new())),
            #[cfg(feature = "sqlite")]
            "sqlite" => Ok(Self::Sqlite(
                SqliteBus::open(SqliteBusConfig::from_url(url)?).await?,
            )),
            #[cfg(feature = "nats")]
            "nats" | "tls" => Ok(Self::Nats(
                NatsBus::connect(NatsBusConfig::new(url, nats_prefix)).await?,
            )),
            _ => {
                let _ = nats_prefix;
                Err(BusError::InvalidConfig(format!(
                    "bus url {url:?}: expected memory://, sqlite://path or nats://host:port"
                )))
            }
        }
    }
}

macro_rules! each {
    ($self:ident, $bus:ident => $body:expr) => {
        match $self {
            AnyBus::Memory($bus) => $body,
            #[cfg(feature = "sqlite")]
            AnyBus::Sqlite($bus) => $body,
            #[cfg(feature = "nats")]
            AnyBus::Nats($bus) => $body,
        }
    };
}

impl Bus for AnyBus {
    async fn publish(&self, topic: &str, envelope: Envelope) -> Result<(), BusError> {
        each!(self, bus => bus.publish(topic, envelope).await)
    }

    async fn subscribe(
        &self,
        pattern: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, BusError> {
        each!(self, bus => bus.subscribe(pattern, group, options).await)
    }
}

impl DeadLetters for AnyBus {
    async fn list_page(&self, filter: &DeadLetterFilter) -> Result<DeadLetterPage, BusError> {
        each!(self, bus => bus.list_page(filter).await)
    }

    async fn get(&self, id: Uuid) -> Result<DeadLetter, BusError> {
        each!(self, bus => bus.get(id).await)
    }

    async fn stats(&self) -> Result<Vec<DeadLetterStats>, BusError> {
        each!(self, bus => bus.stats().await)
    }

    async fn redrive(&self, id: Uuid, actor: &str) -> Result<(), BusError> {
        each!(self, bus => bus.redrive(id, actor).await)
    }

    async fn discard(&self, id: Uuid, actor: &str) -> Result<(), BusError> {
        each!(self, bus => bus.discard(id, actor).await)
    }

    async fn archive(&self, id: Uuid, actor: &str) -> Result<(), BusError> {
        each!(self, bus => bus.archive(id, actor).await)
    }

    async fn actions(&self, limit: usize) -> Result<Vec<DlqAction>, BusError> {
        each!(self, bus => bus.actions(limit).await)
    }
}
