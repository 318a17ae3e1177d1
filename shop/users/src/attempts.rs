//! Login attempts per account, limited before any password is hashed.
//!
//! Hashing is the users service's scarce resource: [`HASHES_IN_FLIGHT_MAX`] Argon2id hashes
//! at once, each a core for tens of milliseconds. Two limits keep one client from taking all
//! of it or from guessing one account's password at leisure:
//!
//! - per client address, at the gateway (`login_per_address` in the shop's gateway
//!   configuration, [`LOGIN_RATE_PER_ADDRESS`] per second): a flooding client gets 429 with
//!   `Retry-After` and leaves the hashing slots to everyone else;
//! - per account, here ([`LOGIN_ATTEMPTS_BURST`] attempts, then one per
//!   [`LOGIN_ATTEMPT_INTERVAL`]), whichever addresses the attempts come from: an attacker
//!   spread over many addresses gets ten guesses a minute per account, not thousands.
//!
//! - per account, across replicas (the database): after [`LOGIN_FAILURES_FREE`] consecutive
//!   failed logins, each further failure locks the account for twice as long as the one
//!   before (1 s, 2 s, 4 s, ... at most [`LOGIN_LOCKOUT_MAX`]); a locked account is answered
//!   429 with `Retry-After` before any hash, whatever the password; a successful login
//!   resets the count. An attacker spread over replicas and addresses gets a few dozen
//!   guesses a day per account.
//!
//! The in-process per-account limit counts every attempt on an existing account, right or
//! wrong: a correct password is only known after the hash. Its price is that someone who knows an
//! email can keep that account's owner from logging in while they keep guessing (each wrong
//! guess costs them a hash slot of their address's share); we judge slow guessing the greater
//! danger. Attempts on unknown emails are not tracked here (the table would grow with every
//! made-up email); the per-address limit covers them.
//!
//! [`HASHES_IN_FLIGHT_MAX`]: crate::password::HASHES_IN_FLIGHT_MAX

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Attempts one account may take at once before it is limited.
pub const LOGIN_ATTEMPTS_BURST: u32 = 10;
/// Once the burst is spent, one more attempt per account per this interval.
pub const LOGIN_ATTEMPT_INTERVAL: Duration = Duration::from_secs(6);
/// Logins and registrations per second one client address may send through the gateway
/// (burst twice that): a fair share of what the hashing slots serve.
pub const LOGIN_RATE_PER_ADDRESS: u32 = 20;
/// Consecutive failed logins an account takes before it is locked.
pub const LOGIN_FAILURES_FREE: i64 = LOGIN_ATTEMPTS_BURST as i64;
/// The longest lock a run of failed logins sets.
pub const LOGIN_LOCKOUT_MAX: Duration = Duration::from_secs(15 * 60);

/// When an account with `failures` consecutive failed logins is locked until (Unix ms), 0
/// while it is under [`LOGIN_FAILURES_FREE`]: 1 s for the first failure past it, doubling,
/// at most [`LOGIN_LOCKOUT_MAX`].
pub(crate) fn locked_until_ms(failures: i64, now_ms: i64) -> i64 {
    let past = failures - LOGIN_FAILURES_FREE;
    if past <= 0 {
        return 0;
    }
    let max_ms = i64::try_from(LOGIN_LOCKOUT_MAX.as_millis()).unwrap_or(i64::MAX);
    let doublings = u32::try_from(past - 1).unwrap_or(u32::MAX);
    let lock_ms = 2_i64
        .checked_pow(doublings)
        .and_then(|factor| factor.checked_mul(1_000))
        .map_or(max_ms, |ms| ms.min(max_ms));
    now_ms.saturating_add(lock_ms)
}

/// Every this many checks, accounts whose allowance is full again are forgotten, so the table
/// holds only accounts attempted within the last minute.
const FORGET_EVERY_CHECKS: u64 = 1_024;

/// The per-account limiter.
#[derive(Debug)]
pub(crate) struct LoginAttempts {
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
    checks: AtomicU64,
}

impl LoginAttempts {
    pub(crate) fn new() -> Self {
        let burst = NonZeroU32::new(LOGIN_ATTEMPTS_BURST).expect("a non-zero constant");
        let quota = Quota::with_period(LOGIN_ATTEMPT_INTERVAL)
            .expect("a non-zero constant")
            .allow_burst(burst);
        Self {
            limiter: RateLimiter::keyed(quota),
            clock: DefaultClock::default(),
            checks: AtomicU64::new(0),
        }
    }

    /// Takes one attempt for `account_id`; `Err(wait)` when its allowance is spent.
    pub(crate) fn check(&self, account_id: &str) -> Result<(), Duration> {
        if self
            .checks
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(FORGET_EVERY_CHECKS)
        {
            // A forgotten account's allowance was full anyway: forgetting it loses nothing.
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(&account_id.to_owned())
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_logins_past_the_free_ones_lock_for_doubling_times_up_to_the_cap() {
        let free = LOGIN_FAILURES_FREE;
        assert_eq!(locked_until_ms(free, 1_000), 0);
        assert_eq!(locked_until_ms(free + 1, 1_000), 2_000);
        assert_eq!(locked_until_ms(free + 2, 1_000), 3_000);
        assert_eq!(locked_until_ms(free + 4, 0), 8_000);
        let cap = i64::try_from(LOGIN_LOCKOUT_MAX.as_millis()).unwrap();
        assert_eq!(locked_until_ms(free + 40, 0), cap);
        assert_eq!(locked_until_ms(i64::MAX, 0), cap);
    }

    #[test]
    fn an_account_gets_its_burst_then_waits() {
        let attempts = LoginAttempts::new();
        for _ in 0..LOGIN_ATTEMPTS_BURST {
            attempts.check("u1").expect("within the burst");
        }
        let wait = attempts.check("u1").expect_err("the burst is spent");
        assert!(wait <= LOGIN_ATTEMPT_INTERVAL, "{wait:?}");
        attempts
            .check("u2")
            .expect("another account is not affected");
    }
}
