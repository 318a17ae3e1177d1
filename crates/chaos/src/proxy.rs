//! A TCP fault proxy: listens on one address, forwards every connection to an upstream
//! address, and injects network faults into a chosen share of the connections.
//!
//! ```text
//!   client ──TCP──▶ FaultProxy (listen) ──TCP──▶ upstream
//!                      ▲
//!                      └── control: set(Faults) in Rust, or PUT /faults over HTTP
//! ```
//!
//! ```no_run
//! use trellis_chaos::proxy::{FaultProxy, Faults, Latency, Reset};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! // Between a service and its database: clients connect to the proxy's port instead.
//! let proxy = FaultProxy::start("127.0.0.1:0", "127.0.0.1:5432", 42).await?;
//! proxy.set(Faults {
//!     latency: Some(Latency::new(100, 20)),
//!     reset: Some(Reset::after_bytes(64 * 1024).with_probability(0.1)),
//!     ..Faults::none()
//! })?;
//! // ... run the load ...
//! println!("{:?}", proxy.stats().faults);
//! proxy.clear();
//! proxy.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! # Why an in-repo proxy
//!
//! toxiproxy is not available from our registries, and the kernel here refuses `tc ... netem`
//! inside a network namespace, so neither can put faults between two processes. A proxy on
//! tokio needs nothing but a port, runs the same on every machine and in CI, and its decisions
//! are seeded so a run replays.
//!
//! # Faults, at the TCP level
//!
//! Each fault in [`Faults`] is either off (`None`) or on with a `probability`: when a
//! connection is accepted the proxy rolls one number per fault kind from an RNG seeded with
//! the proxy's seed and the connection's number (0, 1, 2, ... in accept order), and the fault
//! applies to that connection if the roll is below the probability. The rolls are made for
//! every kind whether it is on or not, so the same seed picks the same connections for a
//! fault whatever else is configured. Decisions are made at accept: changing the faults
//! affects new connections, except `down` (which can close existing ones) and the removal of
//! a blackhole (which releases the connections it holds).
//!
//! - **latency** ([`Latency`]): each chunk read from one side is written to the other
//!   `delay_ms + U(0..=jitter_ms)` after it was read, never before the chunk ahead of it
//!   (order is kept, so the jitter is sampled per chunk or once per direction). Chunks
//!   pipeline: latency is not a throughput limit, up to the queue ([`Limits::queue_chunks`]).
//!   On both directions a request-response round trip grows by at least twice the delay.
//! - **reset** ([`Reset`]): an abortive close, `SO_LINGER` 0 then close, so the kernel sends
//!   RST instead of FIN and the peer's next read or write fails with "connection reset by
//!   peer". At accept (the upstream is never contacted), or after `after_bytes` bytes have
//!   been forwarded (both directions counted; no byte past the budget is forwarded) or
//!   `after_ms` since accept, whichever comes first; then both the client and the upstream
//!   are reset.
//! - **blackhole** ([`Blackhole`]): the connection is accepted, everything the client sends
//!   is read and discarded, nothing is forwarded (the upstream is never contacted), nothing
//!   is answered and the connection is not closed: the client sees a peer that went silent
//!   and only its own timeout saves it. Held until the blackhole is removed from the faults
//!   or `max_ms` passes, then reset.
//! - **bandwidth** ([`Bandwidth`]): a token bucket per connection and direction,
//!   `bytes_per_sec` with bursts of at most a tenth of a second's worth (at most 16 KiB);
//!   since the proxy stops reading when its queue is full, TCP flow control slows the sender.
//! - **slice** ([`Slice`]): each chunk is written as pieces of at most `max_bytes`, with
//!   `delay_ms` between pieces; with `TCP_NODELAY` (set on every socket) each piece leaves as
//!   its own segment, so the receiver sees many short reads and must reassemble frames.
//! - **down** ([`Down`]): a partition switch. New connections are accepted and reset at once
//!   (the client's connect succeeds, its first read fails with a reset; a true refusal would
//!   mean closing the listener and losing the port), and with `close_existing` every open
//!   connection is reset too.
//!
//! Precedence for one connection: `down`, then a reset at accept, then a blackhole; the other
//! faults combine (latency, then slicing, then the bandwidth limit on each piece).
//!
//! # Bounds
//!
//! Everything a client can make the proxy hold is bounded ([`Limits`]): connections beyond
//! `max_connections` are reset at accept, a forwarded connection with no bytes either way for
//! `idle_timeout` is closed, the upstream connect times out, and each direction buffers at
//! most `queue_chunks` reads of `buffer_size` bytes. Fault parameters are bounded by
//! [`Faults::validate`] (delays up to a minute, holds up to an hour).
//!
//! # Control
//!
//! In Rust: [`FaultProxy::set`], [`FaultProxy::clear`], [`FaultProxy::faults`],
//! [`FaultProxy::stats`]. Over HTTP ([`serve_control`], [`control_router`]):
//! `GET /faults`, `PUT /faults` (a JSON [`Faults`]; a bad body is a 400 whose JSON names the
//! field: `{"error":"invalid faults","field":"latency.probability","message":"..."}`),
//! `DELETE /faults`, `GET /stats` (a JSON [`Stats`]). The control endpoint has no
//! authentication: bind it to loopback.

use std::{
    io,
    net::SocketAddr,
    ops::RangeInclusive,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::{Map, Value};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream, ToSocketAddrs},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch},
    task::JoinHandle,
    time::{Instant, sleep, sleep_until, timeout},
};

