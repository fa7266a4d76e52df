//! Client-to-server masking (RFC 6455 section 5.3), applied in place a word at a time.
//!
//! Owns only the XOR; where the mask comes from and which bytes are payload is the
//! frame decoder's business.

/// XORs `buf` with `mask`, as if `buf` started `offset` bytes into the payload.
///
/// `offset` lets a caller unmask a payload in pieces: unmasking `[0..a]` with
/// offset 0 and then `[a..n]` with offset `a` gives the same bytes as unmasking
/// `[0..n]` at once. Masking is its own inverse.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    let mask = rotate(mask, offset);
    let mask_word = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut words = buf.chunks_exact_mut(8);
    for word in &mut words {
        let value = u64::from_ne_bytes((&*word).try_into().expect("chunk of 8")) ^ mask_word;
        word.copy_from_slice(&value.to_ne_bytes());
    }
    // The tail starts at a multiple of 8 bytes, so the mask phase is unchanged.
    for (i, byte) in words.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

fn rotate(mask: [u8; 4], offset: usize) -> [u8; 4] {
    let r = offset & 3;
    [
        mask[r],
        mask[(r + 1) & 3],
        mask[(r + 2) & 3],
        mask[(r + 3) & 3],
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(buf: &mut [u8], mask: [u8; 4], offset: usize) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b ^= mask[(offset + i) % 4];
        }
    }

    #[test]
    fn matches_the_naive_oracle_at_every_length_and_offset() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        for len in 0..70 {
            for offset in 0..9 {
                let original: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
                let mut fast = original.clone();
                let mut slow = original.clone();
                apply_mask(&mut fast, mask, offset);
                naive(&mut slow, mask, offset);
                assert_eq!(fast, slow, "len {len} offset {offset}");
            }
        }
    }

    #[test]
    fn piecewise_equals_whole_and_is_an_involution() {
        let mask = [0xde, 0xad, 0xbe, 0xef];
        let original: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let mut whole = original.clone();
        apply_mask(&mut whole, mask, 0);
        for cut in [0, 1, 3, 5, 8, 13, 999, 1000] {
            let mut pieces = original.clone();
            let (a, b) = pieces.split_at_mut(cut);
            apply_mask(a, mask, 0);
            apply_mask(b, mask, cut);
            assert_eq!(pieces, whole, "cut at {cut}");
        }
        apply_mask(&mut whole, mask, 0);
        assert_eq!(whole, original);
    }
}
