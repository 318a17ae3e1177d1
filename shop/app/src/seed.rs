//! What a new shop starts with: the administrator account and the seed catalog, shared by
//! `up` and `serve`.

#[allow(clippy::wildcard_imports)]
use super::*;

pub(crate) async fn ensure_admin(
    db: &Db,
    given: Option<(String, String)>,
) -> Result<AdminAccount, Error> {
    let (email, password, generated) = match given {
        Some((email, password)) => (email, password, false),
        None => (
            "admin@trellis.local".to_owned(),
            generated_password()?,
            true,
        ),
    };
    let created = shop_users::ensure_admin(db, &email, &password, "Admin")
        .await
        .map_err(|e| service_err("users")(&e))?;
    Ok(AdminAccount {
        password: (created || !generated).then_some(password),
        email,
        created,
        generated,
    })
}

/// 16 random bytes from the OS, hex-encoded.
fn generated_password() -> Result<String, Error> {
    let mut bytes = [0_u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| Error::Service {
        service: "users",
        message: format!("no randomness for the admin password: {e}"),
    })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The catalog a first start creates.
pub const CATALOG: &[(&str, i64, i64)] = &[
    ("Trellis mug", 1_200, 500),
    ("Circuit breaker t-shirt", 2_500, 300),
    ("Saga sticker pack", 400, 1_000),
    ("Event-sourced notebook", 1_800, 200),
    ("Idempotent hoodie", 5_500, 100),
];

/// What [`seed_catalog_at`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seeded {
    /// The catalog was empty; the seed [`CATALOG`] was created.
    Created,
    /// The catalog had products already; nothing was created.
    AlreadyStocked,
}

/// Pause between two tries of a seeding call that found the products service (or the
/// inventory behind it) not answering yet.
const SEED_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// Creates the seed [`CATALOG`] through the products service at `products_url`
/// (`http://host:port`), as an administrator signed with `service_key`, when its catalog is
/// empty. Never twice: a catalog with any product is left alone, and each seed product is
/// created under its own idempotency key, so a repeat after a partial run answers the first
/// result. Each call is tried up to `tries` times, a second apart, while the service (or the
/// inventory it sets stock through) does not answer: `trellis serve products --seed-catalog`
/// may start before them.
///
/// # Errors
/// [`Error::Service`] naming the call that kept failing or was refused.
pub async fn seed_catalog_at(
    products_url: &str,
    service_key: &ServiceKey,
    tries: u32,
) -> Result<Seeded, Error> {
    let err = |e: &dyn std::fmt::Display| Error::Service {
        service: "products",
        message: format!("seeding the catalog: {e}"),
    };
    let admin_token = service_key
        .signer("seed-catalog")
        .token("seed-catalog", trellis_service::ROLE_ADMIN)
        .map_err(|e| err(&e))?;
    let client = reqwest_client().map_err(|e| err(&e))?;
    let tries = tries.max(1);
    // One call, tried again on a connection error or a 5xx.
    let call = |request: reqwest::RequestBuilder| async move {
        let mut last = String::new();
        for attempt in 1..=tries {
            let request = request
                .try_clone()
                .expect("the seeding requests have plain bodies");
            match request.send().await {
                Ok(response) if response.status().is_server_error() => {
                    last = format!("{}", response.status());
                }
                Ok(response) => return Ok(response),
                Err(e) => last = e.to_string(),
            }
            if attempt < tries {
                tokio::time::sleep(SEED_RETRY_PAUSE).await;
            }
        }
        Err(last)
    };
    let page: serde_json::Value = call(client.get(format!("{products_url}/api/products?limit=1")))
        .await
        .map_err(|e| err(&e))?
        .json()
        .await
        .map_err(|e| err(&e))?;
    if page["items"]
        .as_array()
        .is_some_and(|items| !items.is_empty())
    {
        return Ok(Seeded::AlreadyStocked);
    }
    for (i, (name, price_cents, stock)) in CATALOG.iter().enumerate() {
        let request = client
            .post(format!("{products_url}/api/products"))
            .header(IDENTITY_HEADER, admin_token.clone())
            .header("idempotency-key", format!("seed-catalog-{i}"))
            .json(&serde_json::json!({"name": name, "price_cents": price_cents, "stock": stock}));
        let response = call(request).await.map_err(|e| err(&e))?;
        if !response.status().is_success() {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            return Err(err(&format!("{status}: {body}")));
        }
    }
    Ok(Seeded::Created)
}

fn reqwest_client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
}
