//! `[server]`: the listener and the limits it enforces on clients.

use std::net::SocketAddr;

use serde::Deserialize;

use crate::error::ConfigError;

use super::HSTS_MAX_AGE_S_DEFAULT;
use super::{
    BODY_BYTES_MAX_CEILING, BODY_BYTES_MAX_DEFAULT, CONNECTIONS_MAX_CEILING,
    CONNECTIONS_MAX_DEFAULT, H2_STREAMS_MAX_DEFAULT, HEADER_BYTES_MAX_DEFAULT,
    HEADER_COUNT_MAX_DEFAULT, HEADER_READ_TIMEOUT_MS_DEFAULT, LISTEN_DEFAULT,
    RESPONSE_BODY_IDLE_TIMEOUT_MS_DEFAULT, RESPONSE_BODY_TIMEOUT_MS_DEFAULT,
    ROUTE_TIMEOUT_MS_DEFAULT, SHUTDOWN_GRACE_MS_DEFAULT, TIMEOUT_MS_CEILING, WORKER_THREADS_MAX,
    invalid, range,
};

/// `[server]`: the listener and the limits it enforces on clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on, `ip:port`.
    pub listen: String,
    /// Time a client has to send its request headers (slowloris defence), milliseconds.
    pub header_read_timeout_ms: u64,
    /// Largest total size of request headers, bytes.
    pub header_bytes_max: usize,
    /// Most request headers.
    pub header_count_max: usize,
    /// Default request body limit, bytes.
    pub body_bytes_max: u64,
    /// Default route timeout, milliseconds: from the request to the upstream's response
    /// headers, retries included.
    pub timeout_ms: u64,
    /// Default time the upstream has to send the whole response body once its headers
    /// arrived, milliseconds. When it passes (or the idle timeout below does), the response,
    /// already started, cannot change status: the client connection is aborted (HTTP/1.1) or
    /// the stream reset (HTTP/2), the upstream connection is dropped, and
    /// `trellis_gateway_upstream_body_timeouts_total` counts it.
    pub response_body_timeout_ms: u64,
    /// Default longest pause between two pieces of the upstream response body, milliseconds.
    pub response_body_idle_timeout_ms: u64,
    /// Time in-flight requests get on shutdown, milliseconds.
    pub shutdown_grace_ms: u64,
    /// Most concurrent HTTP/2 streams per client connection.
    pub h2_streams_max: u32,
    /// Most client connections open at once, across every worker thread. At the limit the
    /// gateway stops accepting: new connections wait in the kernel's listen backlog (which
    /// refuses them once it is full) and are served as open ones close.
    /// `trellis_gateway_connections_open` shows the count and
    /// `trellis_gateway_connection_limit_reached_total` how often accepting had to wait.
    pub max_connections: usize,
    /// Serve the admin endpoints `/healthz`, `/readyz` and `/metrics`. Without
    /// `admin_listen` they are served on the public listener, to anyone who can reach it
    /// (kept for compatibility; set `admin_listen` to keep them private).
    pub admin_endpoints: bool,
    /// A separate operator listener, `ip:port` (e.g. `127.0.0.1:9080`). When set, the admin
    /// endpoints are served only there ([`Gateway::serve_admin`](crate::Gateway::serve_admin);
    /// [`run`](crate::run) binds it) and the public listener answers 404 for their paths.
    /// Needs `admin_endpoints = true`.
    pub admin_listen: Option<String>,
    /// Worker threads of [`run`](crate::run), each with its own single-threaded runtime and
    /// upstream connection pool; 0 = one per CPU.
    pub worker_threads: usize,
    /// `[server.tls]`: serve HTTPS on the public listener (the operator listener stays plain
    /// HTTP: keep it on a private address).
    pub tls: Option<TlsConfig>,
}

/// `[server.tls]`: the public listener's certificate and key.
///
/// Both files are read at start and again on every configuration reload (SIGHUP under
/// [`run`](crate::run)), so a renewed certificate is served without a restart; a reload
/// whose files cannot be read or do not match keeps the running certificate. ALPN offers
/// HTTP/2 and HTTP/1.1. TLS 1.2 and 1.3 with rustls's safe defaults (ring).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
    /// `Strict-Transport-Security: max-age=…` on every answer, seconds; 0 sends none.
    #[serde(default = "default_hsts_max_age_s")]
    pub hsts_max_age_s: u64,
}

