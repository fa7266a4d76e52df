//! `--max-connections-per-ip`: connections open per client address, counted
//! over every shard of the process.
//!
//! SO_REUSEPORT spreads one address's connections over the shards by the hash
//! of the whole 4-tuple, so a per-shard count would let a client hold the limit
//! on every shard. The one table shared by the shards is striped: a shard locks
//! one stripe for a few nanoseconds at an accept and at a close, never on the
//! data path. Entries exist only while their count is above zero, so the table
//! holds at most one per open connection.
//!
//! IPv4 clients count by address; IPv6 clients by their /64, the block one host
//! is usually given (a client holding a /64 could otherwise take 2^64
//! addresses' worth of connections). IPv4-mapped IPv6 addresses (a dual-stack
//! listener) count as the IPv4 address they carry.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU128;
use std::sync::Mutex;

use crate::limits::PEER_STRIPES;

/// A client's address as counted: an IPv4 address as its IPv4-mapped IPv6
/// form, an IPv6 address cut to its /64; 16 bytes with or without an
/// `Option` around it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerKey(NonZeroU128);

impl PeerKey {
    pub fn of(ip: IpAddr) -> PeerKey {
        let mapped = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4.to_ipv6_mapped(),
                None => Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1)),
            },
        };
        // An IPv4-mapped address has its 0xffff bits set; an IPv6 /64 of all
        // zeros is `::/64`, which holds no address a TCP peer can have but
        // `::1` (loopback), counted as the one block it is.
        PeerKey(NonZeroU128::new(u128::from(mapped)).unwrap_or(NonZeroU128::MIN))
    }

    /// The address an `accept` wrote, if it is an IPv4 or IPv6 one.
    pub fn from_sockaddr(addr: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<PeerKey> {
        let len = len as usize;
        match i32::from(addr.ss_family) {
            libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
                // SAFETY: the family says this storage holds a sockaddr_in, and
                // the kernel wrote at least that many bytes of it; storage is
                // aligned for every sockaddr type.
                let sin = unsafe { &*(addr as *const _ as *const libc::sockaddr_in) };
                let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                Some(PeerKey::of(IpAddr::V4(ip)))
            }
            libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
                // SAFETY: as above, for a sockaddr_in6.
                let sin6 = unsafe { &*(addr as *const _ as *const libc::sockaddr_in6) };
                Some(PeerKey::of(IpAddr::V6(Ipv6Addr::from(
                    sin6.sin6_addr.s6_addr,
                ))))
            }
            _ => None,
        }
    }
}

/// Open connections per client address, over all shards.
pub struct PeerCounts {
    max: u32,
    hasher: RandomState,
    stripes: Box<[Mutex<HashMap<PeerKey, u32>>]>,
}

impl std::fmt::Debug for PeerCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerCounts")
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl PeerCounts {
    /// A table letting each address hold at most `max` connections (at least 1).
    pub fn new(max: u32) -> PeerCounts {
        assert!(
            max > 0,
            "a per-address limit of 0 is no limit: do not make a table"
        );
        PeerCounts {
            max,
            hasher: RandomState::new(),
            stripes: (0..PEER_STRIPES).map(|_| Mutex::default()).collect(),
        }
    }

    fn stripe(&self, peer: PeerKey) -> std::sync::MutexGuard<'_, HashMap<PeerKey, u32>> {
        let index = self.hasher.hash_one(peer) as usize % self.stripes.len();
        // A shard that panicked in here (a count closed twice) left the map
        // whole: the process is stopping, the other shards drain on.
        self.stripes[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a new connection from `peer`, or refuses it (false) when the
    /// address already holds the limit.
    pub fn try_open(&self, peer: PeerKey) -> bool {
        let mut stripe = self.stripe(peer);
        let count = stripe.entry(peer).or_insert(0);
        if *count >= self.max {
            return false;
        }
        *count += 1;
        true
    }

    /// A connection counted by [`Self::try_open`] has ended.
    pub fn close(&self, peer: PeerKey) {
        let mut stripe = self.stripe(peer);
        let count = stripe
            .get_mut(&peer)
            .unwrap_or_else(|| panic!("closing a connection from {peer:?} that was never counted"));
        *count -= 1;
        if *count == 0 {
            stripe.remove(&peer);
        }
    }

    /// Addresses holding at least one connection now.
    #[cfg(test)]
    fn addresses(&self) -> usize {
        self.stripes
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> PeerKey {
        PeerKey::of(s.parse().unwrap())
    }

    #[test]
    fn ipv6_counts_by_its_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:10.0.0.1"), key("10.0.0.1"));
        assert_ne!(key("::ffff:10.0.0.1"), key("::ffff:10.0.0.2"));
        assert_ne!(key("10.0.0.1"), key("10.0.0.2"));
    }

    #[test]
    fn a_key_is_16_bytes_optional_or_not() {
        assert_eq!(std::mem::size_of::<Option<PeerKey>>(), 16);
        assert_eq!(key("::1"), key("::2"), "::/64 is one block");
    }

    #[test]
    fn an_address_holds_at_most_the_limit_and_gets_it_back() {
        let counts = PeerCounts::new(2);
        let a = key("192.0.2.1");
        let b = key("192.0.2.2");
        assert!(counts.try_open(a));
        assert!(counts.try_open(a));
        assert!(!counts.try_open(a), "the third from one address is refused");
        assert!(counts.try_open(b), "another address is not affected");
        assert_eq!(counts.addresses(), 2);
        counts.close(a);
        assert!(
            counts.try_open(a),
            "a closed connection gives its place back"
        );
        counts.close(a);
        counts.close(a);
        counts.close(b);
        assert_eq!(counts.addresses(), 0, "no entry outlives its connections");
    }

    #[test]
    #[should_panic(expected = "never counted")]
    fn closing_an_uncounted_connection_is_a_bug() {
        PeerCounts::new(1).close(key("192.0.2.1"));
    }

    #[test]
    fn sockaddrs_as_the_kernel_writes_them() {
        // SAFETY: all-zero bytes are a valid sockaddr_storage.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let sin = &mut storage as *mut _ as *mut libc::sockaddr_in;
        // SAFETY: storage is large and aligned enough for a sockaddr_in.
        unsafe {
            (*sin).sin_family = libc::AF_INET as libc::sa_family_t;
            (*sin).sin_addr.s_addr = u32::from(std::net::Ipv4Addr::new(127, 0, 0, 2)).to_be();
        }
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(
            PeerKey::from_sockaddr(&storage, len),
            Some(key("127.0.0.2"))
        );
        assert_eq!(PeerKey::from_sockaddr(&storage, 4), None, "truncated");
        storage.ss_family = libc::AF_UNIX as libc::sa_family_t;
        assert_eq!(PeerKey::from_sockaddr(&storage, len), None);
    }
}
