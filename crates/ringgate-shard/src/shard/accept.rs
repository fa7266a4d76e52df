//! Accepting connections and admitting them: the listener's accepts, the
//! accept-rate limit (`--max-accepts-per-sec`) and the per-address limit
//! (`--max-connections-per-ip`).
//!
//! Without either limit, one multishot accept takes every connection into the
//! fixed-file table. A multishot accept reports no client address and takes the
//! whole backlog before the shard could stop it, so with a limit the shard arms
//! one-shot accepts instead: `ACCEPTS_ARMED_MAX` of them for the per-address
//! limit, each writing its client's address into its own slot here, or a single
//! one for the accept-rate limit, which must be able to stop after any accept.
//!
//! A connection counted against its address gives its place back when it is
//! finished; `peer_of` (16 bytes per connection key, only with the limit on)
//! remembers which address that is.

use std::cell::UnsafeCell;
use std::io;

use io_uring::cqueue;
use io_uring::opcode;
use io_uring::types::{CancelBuilder, DestinationSlot, Fd};

use super::Shard;
use crate::conn::Conn;
use crate::input;
use crate::limits::ACCEPTS_ARMED_MAX;
use crate::peers::PeerKey;
use crate::sys;
use crate::token::{Op, Token};

/// Where a one-shot accept writes its client's address.
struct PeerAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

/// A shard's accepting state.
pub(super) struct Accepting {
    /// One slot per one-shot accept; empty when the accept is multishot.
    /// Boxed and never resized: the kernel writes a slot while its accept is
    /// armed, through a pointer taken at arming, so nothing here moves and the
    /// shard reads a slot only after its accept completed.
    addrs: Box<[UnsafeCell<PeerAddr>]>,
    /// Bit `i`: the accept of slot `i` is armed (multishot: bit 0).
    armed: u32,
    /// Connections accepted since the last tick (`--max-accepts-per-sec`).
    this_tick: u32,
    /// Accepting waits for the next tick.
    paused: bool,
    /// By connection key: the address a connection was counted under
    /// (`--max-connections-per-ip`; empty without it).
    peer_of: Vec<Option<PeerKey>>,
}

const _: () = assert!(ACCEPTS_ARMED_MAX <= u32::BITS as usize);

impl Accepting {
    pub(super) fn new(cfg: &crate::ShardConfig) -> Accepting {
        let slots = if cfg.accepts_per_sec_max > 0 {
            1
        } else if cfg.peers.is_some() {
            ACCEPTS_ARMED_MAX
        } else {
            0
        };
        let addrs = (0..slots)
            .map(|_| {
                UnsafeCell::new(PeerAddr {
                    // SAFETY: all-zero bytes are a valid sockaddr_storage.
                    storage: unsafe { std::mem::zeroed() },
                    len: 0,
                })
            })
            .collect();
        let peer_of = if cfg.peers.is_some() {
            Vec::with_capacity(cfg.fixed_files() as usize)
        } else {
            Vec::new()
        };
        Accepting {
            addrs,
            armed: 0,
            this_tick: 0,
            paused: false,
            peer_of,
        }
    }

    fn multishot(&self) -> bool {
        self.addrs.is_empty()
    }

    /// Bytes of the per-key address vector in use (its high-water mark).
    pub(super) fn peer_bytes(&self) -> usize {
        self.peer_of.len() * std::mem::size_of::<Option<PeerKey>>()
    }

    /// The address buffers, to leak at exit while accepts may still be armed.
    pub(super) fn leak_addrs(&mut self) {
        std::mem::forget(std::mem::take(&mut self.addrs));
    }
}

impl Shard {
    /// Arms the accepts not armed now, unless accepting is paused or over.
    pub(super) fn arm_accept(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        let acc = &mut self.accepting;
        if acc.paused || self.shutdown_deadline.is_some() {
            return;
        }
        let listener = Fd(sys::raw(listener));
        if acc.multishot() {
            if acc.armed == 0 {
                let sqe = opcode::AcceptMulti::new(listener)
                    .allocate_file_index(true)
                    .build()
                    .user_data(Token::new(Op::Accept, 0, 0).encode());
                self.staged.push(sqe);
                acc.armed = 1;
            }
            return;
        }
        for (i, slot) in acc.addrs.iter().enumerate() {
            if acc.armed & (1 << i) != 0 {
                continue;
            }
            let addr = slot.get();
            // SAFETY: no accept is armed on this slot, so nothing else writes
            // it; `addr` points into the boxed slice, which neither moves nor is
            // freed while an accept may write it (`leak_addrs` at exit).
            let (storage, len) = unsafe {
                (*addr).len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                (
                    std::ptr::addr_of_mut!((*addr).storage).cast::<libc::sockaddr>(),
                    std::ptr::addr_of_mut!((*addr).len),
                )
            };
            let sqe = opcode::Accept::new(listener, storage, len)
                .file_index(Some(DestinationSlot::auto_target()))
                .build()
                .user_data(Token::new(Op::Accept, 0, i).encode());
            self.staged.push(sqe);
            acc.armed |= 1 << i;
        }
    }

