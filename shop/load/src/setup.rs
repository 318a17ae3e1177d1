//! Before the run: customers registered and logged in, the catalogue listed, the admin logged in.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use shop_contracts::api::{ProductPage, RegisterUser, TokenRequest, TokenResponse, UserView};

use crate::client::{Api, Failure};
use crate::{LoadConfig, LoadError};

/// Most products kept from the listing.
pub(crate) const PRODUCTS_MAX: usize = 1_000;
/// Most listing pages read (a server that pages by one item cannot keep setup busy forever).
const PRODUCT_PAGES_MAX: usize = 200;
/// Most cursors and search words kept for browsing.
const BROWSE_SAMPLES_MAX: usize = 32;
/// Registrations and logins in flight at once (password hashing is deliberately slow).
const SETUP_CONCURRENCY: usize = 8;
/// Attempts of one setup call on a transient failure.
const SETUP_ATTEMPTS: u32 = 3;
/// Attempts of one setup call the shop keeps answering 429: the gateway limits logins and
/// registrations per address to a share of the hashing capacity, so registering many customers
/// from one machine is paced by it rather than failed.
const SETUP_ATTEMPTS_RATE_LIMITED: u32 = 30;
/// First back-off between setup attempts; doubles.
const SETUP_BACKOFF: Duration = Duration::from_millis(200);
/// Longest back-off between setup attempts.
const SETUP_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// A customer of the run.
#[derive(Debug)]
pub(crate) struct User {
    pub(crate) email: String,
    password: String,
    token: RwLock<String>,
}

