//! Who is calling: identity tokens the gateway and the services sign with the deployment's
//! service key, checked by every service before it believes anything about its caller.
//!
//! A service must not take the gateway's word on faith: its port may be reachable by any
//! process on the host or the network (`serve --listen 0.0.0.0`, `--peer` on other hosts). So
//! every request that claims an identity carries a short-lived token in
//! [`IDENTITY_HEADER`], an HS256 JWT signed with the [`ServiceKey`] the gateway and the
//! services of one deployment share:
//!
//! - the gateway, after it verified the user's own JWT, signs a token with the user's id and
//!   role ([`Signer::token`]); identity headers such as `x-user-id` are never read;
//! - a service calling another (gRPC) signs one naming itself, with the role
//!   [`ROLE_SERVICE`] ([`ServiceIdentity`], sent by [`ServiceIdentityClient`]);
//! - [`protect`] wraps a service's router: a REST request with a valid token gets a
//!   [`Caller`], one with an invalid token gets 401, one with none reaches only
//!   the public endpoints (every handler that extracts a `Caller` answers 401); a gRPC
//!   request needs a valid token with the service role, or gets `UNAUTHENTICATED`.
//!
//! Why a shared HMAC key rather than the user's JWT checked against the users service's
//! JWKS, or mTLS: one mechanism covers both the user's identity and the services' own, a check
//! costs a few microseconds and no network call, and it needs nothing but one secret to
//! distribute (`trellis up` makes one per start; `trellis serve` reads
//! [`SERVICE_KEY_ENV`] or the file [`SERVICE_KEY_FILE`] in its data directory, created by the
//! first process that needs it). What it does not give: a stolen key lets its holder claim any
//! identity, so the key is as sensitive as the databases, and a compromised service can
//! impersonate the others. Per-service asymmetric keys (or mTLS) would narrow that; see
//! docs/decisions/0009-service-identity.md.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::{ApiError, Caller, USER_ID_HEADER, USER_ROLE_HEADER};

/// The header an identity token travels in, on REST and gRPC calls alike.
pub const IDENTITY_HEADER: HeaderName = HeaderName::from_static("x-trellis-identity");
/// The kit's role for a service calling another service: what a [`ServiceIdentity`]'s tokens
/// carry, and the only role [`protect`] lets make gRPC calls.
pub const ROLE_SERVICE: &str = "service";
/// The environment variable `trellis serve` reads the service key from (at least
/// [`SERVICE_KEY_LEN_MIN`] bytes of text).
pub const SERVICE_KEY_ENV: &str = "TRELLIS_SERVICE_KEY";
/// The file in the data directory holding the service key when the variable is unset.
pub const SERVICE_KEY_FILE: &str = "service.key";
/// The shortest key accepted, in bytes: HS256 wants at least the hash's 32.
pub const SERVICE_KEY_LEN_MIN: usize = 32;
/// How long an identity token is valid after it was signed.
pub const TOKEN_TTL: Duration = Duration::from_secs(60);
/// Clock difference between two hosts that a token's expiry tolerates.
pub const CLOCK_LEEWAY: Duration = Duration::from_secs(5);
/// The audience every identity token names, so the tokens a deployment issues to its users
/// (the reference shop's have audience `trellis-shop`) can never pass for one even if signed
/// with the same secret.
const AUDIENCE: &str = "trellis-internal";
/// A service token is re-signed once it is this old, well before it expires.
const SERVICE_TOKEN_REFRESH: Duration = Duration::from_secs(30);

/// Why a key could not be loaded or a token not be made or checked.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The key is shorter than [`SERVICE_KEY_LEN_MIN`].
    #[error("the service key is {0} bytes long; it needs at least {SERVICE_KEY_LEN_MIN}")]
    KeyTooShort(usize),
    /// The key file could not be read or created.
    #[error("service key file {path}: {source}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// No randomness for a new key.
    #[error("no OS randomness for a new service key: {0}")]
    Randomness(String),
    /// The token is malformed, forged, expired or for another audience.
    #[error("the identity token is not valid: {0}")]
    InvalidToken(String),
    /// A token could not be signed (an internal bug: the claims always serialise).
    #[error("cannot sign an identity token: {0}")]
    Signing(String),
}

