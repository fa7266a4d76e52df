//! `--max-messages-per-sec`: a token bucket per `/ws` client that sends, held
//! beside the connection table only while it is not full (an idle connection
//! costs nothing): N tokens, refilled at N a second; a message with no token
//! left closes the connection with 1008. The tick drops the buckets that have
//! been refilled to full.

use std::collections::HashMap;
use std::time::Instant;

use ringgate_codec::close_code;

use super::Shard;
use crate::input;

/// A client's bucket: tokens left (thousandths) when last looked at.
pub(super) struct Bucket {
    generation: u32,
    millitokens: u64,
    at: Instant,
}

/// The buckets of the clients that sent lately.
#[derive(Default)]
pub(super) struct Buckets {
    by_key: HashMap<u32, Bucket>,
}

impl Buckets {
    /// Bytes of the bucket table (buckets exist only for clients that sent lately).
    pub(super) fn bytes(&self) -> usize {
        self.by_key.capacity() * (std::mem::size_of::<(u32, Bucket)>() + 1)
    }

    /// Takes a token for one message from `key`; false when none is left.
    fn take(&mut self, key: u32, generation: u32, per_sec: u32, now: Instant) -> bool {
        let full = u64::from(per_sec) * 1000;
        let bucket = self.by_key.entry(key).or_insert(Bucket {
            generation,
            millitokens: full,
            at: now,
        });
        if bucket.generation != generation {
            *bucket = Bucket {
                generation,
                millitokens: full,
                at: now,
            };
        }
        let elapsed_ms = now.duration_since(bucket.at).as_millis() as u64;
        bucket.millitokens = (bucket.millitokens + elapsed_ms * u64::from(per_sec)).min(full);
        bucket.at = now;
        if bucket.millitokens < 1000 {
            return false;
        }
        bucket.millitokens -= 1000;
        true
    }

    /// Drops buckets full again (their owners have been quiet long enough).
    fn prune(&mut self, per_sec: u32, now: Instant) {
        let full = u64::from(per_sec) * 1000;
        self.by_key.retain(|_, b| {
            let elapsed_ms = now.duration_since(b.at).as_millis() as u64;
            b.millitokens + elapsed_ms * u64::from(per_sec) < full
        });
    }
}

impl Shard {
    /// Counts one message from `key` against its rate; over it, the connection
    /// is closed with 1008 and false is returned.
    pub(super) fn within_rate(&mut self, key: usize) -> bool {
        let per_sec = self.cfg.messages_per_sec_max;
        if per_sec == 0 {
            return true;
        }
        let conn = &mut self.conns[key];
        let k = u32::try_from(key).expect("keys fit in 32 bits");
        if self
            .buckets
            .take(k, conn.generation, per_sec, Instant::now())
        {
            return true;
        }
        self.stats.rate_limited.add(1);
        input::start_close(
            conn,
            close_code::POLICY_VIOLATION,
            "message rate limit",
            self.now,
            &mut self.pool,
        );
        false
    }

    /// Once a tick: forget the buckets that are full again.
    pub(super) fn prune_buckets(&mut self) {
        if self.cfg.messages_per_sec_max > 0 {
            self.buckets
                .prune(self.cfg.messages_per_sec_max, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_bucket_allows_bursts_of_n_and_n_a_second() {
        let mut b = Buckets::default();
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(b.take(1, 1, 5, t0));
        }
        assert!(!b.take(1, 1, 5, t0), "the burst is spent");
        assert!(
            b.take(1, 1, 5, t0 + Duration::from_millis(200)),
            "one more after 1/5 s"
        );
        assert!(!b.take(1, 1, 5, t0 + Duration::from_millis(200)));
        assert!(
            b.take(1, 2, 5, t0),
            "a new connection in the slot starts full"
        );
        b.prune(5, t0 + Duration::from_secs(2));
        assert!(b.by_key.is_empty(), "full again: forgotten");
    }
}
