//! One call at a time per order: within this process (a map of mutexes), and on
//! PostgreSQL across every process sharing the database (a lease row per order), so a
//! Refund on one replica waits for a Charge in flight on another.
//!
//! The lease is a row, not a session advisory lock: an advisory lock would hold a pooled
//! connection for the whole provider call (seconds), and a replica cut off by a network
//! partition would keep it until TCP gives up; a lease expires after [`CALL_LEASE_MIN`] or
//! twice the provider call's deadline, whichever is longer. SQLite is one process's
//! database by design (each process mode gives a service its own file), so there the
//! in-process lock is the whole story and no lease row is written.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;
use trellis_service::Db;

use crate::store;

/// Most orders with a call in progress at once; more are refused.
pub(crate) const ORDERS_IN_FLIGHT_MAX: usize = 100_000;
/// Shortest lease a call takes on its order across processes.
pub(crate) const CALL_LEASE_MIN: Duration = Duration::from_secs(15);
/// Pause between two tries for a lease another process holds.
const LEASE_POLL: Duration = Duration::from_millis(20);

type Slot = Arc<tokio::sync::Mutex<()>>;

/// A lock per order id; an entry lives only while someone holds or waits for it.
#[derive(Debug, Clone, Default)]
pub(crate) struct OrderLocks {
    slots: Arc<Mutex<HashMap<String, Slot>>>,
    /// The lease shared with other processes, on PostgreSQL.
    shared: Option<SharedLease>,
}

/// What the cross-process lease needs.
#[derive(Debug, Clone)]
struct SharedLease {
    db: Db,
    /// This process, the first half of each lease's owner (the second is per call).
    process: Arc<str>,
    lease: Duration,
}

/// A held cross-process lease; given back on drop.
#[derive(Debug)]
struct HeldLease {
    shared: SharedLease,
    order_id: String,
    /// Unique per call, so a late give-back never deletes the next call's lease.
    owner: String,
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        let shared = self.shared.clone();
        let order_id = std::mem::take(&mut self.order_id);
        let owner = std::mem::take(&mut self.owner);
        // Given back in the background; if that fails the lease expires by itself.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = store::release_call_lease(&shared.db, &order_id, &owner).await {
                    tracing::warn!(%order_id, %error, "could not give an order's call lease back");
                }
            });
        }
    }
}

/// Holds an order's lock; released on drop.
#[derive(Debug)]
pub(crate) struct OrderGuard {
    slots: Arc<Mutex<HashMap<String, Slot>>>,
    order_id: String,
    guard: Option<OwnedMutexGuard<()>>,
    /// Dropped before the in-process guard (fields drop in order after `Drop::drop`).
    lease: Option<HeldLease>,
}

/// Why the lock was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockError {
    /// Another call for the order held it past the wait limit.
    Busy,
    /// Too many orders in flight.
    Full,
    /// The database did not answer for the shared lease.
    Database,
}

impl OrderLocks {
    /// Locks that also take a lease per order in `db` when it is PostgreSQL, held at most
    /// `lease` (longer than any call, so it expires only when its process died).
    pub(crate) fn for_database(db: &Db, lease: Duration) -> Self {
        let shared = db.is_postgres().then(|| SharedLease {
            db: db.clone(),
            process: uuid::Uuid::now_v7().to_string().into(),
            lease: lease.max(CALL_LEASE_MIN),
        });
        Self {
            slots: Arc::default(),
            shared,
        }
    }

    /// Waits at most `wait` for the order's lock (and, on PostgreSQL, its lease).
    pub(crate) async fn lock(
        &self,
        order_id: &str,
        wait: Duration,
    ) -> Result<OrderGuard, LockError> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(slot) = slots.get(order_id) {
                slot.clone()
            } else {
                if slots.len() >= ORDERS_IN_FLIGHT_MAX {
                    return Err(LockError::Full);
                }
                let slot = Slot::default();
                slots.insert(order_id.to_owned(), slot.clone());
                slot
            }
        };
        // Built before waiting, so a cancelled or timed-out wait still cleans the entry up.
        let mut guard = OrderGuard {
            slots: self.slots.clone(),
            order_id: order_id.to_owned(),
            guard: None,
            lease: None,
        };
        let deadline = tokio::time::Instant::now() + wait;
        let locked = tokio::time::timeout_at(deadline, slot.lock_owned()).await;
        match locked {
            Ok(held) => guard.guard = Some(held),
            Err(_) => return Err(LockError::Busy),
        }
        if let Some(shared) = &self.shared {
            guard.lease = Some(shared.take(order_id, deadline).await?);
        }
        Ok(guard)
    }
}

impl SharedLease {
    /// Takes the order's lease, trying again until `deadline` while another process holds it.
    async fn take(
        &self,
        order_id: &str,
        deadline: tokio::time::Instant,
    ) -> Result<HeldLease, LockError> {
        let lease_ms = i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX);
        let owner = format!("{}:{}", self.process, uuid::Uuid::now_v7());
        loop {
            let now_ms = store::now_ms();
            let taken = store::take_call_lease(
                &self.db,
                order_id,
                &owner,
                now_ms,
                now_ms.saturating_add(lease_ms),
            )
            .await
            .map_err(|error| {
                tracing::warn!(order_id, %error, "could not take an order's call lease");
                LockError::Database
            })?;
            if taken {
                return Ok(HeldLease {
                    shared: self.clone(),
                    order_id: order_id.to_owned(),
                    owner,
                });
            }
            if tokio::time::Instant::now() + LEASE_POLL > deadline {
                return Err(LockError::Busy);
            }
            tokio::time::sleep(LEASE_POLL).await;
        }
    }
}

impl Drop for OrderGuard {
    fn drop(&mut self) {
        // The lease first: a waiter in this process that takes the in-process lock next
        // then finds the lease given back (or being given back) rather than its own.
        drop(self.lease.take());
        drop(self.guard.take());
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map holds the slot now (waiters and holders hold clones): nobody needs it.
        if slots
            .get(&self.order_id)
            .is_some_and(|slot| Arc::strong_count(slot) == 1)
        {
            slots.remove(&self.order_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_second_caller_waits_and_entries_are_removed_after_use() {
        let locks = OrderLocks::default();
        let first = locks
            .lock("o1", Duration::from_secs(1))
            .await
            .expect("free");
        assert_eq!(
            locks.lock("o1", Duration::from_millis(10)).await.err(),
            Some(LockError::Busy)
        );
        let other = locks
            .lock("o2", Duration::from_secs(1))
            .await
            .expect("other order");
        drop(other);
        drop(first);
        let again = locks
            .lock("o1", Duration::from_secs(1))
            .await
            .expect("released");
        drop(again);
        assert!(locks.slots.lock().expect("lock").is_empty());
    }
}
