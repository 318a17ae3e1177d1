//! The in-memory saga log, for tests and examples.
//!
//! Lease expiry uses `tokio::time::Instant`, so tests under paused time control it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use super::{
    LIST_ACTIVE_MAX, Lease, PURGE_BATCH_MAX, SagaFilter, SagaId, SagaInstance, SagaRecord,
    SagaStore, SagaSummary,
};
use crate::error::SagaError;

#[derive(Debug, Clone)]
struct Entry {
    instance: SagaInstance,
    lease_owner: Option<String>,
    lease_expires: Option<Instant>,
}

impl Entry {
    /// Whether `owner` may take the lease now.
    fn claimable_by(&self, owner: &str, now: Instant) -> bool {
        match (&self.lease_owner, self.lease_expires) {
            (None, _) => true,
            (Some(current), _) if current == owner => true,
            (Some(_), Some(expires)) => expires <= now,
            (Some(_), None) => true,
        }
    }

    fn take(&mut self, lease: &Lease, now: Instant) {
        self.lease_owner = Some(lease.owner().to_owned());
        self.lease_expires = Some(now + lease.duration());
    }

    fn summary(&self) -> SagaSummary {
        let instance = &self.instance;
        SagaSummary {
            id: instance.id,
            definition: instance.definition.clone(),
            version: instance.version,
            status: instance.status,
            transitions: instance.records.len() as u64,
            created_at: instance.records[0].at,
            updated_at: instance.last().at,
            lease_owner: self.lease_owner.clone(),
        }
    }
}

/// A saga log in memory. Cheap to clone; clones share the same log. Not durable.
#[derive(Debug, Clone, Default)]
pub struct InMemorySagaStore {
    sagas: Arc<Mutex<HashMap<SagaId, Entry>>>,
}

impl InMemorySagaStore {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SagaId, Entry>> {
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
        lease: &Lease,
    ) -> Result<(), SagaError> {
        let mut sagas = self.lock();
        if sagas.contains_key(&id) || first.seq != 1 {
            return Err(SagaError::Conflict { id, seq: first.seq });
        }
        let mut entry = Entry {
            instance: SagaInstance {
                id,
                definition: definition.to_owned(),
                version,
                status: first.transition.status_after(),
                records: vec![first.clone()],
            },
            lease_owner: None,
            lease_expires: None,
        };
        entry.take(lease, Instant::now());
        sagas.insert(id, entry);
        Ok(())
    }

    async fn append(
        &self,
        id: SagaId,
        record: &SagaRecord,
        lease: &Lease,
    ) -> Result<(), SagaError> {
        let mut sagas = self.lock();
        let entry = sagas.get_mut(&id).ok_or(SagaError::NotFound(id))?;
        if entry.instance.last().seq + 1 != record.seq {
            return Err(SagaError::Conflict {
                id,
                seq: record.seq,
            });
        }
        match &entry.lease_owner {
            Some(owner) if owner == lease.owner() => {}
            other => {
                return Err(SagaError::Leased {
                    id,
                    owner: other.clone().unwrap_or_else(|| "nobody".to_owned()),
                });
            }
        }
        let status = record.transition.status_after();
        entry.instance.status = status;
        entry.instance.records.push(record.clone());
        if status.is_terminal() {
            entry.lease_owner = None;
            entry.lease_expires = None;
        } else {
            entry.take(lease, Instant::now());
        }
        Ok(())
    }

    async fn load(&self, id: SagaId) -> Result<Option<SagaInstance>, SagaError> {
        Ok(self.lock().get(&id).map(|entry| entry.instance.clone()))
    }

    async fn list_active(&self, limit: usize) -> Result<Vec<SagaId>, SagaError> {
        let mut ids: Vec<SagaId> = self
            .lock()
            .values()
            .filter(|entry| entry.instance.status.is_active())
            .map(|entry| entry.instance.id)
            .collect();
        ids.sort();
        ids.truncate(limit.min(LIST_ACTIVE_MAX));
        Ok(ids)
    }

    async fn claim_next(
        &self,
        lease: &Lease,
        after: Option<SagaId>,
    ) -> Result<Option<SagaId>, SagaError> {
        let now = Instant::now();
        let mut sagas = self.lock();
        let next = sagas
            .values()
            .filter(|entry| {
                entry.instance.status.is_active()
                    && after.is_none_or(|after| entry.instance.id > after)
                    && entry.claimable_by(lease.owner(), now)
            })
            .map(|entry| entry.instance.id)
            .min();
        if let Some(id) = next {
            sagas
                .get_mut(&id)
                .expect("the id was just found under the same lock")
                .take(lease, now);
        }
        Ok(next)
    }

    async fn claim(&self, id: SagaId, lease: &Lease) -> Result<(), SagaError> {
        let now = Instant::now();
        let mut sagas = self.lock();
        let entry = sagas.get_mut(&id).ok_or(SagaError::NotFound(id))?;
        if !entry.claimable_by(lease.owner(), now) {
            return Err(SagaError::Leased {
                id,
                owner: entry.lease_owner.clone().unwrap_or_default(),
            });
        }
        entry.take(lease, now);
        Ok(())
    }

    async fn renew(&self, id: SagaId, lease: &Lease) -> Result<bool, SagaError> {
        let mut sagas = self.lock();
        match sagas.get_mut(&id) {
            Some(entry) if entry.lease_owner.as_deref() == Some(lease.owner()) => {
                entry.take(lease, Instant::now());
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release(&self, id: SagaId, owner: &str) -> Result<(), SagaError> {
        let mut sagas = self.lock();
        if let Some(entry) = sagas.get_mut(&id)
            && entry.lease_owner.as_deref() == Some(owner)
        {
            entry.lease_owner = None;
            entry.lease_expires = None;
        }
        Ok(())
    }

    async fn list(&self, filter: &SagaFilter) -> Result<Vec<SagaSummary>, SagaError> {
        let mut summaries: Vec<SagaSummary> = self
            .lock()
            .values()
            .map(Entry::summary)
            .filter(|summary| filter.keeps(summary))
            .collect();
        summaries.sort_by_key(|summary| summary.id);
        summaries.truncate(filter.limit_or_max());
        Ok(summaries)
    }

    async fn purge(&self, before: DateTime<Utc>) -> Result<u64, SagaError> {
        let mut sagas = self.lock();
        let mut doomed: Vec<SagaId> = sagas
            .values()
            .filter(|entry| {
                matches!(
                    entry.instance.status,
                    super::SagaStatus::Completed | super::SagaStatus::Failed
                ) && entry.instance.last().at < before
            })
            .map(|entry| entry.instance.id)
            .collect();
        doomed.sort();
        doomed.truncate(PURGE_BATCH_MAX);
        for id in &doomed {
            sagas.remove(id);
        }
        Ok(doomed.len() as u64)
    }
}
