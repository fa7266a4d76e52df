//! Tokens on a shard (`--auth-*`): each authenticated connection's expiry and
//! ACL, kept beside the connection table (the 48-byte record holds none of
//! it), the expiry schedule the tick walks, and the `refresh` op.
//!
//! Per connection: 16 bytes in a vector indexed like the table (`exp`, the
//! shared ACL, a keyed hash of `sub` for refreshes), reserved for
//! the table's capacity up front (only pages in use are resident); the tick
//! walks it for expiries, as the sweep walks the table. ACLs are shared: connections whose tokens grant the same
//! topics hold one `Arc<Acl>` (`acls` interns them while any connection holds
//! one). `sub` itself is logged when the connection is authenticated, with its
//! key and generation, which the later log lines about it carry.
//!
//! A token expiring closes its connection with 1008 "token expired" at the
//! first tick at or after `exp` (within a second), unless a `refresh` with a
//! later token came first: same `sub`, a later `exp`; its ACL replaces the old
//! one and the subscriptions it no longer allows are dropped, each reported.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Weak};

use ringgate_codec::close_code;

use super::Shard;
use crate::auth::{unix_now, Acl, Claims};
use crate::conn::State;
use crate::input;
use crate::pubsub;

/// A connection's token state.
///
/// An entry lives exactly as long as its connection's record holds the key:
/// made at the upgrade, removed when the connection is finished
/// (`forget_token`), so it needs no generation of its own.
pub(super) struct ConnAuth {
    /// Seconds since the Unix epoch (a u32 lasts until 2106).
    exp: u32,
    /// A keyed hash of the token's `sub` (random key per process): a refresh
    /// must carry the same. 32 bits are enough: a refresh token is verified
    /// first, so swapping `sub`s would need a valid token of the other `sub`,
    /// which could open a connection of its own.
    sub: u32,
    acl: Arc<Acl>,
}

const _: () = assert!(std::mem::size_of::<Option<ConnAuth>>() == 16);

/// How long past `exp` a connection whose `refresh` waits behind its earlier
/// requests is kept for that refresh to be judged.
const REFRESH_WAIT_SECS: u32 = 10;

/// Every authenticated connection's token state on a shard.
#[derive(Default)]
pub(super) struct Tokens {
    /// By connection key (the table's keys are dense and reused).
    by_key: Vec<Option<ConnAuth>>,
    authenticated: usize,
    /// One `Arc` per distinct ACL in use, by the ACL's hash: held weakly, so
    /// the last connection of an ACL frees it (a strong key would keep every
    /// ACL ever seen, and the clean-up below would never drop one).
    acls: HashMap<u64, Weak<Acl>>,
    /// The key of the `sub` hashes (random per process).
    hasher: RandomState,
}

impl Tokens {
    /// Room for `connections` reserved up front: the vector never moves or
    /// doubles, and only the pages of keys in use become resident.
    pub(super) fn with_capacity(connections: usize) -> Tokens {
        Tokens {
            by_key: Vec::with_capacity(connections),
            ..Tokens::default()
        }
    }

    /// Bytes of the per-key vector in use (its high-water mark: the pages
    /// past it were never touched).
    pub(super) fn bytes(&self) -> usize {
        self.by_key.len() * std::mem::size_of::<Option<ConnAuth>>()
    }

    fn get(&self, key: u32) -> Option<&ConnAuth> {
        self.by_key.get(key as usize)?.as_ref()
    }

    fn remove(&mut self, key: u32) {
        if let Some(slot) = self.by_key.get_mut(key as usize) {
            if slot.take().is_some() {
                self.authenticated -= 1;
            }
        }
    }

    fn intern(&mut self, acl: Arc<Acl>) -> Arc<Acl> {
        let hash = self.hasher.hash_one(&*acl);
        if let Some(shared) = self.acls.get(&hash).and_then(Weak::upgrade) {
            // Another ACL of the same hash (rare): this one goes unshared.
            return if shared == acl { shared } else { acl };
        }
        self.acls.insert(hash, Arc::downgrade(&acl));
        if self.acls.len() > 2 * self.authenticated + 64 {
            self.acls.retain(|_, w| w.strong_count() > 0);
        }
        acl
    }

