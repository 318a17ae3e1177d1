//! `trellis users`: work on a users database without the service running, such as making the
//! first administrator of a shop started with `trellis serve`.

use std::io::IsTerminal as _;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

/// Where the users live and what to do with them.
#[derive(Debug, Args)]
pub(crate) struct UsersArgs {
    #[command(subcommand)]
    command: UsersCommand,
}

#[derive(Debug, Subcommand)]
enum UsersCommand {
    /// Makes EMAIL an administrator: creates the account when there is none (the password from
    /// TRELLIS_ADMIN_PASSWORD, or asked for without echo), or promotes the existing account,
    /// leaving its password alone. Running it again changes nothing.
    CreateAdmin(CreateAdminArgs),
}

#[derive(Debug, Args)]
struct CreateAdminArgs {
    /// The users service's database: sqlite://PATH or postgres://….
    #[arg(long, env = "TRELLIS_DB")]
    db: String,
    /// The administrator's email.
    #[arg(long, env = "TRELLIS_ADMIN_EMAIL")]
    email: String,
    /// The name shown for a new account.
    #[arg(long, default_value = "Admin")]
    name: String,
}

/// The variable a new administrator's password is read from; there is no flag for it, so it
/// never lands in shell history.
const PASSWORD_ENV: &str = "TRELLIS_ADMIN_PASSWORD";

impl UsersArgs {
    pub(crate) async fn run(self) -> anyhow::Result<()> {
        match self.command {
            UsersCommand::CreateAdmin(args) => args.run().await,
        }
    }
}

impl CreateAdminArgs {
    async fn run(self) -> anyhow::Result<()> {
        let db = shop_users::open(&self.db)
            .await
            .with_context(|| "opening the users database")?;
        let result = self.create_or_promote(&db).await;
        db.close().await;
        result
    }

    async fn create_or_promote(&self, db: &trellis_service::Db) -> anyhow::Result<()> {
        match shop_users::promote_admin(db, &self.email).await? {
            shop_users::Promotion::Promoted => {
                println!(
                    "{} is an administrator now (promoted; password unchanged)",
                    self.email
                );
                return Ok(());
            }
            shop_users::Promotion::AlreadyAdmin => {
                println!(
                    "{} is an administrator already; nothing changed",
                    self.email
                );
                return Ok(());
            }
            shop_users::Promotion::NoAccount => {}
        }
        let password = password()?;
        if shop_users::ensure_admin(db, &self.email, &password, &self.name).await? {
            println!("administrator {} created", self.email);
        } else {
            // Registered between the lookup and the insert: promote that account.
            shop_users::promote_admin(db, &self.email).await?;
            println!(
                "{} is an administrator now (promoted; password unchanged)",
                self.email
            );
        }
        Ok(())
    }
}

/// The new account's password: the variable, or a prompt on a terminal (not echoed).
fn password() -> anyhow::Result<String> {
    if let Ok(password) = std::env::var(PASSWORD_ENV) {
        return Ok(password);
    }
    if !std::io::stdin().is_terminal() {
        bail!(
            "no account has this email: set {PASSWORD_ENV} to create it (or run on a terminal to be asked)"
        );
    }
    let first = rpassword::prompt_password("password for the new administrator: ")
        .context("reading the password")?;
    let again = rpassword::prompt_password("the same again: ").context("reading the password")?;
    if first != again {
        bail!("the two passwords differ; nothing was created");
    }
    Ok(first)
}