impl User {
    /// The current access token.
    pub(crate) fn token(&self) -> String {
        self.token.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_token(&self, token: String) {
        *self.token.write().unwrap_or_else(|e| e.into_inner()) = token;
    }
}

/// What setup produced.
#[derive(Debug)]
pub(crate) struct World {
    pub(crate) users: Vec<Arc<User>>,
    pub(crate) admin: Option<Arc<User>>,
    /// Ids of products with `available > 0`.
    pub(crate) products: Vec<String>,
    /// `next_cursor` values seen while listing.
    pub(crate) cursors: Vec<String>,
    /// Words from product names, for `q=`.
    pub(crate) words: Vec<String>,
    /// Shortest token lifetime seen.
    pub(crate) token_lifetime: Duration,
}

fn transient(f: &Failure) -> bool {
    matches!(
        f,
        Failure::Status(429 | 502 | 503 | 504)
            | Failure::Timeout
            | Failure::Connect
            | Failure::Transport
    )
}

fn attempts_for(f: &Failure) -> u32 {
    if matches!(f, Failure::Status(429)) {
        SETUP_ATTEMPTS_RATE_LIMITED
    } else {
        SETUP_ATTEMPTS
    }
}

/// Retries `call` on transient failures, with back-off.
async fn retrying<T, F, Fut>(mut call: F) -> Result<T, Failure>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    let mut attempt = 1;
    loop {
        match call(attempt).await {
            Err(f) if transient(&f) && attempt < attempts_for(&f) => {
                let backoff = SETUP_BACKOFF.saturating_mul(2u32.saturating_pow(attempt - 1));
                tokio::time::sleep(backoff.min(SETUP_BACKOFF_MAX)).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Logs `email` in; the token and its lifetime.
pub(crate) async fn login(
    api: &Api,
    email: &str,
    password: &str,
) -> Result<(String, Duration), Failure> {
    let body = TokenRequest {
        email: email.into(),
        password: password.into(),
    };
    let body = &body;
    let token: TokenResponse = retrying(move |_| async move {
        api.post("/api/auth/token", None, None, body)
            .await?
            .json(&[200])
    })
    .await?;
    Ok((token.access_token, Duration::from_secs(token.expires_in)))
}

async fn register(api: &Api, email: String, password: String) -> Result<(User, Duration), Failure> {
    let body = RegisterUser {
        email: email.clone(),
        password: password.clone(),
        name: "load test customer".into(),
    };
    let body = &body;
    retrying(move |attempt| async move {
        let answer = api.post("/api/users", None, None, body).await?;
        // A retry after a lost answer finds the account made: the email is unique to this run.
        if answer.status == 409 && attempt > 1 {
            return Ok(());
        }
        answer.json::<UserView>(&[200, 201]).map(|_| ())
    })
    .await?;
    let (token, lifetime) = login(api, &email, &password).await?;
    Ok((
        User {
            email,
            password,
            token: RwLock::new(token),
        },
        lifetime,
    ))
}

/// Registers and logs in the customers, logs the admin in, lists the catalogue.
pub(crate) async fn run(
    api: &Api,
    config: &LoadConfig,
    rng: &mut fastrand::Rng,
) -> Result<World, LoadError> {
    let mut token_lifetime = Duration::from_secs(3600);
    let admin = match (&config.admin_email, &config.admin_password) {
        (Some(email), Some(password)) => {
            let (token, lifetime) = login(api, email, password).await.map_err(|f| {
                LoadError::setup(
                    "admin login",
                    format!("POST /api/auth/token as {email}: {f}"),
                )
            })?;
            token_lifetime = token_lifetime.min(lifetime);
            Some(Arc::new(User {
                email: email.clone(),
                password: password.clone(),
                token: RwLock::new(token),
            }))
        }
        _ => None,
    };

    // Unique to this run: time plus randomness, so runs against one shop never collide.
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let run_id = format!("{millis:x}{:06x}", rng.u32(..0x100_0000));
    let mut pending = (0..config.users).map(|i| {
        let email = format!("load-{run_id}-{i}@load.trellis.test");
        let password = format!("load-{:016x}", rng.u64(..));
        (email, password)
    });
    let mut tasks = tokio::task::JoinSet::new();
    let mut users: Vec<(usize, Arc<User>)> = Vec::with_capacity(config.users);
    let mut index = 0usize;
    loop {
        while tasks.len() < SETUP_CONCURRENCY {
            let Some((email, password)) = pending.next() else {
                break;
            };
            let api = api.clone();
            let i = index;
            index += 1;
            tasks.spawn(async move {
                let shown = email.clone();
                (i, shown, register(&api, email, password).await)
            });
        }
        let Some(joined) = tasks.join_next().await else {
            break;
        };
        let (i, email, result) = joined.map_err(|e| LoadError::setup("register", e.to_string()))?;
        let (user, lifetime) = result.map_err(|f| {
            LoadError::setup(
                "register",
                format!("POST /api/users + /api/auth/token for {email}: {f}"),
            )
        })?;
        token_lifetime = token_lifetime.min(lifetime);
        users.push((i, Arc::new(user)));
    }
    users.sort_by_key(|(i, _)| *i);
    let users = users.into_iter().map(|(_, u)| u).collect();

    let mut products = Vec::new();
    let mut cursors = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut listed = 0usize;
    let mut cursor: Option<String> = None;
    for _ in 0..PRODUCT_PAGES_MAX {
        let limit = shop_contracts::api::PAGE_LIMIT_MAX.to_string();
        let mut query = vec![("limit", limit.as_str())];
        if let Some(c) = &cursor {
            query.push(("cursor", c.as_str()));
        }
        let page: ProductPage = retrying(|_| {
            let query = query.clone();
            async move { api.get("/api/products", &query, None).await?.json(&[200]) }
        })
        .await
        .map_err(|f| LoadError::setup("products", format!("GET /api/products: {f}")))?;
        for p in page.items {
            if listed >= PRODUCTS_MAX {
                break;
            }
            listed += 1;
            if p.available > 0 {
                products.push(p.id);
            }
            if words.len() < BROWSE_SAMPLES_MAX
                && let Some(word) = p.name.split_whitespace().next()
            {
                let word: String = word
                    .chars()
                    .filter(|c| c.is_alphanumeric())
                    .collect::<String>()
                    .to_lowercase();
                if !word.is_empty() && !words.contains(&word) {
                    words.push(word);
                }
            }
        }
        match page.next_cursor {
            Some(next) if listed < PRODUCTS_MAX && !next.is_empty() => {
                if cursors.len() < BROWSE_SAMPLES_MAX {
                    cursors.push(next.clone());
                }
                cursor = Some(next);
            }
            _ => break,
        }
    }
    if config.mix.order > 0 && products.is_empty() {
        return Err(LoadError::setup(
            "products",
            format!(
                "none of the {listed} products listed by GET /api/products has available > 0, \
                 so no order can be placed; create stock first (POST /api/products or \
                 PUT /api/inventory/{{id}} as admin) or set the order weight to 0"
            ),
        ));
    }
    Ok(World {
        users,
        admin,
        products,
        cursors,
        words,
        token_lifetime,
    })
}

/// Renews every token at half its lifetime (at least every 30 s, at most every 30 min), so
/// runs longer than a token's life keep working. Runs until aborted.
pub(crate) async fn refresh_tokens(api: Api, users: Vec<Arc<User>>, lifetime: Duration) {
    let every = (lifetime / 2).clamp(Duration::from_secs(30), Duration::from_secs(1800));
    loop {
        tokio::time::sleep(every).await;
        for user in &users {
            match login(&api, &user.email, &user.password).await {
                Ok((token, _)) => user.set_token(token),
                Err(f) => tracing::warn!(email = %user.email, failure = %f, "token refresh failed"),
            }
        }
    }
}
