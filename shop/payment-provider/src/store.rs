//! The simulator's memory: charges and their refunds, bounded, oldest evicted first.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What happened to a charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChargeStatus {
    /// The money was taken.
    Captured,
    /// The card was declined; nothing was taken. Repeating the idempotency key declines again.
    Declined,
    /// The money was taken and given back.
    Refunded,
}

/// A charge as the provider shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Charge {
    /// Charge id (`ch_…`).
    pub id: String,
    /// `captured`, `declined` or `refunded`.
    pub status: ChargeStatus,
    /// Amount in cents.
    pub amount_cents: i64,
    /// ISO 4217 currency code.
    pub currency: String,
    /// The key the charge was created with.
    pub idempotency_key: String,
    /// The refund's id once refunded.
    pub refund_id: Option<String>,
}

/// A refund as the provider shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Refund {
    /// Refund id (`re_…`).
    pub id: String,
    /// The refunded charge.
    pub charge_id: String,
    /// Always `refunded`.
    pub status: String,
    /// The key the refund was created with.
    pub idempotency_key: String,
}

#[derive(Debug)]
struct Stored {
    charge: Charge,
    refund_key: Option<String>,
}

/// Charges by id and by idempotency key, at most `capacity` of them.
#[derive(Debug)]
pub(crate) struct Store {
    charges: HashMap<String, Stored>,
    by_key: HashMap<String, String>,
    by_refund_key: HashMap<String, String>,
    age: VecDeque<String>,
    capacity: usize,
}

/// Why a refund was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RefundRefusal {
    UnknownCharge,
    NotCaptured,
    AlreadyRefunded,
    KeyReused { charge_id: String },
}

impl Store {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            charges: HashMap::new(),
            by_key: HashMap::new(),
            by_refund_key: HashMap::new(),
            age: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.charges.len()
    }

    pub(crate) fn by_key(&self, key: &str) -> Option<&Charge> {
        let id = self.by_key.get(key)?;
        self.charges.get(id).map(|s| &s.charge)
    }

    pub(crate) fn by_id(&self, id: &str) -> Option<&Charge> {
        self.charges.get(id).map(|s| &s.charge)
    }

    /// Stores a new charge, evicting the oldest when full. The key must be new.
    pub(crate) fn insert(&mut self, charge: Charge) {
        debug_assert!(!self.by_key.contains_key(&charge.idempotency_key));
        while self.charges.len() >= self.capacity {
            let Some(oldest) = self.age.pop_front() else {
                break;
            };
            if let Some(evicted) = self.charges.remove(&oldest) {
                self.by_key.remove(&evicted.charge.idempotency_key);
                if let Some(refund_key) = evicted.refund_key {
                    self.by_refund_key.remove(&refund_key);
                }
            }
        }
        self.by_key
            .insert(charge.idempotency_key.clone(), charge.id.clone());
        self.age.push_back(charge.id.clone());
        self.charges.insert(
            charge.id.clone(),
            Stored {
                charge,
                refund_key: None,
            },
        );
    }

    /// Refunds a charge once: `Ok((refund, true))` when refunded now, `Ok((refund, false))`
    /// when `key` already refunded this charge.
    pub(crate) fn refund(
        &mut self,
        charge_id: &str,
        key: &str,
        new_refund_id: impl FnOnce() -> String,
    ) -> Result<(Refund, bool), RefundRefusal> {
        if let Some(refunded) = self.by_refund_key.get(key)
            && refunded != charge_id
        {
            return Err(RefundRefusal::KeyReused {
                charge_id: refunded.clone(),
            });
        }
        let stored = self
            .charges
            .get_mut(charge_id)
            .ok_or(RefundRefusal::UnknownCharge)?;
        let charge = &mut stored.charge;
        match (charge.status, &charge.refund_id, &stored.refund_key) {
            (ChargeStatus::Declined, _, _) => Err(RefundRefusal::NotCaptured),
            (ChargeStatus::Refunded, Some(id), Some(existing)) if existing == key => Ok((
                Refund {
                    id: id.clone(),
                    charge_id: charge.id.clone(),
                    status: "refunded".into(),
                    idempotency_key: key.to_owned(),
                },
                false,
            )),
            (ChargeStatus::Refunded, _, _) => Err(RefundRefusal::AlreadyRefunded),
            (ChargeStatus::Captured, _, _) => {
                let id = new_refund_id();
                charge.status = ChargeStatus::Refunded;
                charge.refund_id = Some(id.clone());
                stored.refund_key = Some(key.to_owned());
                self.by_refund_key
                    .insert(key.to_owned(), charge_id.to_owned());
                Ok((
                    Refund {
                        id,
                        charge_id: charge_id.to_owned(),
                        status: "refunded".into(),
                        idempotency_key: key.to_owned(),
                    },
                    true,
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(n: u32) -> Charge {
        Charge {
            id: format!("ch_{n}"),
            status: ChargeStatus::Captured,
            amount_cents: 100,
            currency: "USD".into(),
            idempotency_key: format!("k{n}"),
            refund_id: None,
        }
    }

    #[test]
    fn the_oldest_charges_are_evicted_with_their_keys() {
        let mut store = Store::new(2);
        for n in 0..3 {
            store.insert(charge(n));
        }
        assert_eq!(store.len(), 2);
        assert!(store.by_key("k0").is_none());
        assert!(store.by_id("ch_0").is_none());
        assert_eq!(store.by_key("k2").map(|c| c.id.as_str()), Some("ch_2"));
    }

    #[test]
    fn a_charge_is_refunded_once() {
        let mut store = Store::new(10);
        store.insert(charge(1));
        let (first, new) = store
            .refund("ch_1", "r1", || "re_1".into())
            .expect("refund");
        assert!(new);
        let (again, new) = store
            .refund("ch_1", "r1", || "re_2".into())
            .expect("replay");
        assert!(!new);
        assert_eq!(first, again);
        assert_eq!(
            store.refund("ch_1", "r2", || "re_3".into()),
            Err(RefundRefusal::AlreadyRefunded)
        );
        assert_eq!(
            store.refund("ch_9", "r9", || "re_4".into()),
            Err(RefundRefusal::UnknownCharge)
        );
    }
}
