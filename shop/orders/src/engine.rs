//! The saga engine on whichever saga log the URL names.

use std::sync::Arc;
use std::time::Duration;

use trellis_saga::{
    PostgresSagaStore, SagaDefinition, SagaEngine, SagaError, SagaId, SqliteSagaStore,
};

use crate::saga::{OrderSagaContext, SAGA_NAME};

/// A saga engine on SQLite or PostgreSQL.
#[derive(Debug, Clone)]
pub(crate) enum Engine {
    Sqlite(Arc<SagaEngine<SqliteSagaStore>>),
    Postgres(Arc<SagaEngine<PostgresSagaStore>>),
}

impl Engine {
    pub(crate) async fn open(
        url: &str,
        definition: SagaDefinition<OrderSagaContext>,
    ) -> Result<Self, SagaError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let store = PostgresSagaStore::connect(url).await?;
            Ok(Self::Postgres(Arc::new(
                SagaEngine::new(store).register(definition),
            )))
        } else {
            let store = SqliteSagaStore::open(url).await?;
            Ok(Self::Sqlite(Arc::new(
                SagaEngine::new(store).register(definition),
            )))
        }
    }

    /// Starts the order saga and runs it to its end.
    pub(crate) async fn run(&self, context: &OrderSagaContext) -> Result<SagaId, SagaError> {
        match self {
            Self::Sqlite(engine) => engine.start(SAGA_NAME, context).await,
            Self::Postgres(engine) => engine.start(SAGA_NAME, context).await,
        }
    }

    /// Recovers at once, then every `interval`.
    pub(crate) async fn run_recovery(&self, interval: Duration) {
        match self {
            Self::Sqlite(engine) => engine.run_recovery(interval).await,
            Self::Postgres(engine) => engine.run_recovery(interval).await,
        }
    }
}