    fn sub_hash(&self, sub: &str) -> u32 {
        self.hasher.hash_one(sub) as u32
    }

    fn insert(&mut self, key: u32, claims: Claims) {
        let acl = self.intern(claims.acl);
        let exp = u32::try_from(claims.exp).unwrap_or(u32::MAX);
        let sub = self.sub_hash(&claims.sub);
        let index = key as usize;
        if self.by_key.len() <= index {
            self.by_key.resize_with(index + 1, || None);
        }
        let entry = ConnAuth { exp, sub, acl };
        if self.by_key[index].replace(entry).is_none() {
            self.authenticated += 1;
        }
    }

    /// The connection's ACL, if it is authenticated.
    fn acl(&self, key: usize) -> Option<&Acl> {
        Some(&*self.get(u32::try_from(key).ok()?)?.acl)
    }
}

impl Shard {
    /// A connection passed the token check at its upgrade.
    pub(super) fn authenticated(&mut self, key: usize, claims: Claims) {
        let generation = self.conns[key].generation;
        tracing::debug!(
            shard = self.id,
            key,
            generation,
            sub = claims.sub,
            exp = claims.exp,
            "authenticated"
        );
        let k = u32::try_from(key).expect("keys fit in 32 bits");
        assert!(
            self.tokens.get(k).is_none(),
            "key {key} authenticated twice"
        );
        self.tokens.insert(k, claims);
    }

    /// Whether `key` may subscribe to `topic` (always, without token checking).
    pub(super) fn may_subscribe(&self, key: usize, topic: &str) -> bool {
        if self.cfg.auth.is_none() {
            return true;
        }
        let allowed = self
            .tokens
            .acl(key)
            .is_some_and(|acl| acl.may_subscribe(topic));
        if !allowed {
            self.log_refusal(key, "subscribe", topic);
        }
        allowed
    }

    /// Whether `key` may publish to `topic`: `--client-publish`, narrowed (or
    /// stood in for) by the token's `publish` claim.
    pub(super) fn may_publish(&self, key: usize, topic: &str) -> bool {
        let flag = self.cfg.client_publish.as_deref();
        if self.cfg.auth.is_none() {
            return flag.is_some_and(|p| pubsub::publish_allowed(p, topic));
        }
        let allowed = self
            .tokens
            .acl(key)
            .is_some_and(|acl| acl.may_publish(topic, flag));
        if !allowed {
            self.log_refusal(key, "publish", topic);
        }
        allowed
    }

    fn log_refusal(&self, key: usize, what: &str, topic: &str) {
        let generation = self.conns[key].generation;
        tracing::info!(
            shard = self.id,
            key,
            generation,
            topic,
            "{what} refused by the token's ACL"
        );
    }

    /// Forgets a connection's token state (it is closing).
    pub(super) fn forget_token(&mut self, key: usize) {
        self.tokens
            .remove(u32::try_from(key).expect("keys fit in 32 bits"));
    }

    /// Closes the connections whose token has expired; once a tick.
    pub(super) fn expire_tokens(&mut self) {
        if self.cfg.auth.is_none() {
            return;
        }
        let now = u32::try_from(unix_now()).unwrap_or(u32::MAX);
        let expired: Vec<(usize, u32)> = self
            .tokens
            .by_key
            .iter()
            .enumerate()
            .filter_map(|(key, a)| a.as_ref().filter(|a| a.exp <= now).map(|a| (key, a.exp)))
            .collect();
        for (key, exp) in expired {
            // A refresh the client sent in time may wait behind its unanswered
            // subscribe or its replay: it is judged when its turn comes, if
            // that comes within REFRESH_WAIT_SECS of exp (a replay kept going
            // by live events could hold it back for good).
            if now < exp.saturating_add(REFRESH_WAIT_SECS) && self.refresh_waits(key) {
                continue;
            }
            self.tokens.remove(key as u32);
            let conn = self
                .conns
                .get_mut(key)
                .expect("a token entry outlives no connection record");
            let generation = conn.generation;
            if conn.state != State::Open {
                continue;
            }
            tracing::info!(
                shard = self.id,
                key,
                generation,
                "token expired: closing with 1008"
            );
            self.stats.tokens_expired.add(1);
            input::start_close(
                conn,
                close_code::POLICY_VIOLATION,
                "token expired",
                self.now,
                &mut self.pool,
            );
            self.drive(key);
        }
    }

