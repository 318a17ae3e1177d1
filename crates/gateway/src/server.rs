//! The listener: accepting connections (HTTP/1.1 and h2c, or HTTPS with ALPN when
//! `[server.tls]` is set), client-side limits, graceful shutdown, configuration reload, and
//! [`run`] for the CLI.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tower::Service as _;
use trellis_telemetry::http::TraceContextServer;
use trellis_telemetry::metrics::PrometheusHandle;
use trellis_telemetry::service::ServiceScopeExt as _;

use crate::config::{Config, ServerConfig};
use crate::error::ConfigError;
use crate::hooks::{GatewayHooks, NoHooks};
use crate::proxy::{AdminPlacement, Shared, Table, handle, handle_admin};
use crate::tls::Tls;

/// Pause after a failed `accept` (for example out of file descriptors), so the loop does not
/// spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);
/// HTTP/2 keep-alive ping interval to clients.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// hyper's smallest allowed HTTP/1 read buffer, bytes.
const H1_BUFFER_BYTES_MIN: usize = 8192;
/// Most connections open at once on the operator listener: its own budget, so a flood on the
/// public listener cannot starve health checks and scrapes, nor the reverse.
const ADMIN_CONNECTIONS_MAX: usize = 64;

/// Why the gateway could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Binding or accepting failed.
    #[error("network error: {0}")]
    Io(#[from] std::io::Error),
    /// The metrics recorder could not be installed.
    #[error("telemetry error: {0}")]
    Telemetry(#[from] trellis_telemetry::TelemetryError),
}

impl GatewayError {
    /// Whether trying again may help (a busy port may free up; a bad config will not).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Io(_))
    }
}

/// A configured gateway, ready to [`serve`](Self::serve). Cheap to clone: clones share the
/// routing table, so a clone kept aside can [`reload`](Self::reload) a serving gateway.
#[derive(Debug, Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
    server: Arc<ServerConfig>,
    /// The public listener's TLS, when `[server.tls]` is set.
    tls: Option<Arc<Tls>>,
    /// One permit per open client connection (`server.max_connections`), shared by every
    /// clone, so worker threads and listeners count together.
    connections: Arc<Semaphore>,
    /// The operator listener's connections ([`ADMIN_CONNECTIONS_MAX`]).
    admin_connections: Arc<Semaphore>,
}

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Surface {
    /// Clients: routing and proxying (and the admin endpoints when they are public).
    Public,
    /// Operators: the admin endpoints only.
    Operator,
}

impl Gateway {
    /// Builds a gateway from a configuration: validates it, builds clusters (and starts their
    /// health checks) and auth policies (fetching JWKS documents once).
    ///
    /// Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// [`GatewayError::Config`] naming the bad key.
    pub async fn from_config(config: Config) -> Result<Self, GatewayError> {
        crate::metric_help::describe();
        let table = Table::build(&config).await?;
        let tls = config.server.tls.as_ref().map(Tls::load).transpose()?;
        Ok(Self {
            shared: Arc::new(Shared {
                table: arc_swap::ArcSwap::new(table),
                hooks: Arc::new(NoHooks),
                metrics: None,
                admin: AdminPlacement::from_config(&config.server),
                hsts: tls.as_ref().and_then(|t| t.hsts.clone()),
                https: tls.is_some(),
            }),
            tls: tls.map(Arc::new),
            connections: Arc::new(Semaphore::new(config.server.max_connections)),
            admin_connections: Arc::new(Semaphore::new(ADMIN_CONNECTIONS_MAX)),
            server: Arc::new(config.server),
        })
    }

    /// Reads, validates and builds a gateway from a TOML file.
    ///
    /// # Errors
    /// As [`from_config`](Self::from_config), plus a file that cannot be read or parsed.
    pub async fn from_file(path: impl AsRef<Path>) -> Result<Self, GatewayError> {
        Self::from_config(Config::from_file(path)?).await
    }

