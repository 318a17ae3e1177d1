//! The choreography log: one entry per handler run, written with the inbox record, and
//! [`ChoreographyLog`], which rebuilds a flow's timeline from it.

use std::marker::PhantomData;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::timeline::{Fact, build_timeline};
use super::{ChoreographyDb, Sqlite};
use crate::error::SagaError;
use crate::inspector::SagaTimeline;
use crate::store::SagaId;

/// One handler run, as recorded in `saga_choreography_log` with the inbox entry.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChoreographyLogEntry {
    /// The choreography's name.
    pub choreography: String,
    /// The flow: the trigger's correlation id (its own id when it had none).
    pub correlation_id: Uuid,
    /// The triggering event's id.
    pub event_id: Uuid,
    /// The triggering event's type.
    pub event_type: String,
    /// The handler's step.
    pub step: String,
    /// Whether the handler was a compensation.
    pub compensating: bool,
    /// The type of the event the handler emitted (`None`: it emitted none).
    pub outcome: Option<String>,
    /// The emitted failure's `error` field, for a `*.failed` outcome.
    pub error: Option<String>,
    /// When the handler ran.
    pub at: DateTime<Utc>,
}

/// A choreography log on database `D`: rebuilds a flow's timeline from the entries
/// [`Choreography::handle`](super::Choreography::handle) recorded, without the
/// choreography's code (what the inspector's endpoint and CLI use).
#[derive(Debug, Clone)]
pub struct ChoreographyLog<D: ChoreographyDb = Sqlite> {
    pool: sqlx::Pool<D>,
    marker: PhantomData<fn() -> D>,
}

impl<D: ChoreographyDb> ChoreographyLog<D> {
    /// Uses `pool` (the database the choreography's inbox is in) and creates the log's tables
    /// if missing.
    ///
    /// # Errors
    /// The tables cannot be created.
    pub async fn new(pool: sqlx::Pool<D>) -> Result<Self, SagaError> {
        let mut connection = pool.acquire().await?;
        D::install(&mut connection, None).await?;
        drop(connection);
        Ok(Self {
            pool,
            marker: PhantomData,
        })
    }

    /// Connects to `url` (`sqlite://PATH` or `postgres://...`) and creates the log's tables if
    /// missing.
    ///
    /// # Errors
    /// The database is unreachable or the tables cannot be created.
    pub async fn connect(url: &str) -> Result<Self, SagaError> {
        Self::new(sqlx::Pool::<D>::connect(url).await?).await
    }

    /// The pool (the service's database, where its inbox and outbox also live).
    pub fn pool(&self) -> &sqlx::Pool<D> {
        &self.pool
    }

    /// Every handler run recorded for flow `correlation_id`, in order.
    ///
    /// # Errors
    /// Database errors.
    pub async fn entries(
        &self,
        correlation_id: Uuid,
    ) -> Result<Vec<ChoreographyLogEntry>, SagaError> {
        Ok(D::load(&self.pool, correlation_id).await?.0)
    }

    /// The timeline of flow `correlation_id`: each declared step (as of the choreography's
    /// last run) with when it ran, succeeded, failed or was compensated, and the flow's status
    /// (`Completed` once the last step succeeded; `Failed` once every started compensation
    /// finished after a failure). Its id is the correlation id.
    ///
    /// # Errors
    /// [`SagaError::NotFound`] when nothing was recorded for `correlation_id`; database errors.
    pub async fn timeline(&self, correlation_id: Uuid) -> Result<SagaTimeline, SagaError> {
        let (entries, steps) = D::load(&self.pool, correlation_id).await?;
        let Some(first) = entries.first() else {
            return Err(SagaError::NotFound(SagaId::from_uuid(correlation_id)));
        };
        let name = first.choreography.clone();
        let mut steps: Vec<String> = match steps {
            Some(text) => serde_json::from_str(&text)?,
            None => Vec::new(),
        };
        let mut facts = Vec::with_capacity(entries.len() * 2);
        for entry in entries {
            if !entry.compensating && !steps.contains(&entry.step) {
                steps.push(entry.step.clone());
            }
            facts.push((
                entry.at,
                Fact::Ran {
                    step: entry.step.clone(),
                    compensating: entry.compensating,
                },
            ));
            facts.push((
                entry.at,
                Fact::Done {
                    step: entry.step,
                    compensating: entry.compensating,
                    error: entry.error,
                },
            ));
        }
        Ok(build_timeline(&name, correlation_id, &steps, facts))
    }
}
