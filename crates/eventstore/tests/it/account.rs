//! A small aggregate used by the tests: a bank account.

use serde::{Deserialize, Serialize};
use trellis_eventstore::{Aggregate, DomainEvent};

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Account {
    pub(crate) owner: Option<String>,
    pub(crate) balance_cents: i64,
    pub(crate) closed: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum AccountCommand {
    Open { owner: String },
    Deposit { amount_cents: i64 },
    Withdraw { amount_cents: i64 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum AccountEvent {
    Opened {
        owner: String,
    },
    /// Schema v2: v1 stored `amount` in whole euros.
    Deposited {
        amount_cents: i64,
    },
    Withdrew {
        amount_cents: i64,
    },
}

impl DomainEvent for AccountEvent {
    fn schema_version(event_type: &str) -> u32 {
        if event_type == "Deposited" { 2 } else { 1 }
    }
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub(crate) enum AccountError {
    #[error("the account is already open")]
    AlreadyOpen,
    #[error("the account is not open")]
    NotOpen,
    #[error("amounts must be positive")]
    NotPositive,
    #[error("insufficient funds: balance {balance_cents}, asked {asked_cents}")]
    InsufficientFunds {
        balance_cents: i64,
        asked_cents: i64,
    },
}

impl Aggregate for Account {
    const TYPE: &'static str = "account";
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Error = AccountError;

    fn handle(&self, command: AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        match command {
            AccountCommand::Open { owner } => {
                if self.owner.is_some() {
                    return Err(AccountError::AlreadyOpen);
                }
                Ok(vec![AccountEvent::Opened { owner }])
            }
            AccountCommand::Deposit { amount_cents } => {
                self.owner.as_ref().ok_or(AccountError::NotOpen)?;
                if amount_cents <= 0 {
                    return Err(AccountError::NotPositive);
                }
                Ok(vec![AccountEvent::Deposited { amount_cents }])
            }
            AccountCommand::Withdraw { amount_cents } => {
                self.owner.as_ref().ok_or(AccountError::NotOpen)?;
                if amount_cents <= 0 {
                    return Err(AccountError::NotPositive);
                }
                if amount_cents > self.balance_cents {
                    return Err(AccountError::InsufficientFunds {
                        balance_cents: self.balance_cents,
                        asked_cents: amount_cents,
                    });
                }
                Ok(vec![AccountEvent::Withdrew { amount_cents }])
            }
        }
    }

    fn apply(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::Opened { owner } => self.owner = Some(owner.clone()),
            AccountEvent::Deposited { amount_cents } => self.balance_cents += amount_cents,
            AccountEvent::Withdrew { amount_cents } => self.balance_cents -= amount_cents,
        }
    }
}

/// Deposited v1 → v2: whole euros become cents.
pub(crate) fn upcasters() -> trellis_eventstore::Upcasters {
    trellis_eventstore::Upcasters::new().register("Deposited", 1, |mut data| {
        let euros = data
            .get("amount")
            .and_then(serde_json::Value::as_i64)
            .ok_or("v1 Deposited has no integer `amount`")?;
        let object = data
            .as_object_mut()
            .ok_or("v1 Deposited is not an object")?;
        object.remove("amount");
        object.insert("amount_cents".into(), serde_json::json!(euros * 100));
        Ok(data)
    })
}
