//! The shard's provided-buffer ring: the only receive memory a shard has.
//!
//! Buffer memory scales with reads in flight, not with connections: a multishot
//! recv picks a buffer when data arrives, the shard parses it in place and hands
//! it straight back. With incremental consumption (IOU_PBUF_RING_INC, Linux 6.12)
//! many small reads share one buffer at rising offsets; a completion without
//! IORING_CQE_F_BUF_MORE says the kernel is done with it.
//!
//! Owns the ring memory, the buffers, and each buffer's consumed offset. Does not
//! know about connections.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::{BufRingEntry, IOU_PBUF_RING_INC};
use io_uring::Submitter;

/// Bytes received into one buffer, lent to the shard until [`BufRing::finish`].
#[derive(Debug)]
pub(crate) struct Chunk {
    pub ptr: NonNull<u8>,
    pub len: usize,
    bid: u16,
    /// The kernel is done with the buffer: give it back after use.
    last: bool,
}

/// A registered ring of `entries` buffers of `buf_bytes` each.
pub(crate) struct BufRing {
    ring: Mapping,
    bufs: Mapping,
    entries: u16,
    buf_bytes: u32,
    incremental: bool,
    /// The next ring index to fill; published to the kernel by [`Self::publish`].
    tail: u16,
    dirty: bool,
    /// Per buffer, bytes the kernel has filled so far (incremental mode).
    consumed: Box<[u32]>,
    /// Buffers out of the ring: being filled (incremental mode) or being parsed.
    in_use: u32,
}

impl BufRing {
    /// Allocates and registers the ring as buffer group `bgid`, incremental if the
    /// kernel has it and `want_incremental`.
    pub fn new(
        submitter: &Submitter<'_>,
        entries: u32,
        buf_bytes: u32,
        bgid: u16,
        want_incremental: bool,
    ) -> io::Result<Self> {
        assert!(
            entries.is_power_of_two() && entries <= 32768,
            "checked by ShardConfig"
        );
        let entries16 = entries as u16;
        let ring = Mapping::new(entries as usize * std::mem::size_of::<BufRingEntry>())?;
        let bufs = Mapping::new(entries as usize * buf_bytes as usize)?;
        let addr = ring.ptr.as_ptr() as u64;
        let mut incremental = want_incremental;
        // SAFETY: `ring` is a page-aligned mapping of `entries` entries that lives in
        // `self` until drop, and drop unregisters nothing only after the ring is gone
        // (the shard drops its IoUring first).
        let mut result = unsafe {
            submitter.register_buf_ring_with_flags(
                addr,
                entries16,
                bgid,
                if incremental {
                    IOU_PBUF_RING_INC as u16
                } else {
                    0
                },
            )
        };
        if result.is_err() && incremental {
            incremental = false;
            // SAFETY: as above.
            result = unsafe { submitter.register_buf_ring_with_flags(addr, entries16, bgid, 0) };
        }
        result.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("registering the provided-buffer ring: {e} (needs Linux 5.19)"),
            )
        })?;
        let mut this = Self {
            ring,
            bufs,
            entries: entries16,
            buf_bytes,
            incremental,
            tail: 0,
            dirty: false,
            consumed: vec![0; entries as usize].into_boxed_slice(),
            in_use: 0,
        };
        for bid in 0..entries16 {
            this.push(bid);
        }
        this.publish();
        Ok(this)
    }

    /// Buffers out of the ring now.
    pub fn in_use(&self) -> u32 {
        self.in_use
    }

    /// Whether the kernel consumes buffers incrementally.
    pub fn incremental(&self) -> bool {
        self.incremental
    }

    /// Takes the `len` bytes a recv completion put into buffer `bid`.
    /// `buffer_more` is the CQE's IORING_CQE_F_BUF_MORE flag.
    pub fn take(&mut self, bid: u16, len: usize, buffer_more: bool) -> Chunk {
        assert!(
            bid < self.entries,
            "kernel named buffer {bid} of {}",
            self.entries
        );
        let offset = if self.incremental {
            let consumed = &mut self.consumed[bid as usize];
            let at = *consumed;
            *consumed += len as u32;
            at
        } else {
            0
        };
        if offset == 0 {
            self.in_use += 1;
        }
        assert!(
            offset as usize + len <= self.buf_bytes as usize,
            "recv overran buffer {bid}"
        );
        let start = bid as usize * self.buf_bytes as usize + offset as usize;
        // SAFETY: start + len is inside the buffer mapping (asserted above).
        let ptr = unsafe { NonNull::new_unchecked(self.bufs.ptr.as_ptr().add(start)) };
        Chunk {
            ptr,
            len,
            bid,
            last: !(self.incremental && buffer_more),
        }
    }

    /// Ends the use of a chunk; gives its buffer back when the kernel is done with it.
    pub fn finish(&mut self, chunk: Chunk) {
        if chunk.last {
            self.consumed[chunk.bid as usize] = 0;
            self.in_use -= 1;
            self.push(chunk.bid);
        }
    }

    /// Makes buffers given back since the last call visible to the kernel: one
    /// release store per batch of completions.
    pub fn publish(&mut self) {
        if !self.dirty {
            return;
        }
        // SAFETY: the ring mapping starts with an initialised entry whose `resv`
        // field is the ring tail shared with the kernel.
        let tail = unsafe { BufRingEntry::tail(self.ring.ptr.as_ptr().cast()) } as *mut u16;
        // SAFETY: the tail is a naturally aligned u16 the kernel reads concurrently;
        // AtomicU16 has the same layout.
        unsafe { AtomicU16::from_ptr(tail) }.store(self.tail, Ordering::Release);
        self.dirty = false;
    }

    fn push(&mut self, bid: u16) {
        let index = (self.tail & (self.entries - 1)) as usize;
        // SAFETY: index < entries, inside the ring mapping; the kernel reads only
        // entries before the published tail, and this one is past it.
        let entry = unsafe { &mut *self.ring.ptr.as_ptr().cast::<BufRingEntry>().add(index) };
        let addr = self.bufs.ptr.as_ptr() as u64 + u64::from(bid) * u64::from(self.buf_bytes);
        entry.set_addr(addr);
        entry.set_len(self.buf_bytes);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        self.dirty = true;
    }

    /// Keeps the memory mapped forever: for a shard that must exit while the
    /// kernel may still write into a buffer.
    pub fn leak(self) {
        std::mem::forget(self);
    }
}

/// An anonymous, page-aligned, private mapping, faulted in when made
/// (MAP_POPULATE): the shard's receive memory is allocated once, at start, and
/// the process's RSS shows all of it from the first moment instead of growing as
/// the kernel cycles through the ring (which made a soak's RSS climb for hours
/// and the per-connection figure mean little).
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Self> {
        // SAFETY: an anonymous private mapping with no address hint has no
        // preconditions; the result is checked. MAP_POPULATE only pre-faults it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).expect("mmap never returns null on success");
        Ok(Self { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
