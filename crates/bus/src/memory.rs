//! The in-memory backend: the whole contract, no durability, for tests and examples.
//!
//! Time (ack waits, retry delays) runs on tokio's clock, so tests can use paused time.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use tokio::sync::Notify;
use tokio::time::Instant;
use uuid::Uuid;

use crate::bus::{
    Bus, DeliveryKey, Message, RawDelivery, Settle, Settlement, Source, Subscription,
    count_published, fetch_until, prepare_publish, validate_subscription,
};
use crate::dlq::{
    ACTIONS_LIMIT_MAX, DeadLetter, DeadLetterFilter, DeadLetterPage, DeadLetterState, DeadLetters,
    DlqAction, DlqActionKind, id_cursor, log_action, not_found, page_of, redriven_envelope,
};
use crate::envelope::{Envelope, MESSAGE_BYTES_MAX_DEFAULT};
use crate::error::BusError;
use crate::policy::SubscribeOptions;
use crate::topic;

/// Most messages the in-memory log holds; publishing beyond is [`BusError::Full`].
pub const MEMORY_LOG_MESSAGES_MAX: usize = 1_000_000;
/// Most entries kept in the in-memory DLQ action log (oldest dropped first).
const ACTION_LOG_MAX: usize = 10_000;

/// An in-memory bus. Clones share the same log.
#[derive(Debug, Clone)]
pub struct InMemoryBus {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    changed: Notify,
    message_bytes_max: usize,
}

#[derive(Debug, Default)]
struct State {
    log: Vec<Logged>,
    groups: HashMap<String, Group>,
    dead: BTreeMap<Uuid, DeadLetter>,
    actions: VecDeque<DlqAction>,
    next_lease: u64,
}

#[derive(Debug)]
struct Logged {
    topic: String,
    only_group: Option<String>,
    envelope: Arc<Envelope>,
}

#[derive(Debug)]
struct Group {
    pattern: String,
    /// Index of the next log entry to admit.
    cursor: usize,
    pending: BTreeMap<u64, Pending>,
}

#[derive(Debug)]
struct Pending {
    subject: String,
    visible_at: Instant,
    lease: Option<u64>,
    attempts: u32,
    first_failure: Option<DateTime<Utc>>,
}

impl Default for InMemoryBus {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryBus {
    /// An empty bus with the default message size limit.
    #[must_use]
    pub fn new() -> Self {
        Self::with_message_bytes_max(MESSAGE_BYTES_MAX_DEFAULT)
    }

    /// An empty bus refusing messages over `message_bytes_max` serialized bytes.
    #[must_use]
    pub fn with_message_bytes_max(message_bytes_max: usize) -> Self {
        crate::gauges::describe();
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                changed: Notify::new(),
                message_bytes_max,
            }),
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every mutation is a single
        // step), so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Bus for InMemoryBus {
    async fn publish(&self, topic: &str, mut envelope: Envelope) -> Result<(), BusError> {
        prepare_publish(topic, &mut envelope, self.inner.message_bytes_max)?;
        {
            let mut state = self.inner.lock();
            if state.log.len() >= MEMORY_LOG_MESSAGES_MAX {
                return Err(BusError::Full {
                    what: "the in-memory log",
                    limit: MEMORY_LOG_MESSAGES_MAX,
                });
            }
            state.log.push(Logged {
                topic: topic.to_owned(),
                only_group: None,
                envelope: Arc::new(envelope),
            });
        }
        count_published(topic);
        self.inner.changed.notify_waiters();
        failpoint!(crate::failpoints::PUBLISH_AFTER_COMMIT, topic);
        Ok(())
    }