    /// Installs hooks (replacing the no-op default). Call before serving.
    #[must_use]
    pub fn with_hooks(self, hooks: Arc<dyn GatewayHooks>) -> Self {
        self.rebuild(|s| s.hooks = hooks)
    }

    /// Serves `/metrics` from this Prometheus handle.
    #[must_use]
    pub fn with_metrics(self, handle: PrometheusHandle) -> Self {
        self.rebuild(|s| s.metrics = Some(handle))
    }

    fn rebuild(self, change: impl FnOnce(&mut Shared)) -> Self {
        let mut shared = Shared {
            table: arc_swap::ArcSwap::new(self.shared.table.load_full()),
            hooks: Arc::clone(&self.shared.hooks),
            metrics: self.shared.metrics.clone(),
            admin: self.shared.admin,
            hsts: self.shared.hsts.clone(),
            https: self.shared.https,
        };
        change(&mut shared);
        Self {
            shared: Arc::new(shared),
            server: self.server,
            tls: self.tls,
            connections: self.connections,
            admin_connections: self.admin_connections,
        }
    }

    /// The listen address from the configuration.
    ///
    /// # Errors
    /// When `server.listen` is not `ip:port` (validation already refuses that).
    pub fn listen_addr(&self) -> Result<SocketAddr, GatewayError> {
        self.server.listen.parse().map_err(|_| {
            GatewayError::Config(ConfigError::Invalid {
                key: "server.listen".to_owned(),
                message: "expected ip:port".to_owned(),
            })
        })
    }

    /// The operator listener's address from `server.admin_listen`, when one is configured.
    ///
    /// # Errors
    /// When `server.admin_listen` is not `ip:port` (validation already refuses that).
    pub fn admin_listen_addr(&self) -> Result<Option<SocketAddr>, GatewayError> {
        self.server
            .admin_listen
            .as_deref()
            .map(|address| {
                address.parse().map_err(|_| {
                    GatewayError::Config(ConfigError::Invalid {
                        key: "server.admin_listen".to_owned(),
                        message: "expected ip:port".to_owned(),
                    })
                })
            })
            .transpose()
    }

    /// Binds `server.admin_listen`, when one is configured, for
    /// [`serve_admin`](Self::serve_admin); the listener's `local_addr` is the bound address
    /// (the port the system picked for `:0`).
    ///
    /// # Errors
    /// [`GatewayError::Io`] when the address cannot be bound.
    pub async fn bind_admin(&self) -> Result<Option<TcpListener>, GatewayError> {
        match self.admin_listen_addr()? {
            Some(address) => Ok(Some(TcpListener::bind(address).await?)),
            None => Ok(None),
        }
    }

    /// Swaps in routes, clusters, auth and rate-limit policies from `config`, and reads the
    /// TLS certificate and key files again (a renewed certificate). Requests in flight finish
    /// on the table they started with; the next request uses the new one, the next
    /// connection the new certificate. `[server]` settings (listener, header limits, the TLS
    /// file names) need a restart; the new ones are ignored.
    ///
    /// # Errors
    /// [`GatewayError::Config`] when the new configuration is invalid or the certificate
    /// files are unusable; the old configuration and certificate stay.
    pub async fn reload(&self, config: Config) -> Result<(), GatewayError> {
        let table = Table::build(&config).await?;
        if let Some(tls) = &self.tls {
            tls.reload()?;
        }
        self.shared.table.store(table);
        tracing::info!("gateway configuration reloaded");
        Ok(())
    }

    /// Re-reads `path` and [`reload`](Self::reload)s it: what SIGHUP does under [`run`].
    ///
    /// # Errors
    /// An unreadable or invalid file; the running configuration stays.
    pub async fn reload_from_file(&self, path: impl AsRef<Path>) -> Result<(), GatewayError> {
        self.reload(Config::from_file(path)?).await
    }

