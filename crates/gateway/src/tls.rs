//! TLS on the public listener: rustls with ring (no C build, and the rustls async-nats
//! already brings), a certificate chain and key read from PEM files and read again on every
//! configuration reload, ALPN `h2` and `http/1.1`.
//!
//! Why rustls and not a TLS-terminating proxy in front: the gateway's per-address limits key
//! on the TCP peer, which a proxy in front would make one address for every client.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderValue;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;
use crate::error::ConfigError;

/// The listener's TLS: the running certificate (swapped on reload) and the HSTS header.
#[derive(Debug)]
pub(crate) struct Tls {
    cert_file: String,
    key_file: String,
    current: ArcSwap<ServerConfig>,
    /// `Strict-Transport-Security`, unless its max-age is 0.
    pub(crate) hsts: Option<HeaderValue>,
}

impl Tls {
    /// Reads the certificate and key.
    ///
    /// # Errors
    /// [`ConfigError::Key`] naming `server.tls` and why the files are unusable.
    pub(crate) fn load(config: &TlsConfig) -> Result<Self, ConfigError> {
        let current = server_config(&config.cert_file, &config.key_file)?;
        let hsts = (config.hsts_max_age_s > 0).then(|| {
            HeaderValue::from_str(&format!("max-age={}", config.hsts_max_age_s))
                .expect("digits are a valid header value")
        });
        Ok(Self {
            cert_file: config.cert_file.clone(),
            key_file: config.key_file.clone(),
            current: ArcSwap::new(current),
            hsts,
        })
    }

    /// Reads the files again and serves the new certificate to new connections; on error the
    /// running one stays.
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub(crate) fn reload(&self) -> Result<(), ConfigError> {
        let next = server_config(&self.cert_file, &self.key_file)?;
        self.current.store(next);
        tracing::info!(cert_file = %self.cert_file, "TLS certificate reloaded");
        Ok(())
    }

    /// The acceptor for a new connection.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }
}

fn server_config(cert_file: &str, key_file: &str) -> Result<Arc<ServerConfig>, ConfigError> {
    let fail = |message: String| ConfigError::Key {
        key: "server.tls".to_owned(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(Path::new(cert_file))
        .map_err(|e| fail(format!("cannot read {cert_file}: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(format!("{cert_file}: {e}")))?;
    if certs.is_empty() {
        return Err(fail(format!("{cert_file} holds no certificate")));
    }
    let key = PrivateKeyDer::from_pem_file(Path::new(key_file))
        .map_err(|e| fail(format!("cannot read a private key from {key_file}: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| fail(format!("{cert_file} and {key_file}: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
