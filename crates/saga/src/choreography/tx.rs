//! [`Tx`]: the inbox transaction's connection on either database, and [`on_tx!`](crate::on_tx).

use sqlx::{PgConnection, SqliteConnection};

/// The inbox transaction's connection on either database, as
/// [`ChoreographyDb::tx`](super::ChoreographyDb::tx) gives it to an effect declared once for
/// both (in a function generic over `D: ChoreographyDb`). Write the effect's SQL once with
/// [`on_tx!`](crate::on_tx), which compiles it for each arm, using `$1` placeholders and the
/// SQL both engines accept.
#[derive(Debug)]
pub enum Tx<'t> {
    /// A SQLite connection, inside the inbox's `BEGIN IMMEDIATE` transaction.
    Sqlite(&'t mut SqliteConnection),
    /// A PostgreSQL connection, inside the inbox's transaction.
    Postgres(&'t mut PgConnection),
}

impl Tx<'_> {
    /// The same connection for a shorter borrow, to pass it to several helpers in turn.
    pub fn reborrow(&mut self) -> Tx<'_> {
        match self {
            Self::Sqlite(connection) => Tx::Sqlite(connection),
            Self::Postgres(connection) => Tx::Postgres(connection),
        }
    }
}

/// Runs `body` with `$connection` bound to the connection inside a [`Tx`], compiled once per
/// database (as `trellis_service::on_db!` does for pools); both arms must give one type.
///
/// # Examples
/// ```
/// use trellis_saga::choreography::{Choreography, ChoreographyDb, NextEvent};
/// use trellis_saga::on_tx;
///
/// /// On `order.placed`, hold the order's stock in the inbox's transaction.
/// fn flow<D: ChoreographyDb>() -> Choreography<D> {
///     Choreography::new("place-order", "shop.inventory").step(
///         "order.placed",
///         "reserve",
///         |connection, trigger| {
///             let tx = D::tx(connection);
///             Box::pin(async move {
///                 on_tx!(tx, |connection| {
///                     sqlx::query("INSERT INTO holds (order_id) VALUES ($1)")
///                         .bind(&trigger.subject)
///                         .execute(&mut *connection)
///                         .await?
///                         .rows_affected()
///                 });
///                 Ok(Some(NextEvent::new("shop.events", "stock.reserved", trigger.data.clone())))
///             })
///         },
///     )
/// }
/// # let _ = flow::<sqlx::Sqlite>();
/// ```
#[macro_export]
macro_rules! on_tx {
    ($tx:expr, |$connection:ident| $body:expr) => {
        match $tx {
            $crate::choreography::Tx::Sqlite($connection) => $body,
            $crate::choreography::Tx::Postgres($connection) => $body,
        }
    };
}