    /// Serves clients from `listener` until `shutdown` completes, then stops accepting, asks
    /// every connection to finish its in-flight requests, and waits for them up to
    /// `server.shutdown_grace_ms`.
    ///
    /// # Errors
    /// None today: accept errors are logged and retried. The `Result` leaves room for
    /// listener set-up errors.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), GatewayError> {
        let connections = Arc::clone(&self.connections);
        let max = self.server.max_connections;
        let tls = self.tls.clone();
        self.serve_surface(Surface::Public, listener, connections, max, tls, shutdown)
            .await
    }

    /// Serves the admin endpoints (`/healthz`, `/readyz`, `/metrics`) to operators from
    /// `listener` until `shutdown` completes; every other path answers 404. Meant for the
    /// address in `server.admin_listen` ([`bind_admin`](Self::bind_admin) binds it), next to
    /// [`serve`](Self::serve) or [`serve_threads`](Self::serve_threads) on the public
    /// listener, which then answers 404 for the admin paths. At most 64 operator
    /// connections are open at once, counted apart from the public listener's
    /// `max_connections` so neither can starve the other.
    ///
    /// # Errors
    /// None today, as [`serve`](Self::serve).
    pub async fn serve_admin(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), GatewayError> {
        let connections = Arc::clone(&self.admin_connections);
        self.serve_surface(
            Surface::Operator,
            listener,
            connections,
            ADMIN_CONNECTIONS_MAX,
            None,
            shutdown,
        )
        .await
    }

    async fn serve_surface(
        self,
        surface: Surface,
        listener: TcpListener,
        connections: Arc<Semaphore>,
        connections_max: usize,
        tls: Option<Arc<Tls>>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), GatewayError> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        let header_read_timeout = Duration::from_millis(self.server.header_read_timeout_ms);
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .max_headers(self.server.header_count_max)
            .max_buf_size(self.server.header_bytes_max.max(H1_BUFFER_BYTES_MIN))
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(self.server.header_bytes_max).unwrap_or(u32::MAX))
            .max_concurrent_streams(self.server.h2_streams_max)
            .keep_alive_interval(H2_KEEPALIVE_INTERVAL);
        let builder = Arc::new(builder);
        let (stop_tx, stop_rx) = watch::channel(false);
        let limit_reached = metrics::counter!("trellis_gateway_connection_limit_reached_total");
        tokio::pin!(shutdown);
        loop {
            // A slot first, then a connection: at the limit the gateway stops accepting, so
            // the kernel's backlog holds new clients (and refuses them once full) instead of
            // the gateway holding unbounded sockets, tasks and buffers.
            let permit = match Arc::clone(&connections).try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    limit_reached.increment(1);
                    tracing::debug!(
                        max = connections_max,
                        listener = ?surface,
                        "connection limit reached; accepting again once a connection closes"
                    );
                    tokio::select! {
                        () = &mut shutdown => break,
                        permit = Arc::clone(&connections).acquire_owned() => match permit {
                            Ok(permit) => permit,
                            // Never closed; stay total anyway.
                            Err(_closed) => break,
                        },
                    }
                }
            };
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        // The connection keeps the service scope the gateway runs in, so
                        // its spans carry the gateway's name when it shares a process
                        // (`trellis up`); see trellis_telemetry::service.
                        let serving = Serving {
                            shared: Arc::clone(&self.shared),
                            builder: Arc::clone(&builder),
                            header_read_timeout,
                            stop: stop_rx.clone(),
                            slot: ConnectionSlot::new(permit),
                            surface,
                        };
                        let acceptor = tls.as_ref().map(|tls| tls.acceptor());
                        tokio::spawn(
                            accept_connection(stream, peer, acceptor, serving)
                                .in_current_service(),
                        );
                    }
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    }
                },
            }
        }
        drop(listener);
        let _ = stop_tx.send(true);
        drop(stop_rx);
        let grace = Duration::from_millis(self.server.shutdown_grace_ms);
        if tokio::time::timeout(grace, stop_tx.closed()).await.is_err() {
            tracing::warn!(
                ?grace,
                "connections still open after the shutdown grace period"
            );
        }
        Ok(())
    }
}

