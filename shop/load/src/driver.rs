//! The run: setup, the open-model ticker, the settle wait, the invariant checks.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shop_contracts::api::{OrderAccepted, OrderItem, OrderStatus, PlaceOrder, ProductPage};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::client::{Api, Failure, segment};
use crate::config::{Op, due_offset};
use crate::report::{Invariants, OrderOutcomes, Report};
use crate::setup::{self, User, World};
use crate::stats::Stats;
use crate::{LoadConfig, LoadError, invariants};

/// Most orders remembered for checks, the settle wait and the invariant checks; orders accepted
/// beyond it are counted as `untracked`.
pub(crate) const ORDERS_TRACKED_MAX: usize = 1_000_000;
/// An order younger than this is not checked yet: `GET /api/orders/{id}` reads an eventually
/// consistent read model, and a 404 a moment after the 202 is not an error of the shop.
const CHECK_AGE_MIN: Duration = Duration::from_millis(250);
/// Time between settle polls of the orders still pending.
const SETTLE_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Settle polls in flight at once.
const SETTLE_CONCURRENCY: usize = 32;
/// Extra time, beyond the request timeout, the drive phase waits for its last requests.
const DRAIN_SLACK: Duration = Duration::from_secs(2);
/// Progress bar refresh interval.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);
/// Page size of browse requests.
const BROWSE_LIMIT: &str = "20";

/// One accepted order.
#[derive(Debug, Clone)]
pub(crate) struct Placed {
    pub(crate) id: String,
    pub(crate) user: usize,
    pub(crate) product: String,
}

/// What became of an order, as its owner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Settled {
    Pending,
    /// `GET /api/orders/{id}` answered 404.
    Missing,
    Confirmed,
    Cancelled(Option<String>),
}

impl Settled {
    pub(crate) fn is_terminal(&self) -> bool {
        matches!(self, Settled::Confirmed | Settled::Cancelled(_))
    }
}

#[derive(Debug, Default)]
struct OrderBook {
    /// Per user: their orders and when each was accepted.
    by_user: Vec<Vec<(String, Instant)>>,
    placed: Vec<Placed>,
    untracked: u64,
    /// Order requests that failed in a way that may still have created the order.
    in_doubt: u64,
}

/// What the request tasks share.
#[derive(Debug)]
struct Shared {
    api: Api,
    world: World,
    orders: Mutex<OrderBook>,
    stats: Stats,
}