impl AuthError {
    /// Never: a bad key or token stays bad on a second try.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// The secret the gateway and the services of one deployment share to sign identity tokens.
#[derive(Clone)]
pub struct ServiceKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl std::fmt::Debug for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceKey").finish_non_exhaustive()
    }
}

impl ServiceKey {
    /// A key from secret bytes.
    ///
    /// # Errors
    /// [`AuthError::KeyTooShort`] under [`SERVICE_KEY_LEN_MIN`] bytes.
    pub fn from_secret(secret: &[u8]) -> Result<Self, AuthError> {
        if secret.len() < SERVICE_KEY_LEN_MIN {
            return Err(AuthError::KeyTooShort(secret.len()));
        }
        Ok(Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
        })
    }

    /// A new random key (32 bytes from the OS), for one process or a test.
    ///
    /// # Errors
    /// [`AuthError::Randomness`] when the OS has none to give.
    pub fn generate() -> Result<Self, AuthError> {
        Self::from_secret(random_hex()?.as_bytes())
    }

    /// The key from [`SERVICE_KEY_ENV`] when set, otherwise from `dir/`[`SERVICE_KEY_FILE`],
    /// which is created (mode 0600, 32 random bytes hex-encoded) when missing. Processes
    /// starting together agree on one file: each writes its own candidate and links it into
    /// place only if no file is there yet.
    ///
    /// # Errors
    /// [`AuthError`] when the variable or the file holds too short a key, or the file cannot
    /// be read or created.
    pub fn from_env_or_file(dir: &Path) -> Result<Self, AuthError> {
        if let Ok(text) = std::env::var(SERVICE_KEY_ENV) {
            return Self::from_secret(text.trim().as_bytes());
        }
        let path = dir.join(SERVICE_KEY_FILE);
        let file_err = |source| AuthError::KeyFile {
            path: path.clone(),
            source,
        };
        if !path.exists() {
            std::fs::create_dir_all(dir).map_err(file_err)?;
            let candidate = dir.join(format!(".{SERVICE_KEY_FILE}.{}", std::process::id()));
            write_private(&candidate, random_hex()?.as_bytes()).map_err(file_err)?;
            let linked = std::fs::hard_link(&candidate, &path);
            let _ = std::fs::remove_file(&candidate);
            match linked {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(file_err(e)),
            }
        }
        let text = std::fs::read_to_string(&path).map_err(file_err)?;
        Self::from_secret(text.trim().as_bytes())
    }

    /// A signer whose tokens name `issuer` (`gateway`, `service:orders`, …).
    pub fn signer(&self, issuer: impl Into<String>) -> Signer {
        Signer {
            key: self.encoding.clone(),
            issuer: issuer.into(),
        }
    }

    /// The identity `service` presents to the others, re-signed as it ages.
    pub fn service_identity(&self, service: &str) -> ServiceIdentity {
        ServiceIdentity {
            signer: self.signer(format!("service:{service}")),
            subject: format!("service:{service}"),
            cached: Arc::new(Mutex::new(None)),
        }
    }

    /// The checker of tokens signed with this key.
    pub fn verifier(&self) -> Verifier {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "aud", "sub"]);
        validation.leeway = CLOCK_LEEWAY.as_secs();
        Verifier {
            key: self.decoding.clone(),
            validation: Arc::new(validation),
        }
    }
}

