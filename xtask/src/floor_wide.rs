//! `cargo xtask floor --conns N` past one process's open-file limit: the
//! io_uring half of the floor (floor.rs) at 100,000 sockets, held the way
//! ringgate holds them.
//!
//! The sender keeps every socket only as a direct descriptor: it accepts one,
//! puts it in a ring's registered-file table and closes its fd at once. A
//! table holds at most `FILES_PER_RING` (a ring's table is bounded by the
//! open-file limit), so the sender runs as many rings as it takes, all on one
//! thread pinned to CPU 0, as ringgate runs six shards on one CPU at 100,000
//! connections here. The readers are processes on CPU 1 of
//! `SOCKETS_PER_READER` sockets each, each connecting from a loopback address
//! of its own (127.0.0.2 on).
//!
//! There is no plain `send()` row here: it needs an fd per socket.

use std::net::{Ipv4Addr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

use io_uring::IoUring;

use crate::floor::{
    accept_all, measure, pin, send_batch, sender_ring, Args, KillOnDrop, SQ_ENTRIES,
};

/// Registered files per ring: under the open-file limit (20,000 here), which
/// bounds a ring's table.
pub const FILES_PER_RING: usize = 18_000;

/// Sockets per reader process, each from a loopback address of its own: a
/// connect searches its address's ports for a free one, slower the more are
/// taken, so the readers' sockets are spread thinner than a ring's.
const SOCKETS_PER_READER: usize = 10_000;

/// Sockets this measurement takes at most: one reader per loopback source,
/// 127.0.0.2 to 127.0.0.41.
pub const CONNS_MAX: usize = 40 * SOCKETS_PER_READER;

/// Sender CPU per write, in microseconds, with `args.conns` sockets over as
/// many rings and reader processes as they take.
pub fn measure_wide(args: &Args) -> Result<f64, String> {
    let conns = args.conns.unwrap_or(10_000);
    if conns == 0 || conns > CONNS_MAX {
        return Err(format!("--conns must be from 1 to {CONNS_MAX}"));
    }
    if args.events == 0 || args.size == 0 || args.rate <= 0.0 {
        return Err("--events, --size and --rate must be above 0".into());
    }
    let pattern = args.pattern(conns);
    let per_event = pattern.per_event;
    // Socket i is the (i % FILES_PER_RING)th of ring i / FILES_PER_RING, and
    // one of reader i / SOCKETS_PER_READER's (each reader's are accepted in a
    // run): what each reader will read, as the pattern writes.
    let readers = conns.div_ceil(SOCKETS_PER_READER);
    let mut expected = vec![0u64; readers];
    for write in 0..args.events * per_event {
        expected[pattern.socket_of(write) / SOCKETS_PER_READER] += args.size as u64;
    }
    let mut rings = (0..conns.div_ceil(FILES_PER_RING))
        .map(|r| Ring::new(FILES_PER_RING.min(conns - r * FILES_PER_RING)))
        .collect::<Result<Vec<_>, _>>()?;
    let listener = crate::floor::listener()?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut children = Vec::with_capacity(readers);
    for (r, expected) in expected.iter().enumerate() {
        let first = r * SOCKETS_PER_READER;
        let share = SOCKETS_PER_READER.min(conns - first);
        let source = Ipv4Addr::new(127, 0, 0, 2 + r as u8);
        children.push(KillOnDrop(
            Command::new(&exe)
                .args([
                    "floor-reader",
                    &addr.to_string(),
                    &share.to_string(),
                    &expected.to_string(),
                    if args.spin { "spin" } else { "sleep" },
                    "--source",
                    &source.to_string(),
                ])
                .stdout(Stdio::piped())
                .spawn()
                .map_err(|e| format!("starting reader {r}: {e}"))?,
        ));
        // The reader's sockets (at most SOCKETS_PER_READER fds open at once),
        // then one table update per ring they fall in, not one per socket.
        let accepted = accept_all(&listener, share, false)?;
        let mut at = 0;
        while at < accepted.len() {
            let socket = first + at;
            let (ring, slot) = (socket / FILES_PER_RING, socket % FILES_PER_RING);
            let run = (FILES_PER_RING - slot).min(accepted.len() - at);
            rings[ring].hold(slot, &accepted[at..at + run])?;
            at += run;
        }
        // `accepted` closes here; the rings' tables keep the sockets open.
    }
    pin(0);
    let payload = vec![b'x'; args.size];
    let mut targets = Vec::with_capacity(per_event);
    let mut slots: Vec<Vec<usize>> = vec![Vec::new(); rings.len()];
    let us = measure(args, per_event, |event| {
        // The event's sockets by ring, then each ring's in submits of at most
        // a full SQ, as a shard submits its own.
        pattern.event(event, &mut targets);
        slots.iter_mut().for_each(Vec::clear);
        for &socket in &targets {
            slots[socket / FILES_PER_RING].push(socket % FILES_PER_RING);
        }
        for (ring, slots) in rings.iter_mut().zip(&slots) {
            for batch in slots.chunks(SQ_ENTRIES as usize) {
                send_batch(&mut ring.ring, batch, &payload)?;
            }
        }
        Ok(())
    })?;
    for (r, reader) in children.iter_mut().enumerate() {
        reader.read_all(&format!("reader {r}"), expected[r])?;
    }
    Ok(us)
}

/// A ring with a table of sockets, set up as ringgate's rings are.
struct Ring {
    ring: IoUring,
}

impl Ring {
    fn new(files: usize) -> Result<Ring, String> {
        let ring = sender_ring()?;
        ring.submitter()
            .register_files_sparse(files as u32)
            .map_err(|e| format!("register_files_sparse: {e}"))?;
        Ok(Ring { ring })
    }

    /// Puts `sockets` in the table from `slot` on, in one update; the caller
    /// may then close their fds.
    fn hold(&mut self, slot: usize, sockets: &[TcpStream]) -> Result<(), String> {
        let fds: Vec<i32> = sockets.iter().map(|s| s.as_raw_fd()).collect();
        let done = self
            .ring
            .submitter()
            .register_files_update(slot as u32, &fds)
            .map_err(|e| format!("register_files_update: {e}"))?;
        if done != fds.len() {
            return Err(format!(
                "register_files_update took {done} of {}",
                fds.len()
            ));
        }
        Ok(())
    }
}