impl Gateway {
    /// Serves clients from `listener` on `server.worker_threads` threads (0: one per CPU),
    /// each running its own single-threaded tokio runtime, accepting from the shared
    /// listener and forwarding through its own upstream connection pool, until `shutdown`
    /// completes; then every worker drains as [`serve`](Self::serve) does.
    ///
    /// Thread-per-core avoids waking another thread for each forwarded request (hyper's
    /// pooled client runs every upstream connection as a task of its own); routing table,
    /// breakers, rate limits and token caches stay shared. Call it from any tokio runtime: the
    /// waiting happens on a blocking thread.
    ///
    /// # Errors
    /// [`GatewayError::Io`] when the listener cannot be shared or a thread cannot start.
    pub async fn serve_threads(
        self,
        listener: std::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), GatewayError> {
        let workers = crate::proxy::resolve_workers(self.server.worker_threads);
        listener.set_nonblocking(true)?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut threads = Vec::with_capacity(workers);
        for index in 0..workers {
            let listener = listener.try_clone()?;
            let gateway = self.clone();
            let mut stop = stop_rx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("trellis-gateway-{index}"))
                .spawn(move || -> Result<(), GatewayError> {
                    crate::upstream::set_worker_index(index);
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    runtime.block_on(async move {
                        let listener = TcpListener::from_std(listener)?;
                        gateway
                            .serve(listener, async move {
                                let _ = stop.wait_for(|stopping| *stopping).await;
                            })
                            .await
                    })
                })?;
            threads.push(thread);
        }
        drop(listener);
        shutdown.await;
        let _ = stop_tx.send(true);
        let joined = tokio::task::spawn_blocking(move || {
            threads
                .into_iter()
                .map(|t| {
                    t.join().unwrap_or_else(|_| {
                        Err(GatewayError::Io(std::io::Error::other(
                            "a gateway worker panicked",
                        )))
                    })
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| GatewayError::Io(std::io::Error::other(e.to_string())))?;
        joined.into_iter().collect()
    }
}

/// An open client connection's place under `server.max_connections`: freed, and the open
/// connection gauge lowered, when the connection's task ends.
#[derive(Debug)]
struct ConnectionSlot {
    _permit: OwnedSemaphorePermit,
    open: metrics::Gauge,
}

impl ConnectionSlot {
    fn new(permit: OwnedSemaphorePermit) -> Self {
        let open = metrics::gauge!("trellis_gateway_connections_open");
        open.increment(1.0);
        Self {
            _permit: permit,
            open,
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.open.decrement(1.0);
    }
}

/// What serving one accepted connection needs.
struct Serving {
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    header_read_timeout: Duration,
    stop: watch::Receiver<bool>,
    slot: ConnectionSlot,
    surface: Surface,
}

/// Completes the TLS handshake, when the listener has TLS (within the header-read timeout:
/// a client that opens a connection and stalls the handshake is a slowloris too), then
/// serves the connection.
async fn accept_connection(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    serving: Serving,
) {
    let Some(acceptor) = acceptor else {
        return connection(stream, peer, serving).await;
    };
    match tokio::time::timeout(serving.header_read_timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => connection(tls, peer, serving).await,
        Ok(Err(error)) => {
            metrics::counter!("trellis_gateway_tls_handshake_failures_total").increment(1);
            tracing::debug!(%peer, %error, "TLS handshake failed");
        }
        Err(_) => {
            metrics::counter!("trellis_gateway_tls_handshake_failures_total").increment(1);
            tracing::debug!(%peer, "no TLS handshake within the header-read timeout; closing");
        }
    }
}

async fn connection<I>(io: I, peer: SocketAddr, serving: Serving)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Serving {
        shared,
        builder,
        header_read_timeout,
        mut stop,
        slot: _slot,
        surface,
    } = serving;
    let started = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&started);
    let service = hyper::service::service_fn(move |request| {
        seen.store(true, Ordering::Relaxed);
        let shared = Arc::clone(&shared);
        let mut traced = TraceContextServer::new(tower::service_fn(move |request| {
            let shared = Arc::clone(&shared);
            async move {
                Ok::<_, std::convert::Infallible>(match surface {
                    Surface::Public => handle(shared, peer, request).await,
                    Surface::Operator => handle_admin(&shared, request),
                })
            }
        }));
        traced.call(request)
    });
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    // hyper's header-read timer starts once it knows the protocol; a client that sends
    // nothing at all is cut off here.
    let first_request = tokio::time::sleep(header_read_timeout);
    tokio::pin!(first_request);
    let mut first_checked = false;
    let mut stopping = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "connection ended with an error");
                }
                return;
            }
            () = &mut first_request, if !first_checked => {
                first_checked = true;
                if !started.load(Ordering::Relaxed) {
                    tracing::debug!(%peer, "no request within the header-read timeout; closing");
                    return;
                }
            }
            changed = stop.changed(), if !stopping => {
                stopping = true;
                let _ = changed;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Runs the gateway from a configuration file until SIGINT or SIGTERM: installs the
/// Prometheus recorder, binds `server.listen`, reloads the file on SIGHUP (an invalid file is
/// logged and the running configuration kept), and drains connections on shutdown.
///
/// This is what `trellis gateway --config gateway.toml` calls. Logging/tracing set-up is the
/// caller's (`trellis_telemetry::init`).
///
/// # Errors
/// An unusable configuration, a port that cannot be bound, or a metrics recorder conflict.
pub async fn run(config_path: impl AsRef<Path>) -> Result<(), GatewayError> {
    run_on(config_path, None).await
}

/// As [`run`], listening on `listen` instead of the file's `server.listen` when given (the
/// `trellis gateway --listen` flag).
///
/// # Errors
/// As [`run`].
pub async fn run_on(
    config_path: impl AsRef<Path>,
    listen: Option<std::net::SocketAddr>,
) -> Result<(), GatewayError> {
    let path: PathBuf = config_path.as_ref().to_owned();
    let handle = trellis_telemetry::metrics::install_prometheus()?;
    let gateway = Gateway::from_file(&path).await?.with_metrics(handle);
    let address = match listen {
        Some(address) => address,
        None => gateway.listen_addr()?,
    };
    let listener = std::net::TcpListener::bind(address)?;
    tracing::info!(addr = %listener.local_addr()?, "gateway listening");
    let (stop_admin, admin_stopped) = watch::channel(false);
    let admin = match gateway.bind_admin().await? {
        Some(admin_listener) => {
            tracing::info!(addr = %admin_listener.local_addr()?, "operator listener (admin endpoints)");
            let mut stopped = admin_stopped;
            Some(tokio::spawn(gateway.clone().serve_admin(
                admin_listener,
                async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                },
            )))
        }
        None => None,
    };
    spawn_reload_on_sighup(gateway.clone(), path)?;
    let served = gateway.serve_threads(listener, shutdown_signal()).await;
    let _ = stop_admin.send(true);
    if let Some(admin) = admin {
        admin
            .await
            .map_err(|e| GatewayError::Io(std::io::Error::other(e.to_string())))??;
    }
    served
}

#[cfg(unix)]
fn spawn_reload_on_sighup(gateway: Gateway, path: PathBuf) -> Result<(), GatewayError> {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            if let Err(error) = gateway.reload_from_file(&path).await {
                tracing::error!(%error, "reload refused; the running configuration stays");
            }
        }
    });
    Ok(())
}

#[cfg(not(unix))]
fn spawn_reload_on_sighup(_gateway: Gateway, _path: PathBuf) -> Result<(), GatewayError> {
    Ok(())
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = term => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
