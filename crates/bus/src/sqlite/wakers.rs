//! Whom a commit wakes: each group's consumers in this process, by the group's pattern list.
//!
//! Waking every consumer after every publish made each group fetch (three statements in the
//! writer's transaction) for every message of every topic, its own or not: with four
//! choreography participants on narrow lists, most fetches found nothing. A group is woken
//! when a committed publish's topic matches its list, or one of its own messages was settled
//! (the next message of that subject may be deliverable). Other processes' writes are found
//! by polling, as before.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::topic;

/// The consumer groups of this process, each with its pattern list and one notifier its
/// subscriptions wait on.
#[derive(Debug, Default)]
pub(super) struct Wakers {
    groups: Mutex<HashMap<String, (String, Arc<Notify>)>>,
}

impl Wakers {
    /// The notifier of `group`, whose list is now `pattern` (a replaced list replaces it).
    pub(super) fn register(&self, group: &str, pattern: &str) -> Arc<Notify> {
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        let entry = groups
            .entry(group.to_owned())
            .or_insert_with(|| (pattern.to_owned(), Arc::new(Notify::new())));
        pattern.clone_into(&mut entry.0);
        Arc::clone(&entry.1)
    }

    /// Wakes the groups whose list matches one of `topics`, and the `groups` named.
    pub(super) fn wake(&self, topics: &HashSet<String>, groups: &HashSet<String>) {
        if topics.is_empty() && groups.is_empty() {
            return;
        }
        let registered = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        for (group, (pattern, notify)) in registered.iter() {
            if groups.contains(group) || topics.iter().any(|t| topic::matches(pattern, t)) {
                notify.notify_waiters();
            }
        }
    }

    /// Wakes every group (a dead letter sent back, whose group the caller did not say).
    pub(super) fn wake_all(&self) {
        let registered = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        for (_, notify) in registered.values() {
            notify.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::Wakers;

    #[test]
    fn a_commit_wakes_only_the_groups_it_concerns() {
        // Goal: a publish wakes the groups whose list matches its topic, a settlement its own
        // group, and nobody else.
        let wakers = Wakers::default();
        let inventory = wakers.register("inventory", "order.created,payment.failed");
        let shipping = wakers.register("shipping", "order.shipping_started");
        let woken =
            |notify: &std::sync::Arc<tokio::sync::Notify>, topics: &[&str], groups: &[&str]| {
                let notified = notify.notified();
                let topics: HashSet<String> = topics.iter().map(|t| (*t).to_owned()).collect();
                let groups: HashSet<String> = groups.iter().map(|g| (*g).to_owned()).collect();
                wakers.wake(&topics, &groups);
                futures_util::FutureExt::now_or_never(notified).is_some()
            };
        assert!(woken(&inventory, &["payment.failed"], &[]));
        assert!(!woken(&shipping, &["payment.failed"], &[]));
        assert!(woken(&shipping, &[], &["shipping"]));
        assert!(!woken(&inventory, &[], &["shipping"]));
    }
}
