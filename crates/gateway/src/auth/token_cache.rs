//! The cache of verified JWTs, bounded in entries and sharded by a keyed hash.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, PoisonError};

use super::Identity;
#[cfg(doc)]
use super::jwt::TOKEN_BYTES_MAX;
use super::jwt::unix_now;

/// Shards of the verified-token cache (spreads lock contention).
const TOKEN_CACHE_SHARDS: usize = 16;

/// One cached token: the whole token (compared on lookup), its expiry in Unix seconds, and
/// the identity it proved.
#[derive(Debug)]
struct CachedToken {
    token: Box<str>,
    exp: u64,
    identity: Arc<Identity>,
}

/// One shard of the token cache, keyed by the token's hash.
type Shard = HashMap<u64, CachedToken>;

/// Bytes at the end of a token that are hashed: the signature's tail, unique per token.
const TOKEN_HASHED_TAIL_BYTES: usize = 32;

/// Verified tokens until their expiry, bounded in entries.
///
/// Looked up by a keyed hash of the token's last [`TOKEN_HASHED_TAIL_BYTES`] bytes (the
/// signature: hashing 32 bytes instead of ~500 keeps a cache hit well under a microsecond),
/// and then confirmed by comparing the whole token, so no hash collision can make one token
/// pass as another (a collision is a miss: the token is verified again). Only verified tokens
/// are inserted, so a client cannot fill the cache with crafted colliding entries. Memory is
/// bounded by the entry limit times the longest accepted token ([`TOKEN_BYTES_MAX`]).
#[derive(Debug)]
pub(super) struct TokenCache {
    shards: Vec<Mutex<Shard>>,
    per_shard: usize,
    hasher: RandomState,
}

impl TokenCache {
    pub(super) fn new(entries: usize) -> Self {
        let shards = if entries == 0 { 0 } else { TOKEN_CACHE_SHARDS };
        Self {
            shards: (0..shards).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: entries.div_ceil(TOKEN_CACHE_SHARDS).max(1),
            hasher: RandomState::new(),
        }
    }

    /// The token's hash and its shard; `None` when caching is off.
    fn locate(&self, token: &str) -> Option<(u64, &Mutex<Shard>)> {
        if self.shards.is_empty() {
            return None;
        }
        let bytes = token.as_bytes();
        let tail = &bytes[bytes.len().saturating_sub(TOKEN_HASHED_TAIL_BYTES)..];
        let hash = self.hasher.hash_one(tail);
        let index = (hash as usize) % self.shards.len();
        self.shards.get(index).map(|shard| (hash, shard))
    }

    pub(super) fn get(&self, token: &str, now: u64, leeway_s: u64) -> Option<Arc<Identity>> {
        let (hash, shard) = self.locate(token)?;
        let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
        let cached = shard.get(&hash)?;
        if *cached.token != *token {
            return None;
        }
        if now > cached.exp.saturating_add(leeway_s) {
            shard.remove(&hash);
            return None;
        }
        Some(Arc::clone(&cached.identity))
    }

    /// Forgets every cached token (a key they may have been verified with is gone).
    pub(super) fn clear(&self) {
        for shard in &self.shards {
            shard.lock().unwrap_or_else(PoisonError::into_inner).clear();
        }
    }

    pub(super) fn insert(&self, token: &str, exp: u64, identity: Arc<Identity>) {
        let Some((hash, shard)) = self.locate(token) else {
            return;
        };
        let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
        if shard.len() >= self.per_shard && !shard.contains_key(&hash) {
            let now = unix_now();
            shard.retain(|_, cached| cached.exp >= now);
            if shard.len() >= self.per_shard {
                // Still full of live tokens: drop an arbitrary one (it is re-verified if used).
                if let Some(victim) = shard.keys().next().copied() {
                    shard.remove(&victim);
                }
            }
        }
        shard.insert(
            hash,
            CachedToken {
                token: token.into(),
                exp,
                identity,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_cache_never_holds_more_than_its_bound() {
        let cache = TokenCache::new(32);
        let far = unix_now() + 3600;
        for i in 0..1000 {
            cache.insert(&format!("token-{i}"), far, Arc::new(Identity::default()));
        }
        let total: usize = cache
            .shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum();
        assert!(total <= 32 + TOKEN_CACHE_SHARDS, "{total}");
        assert!(cache.get("token-999", unix_now(), 0).is_some());
    }

    #[test]
    fn tokens_sharing_a_tail_never_answer_for_each_other() {
        let cache = TokenCache::new(8);
        let far = unix_now() + 3600;
        let tail = "x".repeat(TOKEN_HASHED_TAIL_BYTES);
        let admin = Identity {
            subject: Some("admin".to_owned()),
            ..Identity::default()
        };
        cache.insert(&format!("a.{tail}"), far, Arc::new(admin));
        assert!(cache.get(&format!("b.{tail}"), unix_now(), 0).is_none());
        let hit = cache
            .get(&format!("a.{tail}"), unix_now(), 0)
            .expect("cached");
        assert_eq!(hit.subject.as_deref(), Some("admin"));
    }

    #[test]
    fn an_expired_cached_token_is_not_served() {
        let cache = TokenCache::new(8);
        cache.insert("t", 100, Arc::new(Identity::default()));
        assert!(cache.get("t", 100, 0).is_some());
        assert!(cache.get("t", 131, 30).is_none());
    }
}