/// The longest latency or jitter a fault may add, per chunk (one minute).
pub const MAX_DELAY_MS: u64 = 60_000;
/// The longest a reset may wait, or a blackhole may hold a connection (one hour).
pub const MAX_HOLD_MS: u64 = 3_600_000;
/// The highest bandwidth limit (1 GiB/s); the lowest is 1 byte per second.
pub const MAX_BYTES_PER_SEC: u64 = 1 << 30;
/// The largest slice (64 KiB); the smallest is 1 byte.
pub const MAX_SLICE_BYTES: usize = 64 * 1024;
/// The longest pause between two slices (ten seconds).
pub const MAX_SLICE_DELAY_MS: u64 = 10_000;
/// The largest request body the control endpoint reads.
const MAX_CONTROL_BODY: usize = 64 * 1024;

/// Which way through the proxy a fault acts on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Bytes from the client to the upstream (requests).
    Upstream,
    /// Bytes from the upstream to the client (responses).
    Downstream,
    /// Both ways.
    #[default]
    Both,
}

impl Direction {
    fn covers(self, way: Way) -> bool {
        matches!(
            (self, way),
            (Direction::Both, _)
                | (Direction::Upstream, Way::ToUpstream)
                | (Direction::Downstream, Way::ToClient)
        )
    }
}

/// How often a latency fault samples its jitter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sample {
    /// A fresh delay for every chunk (order is still kept).
    #[default]
    PerChunk,
    /// One delay per connection and direction, kept for the connection's life (a path with a
    /// fixed but random round trip).
    PerDirection,
}

/// The faults a [`FaultProxy`] injects; `None` is off. `Faults::default()` is a clean pass
/// through. See the [module docs](self) for what each does on the wire.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added latency with jitter.
    pub latency: Option<Latency>,
    /// Connection resets (RST), at accept or after some bytes or time.
    pub reset: Option<Reset>,
    /// Accept and never answer.
    pub blackhole: Option<Blackhole>,
    /// A bandwidth limit per connection and direction.
    pub bandwidth: Option<Bandwidth>,
    /// Writes sliced into small pieces.
    pub slice: Option<Slice>,
    /// The partition switch: refuse new connections, optionally close open ones.
    pub down: Option<Down>,
}

/// Added latency: `delay_ms` plus a uniform `0..=jitter_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Latency {
    /// The share of connections affected, `0.0..=1.0` (default 1).
    pub probability: f64,
    /// The fixed part of the delay, in milliseconds (at most [`MAX_DELAY_MS`]).
    pub delay_ms: u64,
    /// The random part, uniform in `0..=jitter_ms` (at most [`MAX_DELAY_MS`]).
    pub jitter_ms: u64,
    /// Whether the jitter is sampled per chunk or once per direction.
    pub sample: Sample,
    /// Which way the delay applies (default both).
    pub direction: Direction,
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            probability: 1.0,
            delay_ms: 0,
            jitter_ms: 0,
            sample: Sample::PerChunk,
            direction: Direction::Both,
        }
    }
}

impl Latency {
    /// `delay_ms + U(0..=jitter_ms)` on every connection, both ways, sampled per chunk.
    pub fn new(delay_ms: u64, jitter_ms: u64) -> Self {
        Latency {
            delay_ms,
            jitter_ms,
            ..Latency::default()
        }
    }

    /// The same, on a share of connections.
    pub fn with_probability(self, probability: f64) -> Self {
        Latency {
            probability,
            ..self
        }
    }

    /// The same, one way only.
    pub fn with_direction(self, direction: Direction) -> Self {
        Latency { direction, ..self }
    }
}

/// A reset (RST). With neither `after_bytes` nor `after_ms` it happens at accept; with
/// either or both, at whichever comes first.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Reset {
    /// The share of connections affected, `0.0..=1.0` (default 1).
    pub probability: f64,
    /// Reset once this many bytes (both ways together) have been forwarded.
    pub after_bytes: Option<u64>,
    /// Reset this long after accept, in milliseconds (at most [`MAX_HOLD_MS`]).
    pub after_ms: Option<u64>,
}

impl Default for Reset {
    fn default() -> Self {
        Reset {
            probability: 1.0,
            after_bytes: None,
            after_ms: None,
        }
    }
}

impl Reset {
    /// Reset every connection as soon as it is accepted.
    pub fn at_accept() -> Self {
        Reset::default()
    }

    /// Reset every connection once `bytes` have been forwarded.
    pub fn after_bytes(bytes: u64) -> Self {
        Reset {
            after_bytes: Some(bytes),
            ..Reset::default()
        }
    }

    /// Reset every connection `ms` milliseconds after accept.
    pub fn after_ms(ms: u64) -> Self {
        Reset {
            after_ms: Some(ms),
            ..Reset::default()
        }
    }

    /// The same, on a share of connections.
    pub fn with_probability(self, probability: f64) -> Self {
        Reset {
            probability,
            ..self
        }
    }

    fn at_accept_only(&self) -> bool {
        self.after_bytes.is_none() && self.after_ms.is_none()
    }
}

/// A blackhole: accept, read and discard, never answer, never close.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Blackhole {
    /// The share of connections affected, `0.0..=1.0` (default 1).
    pub probability: f64,
    /// The longest a connection is held before it is reset, in milliseconds (default one
    /// minute, at most [`MAX_HOLD_MS`]). Removing the blackhole releases it sooner.
    pub max_ms: u64,
}

