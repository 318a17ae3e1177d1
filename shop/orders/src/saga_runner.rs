//! The saga engine on whichever saga log the URL names.
//!
//! # Lease owner
//! Each saga is leased to the engine running it (trellis-saga's `Lease`, 30 s). An engine
//! with a fresh owner id after a restart would find its own sagas leased to its previous
//! incarnation and wait out the lease before recovering them. On SQLite the saga log is a
//! file of this process's data directory, and no two live processes use one data directory,
//! so the owner is derived from the file's canonical path (`orders@/…/orders-saga.db`): the
//! same after every restart, and the restarted engine takes its sagas back on its first
//! recovery pass. On PostgreSQL several orders processes share one log, and a derived id could
//! name two live engines at once (which the engine forbids), so each engine keeps a fresh
//! owner there and a dead process's sagas are taken over when their leases expire.

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

/// The stable lease owner of the engine on the SQLite saga log `url` (opened, so the file
/// exists): derived from the file's canonical path. `None` for an in-memory log.
fn sqlite_owner(url: &str) -> Option<String> {
    let path = url.strip_prefix("sqlite://")?;
    let path = path.split_once('?').map_or(path, |(path, _)| path);
    let path = std::fs::canonicalize(path).ok()?;
    Some(format!("orders@{}", path.display()))
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
            let mut engine = SagaEngine::new(store);
            if let Some(owner) = sqlite_owner(url) {
                engine = engine.with_owner(owner);
            }
            Ok(Self::Sqlite(Arc::new(engine.register(definition))))
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

#[cfg(test)]
mod tests {
    use tokio::sync::{Notify, mpsc};
    use trellis_saga::{SagaDefinition, SagaStatus, Step, StepContext};

    use super::Engine;
    use crate::saga::{OrderSagaContext, SAGA_NAME, SAGA_VERSION};

    /// The order saga's name and version with one step that announces each run on `runs`
    /// and then, when `hang`, never finishes (the process dies during it).
    fn definition(runs: mpsc::UnboundedSender<()>, hang: bool) -> SagaDefinition<OrderSagaContext> {
        let step = Step::new(
            "only",
            move |_ctx: &mut OrderSagaContext, _step: StepContext| {
                let runs = runs.clone();
                Box::pin(async move {
                    let _ = runs.send(());
                    if hang {
                        Notify::new().notified().await;
                    }
                    Ok(())
                })
            },
        );
        SagaDefinition::builder(SAGA_NAME, SAGA_VERSION)
            .step(step)
            .build()
            .expect("a valid definition")
    }

    #[tokio::test]
    async fn a_restarted_engine_resumes_its_sagas_on_the_first_recovery_pass() {
        // Engine 1 starts a saga and "crashes" in its step; engine 2, opened on the same saga
        // log as a restarted process would, must take the saga back on its first recovery
        // pass instead of waiting out engine 1's lease.
        let dir = std::env::temp_dir().join(format!("orders-engine-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let url = format!("sqlite://{}", dir.join("orders-saga.db").display());
        let context = OrderSagaContext {
            order_id: uuid::Uuid::now_v7().to_string(),
            user_id: "user-1".to_owned(),
            lines: Vec::new(),
            total_cents: 0,
            traceparent: None,
        };

        let (runs, mut ran) = mpsc::unbounded_channel();
        let first = Engine::open(&url, definition(runs, true))
            .await
            .expect("engine 1");
        let running = {
            let first = first.clone();
            let context = context.clone();
            tokio::spawn(async move { first.run(&context).await })
        };
        ran.recv().await.expect("the step started");
        running.abort();
        let _ = running.await;
        drop(first);

        let (runs, mut ran) = mpsc::unbounded_channel();
        let second = Engine::open(&url, definition(runs, false))
            .await
            .expect("engine 2");
        let Engine::Sqlite(engine) = &second else {
            panic!("a sqlite:// URL opens the SQLite log");
        };
        let report = engine.recover().await.expect("recovery pass");
        assert!(report.refused.is_empty(), "{:?}", report.refused);
        assert_eq!(
            report
                .resumed
                .iter()
                .map(|(_, status)| *status)
                .collect::<Vec<_>>(),
            [SagaStatus::Completed],
            "the saga is taken back at once"
        );
        assert!(ran.try_recv().is_ok(), "the step ran again in engine 2");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