    /// `{"op":"refresh","token":T}`: a later token of the same `sub` replaces
    /// the connection's; subscriptions its ACL no longer allows are dropped.
    pub(super) fn refresh(&mut self, key: usize, token: &str) {
        let Some(verifier) = self.cfg.auth.clone() else {
            return self.error(key, "bad_request", "tokens are not checked on this server");
        };
        // Each check costs a signature verification (hundreds of microseconds
        // for ES256): a refused one is a strike, so a connection cannot keep
        // the shard verifying tokens for nothing.
        let claims = match verifier.verify(token) {
            Ok(claims) => claims,
            Err(why) => return self.refuse_refresh(key, &why),
        };
        let generation = self.conns[key].generation;
        let k = u32::try_from(key).expect("keys fit in 32 bits");
        let Some(old) = self.tokens.get(k) else {
            return self.refuse_refresh(key, "this connection has no token to refresh");
        };
        if old.sub != self.tokens.sub_hash(&claims.sub) {
            return self.refuse_refresh(key, "the new token is for another sub");
        }
        if claims.exp <= u64::from(old.exp) {
            return self.refuse_refresh(key, "the new token does not expire later");
        }
        let exp = claims.exp;
        tracing::debug!(shard = self.id, key, generation, exp, "token refreshed");
        self.tokens.insert(k, claims);
        let acl = self.tokens.get(k).expect("just refreshed").acl.clone();
        let dropped: Vec<Arc<str>> = self
            .topics
            .topics_of(&self.conns, key)
            .filter(|t| !acl.may_subscribe(t))
            .collect();
        for topic in &dropped {
            self.topics.unsubscribe(&mut self.conns, key, topic);
            self.reply(
                key,
                pubsub::reply_with_reason("unsubscribed", topic, "forbidden"),
            );
        }
        if !dropped.is_empty() {
            self.after_topic_changes();
        }
        self.reply(key, pubsub::refreshed_reply(exp));
    }

    /// Whether a `refresh` is among the connection's waiting requests.
    fn refresh_waits(&self, key: usize) -> bool {
        self.outstanding.get(&key).is_some_and(|o| {
            o.deferred.iter().any(|text| {
                matches!(
                    crate::pubsub::parse_request(text),
                    Ok(crate::pubsub::Request::Refresh(_))
                )
            })
        })
    }

    fn refuse_refresh(&mut self, key: usize, why: &str) {
        self.error(key, "unauthorized", why);
        self.strike(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(sub: &str, exp: u64, topics: &[&str]) -> Claims {
        Claims {
            sub: sub.into(),
            exp,
            acl: Arc::new(Acl::for_tests(topics)),
        }
    }

    #[test]
    fn acls_are_shared_and_slots_are_reused() {
        let mut t = Tokens::with_capacity(3000);
        for key in 0..3000u32 {
            t.insert(key, claims(&format!("u{key}"), 2_000_000_000, &["news"]));
        }
        let first = t.get(0).unwrap().acl.clone();
        assert!(
            Arc::ptr_eq(&first, &t.get(2999).unwrap().acl),
            "one ACL for all"
        );
        for _round in 0..10 {
            for key in 0..3000u32 {
                t.remove(key);
                t.insert(key, claims("x", 2_000_000_000, &["news", "x"]));
            }
        }
        assert_eq!(t.authenticated, 3000);
        assert_eq!(t.by_key.len(), 3000);
        assert!(t.acls.len() <= 2 * t.authenticated + 64);
    }

    #[test]
    fn an_acl_no_connection_holds_is_freed() {
        // Found in review: interned by a strong key, every distinct ACL ever
        // seen stayed (a topic per user: one per user who ever connected).
        let mut t = Tokens::with_capacity(10);
        for user in 0..10_000u32 {
            let topic = format!("user.{user}");
            t.insert(0, claims("u", 2_000_000_000, &[&topic]));
            t.remove(0);
        }
        assert!(
            t.acls.len() <= 64,
            "{} ACLs kept for none in use",
            t.acls.len()
        );
    }
}
