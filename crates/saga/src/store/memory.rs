//! The in-memory saga log, for tests and examples.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{LIST_ACTIVE_MAX, SagaId, SagaInstance, SagaRecord, SagaStore};
use crate::error::SagaError;

/// A saga log in memory. Cheap to clone; clones share the same log. Not durable.
#[derive(Debug, Clone, Default)]
pub struct InMemorySagaStore {
    sagas: Arc<Mutex<HashMap<SagaId, SagaInstance>>>,
}

impl InMemorySagaStore {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SagaId, SagaInstance>> {
        // A panic while holding the lock cannot leave an instance half-written: every change
        // below is a single push or insert.
        self.sagas
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl SagaStore for InMemorySagaStore {
    async fn create(
        &self,
        id: SagaId,
        definition: &str,
        version: u32,
        first: &SagaRecord,
    ) -> Result<(), SagaError> {
        let mut sagas = self.lock();
        if sagas.contains_key(&id) || first.seq != 1 {
            return Err(SagaError::Conflict { id, seq: first.seq });
        }
        sagas.insert(
            id,
            SagaInstance {
                id,
                definition: definition.to_owned(),
                version,
                status: first.transition.status_after(),
                records: vec![first.clone()],
            },
        );
        Ok(())
    }

    async fn append(&self, id: SagaId, record: &SagaRecord) -> Result<(), SagaError> {
        let mut sagas = self.lock();
        let instance = sagas.get_mut(&id).ok_or(SagaError::NotFound(id))?;
        if instance.last().seq + 1 != record.seq {
            return Err(SagaError::Conflict {
                id,
                seq: record.seq,
            });
        }
        instance.status = record.transition.status_after();
        instance.records.push(record.clone());
        Ok(())
    }

    async fn load(&self, id: SagaId) -> Result<Option<SagaInstance>, SagaError> {
        Ok(self.lock().get(&id).cloned())
    }

    async fn list_active(&self, limit: usize) -> Result<Vec<SagaId>, SagaError> {
        let mut ids: Vec<SagaId> = self
            .lock()
            .values()
            .filter(|instance| instance.status.is_active())
            .map(|instance| instance.id)
            .collect();
        ids.sort();
        ids.truncate(limit.min(LIST_ACTIVE_MAX));
        Ok(ids)
    }
}