fn default_hsts_max_age_s() -> u64 {
    HSTS_MAX_AGE_S_DEFAULT
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: LISTEN_DEFAULT.to_owned(),
            header_read_timeout_ms: HEADER_READ_TIMEOUT_MS_DEFAULT,
            header_bytes_max: HEADER_BYTES_MAX_DEFAULT,
            header_count_max: HEADER_COUNT_MAX_DEFAULT,
            body_bytes_max: BODY_BYTES_MAX_DEFAULT,
            timeout_ms: ROUTE_TIMEOUT_MS_DEFAULT,
            response_body_timeout_ms: RESPONSE_BODY_TIMEOUT_MS_DEFAULT,
            response_body_idle_timeout_ms: RESPONSE_BODY_IDLE_TIMEOUT_MS_DEFAULT,
            shutdown_grace_ms: SHUTDOWN_GRACE_MS_DEFAULT,
            h2_streams_max: H2_STREAMS_MAX_DEFAULT,
            max_connections: CONNECTIONS_MAX_DEFAULT,
            admin_endpoints: true,
            admin_listen: None,
            worker_threads: 0,
            tls: None,
        }
    }
}

impl ServerConfig {
    /// Checks addresses and ranges; keys start with `server.`.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let s = self;
        s.listen
            .parse::<SocketAddr>()
            .map_err(|_| invalid("server.listen", "expected ip:port, e.g. 127.0.0.1:8080"))?;
        if let Some(admin) = &s.admin_listen {
            admin.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "server.admin_listen",
                    "expected ip:port, e.g. 127.0.0.1:9080",
                )
            })?;
            if !s.admin_endpoints {
                return Err(invalid(
                    "server.admin_listen",
                    "an operator listener needs `admin_endpoints = true`",
                ));
            }
        }
        range(
            "server.header_read_timeout_ms",
            s.header_read_timeout_ms,
            1,
            TIMEOUT_MS_CEILING,
        )?;
        range("server.timeout_ms", s.timeout_ms, 1, TIMEOUT_MS_CEILING)?;
        if let Some(tls) = &s.tls {
            if tls.cert_file.trim().is_empty() || tls.key_file.trim().is_empty() {
                return Err(invalid(
                    "server.tls",
                    "needs `cert_file` and `key_file` (PEM files)",
                ));
            }
            range(
                "server.tls.hsts_max_age_s",
                tls.hsts_max_age_s,
                0,
                2 * HSTS_MAX_AGE_S_DEFAULT,
            )?;
        }
        range(
            "server.response_body_timeout_ms",
            s.response_body_timeout_ms,
            1,
            TIMEOUT_MS_CEILING,
        )?;
        range(
            "server.response_body_idle_timeout_ms",
            s.response_body_idle_timeout_ms,
            1,
            TIMEOUT_MS_CEILING,
        )?;
        range(
            "server.shutdown_grace_ms",
            s.shutdown_grace_ms,
            0,
            TIMEOUT_MS_CEILING,
        )?;
        range(
            "server.header_bytes_max",
            s.header_bytes_max as u64,
            1024,
            1024 * 1024,
        )?;
        range(
            "server.header_count_max",
            s.header_count_max as u64,
            8,
            1000,
        )?;
        range(
            "server.body_bytes_max",
            s.body_bytes_max,
            0,
            BODY_BYTES_MAX_CEILING,
        )?;
        range(
            "server.h2_streams_max",
            u64::from(s.h2_streams_max),
            1,
            10_000,
        )?;
        range(
            "server.max_connections",
            s.max_connections as u64,
            1,
            CONNECTIONS_MAX_CEILING as u64,
        )?;
        range(
            "server.worker_threads",
            s.worker_threads as u64,
            0,
            WORKER_THREADS_MAX as u64,
        )?;
        Ok(())
    }
}
