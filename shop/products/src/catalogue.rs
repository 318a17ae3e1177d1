//! The products table and the idempotency keys of product creation.

use std::collections::HashMap;

use sqlx::Row;
use trellis_service::{Db, on_db};

/// Tables of the products service (DDL both engines accept).
pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS products (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    name_lower TEXT NOT NULL,
    price_cents BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS product_idempotency (
    idempotency_key TEXT PRIMARY KEY,
    request TEXT NOT NULL,
    product_id TEXT NOT NULL,
    stock_set BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
";

/// A stored product.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Product {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) price_cents: i64,
}

/// What an idempotency key already recorded.
#[derive(Debug, Clone)]
pub(crate) struct KeyRecord {
    pub(crate) request: String,
    pub(crate) product: Product,
    pub(crate) stock_set: bool,
}

/// The outcome of [`create`].
#[derive(Debug)]
pub(crate) enum Created {
    /// A new product.
    New(Product),
    /// The key was used before.
    Existing(KeyRecord),
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn product_from(row: &impl ProductRow) -> Product {
    row.product()
}

/// Reads a product from either engine's row type.
trait ProductRow {
    fn product(&self) -> Product;
}

impl ProductRow for sqlx::sqlite::SqliteRow {
    fn product(&self) -> Product {
        Product {
            id: self.get("id"),
            name: self.get("name"),
            price_cents: self.get("price_cents"),
        }
    }
}

impl ProductRow for sqlx::postgres::PgRow {
    fn product(&self) -> Product {
        Product {
            id: self.get("id"),
            name: self.get("name"),
            price_cents: self.get("price_cents"),
        }
    }
}

/// What an idempotency key recorded, if anything.
pub(crate) async fn key_record(db: &Db, key: &str) -> Result<Option<KeyRecord>, sqlx::Error> {
    on_db!(db, |pool| sqlx::query(
        "SELECT k.request, k.stock_set, p.id, p.name, p.price_cents \
         FROM product_idempotency k JOIN products p ON p.id = k.product_id \
         WHERE k.idempotency_key = $1"
    )
    .bind(key)
    .fetch_optional(pool)
    .await
    .map(|row| row.map(|row| KeyRecord {
        request: row.get("request"),
        stock_set: row.get::<i64, _>("stock_set") != 0,
        product: product_from(&row),
    })))
}

/// Inserts a product, and with a key records the key in the same transaction. A key used
/// before (also by a concurrent call) answers what it recorded instead.
pub(crate) async fn create(
    db: &Db,
    name: &str,
    price_cents: i64,
    key: Option<(&str, &str)>,
) -> Result<Created, sqlx::Error> {
    let product = Product {
        id: uuid::Uuid::now_v7().to_string(),
        name: name.to_owned(),
        price_cents,
    };
    let inserted = on_db!(db, |pool, begin| {
        let mut tx = pool.begin_with(begin).await?;
        let mut fresh = true;
        if let Some((key, request)) = key {
            fresh = sqlx::query(
                "INSERT INTO product_idempotency \
                 (idempotency_key, request, product_id, stock_set, created_at) \
                 VALUES ($1, $2, $3, 0, $4) ON CONFLICT (idempotency_key) DO NOTHING",
            )
            .bind(key)
            .bind(request)
            .bind(&product.id)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
        }
        if fresh {
            sqlx::query(
                "INSERT INTO products (id, name, name_lower, price_cents, created_at) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&product.id)
            .bind(&product.name)
            .bind(product.name.to_lowercase())
            .bind(product.price_cents)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        } else {
            tx.rollback().await?;
        }
        fresh
    });
    if inserted {
        return Ok(Created::New(product));
    }
    let (key, _) = key.expect("only a key can conflict");
    match key_record(db, key).await? {
        Some(record) => Ok(Created::Existing(record)),
        None => Err(sqlx::Error::RowNotFound),
    }
}

/// Records that the stock of a key's product was set.
pub(crate) async fn mark_stock_set(db: &Db, key: &str) -> Result<(), sqlx::Error> {
    on_db!(db, |pool| sqlx::query(
        "UPDATE product_idempotency SET stock_set = 1 WHERE idempotency_key = $1"
    )
    .bind(key)
    .execute(pool)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(())
}

/// One product.
pub(crate) async fn find(db: &Db, id: &str) -> Result<Option<Product>, sqlx::Error> {
    on_db!(db, |pool| sqlx::query(
        "SELECT id, name, price_cents FROM products WHERE id = $1"
    )
    .bind(id)
    .fetch_optional(pool)
    .await
    .map(|row| row.map(|row| product_from(&row))))
}

/// Escapes `%`, `_` and `\` for a `LIKE … ESCAPE '\'` pattern.
pub(crate) fn like_pattern(needle: &str) -> String {
    let mut pattern = String::with_capacity(needle.len() + 2);
    pattern.push('%');
    for c in needle.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

/// Up to `limit` products after `after` (an id), whose lowercased name contains `needle`
/// (already lowercased), in id order.
pub(crate) async fn list(
    db: &Db,
    after: Option<&str>,
    needle: Option<&str>,
    limit: u32,
) -> Result<Vec<Product>, sqlx::Error> {
    let mut conditions = Vec::new();
    let mut binds: Vec<String> = Vec::new();
    if let Some(after) = after {
        binds.push(after.to_owned());
        conditions.push(format!("id > ${}", binds.len()));
    }
    if let Some(needle) = needle {
        binds.push(like_pattern(needle));
        conditions.push(format!("name_lower LIKE ${} ESCAPE '\\'", binds.len()));
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    };
    let sql = format!(
        "SELECT id, name, price_cents FROM products {filter} ORDER BY id LIMIT {}",
        i64::from(limit)
    );
    on_db!(db, |pool| {
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()));
        for value in &binds {
            query = query.bind(value);
        }
        query
            .fetch_all(pool)
            .await
            .map(|rows| rows.iter().map(product_from).collect())
    })
}

/// The products with these ids, by id (missing ones absent).
pub(crate) async fn by_ids(
    db: &Db,
    ids: &[String],
) -> Result<HashMap<String, Product>, sqlx::Error> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let placeholders: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
    let sql = format!(
        "SELECT id, name, price_cents FROM products WHERE id IN ({})",
        placeholders.join(", ")
    );
    on_db!(db, |pool| {
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()));
        for id in ids {
            query = query.bind(id);
        }
        query.fetch_all(pool).await.map(|rows| {
            rows.iter()
                .map(|r| {
                    let p = product_from(r);
                    (p.id.clone(), p)
                })
                .collect()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_wildcards_are_escaped() {
        assert_eq!(like_pattern("50%_off\\"), "%50\\%\\_off\\\\%");
    }
}
