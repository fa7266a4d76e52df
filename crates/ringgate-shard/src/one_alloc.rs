//! Shared frames in one allocation each.
//!
//! An event's frame is held by the history and by every send queue it is
//! queued on, so it is a reference-counted `Bytes`. Made from a `Vec`, a
//! `Bytes` puts its count in a second allocation at the first clone (32 bytes
//! with the allocator's header): two allocations and two frees per event, and
//! three cold cache lines to touch when the history drops a frame published
//! long ago (the count, the frame's header, the count's header). A frame of at
//! most [`INLINE_BYTES_MAX`] bytes is instead stored beside its count, in a
//! fixed-size buffer handed to `Bytes::from_owner`: one allocation, one free,
//! one line. The buffers come in size classes that fill glibc's chunks exactly
//! (16 bytes apart up to 252, then 32), so a frame wastes at most 31 bytes and
//! never more than the `Vec` and its separate count did. This is on the
//! publish path of every event (a malloc, a free and a cold miss per event
//! were a tenth of the broker thread's time in the notification runs), which
//! is why it is ours and not a general-purpose arena.
//!
//! Larger frames keep the `Vec`: their count's 32 bytes are small beside them.

use bytes::Bytes;

/// The largest frame stored beside its count.
pub const INLINE_BYTES_MAX: usize = 508;

/// A frame in a buffer of `N` bytes, `len` of them used. With the count
/// `from_owner` puts before it, `8 + 4 + N` bytes: each class below is
/// `16k - 4` so that is `16k + 8`, which glibc serves from a `16k + 16`-byte
/// chunk with nothing to spare.
#[repr(C)]
struct Inline<const N: usize> {
    len: u32,
    bytes: [u8; N],
}

impl<const N: usize> AsRef<[u8]> for Inline<N> {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

/// `head` then `parts`, `len` bytes in all, in a buffer of `N`.
fn inline<const N: usize>(head: &[u8], parts: &[&[u8]], len: usize) -> Bytes {
    assert!(len <= N, "the frame fits its class");
    let mut frame = Inline {
        len: u32::try_from(len).expect("inline frames are small"),
        bytes: [0; N],
    };
    let mut at = 0;
    for part in std::iter::once(&head).chain(parts) {
        frame.bytes[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    assert_eq!(at, len, "the frame is its parts");
    Bytes::from_owner(frame)
}

/// `head` then `parts`, `len` bytes, in a `Vec` of exactly that.
fn vec(head: &[u8], parts: &[&[u8]], len: usize) -> Bytes {
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(head);
    for part in parts {
        out.extend_from_slice(part);
    }
    assert_eq!(out.len(), len, "the frame is its parts");
    Bytes::from(out)
}

/// Picks the smallest class that holds `len` bytes (the classes in order, the
/// last one [`INLINE_BYTES_MAX`]).
macro_rules! by_class {
    ($head:expr, $parts:expr, $len:expr; $($class:literal)*) => {
        match $len {
            $(len if len <= $class => inline::<$class>($head, $parts, len),)*
            len => panic!("{len} bytes: INLINE_BYTES_MAX must be the last class"),
        }
    };
}

/// `head` then `parts`, one after the other, as one shared `Bytes`: in one
/// allocation with its reference count when it is at most
/// [`INLINE_BYTES_MAX`] bytes. (A frame is its header and its payload's parts.)
pub fn concat(head: &[u8], parts: &[&[u8]]) -> Bytes {
    let len = head.len() + parts.iter().map(|p| p.len()).sum::<usize>();
    if len > INLINE_BYTES_MAX {
        return vec(head, parts, len);
    }
    by_class!(head, parts, len;
        28 44 60 76 92 108 124 140 156 172 188 204 220 236 252
        284 316 348 380 412 444 476 508)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every length around every class boundary, and past the last.
    fn lengths() -> impl Iterator<Item = usize> {
        (0..=INLINE_BYTES_MAX + 40).chain([1_000, 4_096, 70_000])
    }

    #[test]
    fn a_frame_is_its_parts_at_every_length() {
        for len in lengths() {
            let whole: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            // Split in three uneven parts, some empty.
            let (a, rest) = whole.split_at(len / 3);
            let (b, c) = rest.split_at(rest.len() / 2);
            let frame = concat(a, &[&[], b, c]);
            assert_eq!(&frame[..], &whole[..], "length {len}");
            let copy = frame.clone();
            drop(frame);
            assert_eq!(&copy[..], &whole[..], "a clone outlives the first handle");
            let tail = copy.slice(len / 2..);
            drop(copy);
            assert_eq!(&tail[..], &whole[len / 2..], "a slice outlives both");
        }
    }

    #[test]
    fn small_frames_take_one_allocation_and_large_ones_their_vec() {
        // The classes fill glibc's chunks: 8-byte count, 4-byte length, N bytes.
        assert_eq!(std::mem::size_of::<Inline<28>>(), 32);
        assert_eq!(std::mem::size_of::<Inline<508>>(), 512);
        // An inline frame's bytes lie inside the owner `from_owner` boxed: the
        // first byte sits 12 bytes past the count (8-byte count, 4-byte length).
        // A frame from a `Vec` starts its allocation, 16-byte aligned by glibc.
        for len in [1, 28, 29, 252, 253, INLINE_BYTES_MAX] {
            let frame = concat(&[], &[&vec![1u8; len]]);
            assert_eq!(frame.as_ptr() as usize % 16, 12, "length {len} inline");
        }
        let large = concat(&[1], &[&vec![1u8; INLINE_BYTES_MAX]]);
        assert_eq!(
            large.as_ptr() as usize % 16,
            0,
            "past the last class: a Vec"
        );
    }
}