    async fn subscribe(
        &self,
        pattern: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, BusError> {
        validate_subscription(pattern, group)?;
        let pattern = crate::topic::canonical_pattern_list(pattern);
        {
            let mut state = self.inner.lock();
            let entry = state
                .groups
                .entry(group.to_owned())
                .or_insert_with(|| Group {
                    pattern: pattern.clone(),
                    cursor: 0,
                    pending: BTreeMap::new(),
                });
            if entry.pattern != pattern {
                if !options.replace_patterns {
                    return Err(BusError::GroupConflict {
                        group: group.to_owned(),
                        existing: entry.pattern.clone(),
                        requested: pattern,
                    });
                }
                entry.pattern = pattern;
            }
        }
        let source = MemorySource {
            inner: Arc::clone(&self.inner),
            group: group.to_owned(),
            ack_wait: options.ack_wait,
            ordered: options.per_subject_order,
        };
        let settler = MemorySettler {
            inner: Arc::clone(&self.inner),
        };
        Ok(Subscription::new(
            group,
            Box::new(source),
            Arc::new(settler),
            options,
        ))
    }
}

#[derive(Debug)]
struct MemorySource {
    inner: Arc<Inner>,
    group: String,
    ack_wait: Duration,
    ordered: bool,
}

impl MemorySource {
    /// Admits new log entries and leases up to `max` deliverable heads of their subjects.
    /// Returns the deliveries and, when none, the earliest time one may become deliverable.
    fn try_lease(&self, max: usize) -> (Vec<RawDelivery>, Option<Instant>) {
        let now = Instant::now();
        let mut guard = self.inner.lock();
        let state = &mut *guard;
        let lease = state.next_lease;
        state.next_lease += 1;
        let Some(group) = state.groups.get_mut(&self.group) else {
            return (Vec::new(), None);
        };
        while group.cursor < state.log.len() {
            let logged = &state.log[group.cursor];
            let sequence = group.cursor as u64 + 1;
            group.cursor += 1;
            let for_us = logged
                .only_group
                .as_ref()
                .is_none_or(|only| *only == self.group);
            if for_us && topic::matches(&group.pattern, &logged.topic) {
                group.pending.insert(
                    sequence,
                    Pending {
                        subject: logged.envelope.subject.clone(),
                        visible_at: now,
                        lease: None,
                        attempts: 0,
                        first_failure: None,
                    },
                );
            }
        }
        let mut seen_subjects: HashSet<&str> = HashSet::new();
        let mut chosen = Vec::new();
        let mut next_wake: Option<Instant> = None;
        for (sequence, pending) in &group.pending {
            if chosen.len() >= max {
                break;
            }
            if self.ordered && !seen_subjects.insert(pending.subject.as_str()) {
                continue;
            }
            if pending.visible_at <= now {
                chosen.push(*sequence);
            } else {
                next_wake =
                    Some(next_wake.map_or(pending.visible_at, |w| w.min(pending.visible_at)));
            }
        }
        let mut deliveries = Vec::with_capacity(chosen.len());
        for sequence in chosen {
            let Some(pending) = group.pending.get_mut(&sequence) else {
                continue;
            };
            pending.visible_at = now + self.ack_wait;
            pending.lease = Some(lease);
            pending.attempts += 1;
            let index = usize::try_from(sequence - 1).expect("log indexes fit in usize");
            let logged = &state.log[index];
            deliveries.push(RawDelivery {
                topic: logged.topic.clone(),
                envelope: Ok(Envelope::clone(&logged.envelope)),
                attempt: pending.attempts,
                key: DeliveryKey {
                    sequence,
                    lease,
                    reply: None,
                    parked: false,
                    first_failure: None,
                },
            });
        }
        (deliveries, next_wake)
    }
}

impl Source for MemorySource {
    fn fetch(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<RawDelivery>, BusError>> {
        let source = &*self;
        Box::pin(fetch_until(&source.inner.changed, wait, move || {
            std::future::ready(Ok(source.try_lease(max)))
        }))
    }
}

#[derive(Debug)]
struct MemorySettler {
    inner: Arc<Inner>,
}

impl Settle for MemorySettler {
    fn settle(
        &self,
        message: Arc<Message>,
        key: DeliveryKey,
        attempt: u32,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), BusError>> {
        let outcome = self.settle_now(&message, &key, attempt, settlement);
        self.inner.changed.notify_waiters();
        Box::pin(async move { outcome })
    }
}

impl MemorySettler {
    fn settle_now(
        &self,
        message: &Message,
        key: &DeliveryKey,
        attempt: u32,
        settlement: Settlement,
    ) -> Result<(), BusError> {
        let mut guard = self.inner.lock();
        let state = &mut *guard;
        let group = state
            .groups
            .get_mut(&message.group)
            .ok_or(BusError::LeaseLost)?;
        let Some(pending) = group.pending.get_mut(&key.sequence) else {
            return Err(BusError::LeaseLost);
        };
        if pending.lease != Some(key.lease) {
            return Err(BusError::LeaseLost);
        }
        match settlement {
            Settlement::Ack => {
                group.pending.remove(&key.sequence);
            }
            Settlement::Nack { delay, failed } => {
                pending.visible_at = Instant::now() + delay;
                pending.lease = None;
                if failed {
                    pending.first_failure.get_or_insert_with(Utc::now);
                }
            }
            Settlement::DeadLetter(failure) => {
                let first_failure = pending.first_failure;
                group.pending.remove(&key.sequence);
                let letter = DeadLetter::from_failure(message, attempt, &failure, first_failure);
                state.dead.insert(letter.id, letter);
            }
        }
        Ok(())
    }
}

impl InMemoryBus {
    fn act(&self, id: Uuid, actor: &str, action: DlqActionKind) -> Result<(), BusError> {
        let mut guard = self.inner.lock();
        let state = &mut *guard;
        let letter = state.dead.get(&id).cloned().ok_or_else(|| not_found(id))?;
        let entry = DlqAction::new(action, &letter, actor);
        match action {
            DlqActionKind::Redrive => {
                if state.log.len() >= MEMORY_LOG_MESSAGES_MAX {
                    return Err(BusError::Full {
                        what: "the in-memory log",
                        limit: MEMORY_LOG_MESSAGES_MAX,
                    });
                }
                state.dead.remove(&id);
                state.log.push(Logged {
                    topic: letter.topic.clone(),
                    only_group: Some(letter.group.clone()),
                    envelope: Arc::new(redriven_envelope(&letter)),
                });
            }
            DlqActionKind::Discard => {
                state.dead.remove(&id);
            }
            DlqActionKind::Archive => {
                if let Some(stored) = state.dead.get_mut(&id) {
                    stored.state = DeadLetterState::Archived;
                }
            }
        }
        if state.actions.len() >= ACTION_LOG_MAX {
            state.actions.pop_front();
        }
        state.actions.push_back(entry);
        drop(guard);
        // Traced and counted once done, as the other backends do (a refused redrive is not).
        log_action(action, &letter, actor);
        self.inner.changed.notify_waiters();
        Ok(())
    }
}

impl DeadLetters for InMemoryBus {
    async fn list_page(&self, filter: &DeadLetterFilter) -> Result<DeadLetterPage, BusError> {
        filter.validate()?;
        let after = id_cursor(filter)?;
        let now = Utc::now();
        let state = self.inner.lock();
        let start = after.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        let found = state
            .dead
            .range((start, std::ops::Bound::Unbounded))
            .map(|(_, letter)| letter)
            .filter(|letter| filter.accepts(letter, now))
            .take(filter.limit() + 1)
            .map(|letter| (letter.clone(), letter.id.to_string()))
            .collect();
        Ok(page_of(found, filter.limit(), None))
    }

    async fn get(&self, id: Uuid) -> Result<DeadLetter, BusError> {
        self.inner
            .lock()
            .dead
            .get(&id)
            .cloned()
            .ok_or_else(|| not_found(id))
    }

    async fn redrive(&self, id: Uuid, actor: &str) -> Result<(), BusError> {
        self.act(id, actor, DlqActionKind::Redrive)
    }

    async fn discard(&self, id: Uuid, actor: &str) -> Result<(), BusError> {
        self.act(id, actor, DlqActionKind::Discard)
    }

    async fn archive(&self, id: Uuid, actor: &str) -> Result<(), BusError> {
        self.act(id, actor, DlqActionKind::Archive)
    }

    async fn actions(&self, limit: usize) -> Result<Vec<DlqAction>, BusError> {
        let state = self.inner.lock();
        Ok(state
            .actions
            .iter()
            .rev()
            .take(limit.min(ACTIONS_LIMIT_MAX))
            .cloned()
            .collect())
    }
}