impl Default for Blackhole {
    fn default() -> Self {
        Blackhole {
            probability: 1.0,
            max_ms: 60_000,
        }
    }
}

impl Blackhole {
    /// Blackhole every connection, for at most a minute each.
    pub fn new() -> Self {
        Blackhole::default()
    }

    /// The same, on a share of connections.
    pub fn with_probability(self, probability: f64) -> Self {
        Blackhole {
            probability,
            ..self
        }
    }
}

/// A bandwidth limit per connection and direction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Bandwidth {
    /// The share of connections affected, `0.0..=1.0` (default 1).
    pub probability: f64,
    /// Bytes per second, `1..=`[`MAX_BYTES_PER_SEC`] (required: 0 is refused).
    pub bytes_per_sec: u64,
    /// Which way the limit applies (default both, each way at this rate).
    pub direction: Direction,
}

impl Default for Bandwidth {
    fn default() -> Self {
        Bandwidth {
            probability: 1.0,
            bytes_per_sec: 0,
            direction: Direction::Both,
        }
    }
}

impl Bandwidth {
    /// `bytes_per_sec` each way on every connection.
    pub fn new(bytes_per_sec: u64) -> Self {
        Bandwidth {
            bytes_per_sec,
            ..Bandwidth::default()
        }
    }

    /// The same, on a share of connections.
    pub fn with_probability(self, probability: f64) -> Self {
        Bandwidth {
            probability,
            ..self
        }
    }

    /// The same, one way only.
    pub fn with_direction(self, direction: Direction) -> Self {
        Bandwidth { direction, ..self }
    }
}

/// Writes sliced into pieces of at most `max_bytes`, `delay_ms` apart.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Slice {
    /// The share of connections affected, `0.0..=1.0` (default 1).
    pub probability: f64,
    /// The largest piece, `1..=`[`MAX_SLICE_BYTES`] (required: 0 is refused).
    pub max_bytes: usize,
    /// The pause between two pieces of one chunk, in milliseconds (at most
    /// [`MAX_SLICE_DELAY_MS`]).
    pub delay_ms: u64,
    /// Which way the slicing applies (default both).
    pub direction: Direction,
}

impl Default for Slice {
    fn default() -> Self {
        Slice {
            probability: 1.0,
            max_bytes: 0,
            delay_ms: 0,
            direction: Direction::Both,
        }
    }
}

impl Slice {
    /// Pieces of at most `max_bytes`, `delay_ms` apart, both ways on every connection.
    pub fn new(max_bytes: usize, delay_ms: u64) -> Self {
        Slice {
            max_bytes,
            delay_ms,
            ..Slice::default()
        }
    }

    /// The same, on a share of connections.
    pub fn with_probability(self, probability: f64) -> Self {
        Slice {
            probability,
            ..self
        }
    }

    /// The same, one way only.
    pub fn with_direction(self, direction: Direction) -> Self {
        Slice { direction, ..self }
    }
}

/// The partition switch: while set, new connections are reset at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Down {
    /// Also reset every open connection when the switch is set (default true).
    pub close_existing: bool,
}

impl Default for Down {
    fn default() -> Self {
        Down {
            close_existing: true,
        }
    }
}

/// Faults that failed validation: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FaultError {
    /// The field's path, such as `latency.probability` (`body` when the JSON itself is bad).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FaultError {
    fn new(field: impl Into<String>, message: impl ToString) -> Self {
        FaultError {
            field: field.into(),
            message: message.to_string(),
        }
    }
}

fn check_probability(field: &str, probability: f64) -> Result<(), FaultError> {
    if (0.0..=1.0).contains(&probability) {
        Ok(())
    } else {
        Err(FaultError::new(
            format!("{field}.probability"),
            format!("must be between 0 and 1, got {probability}"),
        ))
    }
}

fn check_range<T>(field: &str, value: T, range: RangeInclusive<T>) -> Result<(), FaultError>
where
    T: PartialOrd + std::fmt::Display,
{
    if range.contains(&value) {
        Ok(())
    } else {
        Err(FaultError::new(
            field,
            format!(
                "must be in {}..={}, got {value}",
                range.start(),
                range.end()
            ),
        ))
    }
}

impl Faults {
    /// No faults: a clean pass-through.
    pub fn none() -> Self {
        Faults::default()
    }

    /// Whether every fault is off.
    pub fn is_none(&self) -> bool {
        *self == Faults::default()
    }

    /// Checks every probability and bound; the error names the first bad field.
    pub fn validate(&self) -> Result<(), FaultError> {
        if let Some(latency) = &self.latency {
            check_probability("latency", latency.probability)?;
            check_range("latency.delay_ms", latency.delay_ms, 0..=MAX_DELAY_MS)?;
            check_range("latency.jitter_ms", latency.jitter_ms, 0..=MAX_DELAY_MS)?;
        }
        if let Some(reset) = &self.reset {
            check_probability("reset", reset.probability)?;
            if let Some(ms) = reset.after_ms {
                check_range("reset.after_ms", ms, 0..=MAX_HOLD_MS)?;
            }
        }
        if let Some(blackhole) = &self.blackhole {
            check_probability("blackhole", blackhole.probability)?;
            check_range("blackhole.max_ms", blackhole.max_ms, 1..=MAX_HOLD_MS)?;
        }
        if let Some(bandwidth) = &self.bandwidth {
            check_probability("bandwidth", bandwidth.probability)?;
            check_range(
                "bandwidth.bytes_per_sec",
                bandwidth.bytes_per_sec,
                1..=MAX_BYTES_PER_SEC,
            )?;
        }
        if let Some(slice) = &self.slice {
            check_probability("slice", slice.probability)?;
            check_range("slice.max_bytes", slice.max_bytes, 1..=MAX_SLICE_BYTES)?;
            check_range("slice.delay_ms", slice.delay_ms, 0..=MAX_SLICE_DELAY_MS)?;
        }
        Ok(())
    }

