//! One call at a time per order, within this process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;

/// Most orders with a call in progress at once; more are refused.
pub(crate) const ORDERS_IN_FLIGHT_MAX: usize = 100_000;

type Slot = Arc<tokio::sync::Mutex<()>>;

/// A lock per order id; an entry lives only while someone holds or waits for it.
#[derive(Debug, Clone, Default)]
pub(crate) struct OrderLocks {
    slots: Arc<Mutex<HashMap<String, Slot>>>,
}

/// Holds an order's lock; released on drop.
#[derive(Debug)]
pub(crate) struct OrderGuard {
    slots: Arc<Mutex<HashMap<String, Slot>>>,
    order_id: String,
    guard: Option<OwnedMutexGuard<()>>,
}

/// Why the lock was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockError {
    /// Another call for the order held it past the wait limit.
    Busy,
    /// Too many orders in flight.
    Full,
}

impl OrderLocks {
    /// Waits at most `wait` for the order's lock.
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
        };
        let locked = tokio::time::timeout(wait, slot.lock_owned()).await;
        match locked {
            Ok(held) => {
                guard.guard = Some(held);
                Ok(guard)
            }
            Err(_) => Err(LockError::Busy),
        }
    }
}

impl Drop for OrderGuard {
    fn drop(&mut self) {
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