fn random_hex() -> Result<String, AuthError> {
    let mut bytes = [0_u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| AuthError::Randomness(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// The claims of an identity token.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    role: String,
    aud: String,
    iat: u64,
    exp: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Signs identity tokens.
#[derive(Clone)]
pub struct Signer {
    key: EncodingKey,
    issuer: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A token saying `subject` with `role` is calling, valid for [`TOKEN_TTL`], as a header
    /// value for [`IDENTITY_HEADER`].
    ///
    /// # Errors
    /// [`AuthError::Signing`], which does not happen with the claims this makes.
    pub fn token(&self, subject: &str, role: &str) -> Result<HeaderValue, AuthError> {
        self.token_at(subject, role, unix_now())
    }

    fn token_at(&self, subject: &str, role: &str, now_s: u64) -> Result<HeaderValue, AuthError> {
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: subject.to_owned(),
            role: role.to_owned(),
            aud: AUDIENCE.to_owned(),
            iat: now_s,
            exp: now_s + TOKEN_TTL.as_secs(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.key)
            .map_err(|e| AuthError::Signing(e.to_string()))?;
        HeaderValue::from_str(&token).map_err(|e| AuthError::Signing(e.to_string()))
    }
}

/// A service's own identity: a token with the [`ROLE_SERVICE`] role, signed once and reused
/// until it is 30 seconds old (half its [`TOKEN_TTL`]).
#[derive(Debug, Clone)]
pub struct ServiceIdentity {
    signer: Signer,
    subject: String,
    cached: Arc<Mutex<Option<(HeaderValue, u64)>>>,
}

impl ServiceIdentity {
    /// The current token.
    ///
    /// # Errors
    /// As [`Signer::token`].
    pub fn token(&self) -> Result<HeaderValue, AuthError> {
        let now = unix_now();
        let mut cached = self
            .cached
            .lock()
            .expect("no code panics holding this lock");
        if let Some((token, signed_at)) = cached.as_ref()
            && now.saturating_sub(*signed_at) < SERVICE_TOKEN_REFRESH.as_secs()
        {
            return Ok(token.clone());
        }
        let token = self.signer.token_at(&self.subject, ROLE_SERVICE, now)?;
        *cached = Some((token.clone(), now));
        Ok(token)
    }
}

/// Checks identity tokens.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Arc<Validation>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").finish_non_exhaustive()
    }
}

impl Verifier {
    /// The caller a token names.
    ///
    /// # Errors
    /// [`AuthError::InvalidToken`] when it is malformed, signed with another key, expired or
    /// meant for another audience.
    pub fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| AuthError::InvalidToken(e.to_string()))?;
        if data.claims.sub.is_empty() {
            return Err(AuthError::InvalidToken("empty subject".to_owned()));
        }
        Ok(Caller {
            user_id: data.claims.sub,
            role: data.claims.role,
        })
    }

    /// The caller named by the request's [`IDENTITY_HEADER`]; `Ok(None)` without one.
    ///
    /// # Errors
    /// As [`verify`](Self::verify).
    pub fn verify_headers(&self, headers: &HeaderMap) -> Result<Option<Caller>, AuthError> {
        match headers.get(&IDENTITY_HEADER) {
            None => Ok(None),
            Some(value) => {
                let text = value
                    .to_str()
                    .map_err(|_| AuthError::InvalidToken("not ASCII".to_owned()))?;
                self.verify(text).map(Some)
            }
        }
    }
}

/// Wraps a service's router (REST and gRPC) so it believes only identities signed with `key`;
/// see the [module docs](self). Routes added to the router afterwards (`/healthz`,
/// `/readyz`) are not affected.
pub fn protect(router: Router, key: &ServiceKey) -> Router {
    router.layer(axum::middleware::from_fn_with_state(
        key.verifier(),
        authenticate,
    ))
}

/// Wraps an operator surface (a DLQ router, a console) so only a caller with the
/// [`ROLE_ADMIN`](crate::ROLE_ADMIN) role reaches it: 401 without a verified caller, 403 for
/// any other role. Put it inside [`protect`], which
/// verifies the caller. The `x-actor` header the routes may log is set to the administrator's
/// id, never taken as sent.
pub fn admin_only(router: Router) -> Router {
    router.layer(axum::middleware::from_fn(require_admin))
}

/// The header operator surfaces read to name who acted (trellis-bus's DLQ action log).
const ACTOR_HEADER: HeaderName = HeaderName::from_static("x-actor");

async fn require_admin(mut request: Request, next: Next) -> Response {
    let caller = request.extensions().get::<Caller>().cloned();
    match caller {
        None => ApiError::unauthenticated("this call needs an administrator's credential")
            .into_response(),
        Some(caller) => match caller.require_admin() {
            Err(e) => e.into_response(),
            Ok(()) => {
                match HeaderValue::from_str(&caller.user_id) {
                    Ok(actor) => request.headers_mut().insert(ACTOR_HEADER, actor),
                    Err(_) => request.headers_mut().remove(ACTOR_HEADER),
                };
                next.run(request).await
            }
        },
    }
}