    /// Parses and validates a JSON body; the error names the bad field (`latency.delay_ms`,
    /// an unknown `latncy`, or `body` when the JSON does not parse).
    pub fn from_json(body: &[u8]) -> Result<Faults, FaultError> {
        let value: Value =
            serde_json::from_slice(body).map_err(|error| FaultError::new("body", error))?;
        let Value::Object(fields) = &value else {
            return Err(FaultError::new("body", "expected a JSON object"));
        };
        // serde's derive says what is wrong but not where: try each field alone (every
        // field has a default) to name the one that fails.
        for (name, field) in fields {
            match name.as_str() {
                "latency" => probe::<Latency>(name, field)?,
                "reset" => probe::<Reset>(name, field)?,
                "blackhole" => probe::<Blackhole>(name, field)?,
                "bandwidth" => probe::<Bandwidth>(name, field)?,
                "slice" => probe::<Slice>(name, field)?,
                "down" => probe::<Down>(name, field)?,
                _ => return Err(FaultError::new(name.as_str(), "unknown fault")),
            }
        }
        let faults: Faults =
            serde_json::from_value(value).map_err(|error| FaultError::new("body", error))?;
        faults.validate()?;
        Ok(faults)
    }
}

/// Deserializes each field of one fault's object alone, to name the first that fails.
fn probe<T: DeserializeOwned>(name: &str, value: &Value) -> Result<(), FaultError> {
    match value {
        Value::Null => Ok(()),
        Value::Object(fields) => {
            for (key, field) in fields {
                let mut alone = Map::new();
                alone.insert(key.clone(), field.clone());
                if let Err(error) = serde_json::from_value::<T>(Value::Object(alone)) {
                    return Err(FaultError::new(format!("{name}.{key}"), error));
                }
            }
            Ok(())
        }
        _ => Err(FaultError::new(
            name,
            "expected an object (or null to turn the fault off)",
        )),
    }
}

/// Bounds on what the proxy holds.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections at most; more are reset at accept (default 1024).
    pub max_connections: u32,
    /// A forwarded connection with no bytes either way for this long is closed (default five
    /// minutes). Blackholed connections are bounded by [`Blackhole::max_ms`] instead.
    pub idle_timeout: Duration,
    /// How long the connect to the upstream may take (default five seconds); on failure the
    /// client is reset.
    pub connect_timeout: Duration,
    /// The largest read, in bytes (default 16 KiB).
    pub buffer_size: usize,
    /// Reads queued per direction while latency or bandwidth holds them (default 8).
    pub queue_chunks: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(5),
            buffer_size: 16 * 1024,
            queue_chunks: 8,
        }
    }
}

/// Counters since the proxy started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Connections accepted (including those then refused or reset).
    pub connections: u64,
    /// Connections open now.
    pub active: u64,
    /// Connections reset at accept because the proxy was down or full.
    pub refused: u64,
    /// Upstream connects that failed or timed out.
    pub upstream_errors: u64,
    /// Bytes forwarded from clients to the upstream.
    pub bytes_to_upstream: u64,
    /// Bytes forwarded from the upstream to clients.
    pub bytes_to_client: u64,
    /// Bytes read from blackholed clients and discarded.
    pub bytes_discarded: u64,
    /// Faults applied, by kind.
    pub faults: FaultCounts,
}

/// Faults applied, by kind: connections the fault was chosen for, except `reset` (resets
/// actually sent) and `down` (connections refused or closed by the switch).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultCounts {
    /// Connections given latency.
    pub latency: u64,
    /// Resets sent by the reset fault.
    pub reset: u64,
    /// Connections blackholed.
    pub blackhole: u64,
    /// Connections given a bandwidth limit.
    pub bandwidth: u64,
    /// Connections sliced.
    pub slice: u64,
    /// Connections refused or closed by the down switch.
    pub down: u64,
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    active: AtomicU64,
    refused: AtomicU64,
    upstream_errors: AtomicU64,
    bytes_to_upstream: AtomicU64,
    bytes_to_client: AtomicU64,
    bytes_discarded: AtomicU64,
    latency: AtomicU64,
    reset: AtomicU64,
    blackhole: AtomicU64,
    bandwidth: AtomicU64,
    slice: AtomicU64,
    down: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> Stats {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Stats {
            connections: get(&self.connections),
            active: get(&self.active),
            refused: get(&self.refused),
            upstream_errors: get(&self.upstream_errors),
            bytes_to_upstream: get(&self.bytes_to_upstream),
            bytes_to_client: get(&self.bytes_to_client),
            bytes_discarded: get(&self.bytes_discarded),
            faults: FaultCounts {
                latency: get(&self.latency),
                reset: get(&self.reset),
                blackhole: get(&self.blackhole),
                bandwidth: get(&self.bandwidth),
                slice: get(&self.slice),
                down: get(&self.down),
            },
        }
    }
}

