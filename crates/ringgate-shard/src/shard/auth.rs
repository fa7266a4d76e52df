//! Tokens on a shard (`--auth-*`): each authenticated connection's expiry and
//! ACL, kept beside the connection table (the 48-byte record holds none of
//! it), the expiry schedule the tick walks, and the `refresh` op.
//!
//! ACLs are shared: connections whose tokens grant the same topics hold one
//! `Arc<Acl>` (`acls` interns them while any connection holds one). A token
//! expiring closes its connection with 1008 "token expired" at the first tick
//! after `exp` (within a second), unless a `refresh` with a later token came
//! first: same `sub`, a later `exp`; its ACL replaces the old one and the
//! subscriptions it no longer allows are dropped, each reported.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};

use ringgate_codec::close_code;

use super::Shard;
use crate::auth::{unix_now, Acl, Claims};
use crate::conn::State;
use crate::input;
use crate::pubsub;

/// A connection's token state.
pub(super) struct ConnAuth {
    generation: u32,
    exp: u64,
    acl: Arc<Acl>,
    /// The token's `sub`, for logs.
    sub: Box<str>,
}

/// Every authenticated connection's token state on a shard.
#[derive(Default)]
pub(super) struct Tokens {
    by_key: HashMap<u32, ConnAuth>,
    /// `exp` -> connections whose token expires then (key, generation).
    expiries: BTreeMap<u64, Vec<(u32, u32)>>,
    /// One `Arc` per distinct ACL in use.
    acls: HashMap<Arc<Acl>, Weak<Acl>>,
}

impl Tokens {
    fn intern(&mut self, acl: Arc<Acl>) -> Arc<Acl> {
        if let Some(shared) = self.acls.get(&acl).and_then(Weak::upgrade) {
            return shared;
        }
        self.acls.insert(acl.clone(), Arc::downgrade(&acl));
        if self.acls.len() > 2 * self.by_key.len() + 64 {
            self.acls.retain(|_, w| w.strong_count() > 0);
        }
        acl
    }

    fn insert(&mut self, key: u32, generation: u32, claims: Claims) {
        let acl = self.intern(claims.acl);
        self.expiries
            .entry(claims.exp)
            .or_default()
            .push((key, generation));
        self.by_key.insert(
            key,
            ConnAuth {
                generation,
                exp: claims.exp,
                acl,
                sub: claims.sub.into_boxed_str(),
            },
        );
    }

    /// The connection's ACL, if it is authenticated.
    fn acl(&self, key: usize, generation: u32) -> Option<&Acl> {
        let auth = self.by_key.get(&(key as u32))?;
        (auth.generation == generation).then_some(&*auth.acl)
    }
}

impl Shard {
    /// A connection passed the token check at its upgrade.
    pub(super) fn authenticated(&mut self, key: usize, claims: Claims) {
        let generation = self.conns[key].generation;
        tracing::debug!(
            shard = self.id,
            sub = claims.sub,
            exp = claims.exp,
            "authenticated"
        );
        self.tokens.insert(
            u32::try_from(key).expect("keys fit in 32 bits"),
            generation,
            claims,
        );
    }

    /// Whether `key` may subscribe to `topic` (always, without token checking).
    pub(super) fn may_subscribe(&self, key: usize, topic: &str) -> bool {
        if self.cfg.auth.is_none() {
            return true;
        }
        let generation = self.conns[key].generation;
        let allowed = self
            .tokens
            .acl(key, generation)
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
        let generation = self.conns[key].generation;
        let allowed = self
            .tokens
            .acl(key, generation)
            .is_some_and(|acl| acl.may_publish(topic, flag));
        if !allowed {
            self.log_refusal(key, "publish", topic);
        }
        allowed
    }

    fn log_refusal(&self, key: usize, what: &str, topic: &str) {
        let sub = self.tokens.by_key.get(&(key as u32)).map_or("", |a| &a.sub);
        tracing::info!(
            shard = self.id,
            sub,
            topic,
            "{what} refused by the token's ACL"
        );
    }

    /// Forgets a connection's token state (it is closing).
    pub(super) fn forget_token(&mut self, key: usize) {
        let generation = self.conns[key].generation;
        let k = key as u32;
        if self
            .tokens
            .by_key
            .get(&k)
            .is_some_and(|a| a.generation == generation)
        {
            // Its expiry entry stays until its time; it finds no match then.
            self.tokens.by_key.remove(&k);
        }
    }

    /// Closes the connections whose token has expired; once a tick.
    pub(super) fn expire_tokens(&mut self) {
        if self.cfg.auth.is_none() {
            return;
        }
        let now = unix_now();
        while let Some(entry) = self.tokens.expiries.first_entry() {
            if *entry.key() > now {
                break;
            }
            let exp = *entry.key();
            for (key, generation) in entry.remove() {
                let current = self
                    .tokens
                    .by_key
                    .get(&key)
                    .is_some_and(|a| a.generation == generation && a.exp == exp);
                if !current {
                    continue; // Refreshed, or gone.
                }
                let auth = self.tokens.by_key.remove(&key).expect("just found");
                let key = key as usize;
                let Some(conn) = self.conns.get_mut(key) else {
                    continue;
                };
                if conn.generation != generation || conn.state != State::Open {
                    continue;
                }
                tracing::info!(
                    shard = self.id,
                    sub = &*auth.sub,
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
    }

    /// `{"op":"refresh","token":T}`: a later token of the same `sub` replaces
    /// the connection's; subscriptions its ACL no longer allows are dropped.
    pub(super) fn refresh(&mut self, key: usize, token: &str) {
        let Some(verifier) = self.cfg.auth.clone() else {
            return self.error(key, "bad_request", "tokens are not checked on this server");
        };
        let claims = match verifier.verify(token) {
            Ok(claims) => claims,
            Err(why) => return self.error(key, "unauthorized", &why),
        };
        let generation = self.conns[key].generation;
        let k = key as u32;
        let Some(old) = self
            .tokens
            .by_key
            .get(&k)
            .filter(|a| a.generation == generation)
        else {
            return self.error(
                key,
                "unauthorized",
                "this connection has no token to refresh",
            );
        };
        if *old.sub != claims.sub {
            return self.error(key, "unauthorized", "the new token is for another sub");
        }
        if claims.exp <= old.exp {
            return self.error(key, "unauthorized", "the new token does not expire later");
        }
        let exp = claims.exp;
        self.tokens.insert(k, generation, claims);
        let acl = self.tokens.by_key[&k].acl.clone();
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
}