fn is_grpc(request: &Request) -> bool {
    request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

async fn authenticate(
    State(verifier): State<Verifier>,
    mut request: Request,
    next: Next,
) -> Response {
    // Nothing after this layer may read identity headers as sent.
    request.headers_mut().remove(USER_ID_HEADER);
    request.headers_mut().remove(USER_ROLE_HEADER);
    let outcome = verifier.verify_headers(request.headers());
    if is_grpc(&request) {
        return match outcome {
            Ok(Some(caller)) if caller.role == ROLE_SERVICE => {
                request.extensions_mut().insert(caller);
                next.run(request).await
            }
            Ok(Some(caller)) => tonic::Status::permission_denied(format!(
                "{} is not a service; gRPC calls need a service identity",
                caller.user_id
            ))
            .into_http(),
            Ok(None) => {
                tonic::Status::unauthenticated("gRPC calls need a service identity").into_http()
            }
            Err(e) => tonic::Status::unauthenticated(e.to_string()).into_http(),
        };
    }
    match outcome {
        Ok(Some(caller)) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Ok(None) => next.run(request).await,
        Err(e) => ApiError::unauthenticated(e.to_string()).into_response(),
    }
}

/// Sends a [`ServiceIdentity`] with every request (the gRPC channels of
/// [`grpc_channel`](crate::grpc_channel) are wrapped in it).
#[derive(Debug, Clone)]
pub struct ServiceIdentityClient<S> {
    inner: S,
    identity: ServiceIdentity,
}

impl<S> ServiceIdentityClient<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, identity: ServiceIdentity) -> Self {
        Self { inner, identity }
    }
}

impl<S, B> tower::Service<http::Request<B>> for ServiceIdentityClient<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match self.identity.token() {
            Ok(token) => {
                request.headers_mut().insert(IDENTITY_HEADER, token);
            }
            // Cannot happen with the claims we sign; the callee then answers UNAUTHENTICATED.
            Err(error) => tracing::error!(%error, "no service identity for an outgoing call"),
        }
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ServiceKey {
        ServiceKey::from_secret(b"0123456789abcdef0123456789abcdef").expect("32 bytes")
    }

    #[test]
    fn a_token_names_the_caller_it_was_signed_for() {
        let token = key().signer("gateway").token("u1", "admin").expect("signs");
        let caller = key()
            .verifier()
            .verify(token.to_str().expect("ascii"))
            .expect("valid");
        assert_eq!(caller.user_id, "u1");
        assert!(caller.is_admin());
    }

    #[test]
    fn a_token_signed_with_another_key_is_refused() {
        let other = ServiceKey::from_secret(b"another key of thirty-two bytes!").expect("32 bytes");
        let token = other.signer("gateway").token("u1", "admin").expect("signs");
        let refused = key().verifier().verify(token.to_str().expect("ascii"));
        assert!(matches!(refused, Err(AuthError::InvalidToken(_))));
    }

    #[test]
    fn an_expired_token_is_refused() {
        let long_ago = unix_now() - TOKEN_TTL.as_secs() - CLOCK_LEEWAY.as_secs() - 10;
        let token = key()
            .signer("gateway")
            .token_at("u1", "customer", long_ago)
            .expect("signs");
        assert!(
            key()
                .verifier()
                .verify(token.to_str().expect("ascii"))
                .is_err()
        );
    }

    #[test]
    fn a_short_key_is_refused() {
        assert!(matches!(
            ServiceKey::from_secret(b"short"),
            Err(AuthError::KeyTooShort(5))
        ));
    }

    #[test]
    fn processes_sharing_a_data_directory_agree_on_one_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = ServiceKey::from_env_or_file(dir.path()).expect("creates");
        let second = ServiceKey::from_env_or_file(dir.path()).expect("reads");
        let token = first.signer("a").token("u1", "customer").expect("signs");
        assert!(
            second
                .verifier()
                .verify(token.to_str().expect("ascii"))
                .is_ok()
        );
    }
}