/// What the accept loop and every connection share.
#[derive(Debug)]
struct Shared {
    upstream: String,
    seed: u64,
    limits: Limits,
    faults: watch::Sender<Arc<Faults>>,
    /// Bumped to reset every open connection (down with `close_existing`, shutdown).
    close_epoch: watch::Sender<u64>,
    stop: watch::Sender<bool>,
    slots: Arc<Semaphore>,
    next_id: AtomicU64,
    counters: Counters,
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl Inner {
    fn stop(&self) {
        self.shared.stop.send_replace(true);
        self.shared.close_epoch.send_modify(|epoch| *epoch += 1);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running fault proxy. Cheap to clone; the proxy stops when [`FaultProxy::shutdown`] is
/// called or the last clone is dropped.
#[derive(Debug, Clone)]
pub struct FaultProxy {
    inner: Arc<Inner>,
}

impl FaultProxy {
    /// Listens on `listen` and forwards every connection to `upstream` (`host:port`,
    /// resolved per connection), with no faults until [`FaultProxy::set`]. `seed` decides
    /// which connections each fault picks and the jitter: the same seed replays the same
    /// choices for the same sequence of connections.
    pub async fn start(
        listen: impl ToSocketAddrs,
        upstream: impl Into<String>,
        seed: u64,
    ) -> io::Result<FaultProxy> {
        FaultProxy::start_with(listen, upstream, seed, Limits::default()).await
    }

    /// [`FaultProxy::start`] with explicit bounds.
    pub async fn start_with(
        listen: impl ToSocketAddrs,
        upstream: impl Into<String>,
        seed: u64,
        limits: Limits,
    ) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind(listen).await?;
        let local_addr = listener.local_addr()?;
        let limits = Limits {
            max_connections: limits.max_connections.max(1),
            buffer_size: limits.buffer_size.max(1),
            queue_chunks: limits.queue_chunks.max(1),
            ..limits
        };
        let shared = Arc::new(Shared {
            upstream: upstream.into(),
            seed,
            slots: Arc::new(Semaphore::new(limits.max_connections as usize)),
            limits,
            faults: watch::Sender::new(Arc::new(Faults::default())),
            close_epoch: watch::Sender::new(0),
            stop: watch::Sender::new(false),
            next_id: AtomicU64::new(0),
            counters: Counters::default(),
        });
        tracing::info!(listen = %local_addr, upstream = %shared.upstream, seed, "fault proxy started");
        let accept = tokio::spawn(accept_loop(Arc::clone(&shared), listener));
        Ok(FaultProxy {
            inner: Arc::new(Inner {
                shared,
                local_addr,
                accept: Mutex::new(Some(accept)),
            }),
        })
    }

    /// The address the proxy listens on (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// The upstream address connections are forwarded to.
    pub fn upstream(&self) -> &str {
        &self.inner.shared.upstream
    }

    /// The seed the proxy's decisions come from.
    pub fn seed(&self) -> u64 {
        self.inner.shared.seed
    }

    /// Replaces the faults (validated first). New connections get the new faults; open ones
    /// keep what they were given at accept, except that `down` with `close_existing` resets
    /// them all and removing the blackhole releases the connections it holds.
    pub fn set(&self, faults: Faults) -> Result<(), FaultError> {
        faults.validate()?;
        let close = faults.down.is_some_and(|down| down.close_existing);
        tracing::info!(upstream = %self.inner.shared.upstream, ?faults, "faults set");
        self.inner.shared.faults.send_replace(Arc::new(faults));
        if close {
            self.inner
                .shared
                .close_epoch
                .send_modify(|epoch| *epoch += 1);
        }
        Ok(())
    }

    /// The faults in force.
    pub fn faults(&self) -> Faults {
        Faults::clone(&self.inner.shared.faults.borrow())
    }

    /// Removes every fault (a clean pass-through for new connections).
    pub fn clear(&self) {
        // The empty set always validates.
        let _ = self.set(Faults::default());
    }

    /// The counters since start.
    pub fn stats(&self) -> Stats {
        self.inner.shared.counters.snapshot()
    }

    /// Stops accepting, resets every open connection and waits (at most five seconds) for
    /// the connection tasks to end. The port is free when this returns.
    pub async fn shutdown(&self) {
        self.inner.stop();
        let accept = self
            .inner
            .accept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(accept) = accept {
            let _ = accept.await;
        }
        let all = self.inner.shared.limits.max_connections;
        let _ = timeout(
            Duration::from_secs(5),
            self.inner.shared.slots.acquire_many(all),
        )
        .await;
        tracing::info!(listen = %self.inner.local_addr, "fault proxy stopped");
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut stop = shared.stop.subscribe();
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|stop| *stop) => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((socket, peer)) => on_accept(&shared, socket, peer),
            Err(error) => {
                // Out of descriptors, or a connection that died in the backlog: pause, go on.
                tracing::warn!(%error, "fault proxy: accept failed");
                sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn on_accept(shared: &Arc<Shared>, socket: TcpStream, peer: SocketAddr) {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    bump(&shared.counters.connections);
    // Subscribe before reading the faults: a `set` after this point is seen by the
    // connection, one before it is in the snapshot.
    let kill = shared.close_epoch.subscribe();
    let mut faults_rx = shared.faults.subscribe();
    let faults = Arc::clone(&faults_rx.borrow_and_update());
    if faults.down.is_some() {
        bump(&shared.counters.refused);
        bump(&shared.counters.down);
        abort(&socket);
        return;
    }
    let Ok(slot) = Arc::clone(&shared.slots).try_acquire_owned() else {
        tracing::warn!(%peer, max = shared.limits.max_connections, "fault proxy full: connection reset");
        bump(&shared.counters.refused);
        abort(&socket);
        return;
    };
    let plan = Plan::decide(shared.seed, id, &faults);
    tracing::debug!(id, %peer, ?plan, "fault proxy: connection");
    if plan.reset.is_some_and(|reset| reset.at_accept_only()) {
        bump(&shared.counters.reset);
        abort(&socket);
        return;
    }
    tokio::spawn(connection(
        Arc::clone(shared),
        socket,
        plan,
        kill,
        faults_rx,
        slot,
    ));
}

/// Sets `SO_LINGER` 0 so that dropping the socket sends RST.
fn abort(socket: &TcpStream) {
    if let Err(error) = socket.set_zero_linger() {
        tracing::debug!(%error, "fault proxy: cannot set SO_LINGER 0");
    }
}

/// The faults chosen for one connection.
#[derive(Debug, Clone)]
struct Plan {
    latency: Option<Latency>,
    reset: Option<Reset>,
    blackhole: Option<Blackhole>,
    bandwidth: Option<Bandwidth>,
    slice: Option<Slice>,
    /// Seeds the jitter of this connection's two directions.
    seed: u64,
}

/// splitmix64: spreads (seed, connection number) over the RNG's seed space.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Plan {
    fn decide(seed: u64, id: u64, faults: &Faults) -> Plan {
        let mut rng = fastrand::Rng::with_seed(mix(seed ^ mix(id)));
        // One roll per kind, always, in a fixed order: a fault's choice of connections does
        // not depend on which other faults are on.
        let rolls: [f64; 5] = std::array::from_fn(|_| rng.f64());
        Plan {
            reset: faults.reset.filter(|f| rolls[0] < f.probability),
            blackhole: faults.blackhole.filter(|f| rolls[1] < f.probability),
            latency: faults.latency.filter(|f| rolls[2] < f.probability),
            bandwidth: faults.bandwidth.filter(|f| rolls[3] < f.probability),
            slice: faults.slice.filter(|f| rolls[4] < f.probability),
            seed: rng.u64(..),
        }
    }
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Both sides finished, or the idle timeout: close normally.
    Closed,
    /// A peer failed or vanished: reset the other side too.
    Reset,
    /// The reset fault fired.
    FaultReset,
    /// The blackhole was lifted or its bound passed.
    Released,
    /// Down with `close_existing`, or shutdown.
    Killed,
}

struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.counters.active.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(
    shared: Arc<Shared>,
    mut client: TcpStream,
    plan: Plan,
    mut kill: watch::Receiver<u64>,
    faults_rx: watch::Receiver<Arc<Faults>>,
    _slot: OwnedSemaphorePermit,
) {
    bump(&shared.counters.active);
    let _active = ActiveGuard(Arc::clone(&shared));
    let _ = client.set_nodelay(true);
    let (ending, upstream) = match plan.blackhole {
        Some(blackhole) => {
            bump(&shared.counters.blackhole);
            let ending = hold(&shared, &mut client, blackhole, &mut kill, faults_rx).await;
            (ending, None)
        }
        None => forward(&shared, &mut client, &plan, &mut kill).await,
    };
    match ending {
        Ending::Closed => return,
        Ending::FaultReset => bump(&shared.counters.reset),
        Ending::Killed if !*shared.stop.borrow() => bump(&shared.counters.down),
        Ending::Killed | Ending::Reset | Ending::Released => {}
    }
    abort(&client);
    if let Some(upstream) = &upstream {
        abort(upstream);
    }
}

/// A blackhole: read and discard until released, the bound passes, or the proxy closes
/// everything.
async fn hold(
    shared: &Shared,
    client: &mut TcpStream,
    blackhole: Blackhole,
    kill: &mut watch::Receiver<u64>,
    mut faults_rx: watch::Receiver<Arc<Faults>>,
) -> Ending {
    let deadline = Instant::now() + Duration::from_millis(blackhole.max_ms);
    let mut buf = vec![0u8; 4096];
    // After the client's FIN there is nothing more to read, but the connection stays held.
    let mut open = true;
    loop {
        tokio::select! {
            read = client.read(&mut buf), if open => match read {
                Ok(0) => open = false,
                Ok(n) => {
                    shared.counters.bytes_discarded.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(_) => return Ending::Reset,
            },
            () = sleep_until(deadline) => return Ending::Released,
            changed = faults_rx.changed() => {
                if changed.is_err() || faults_rx.borrow_and_update().blackhole.is_none() {
                    return Ending::Released;
                }
            }
            _ = kill.changed() => return Ending::Killed,
        }
    }
}

/// Connects to the upstream and pumps both ways with the plan's faults, until both sides are
/// done or something ends the connection. Returns the upstream socket so the caller can
/// reset it.
async fn forward(
    shared: &Arc<Shared>,
    client: &mut TcpStream,
    plan: &Plan,
    kill: &mut watch::Receiver<u64>,
) -> (Ending, Option<TcpStream>) {
    let connect = timeout(
        shared.limits.connect_timeout,
        TcpStream::connect(shared.upstream.as_str()),
    )
    .await;
    let mut upstream = match connect {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(error)) => {
            // Expected while the upstream restarts (a chaos run kills it): counted in
            // `upstream_errors`, logged at debug level only.
            tracing::debug!(upstream = %shared.upstream, %error, "fault proxy: upstream connect failed");
            bump(&shared.counters.upstream_errors);
            return (Ending::Reset, None);
        }
        Err(_) => {
            tracing::warn!(upstream = %shared.upstream, "fault proxy: upstream connect timed out");
            bump(&shared.counters.upstream_errors);
            return (Ending::Reset, None);
        }
    };
    let _ = upstream.set_nodelay(true);
    for (chosen, counter) in [
        (plan.latency.is_some(), &shared.counters.latency),
        (plan.bandwidth.is_some(), &shared.counters.bandwidth),
        (plan.slice.is_some(), &shared.counters.slice),
    ] {
        if chosen {
            bump(counter);
        }
    }
    let conn = Conn::new(
        Arc::clone(shared),
        plan.reset.and_then(|reset| reset.after_bytes),
    );
    let reset_at = plan
        .reset
        .and_then(|reset| reset.after_ms)
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    let ending = {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        let to_upstream = pump(
            client_read,
            upstream_write,
            Shaping::new(plan, Way::ToUpstream),
            &conn,
            Way::ToUpstream,
        );
        let to_client = pump(
            upstream_read,
            client_write,
            Shaping::new(plan, Way::ToClient),
            &conn,
            Way::ToClient,
        );
        let reset_timer = async {
            match reset_at {
                Some(at) => sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            done = async { tokio::try_join!(to_upstream, to_client) } => match done {
                Ok(_) => Ending::Closed,
                Err(Stop::Budget) => Ending::FaultReset,
                Err(Stop::Io) => Ending::Reset,
            },
            () = reset_timer => Ending::FaultReset,
            _ = kill.changed() => Ending::Killed,
            () = conn.idle(shared.limits.idle_timeout) => {
                tracing::debug!(upstream = %shared.upstream, "fault proxy: idle connection closed");
                Ending::Closed
            }
        }
    };
    (ending, Some(upstream))
}

/// One way through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    ToUpstream,
    ToClient,
}

/// Why a pump stopped early.
#[derive(Debug)]
enum Stop {
    /// The reset fault's byte budget is spent.
    Budget,
    /// A read or write failed: a peer reset or vanished.
    Io,
}

/// Per-connection state both pumps share.
struct Conn {
    shared: Arc<Shared>,
    start: Instant,
    /// Milliseconds from `start` to the last byte read or written.
    last: AtomicU64,
    /// Bytes left before the reset fault fires.
    budget: Option<AtomicU64>,
}

impl Conn {
    fn new(shared: Arc<Shared>, budget: Option<u64>) -> Self {
        Conn {
            shared,
            start: Instant::now(),
            last: AtomicU64::new(0),
            budget: budget.map(AtomicU64::new),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `idle`.
    async fn idle(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last.load(Ordering::Relaxed));
            if last.elapsed() >= idle {
                return;
            }
            sleep_until(last + idle).await;
        }
    }

    /// How many of `want` bytes may go before the reset budget is spent, and whether it is
    /// spent after them.
    fn take_budget(&self, want: usize) -> (usize, bool) {
        let Some(budget) = &self.budget else {
            return (want, false);
        };
        let want = want as u64;
        let before = budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                Some(left.saturating_sub(want))
            })
            .unwrap_or(0);
        let allowed = before.min(want);
        (allowed as usize, before <= want)
    }

    fn count(&self, way: Way, bytes: usize) {
        let counter = match way {
            Way::ToUpstream => &self.shared.counters.bytes_to_upstream,
            Way::ToClient => &self.shared.counters.bytes_to_client,
        };
        counter.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// Reads on one side and writes to the other, through a bounded queue so that latency
/// pipelines. Ends with a FIN on the write side once the read side has ended and the queue is
/// drained.
async fn pump<R, W>(
    mut read: R,
    mut write: W,
    mut shaping: Shaping,
    conn: &Conn,
    way: Way,
) -> Result<(), Stop>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let limits = &conn.shared.limits;
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(limits.queue_chunks);
    let size = limits.buffer_size;
    let reader = async move {
        loop {
            let mut buf = vec![0u8; size];
            let n = read.read(&mut buf).await.map_err(|_| Stop::Io)?;
            if n == 0 {
                return Ok::<(), Stop>(());
            }
            buf.truncate(n);
            conn.touch();
            if tx.send((Instant::now(), buf)).await.is_err() {
                return Ok(());
            }
        }
    };
    let writer = async {
        while let Some((read_at, chunk)) = rx.recv().await {
            shaping
                .deliver(&mut write, read_at, &chunk, conn, way)
                .await?;
        }
        write.shutdown().await.map_err(|_| Stop::Io)
    };
    tokio::try_join!(reader, writer).map(|_| ())
}

/// The faults one direction of one connection applies.
struct Shaping {
    /// The delay, fixed when sampled per direction.
    latency: Option<(Latency, Option<Duration>)>,
    bucket: Option<Bucket>,
    slice: Option<Slice>,
    rng: fastrand::Rng,
}

fn jittered(latency: &Latency, rng: &mut fastrand::Rng) -> Duration {
    Duration::from_millis(latency.delay_ms + rng.u64(0..=latency.jitter_ms))
}

impl Shaping {
    fn new(plan: &Plan, way: Way) -> Self {
        let mut rng = fastrand::Rng::with_seed(mix(plan.seed ^ way as u64));
        let latency = plan
            .latency
            .filter(|latency| latency.direction.covers(way))
            .map(|latency| {
                let fixed =
                    (latency.sample == Sample::PerDirection).then(|| jittered(&latency, &mut rng));
                (latency, fixed)
            });
        Shaping {
            latency,
            bucket: plan
                .bandwidth
                .filter(|bandwidth| bandwidth.direction.covers(way))
                .map(|bandwidth| Bucket::new(bandwidth.bytes_per_sec)),
            slice: plan.slice.filter(|slice| slice.direction.covers(way)),
            rng,
        }
    }

    async fn deliver<W: AsyncWrite + Unpin>(
        &mut self,
        write: &mut W,
        read_at: Instant,
        chunk: &[u8],
        conn: &Conn,
        way: Way,
    ) -> Result<(), Stop> {
        if let Some((latency, fixed)) = &self.latency {
            let delay = match fixed {
                Some(delay) => *delay,
                None => jittered(latency, &mut self.rng),
            };
            sleep_until(read_at + delay).await;
        }
        let piece = self.slice.map_or(chunk.len(), |slice| slice.max_bytes);
        for (i, piece) in chunk.chunks(piece.max(1)).enumerate() {
            if let Some(slice) = self.slice
                && i > 0
                && slice.delay_ms > 0
            {
                sleep(Duration::from_millis(slice.delay_ms)).await;
            }
            let mut rest = piece;
            while !rest.is_empty() {
                let n = match &mut self.bucket {
                    Some(bucket) => bucket.take(rest.len()).await,
                    None => rest.len(),
                };
                let (n, spent) = conn.take_budget(n);
                if n > 0 {
                    write.write_all(&rest[..n]).await.map_err(|_| Stop::Io)?;
                    conn.count(way, n);
                    conn.touch();
                }
                if spent {
                    return Err(Stop::Budget);
                }
                rest = &rest[n..];
            }
        }
        Ok(())
    }
}

/// A token bucket: `rate` bytes per second, holding at most a tenth of a second's worth
/// (at most 16 KiB, at least 1 byte); starts full.
struct Bucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(bytes_per_sec: u64) -> Self {
        let rate = bytes_per_sec.max(1) as f64;
        let capacity = (rate / 10.0).floor().clamp(1.0, 16.0 * 1024.0);
        Bucket {
            rate,
            capacity,
            tokens: capacity,
            last: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let earned = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.capacity);
        self.last = now;
    }

    /// Waits until some bytes may pass and takes up to `want` of them (at least one).
    async fn take(&mut self, want: usize) -> usize {
        loop {
            self.refill();
            let goal = (want as f64).min(self.capacity);
            if self.tokens >= goal {
                self.tokens -= goal;
                return goal as usize;
            }
            let wait = (goal - self.tokens) / self.rate;
            sleep(Duration::from_secs_f64(wait.max(0.001))).await;
        }
    }
}

/// The control endpoint's routes for `proxy`: `GET`/`PUT`/`DELETE /faults`, `GET /stats`.
/// Mount it in an existing axum app, or use [`serve_control`].
pub fn control_router(proxy: FaultProxy) -> Router {
    Router::new()
        .route(
            "/faults",
            get(get_faults).put(put_faults).delete(delete_faults),
        )
        .route("/stats", get(get_stats))
        .layer(DefaultBodyLimit::max(MAX_CONTROL_BODY))
        .with_state(proxy)
}

async fn get_faults(State(proxy): State<FaultProxy>) -> Json<Faults> {
    Json(proxy.faults())
}

async fn put_faults(State(proxy): State<FaultProxy>, body: Bytes) -> Response {
    match Faults::from_json(&body).and_then(|faults| proxy.set(faults)) {
        Ok(()) => Json(proxy.faults()).into_response(),
        Err(error) => (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({
                "error": "invalid faults",
                "field": error.field,
                "message": error.message,
            })),
        )
            .into_response(),
    }
}

async fn delete_faults(State(proxy): State<FaultProxy>) -> Json<Faults> {
    proxy.clear();
    Json(proxy.faults())
}

async fn get_stats(State(proxy): State<FaultProxy>) -> Json<Stats> {
    Json(proxy.stats())
}

/// The control endpoint, served on its own address by [`serve_control`].
#[derive(Debug)]
pub struct ControlServer {
    local_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<io::Result<()>>,
}

/// Serves [`control_router`] for `proxy` on `listen` (bind it to loopback: it has no
/// authentication).
pub async fn serve_control(
    proxy: FaultProxy,
    listen: impl ToSocketAddrs,
) -> io::Result<ControlServer> {
    let listener = TcpListener::bind(listen).await?;
    let local_addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let app = control_router(proxy);
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
    });
    Ok(ControlServer {
        local_addr,
        stop: Some(stop),
        task,
    })
}

impl ControlServer {
    /// The address the control endpoint listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops the control endpoint (in-flight requests finish, bounded by five seconds).
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if timeout(Duration::from_secs(5), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}