    /// Cancels the armed accepts (the shard is draining). Accepts staged and
    /// not yet submitted are dropped instead: they name the listener by its
    /// descriptor number, which the drain closes before they would reach the
    /// kernel (where they would fail, or meet whatever reused the number).
    pub(super) fn cancel_accepts(&mut self) {
        let armed = &mut self.accepting.armed;
        self.staged.retain(|sqe| {
            let token = Token::decode(sqe.get_user_data());
            if token.op != Op::Accept {
                return true;
            }
            *armed &= !(1 << token.key);
            false
        });
        for i in 0..u32::BITS as usize {
            if self.accepting.armed & (1 << i) != 0 {
                let target = Token::new(Op::Accept, 0, i).encode();
                let cancel = opcode::AsyncCancel2::new(CancelBuilder::user_data(target))
                    .build()
                    .user_data(Token::shard(Op::Cancel).encode());
                self.staged.push(cancel);
            }
        }
    }

    pub(super) fn on_accept(&mut self, slot: usize, result: i32, flags: u32) {
        let acc = &mut self.accepting;
        assert!(
            acc.armed & (1 << slot) != 0,
            "accept slot {slot} was not armed"
        );
        if !acc.multishot() || !cqueue::more(flags) {
            acc.armed &= !(1 << slot);
        }
        if result < 0 {
            match -result {
                libc::ENFILE => {
                    // The fixed-file table is full: the kernel closed the socket.
                    // Accepting again waits for the next tick.
                    self.stats.rejected_table_full.add(1);
                    return;
                }
                libc::ECANCELED => return,
                errno => tracing::warn!(
                    shard = self.id,
                    "accept failed: {}",
                    io::Error::from_raw_os_error(errno)
                ),
            }
        } else {
            let peer = if self.cfg.peers.is_some() {
                // SAFETY: this slot's accept has completed, so the kernel no
                // longer writes it; it is re-armed only below.
                let addr = unsafe { &*self.accepting.addrs[slot].get() };
                let peer = PeerKey::from_sockaddr(&addr.storage, addr.len);
                assert!(peer.is_some(), "a TCP accept gave no IP address");
                peer
            } else {
                None
            };
            self.admit(result as u32, peer);
            self.count_accept();
        }
        self.arm_accept();
    }

    /// A tick: the accept-rate budget starts over, and accepts the table had no
    /// room for are armed again.
    pub(super) fn accept_tick(&mut self) {
        self.accepting.this_tick = 0;
        self.accepting.paused = false;
        self.arm_accept();
    }

    /// `--max-accepts-per-sec`: past this shard's share in the current tick,
    /// stop accepting until the next (new clients wait in the listen backlog;
    /// a reconnect storm is spread over seconds instead of starving the
    /// connections already served).
    fn count_accept(&mut self) {
        let max = self.cfg.accepts_per_sec_max;
        let acc = &mut self.accepting;
        acc.this_tick += 1;
        if max == 0 || acc.this_tick < max || acc.paused {
            return;
        }
        // The accept was the one one-shot accept: not re-arming it is enough.
        assert_eq!(acc.armed, 0, "a rate-limited accept is one-shot and alone");
        acc.paused = true;
        self.stats.accepts_paused.add(1);
    }

    fn admit(&mut self, slot: u32, peer: Option<PeerKey>) {
        self.stats.accepted.add(1);
        self.stats.direct_descriptors.add(1);
        self.stats.connections.add(1);
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1) & crate::token::GENERATION_MASK;
        let full = self.conns.len() >= self.cfg.connections_max as usize;
        let draining = self.shutdown_deadline.is_some();
        let key = self.conns.insert(Conn::new(slot, generation, self.now));
        let refusal = if draining {
            // Accepted before the listener's accept was cancelled: a draining
            // shard serves no new client.
            Some((
                503,
                "server shutting down, try another",
                "Retry-After: 1\r\n",
            ))
        } else if full {
            self.stats.rejected_limit.add(1);
            Some((
                503,
                "server at its connection limit, try again later",
                "Retry-After: 1\r\n",
            ))
        } else if let Some(peer) = peer {
            let counts = self.cfg.peers.as_ref().expect("a peer only with the limit");
            if counts.try_open(peer) {
                let peer_of = &mut self.accepting.peer_of;
                if peer_of.len() <= key {
                    peer_of.resize(key + 1, None);
                }
                assert!(peer_of[key].is_none(), "key {key} is counted twice");
                peer_of[key] = Some(peer);
                None
            } else {
                Some((
                    429,
                    "too many connections from your address",
                    "Retry-After: 5\r\n",
                ))
            }
        } else {
            None
        };
        if let Some((status, reason, headers)) = refusal {
            let (conns, mut env) = self.env_parts();
            input::reject(&mut conns[key], status, reason, headers, &mut env);
        }
        self.drive(key);
    }

    /// A finished connection gives its place under its address back.
    pub(super) fn release_peer(&mut self, key: usize) {
        if let Some(peer) = self.accepting.peer_of.get_mut(key).and_then(Option::take) {
            let counts = self.cfg.peers.as_ref().expect("a peer only with the limit");
            counts.close(peer);
        }
    }
}
