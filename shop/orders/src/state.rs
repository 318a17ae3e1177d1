//! What the REST handlers share: the order repository, the read-model database, the saga
//! queue, the clients of the users and products services, and the memory of confirmed
//! accounts.
//!
//! The account memory exists because every placement would otherwise ask the users service
//! whether the caller's account exists: accounts are never deleted and the gateway already
//! verified the caller's token, so a recent "yes" is trusted for [`KNOWN_USER_TTL`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shop_contracts::proto::products_client::ProductsClient;
use shop_contracts::proto::users_client::UsersClient;
use trellis_eventstore::{AnyStore, Repository};
use trellis_service::{Db, GrpcChannel};

use crate::aggregate::{Order, SharedClock};
use crate::saga_runner::SagaQueue;

/// How long a confirmed account is trusted without asking the users service again.
const KNOWN_USER_TTL: Duration = Duration::from_secs(60);
/// Most accounts remembered; the memory is cleared when it is full.
const KNOWN_USERS_MAX: usize = 100_000;

/// Shared by the handlers.
#[derive(Clone)]
pub(crate) struct State {
    inner: Arc<Inner>,
}

struct Inner {
    orders: Arc<Repository<Order, AnyStore>>,
    db: Db,
    /// The time the order's events (and the idempotency rows) record.
    clock: SharedClock,
    /// Orders waiting for a saga slot; `None` when the saga is choreographed (the
    /// participants react to `order.created`).
    sagas: Option<SagaQueue>,
    users: UsersClient<GrpcChannel>,
    /// Callers whose account the users service confirmed, and when.
    known_users: Mutex<HashMap<String, Instant>>,
    products: ProductsClient<GrpcChannel>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").finish_non_exhaustive()
    }
}

impl State {
    pub(crate) fn new(
        orders: Arc<Repository<Order, AnyStore>>,
        db: Db,
        clock: SharedClock,
        sagas: Option<SagaQueue>,
        users: UsersClient<GrpcChannel>,
        products: ProductsClient<GrpcChannel>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                orders,
                db,
                clock,
                sagas,
                users,
                known_users: Mutex::new(HashMap::new()),
                products,
            }),
        }
    }

    /// The order repository.
    pub(crate) fn orders(&self) -> &Repository<Order, AnyStore> {
        &self.inner.orders
    }

    /// The read-model database (also holding the idempotency table).
    pub(crate) fn db(&self) -> &Db {
        &self.inner.db
    }

    /// The time now, by the service's clock.
    pub(crate) fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.inner.clock.now()
    }

    /// The saga queue; `None` when the saga is choreographed.
    pub(crate) fn sagas(&self) -> Option<&SagaQueue> {
        self.inner.sagas.as_ref()
    }

    /// A client of the users service.
    pub(crate) fn users(&self) -> UsersClient<GrpcChannel> {
        self.inner.users.clone()
    }

    /// A client of the products service.
    pub(crate) fn products(&self) -> ProductsClient<GrpcChannel> {
        self.inner.products.clone()
    }

    /// Whether the users service confirmed `user_id`'s account within [`KNOWN_USER_TTL`].
    pub(crate) fn known_user(&self, user_id: &str) -> bool {
        let known = self
            .inner
            .known_users
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        known
            .get(user_id)
            .is_some_and(|at| at.elapsed() < KNOWN_USER_TTL)
    }

    /// Remembers that the users service confirmed `user_id`'s account just now.
    pub(crate) fn remember_user(&self, user_id: &str) {
        let mut known = self
            .inner
            .known_users
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if known.len() >= KNOWN_USERS_MAX {
            known.clear();
        }
        known.insert(user_id.to_owned(), Instant::now());
    }
}