/// What one arrival does, chosen by the ticker.
#[derive(Debug)]
enum Action {
    Browse(Vec<(&'static str, String)>),
    Order { user: usize, product: usize },
    Check { user: usize, order: String },
}

impl Action {
    fn op(&self) -> Op {
        match self {
            Action::Browse(_) => Op::Browse,
            Action::Order { .. } => Op::Order,
            Action::Check { .. } => Op::Check,
        }
    }
}

impl Shared {
    fn book(&self) -> std::sync::MutexGuard<'_, OrderBook> {
        self.orders.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn browse(&self, rng: &mut fastrand::Rng) -> Action {
        let mut query = vec![("limit", BROWSE_LIMIT.to_owned())];
        match rng.u8(..10) {
            7 | 8 if !self.world.cursors.is_empty() => {
                let c = &self.world.cursors[rng.usize(..self.world.cursors.len())];
                query.push(("cursor", c.clone()));
            }
            9 if !self.world.words.is_empty() => {
                let w = &self.world.words[rng.usize(..self.world.words.len())];
                query.push(("q", w.clone()));
            }
            _ => {}
        }
        Action::Browse(query)
    }

    fn pick(&self, rng: &mut fastrand::Rng, config: &LoadConfig) -> Action {
        let users = self.world.users.len();
        match config.mix.pick(rng.u64(..config.mix.total())) {
            Op::Browse => self.browse(rng),
            Op::Order if self.world.products.is_empty() => self.browse(rng),
            Op::Order => Action::Order {
                user: rng.usize(..users),
                product: rng.usize(..self.world.products.len()),
            },
            Op::Check => {
                let user = rng.usize(..users);
                let order = {
                    let book = self.book();
                    let theirs = book.by_user.get(user).map(Vec::as_slice).unwrap_or(&[]);
                    let old_enough = |(_, at): &&(String, Instant)| at.elapsed() >= CHECK_AGE_MIN;
                    if theirs.is_empty() {
                        None
                    } else {
                        // A random one if old enough, else their oldest if that is.
                        Some(&theirs[rng.usize(..theirs.len())])
                            .filter(old_enough)
                            .or_else(|| theirs.first().filter(old_enough))
                            .map(|(id, _)| id.clone())
                    }
                };
                match order {
                    Some(order) => Action::Check { user, order },
                    None => self.browse(rng),
                }
            }
        }
    }

    async fn perform(&self, action: Action) -> Result<(), Failure> {
        match action {
            Action::Browse(query) => {
                let query: Vec<(&str, &str)> =
                    query.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let _page: ProductPage = self
                    .api
                    .get("/api/products", &query, None)
                    .await?
                    .json(&[200])?;
                Ok(())
            }
            Action::Order { user, product } => {
                let product_id = self.world.products[product].clone();
                let body = PlaceOrder {
                    items: vec![OrderItem {
                        product_id: product_id.clone(),
                        quantity: 1,
                    }],
                };
                let key = uuid::Uuid::now_v7().to_string();
                let token = self.world.users[user].token();
                let answer = self
                    .api
                    .post("/api/orders", Some(&token), Some(&key), &body)
                    .await;
                let accepted = answer
                    .and_then(|a| a.json::<OrderAccepted>(&[200, 201, 202]))
                    .and_then(|accepted| {
                        if accepted.id.is_empty() {
                            Err(Failure::BadResponse("order accepted without an id".into()))
                        } else {
                            Ok(accepted)
                        }
                    });
                let accepted = match accepted {
                    Ok(accepted) => accepted,
                    Err(failure) => {
                        if failure.may_have_happened() {
                            self.book().in_doubt += 1;
                        }
                        return Err(failure);
                    }
                };
                let mut book = self.book();
                if book.placed.len() < ORDERS_TRACKED_MAX {
                    book.by_user[user].push((accepted.id.clone(), Instant::now()));
                    book.placed.push(Placed {
                        id: accepted.id,
                        user,
                        product: product_id,
                    });
                } else {
                    book.untracked += 1;
                }
                Ok(())
            }
            Action::Check { user, order } => {
                let token = self.world.users[user].token();
                let view = get_order(&self.api, &order, &token).await?;
                match view {
                    Some((id, _)) if id == order => Ok(()),
                    Some((id, _)) => Err(Failure::BadResponse(format!(
                        "asked for order {order}, got {id}"
                    ))),
                    None => Err(Failure::Status(404)),
                }
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct OrderStatusView {
    id: String,
    status: OrderStatus,
    #[serde(default)]
    reason: Option<String>,
}

/// `GET /api/orders/{id}` as its owner: `None` on 404.
async fn get_order(api: &Api, id: &str, token: &str) -> Result<Option<(String, Settled)>, Failure> {
    let answer = api
        .get(&format!("/api/orders/{}", segment(id)), &[], Some(token))
        .await?;
    if answer.status == 404 {
        return Ok(None);
    }
    let view: OrderStatusView = answer.json(&[200])?;
    let settled = match view.status {
        OrderStatus::Pending => Settled::Pending,
        OrderStatus::Confirmed => Settled::Confirmed,
        OrderStatus::Cancelled => Settled::Cancelled(view.reason),
    };
    Ok(Some((view.id, settled)))
}

/// Aborts a background task when dropped, so an early return leaves nothing running.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs a whole load test; see the crate docs.
pub(crate) async fn run(config: LoadConfig) -> Result<Report, LoadError> {
    config.validate()?;
    let base = config.base_url()?;
    let api = Api::new(base.clone(), config.request_timeout)
        .map_err(|e| LoadError::setup("http client", e.to_string()))?;
    let seed = config.seed.unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);

    let world = setup::run(&api, &config, &mut rng).await?;
    let mut renewed: Vec<Arc<User>> = world.users.clone();
    renewed.extend(world.admin.clone());
    let _refresher = AbortOnDrop(tokio::spawn(setup::refresh_tokens(
        api.clone(),
        renewed,
        world.token_lifetime,
    )));
    let users = world.users.len();
    let shared = Arc::new(Shared {
        api: api.clone(),
        world,
        orders: Mutex::new(OrderBook {
            by_user: vec![Vec::new(); users],
            ..OrderBook::default()
        }),
        stats: Stats::new(),
    });

    let elapsed = drive(&shared, &config, &mut rng).await;

    let placed = shared.book().placed.clone();
    let (untracked, in_doubt) = {
        let book = shared.book();
        (book.untracked, book.in_doubt)
    };
    let settled = settle(&shared, &placed, &config).await;

    let mut outcomes = OrderOutcomes {
        placed: placed.len() as u64 + untracked,
        untracked,
        in_doubt,
        ..OrderOutcomes::default()
    };
    let mut inv = Invariants {
        orders_checked: placed.len() as u64,
        ..Invariants::default()
    };
    for (order, state) in placed.iter().zip(&settled) {
        match state {
            Settled::Confirmed => outcomes.confirmed += 1,
            Settled::Cancelled(reason) => {
                let reason = reason.clone().unwrap_or_else(|| "unknown".into());
                *outcomes.cancelled.entry(reason).or_insert(0) += 1;
            }
            Settled::Pending => {
                outcomes.pending += 1;
                inv.violate(
                    "order",
                    &order.id,
                    format!(
                        "still PENDING {} s after the run",
                        config.settle_timeout.as_secs_f64()
                    ),
                );
            }
            Settled::Missing => {
                outcomes.pending += 1;
                inv.violate(
                    "order",
                    &order.id,
                    "accepted (202) but its owner gets 404 from GET /api/orders/{id}".into(),
                );
            }
        }
    }
    if let Some(admin) = &shared.world.admin {
        let touched: BTreeSet<String> = placed.iter().map(|p| p.product.clone()).collect();
        // "Nothing reserved" only holds once every order is terminal, and only orders known
        // to exist could be waited for.
        let all_terminal =
            untracked == 0 && in_doubt == 0 && settled.iter().all(Settled::is_terminal);
        invariants::check(
            &api,
            &admin.token(),
            &placed,
            &settled,
            &touched,
            all_terminal,
            &mut inv,
        )
        .await;
    }

    let (ops, overall, errors) = shared.stats.summarize();
    let sent = shared.stats.sent.load(Ordering::Relaxed);
    let elapsed_s = elapsed.max(config.duration).as_secs_f64();
    Ok(Report {
        target: base,
        seed,
        rate_target: config.rate,
        duration_s: config.duration.as_secs_f64(),
        elapsed_s,
        arrivals: shared.stats.arrivals.load(Ordering::Relaxed),
        sent,
        achieved_rate: sent as f64 / elapsed_s,
        ops,
        overall,
        errors,
        orders: outcomes,
        invariants: inv,
    })
}

/// The open-model ticker: arrival `i` is issued at `start + i / rate` whatever earlier
/// requests are doing, and its latency runs from that due time. Returns how long the arrivals
/// took to issue.
async fn drive(shared: &Arc<Shared>, config: &LoadConfig, rng: &mut fastrand::Rng) -> Duration {
    let permits = Arc::new(Semaphore::new(config.max_in_flight));
    let arrivals = config.arrivals();
    let start = Instant::now();
    let mut progress_bar = config.progress.then(|| {
        AbortOnDrop(tokio::spawn(progress(
            shared.clone(),
            permits.clone(),
            config.clone(),
            start,
        )))
    });
    let mut tasks = JoinSet::new();
    for i in 0..arrivals {
        let due = start + due_offset(i, config.rate);
        if due > Instant::now() {
            tokio::time::sleep_until(due).await;
        }
        // Reap finished tasks so the set holds only those in flight.
        while tasks.try_join_next().is_some() {}
        let action = shared.pick(rng, config);
        let op = action.op();
        shared.stats.arrivals.fetch_add(1, Ordering::Relaxed);
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            shared.stats.error(op, "overloaded");
            continue;
        };
        shared.stats.sent.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        tasks.spawn(async move {
            let mut guard = Unfinished {
                shared: &shared,
                op,
                finished: false,
            };
            let outcome = shared.perform(action).await;
            shared.stats.record(op, due.elapsed(), outcome);
            guard.finished = true;
            drop(permit);
        });
    }
    let elapsed = start.elapsed();
    // Every request carries the request timeout, so this wait is bounded; the slack covers
    // scheduling. A task still running after it is counted as a timeout.
    let drained = tokio::time::timeout(config.request_timeout + DRAIN_SLACK, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        // Dropping the tasks' futures counts each as a timeout (see `Unfinished`).
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    // Let the bar see nothing in flight and clear itself (it checks every interval).
    if let Some(bar) = progress_bar.as_mut() {
        let _ = tokio::time::timeout(PROGRESS_INTERVAL * 3, &mut bar.0).await;
    }
    elapsed
}

/// Counts a request whose task is dropped before it finished (aborted after the drain wait)
/// as a `timeout`.
struct Unfinished<'a> {
    shared: &'a Shared,
    op: Op,
    finished: bool,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.shared.stats.error(self.op, "timeout");
        }
    }
}

/// Draws the progress bar until the duration has passed and nothing is in flight.
async fn progress(
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    config: LoadConfig,
    start: Instant,
) {
    let total_ms = u64::try_from(config.duration.as_millis()).unwrap_or(u64::MAX);
    let bar = indicatif::ProgressBar::new(total_ms);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {percent:>3}% {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    let mut window = (Instant::now(), 0u64);
    let mut rate = 0.0;
    loop {
        tokio::time::sleep(PROGRESS_INTERVAL).await;
        let sent = shared.stats.sent.load(Ordering::Relaxed);
        // The rate over the last second or so (over everything until the first second is up).
        let since = window.0.elapsed();
        if since >= Duration::from_secs(1) {
            rate = (sent - window.1) as f64 / since.as_secs_f64();
            window = (Instant::now(), sent);
        } else if window.1 == 0 {
            rate = sent as f64 / since.as_secs_f64().max(PROGRESS_INTERVAL.as_secs_f64());
        }
        let in_flight = config.max_in_flight - permits.available_permits();
        bar.set_position(
            u64::try_from(start.elapsed().as_millis())
                .unwrap_or(u64::MAX)
                .min(total_ms),
        );
        bar.set_message(format!(
            "sent {sent}  in flight {in_flight}  errors {}  {rate:.0}/s",
            shared.stats.errors.load(Ordering::Relaxed)
        ));
        if start.elapsed() >= config.duration && in_flight == 0 {
            bar.finish_and_clear();
            return;
        }
    }
}

/// Polls every placed order as its owner until none is pending or `settle_timeout` passes.
async fn settle(shared: &Arc<Shared>, placed: &[Placed], config: &LoadConfig) -> Vec<Settled> {
    let deadline = Instant::now() + config.settle_timeout;
    let mut states = vec![Settled::Pending; placed.len()];
    let spinner = config.progress.then(|| {
        let spinner = indicatif::ProgressBar::new_spinner();
        spinner.enable_steady_tick(PROGRESS_INTERVAL);
        spinner
    });
    loop {
        let open: Vec<usize> = (0..placed.len())
            .filter(|&i| !states[i].is_terminal())
            .collect();
        if let Some(spinner) = &spinner {
            spinner.set_message(format!(
                "settling: {} of {} orders not yet terminal",
                open.len(),
                placed.len()
            ));
        }
        if open.is_empty() {
            break;
        }
        let mut tasks = JoinSet::new();
        let mut queue = open.into_iter();
        let mut polled: HashMap<usize, Settled> = HashMap::new();
        loop {
            while tasks.len() < SETTLE_CONCURRENCY {
                let Some(i) = queue.next() else { break };
                let api = shared.api.clone();
                let id = placed[i].id.clone();
                let token = shared.world.users[placed[i].user].token();
                let left = deadline.saturating_duration_since(Instant::now());
                tasks.spawn(async move {
                    // Near the deadline a poll gets only the time left (but at least one try).
                    let wait = left.max(Duration::from_millis(100));
                    let got = tokio::time::timeout(wait, get_order(&api, &id, &token)).await;
                    (i, got)
                });
            }
            let Some(joined) = tasks.join_next().await else {
                break;
            };
            let Ok((i, got)) = joined else { continue };
            match got {
                Ok(Ok(Some((_, state)))) => {
                    polled.insert(i, state);
                }
                Ok(Ok(None)) => {
                    polled.insert(i, Settled::Missing);
                }
                // A failed poll leaves the order as it was; the next round asks again.
                Ok(Err(_)) | Err(_) => {}
            }
        }
        for (i, state) in polled {
            states[i] = state;
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        tokio::time::sleep(SETTLE_POLL_INTERVAL.min(deadline - now)).await;
    }
    if let Some(spinner) = spinner {
        spinner.finish_and_clear();
    }
    states
}
