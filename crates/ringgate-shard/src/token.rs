//! `user_data` encoding: what an operation was, and for which connection.
//!
//! Layout: `op` in bits 56..64, the connection's generation in bits 32..56, the
//! connection-table key in bits 0..32. A record is freed only when nothing is
//! in flight on it, so a completion whose generation does not match the slot's
//! current record is a bug, and the shard crashes on it. `user_data` 0 is never
//! used.

/// The operation kinds a shard submits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Op {
    Accept = 1,
    Tick = 2,
    Doorbell = 3,
    /// Cancels of any kind: their completions carry nothing to act on.
    Cancel = 4,
    Recv = 5,
    Send = 6,
    Shutdown = 7,
    Close = 8,
    Poll = 9,
}

impl Op {
    fn from_bits(bits: u8) -> Option<Op> {
        Some(match bits {
            1 => Op::Accept,
            2 => Op::Tick,
            3 => Op::Doorbell,
            4 => Op::Cancel,
            5 => Op::Recv,
            6 => Op::Send,
            7 => Op::Shutdown,
            8 => Op::Close,
            9 => Op::Poll,
            _ => return None,
        })
    }
}

/// Generations wrap at 24 bits.
pub(crate) const GENERATION_MASK: u32 = (1 << 24) - 1;

/// A decoded `user_data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Token {
    pub op: Op,
    pub generation: u32,
    pub key: u32,
}

impl Token {
    pub fn new(op: Op, generation: u32, key: usize) -> Self {
        let key = u32::try_from(key).expect("connection keys fit in 32 bits");
        Token {
            op,
            generation: generation & GENERATION_MASK,
            key,
        }
    }

    /// A token for a shard-wide operation (no connection).
    pub fn shard(op: Op) -> Self {
        Token {
            op,
            generation: 0,
            key: 0,
        }
    }

    pub fn encode(self) -> u64 {
        (self.op as u64) << 56 | u64::from(self.generation) << 32 | u64::from(self.key)
    }

    /// Decodes a `user_data`; an unknown op is a bug in this crate.
    pub fn decode(user_data: u64) -> Token {
        let op = Op::from_bits((user_data >> 56) as u8)
            .unwrap_or_else(|| panic!("completion with foreign user_data {user_data:#x}"));
        Token {
            op,
            generation: (user_data >> 32) as u32 & GENERATION_MASK,
            key: user_data as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_at_the_edges() {
        for op in [Op::Accept, Op::Recv, Op::Close] {
            for generation in [0, 1, GENERATION_MASK] {
                for key in [0usize, 1, u32::MAX as usize] {
                    let t = Token::new(op, generation, key);
                    assert_eq!(Token::decode(t.encode()), t);
                    assert_ne!(t.encode(), 0);
                }
            }
        }
        // Generations wrap instead of spilling into the op byte.
        let t = Token::new(Op::Send, GENERATION_MASK + 2, 7);
        assert_eq!(Token::decode(t.encode()).generation, 1);
        assert_eq!(Token::decode(t.encode()).op, Op::Send);
    }
}
