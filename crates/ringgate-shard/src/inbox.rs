//! A shard's inbox: a bounded queue of commands from other threads, the
//! doorbell (an eventfd the shard keeps a read armed on) that wakes it, and the
//! shutdown request, which needs no queue space.
//!
//! The doorbell rings once per batch, not once per command: a sender rings only
//! when it flips `notified` from false to true, and the shard clears `notified`
//! (under the queue's lock) only when it takes the last queued command. A full
//! queue is back-pressure: the command is handed back to the sender, which
//! reports it or waits for room (the broker: a client's publish is refused;
//! the publish API waits up to `--publish-wait`, then refuses what still finds
//! no room with 503). A sender that must deliver to several inboxes or none
//! reserves a place in each first ([`Inbox::reserve`]).
//!
//! Shutdown is a separate flag plus an unconditional ring: a shard whose queue
//! is full of events still learns that it must stop.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;

use crate::routes::HashedTopic;
use crate::sys;
use crate::upstream::SubscribeAnswer;

/// Messages other threads send to a shard through its queue.
#[derive(Debug)]
pub enum Command {
    /// Queue `frame` (an encoded WebSocket frame) on every local subscriber of `topic`.
    Deliver {
        /// The topic.
        topic: Arc<str>,
        /// `topic`'s [`crate::topic_hash`], computed once by the publisher: the
        /// shard finds the topic by it without hashing the name again. Made by
        /// [`Command::deliver`], which holds the two together (one made by hand
        /// with another hash would reach nobody; debug builds check it).
        hash: u64,
        /// The event's number in its topic.
        seq: u64,
        /// The frame, shared by every shard it goes to and every subscriber.
        frame: Bytes,
        /// When it was published ([`crate::clock_ns`]), for the latency histogram.
        published_ns: u64,
    },
    /// The broker's answer to a subscribe this shard forwarded.
    Subscribed(Box<SubscribeAnswer>),
}

impl Command {
    /// The delivery of `frame`, event `seq` of `topic` (`name`, the publisher's
    /// shared copy of the same name), to the shard's subscribers.
    pub fn deliver(
        topic: HashedTopic<'_>,
        name: &Arc<str>,
        seq: u64,
        frame: Bytes,
        published_ns: u64,
    ) -> Command {
        assert_eq!(topic.name(), &**name, "a delivery's hash is its topic's");
        Command::Deliver {
            topic: name.clone(),
            hash: topic.hash(),
            seq,
            frame,
            published_ns,
        }
    }

    /// The bytes this command will put in send queues per subscriber.
    fn bytes(&self) -> usize {
        match self {
            Command::Deliver { frame, .. } => frame.len(),
            Command::Subscribed(answer) => answer.replay.iter().map(Bytes::len).sum(),
        }
    }
}

struct Queue {
    commands: VecDeque<Command>,
    /// Places promised to senders by [`Inbox::reserve`] and not yet used.
    reserved: usize,
}

pub(crate) struct Inbox {
    queue: Mutex<Queue>,
    capacity: usize,
    notified: AtomicBool,
    shutdown: Mutex<Option<Instant>>,
    doorbell: OwnedFd,
}

/// Places in an inbox promised to a sender: commands [`Reservation::stage`]d
/// into them cannot be refused, and reach the queue together, in order, with
/// one lock and at most one ring, at [`Reservation::commit`]. Unused places
/// go back at the commit or when the reservation is dropped. Dropping staged
/// commands uncommitted is a bug (they were promised to the shard) and panics.
pub struct Reservation<'a> {
    inbox: &'a Inbox,
    /// Places promised and not yet staged into.
    places: usize,
    staged: Vec<Command>,
}

impl Reservation<'_> {
    /// Places left for [`Reservation::stage`].
    pub fn places(&self) -> usize {
        self.places
    }

    /// Queues one command in a reserved place, at once (a one-place reservation's use).
    pub fn push(mut self, command: Command) {
        assert!(self.places > 0, "pushing past the reserved places");
        let places = std::mem::take(&mut self.places);
        self.inbox.fill_reserved(places, std::iter::once(command));
    }

    /// Holds `command` for the next [`Reservation::commit`], in a reserved place.
    pub fn stage(&mut self, command: Command) {
        assert!(self.places > 0, "staging past the reserved places");
        self.places -= 1;
        self.staged.push(command);
    }

    /// Queues the staged commands in order and gives the unused places back.
    pub fn commit(mut self) {
        let staged = std::mem::take(&mut self.staged);
        let places = staged.len() + std::mem::take(&mut self.places);
        self.inbox.fill_reserved(places, staged.into_iter());
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            assert!(
                self.staged.is_empty(),
                "staged commands dropped uncommitted"
            );
        }
        // Nothing is queued: while panicking, staged commands are dropped too.
        let unused = self.places + self.staged.len();
        self.inbox.fill_reserved(unused, std::iter::empty());
    }
}

impl Inbox {
    pub fn new(capacity: usize) -> std::io::Result<Self> {
        Ok(Inbox {
            queue: Mutex::new(Queue {
                commands: VecDeque::with_capacity(capacity.min(1024)),
                reserved: 0,
            }),
            capacity,
            notified: AtomicBool::new(false),
            shutdown: Mutex::new(None),
            doorbell: sys::eventfd()?,
        })
    }

    pub fn doorbell(&self) -> &OwnedFd {
        &self.doorbell
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A sender that panicked mid-push leaves a consistent queue (push_back is
        // the last step), so a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends `places` reservations: `commands` (at most that many) are queued in
    /// order in some of them, the rest given back; rings if any was queued.
    fn fill_reserved(&self, places: usize, commands: impl ExactSizeIterator<Item = Command>) {
        let queued = commands.len();
        assert!(queued <= places, "more commands than reserved places");
        if places == 0 {
            return;
        }
        {
            let mut queue = self.lock();
            assert!(queue.reserved >= places, "a reservation without its places");
            queue.reserved -= places;
            queue.commands.extend(commands);
        }
        if queued > 0 {
            self.ring();
        }
    }

    /// Wakes the shard unless it was already woken and has not drained since.
    fn ring(&self) {
        if !self.notified.swap(true, Ordering::SeqCst) {
            sys::ring_eventfd(sys::raw(&self.doorbell));
        }
    }

    /// Queues a command; hands it back if the inbox is full.
    pub fn push(&self, command: Command) -> Result<(), Command> {
        {
            let mut queue = self.lock();
            if queue.commands.len() + queue.reserved >= self.capacity {
                return Err(command);
            }
            queue.commands.push_back(command);
        }
        self.ring();
        Ok(())
    }

    /// Queues the broker's answer to a subscribe whatever the queue holds: the
    /// shard bounds how many answers can be outstanding
    /// (`SUBSCRIBES_PENDING_MAX`), so answers add at most that to the queue, and
    /// a subscribe is never lost to a queue full of events.
    pub fn push_answer(&self, answer: Box<SubscribeAnswer>) {
        self.lock().commands.push_back(Command::Subscribed(answer));
        self.ring();
    }

    /// Commands it holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Places neither taken nor reserved now.
    pub fn room(&self) -> usize {
        let queue = self.lock();
        self.capacity
            .saturating_sub(queue.commands.len() + queue.reserved)
    }

    /// Promises a place for one command, or `None` if the inbox is full.
    pub fn reserve(&self) -> Option<Reservation<'_>> {
        Some(self.reserve_up_to(1)).filter(|r| r.places() == 1)
    }

    /// Promises as many places as are free, up to `wanted` (perhaps none).
    pub fn reserve_up_to(&self, wanted: usize) -> Reservation<'_> {
        let mut queue = self.lock();
        let free = self
            .capacity
            .saturating_sub(queue.commands.len() + queue.reserved);
        let places = wanted.min(free);
        queue.reserved += places;
        Reservation {
            inbox: self,
            places,
            // A single place is pushed at once (`push`), never staged.
            staged: if places > 1 {
                Vec::with_capacity(places)
            } else {
                Vec::new()
            },
        }
    }

    /// Asks the shard to drain and stop by `deadline`. Needs no queue space; the
    /// first request wins.
    pub fn request_shutdown(&self, deadline: Instant) {
        let mut shutdown = self.shutdown.lock().unwrap_or_else(|p| p.into_inner());
        shutdown.get_or_insert(deadline);
        drop(shutdown);
        // Always ring: the shard may have been notified of events it has not yet
        // drained, and it checks this flag on every doorbell.
        sys::ring_eventfd(sys::raw(&self.doorbell));
    }

    /// The deadline of a requested shutdown.
    pub fn shutdown_requested(&self) -> Option<Instant> {
        *self.shutdown.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves queued commands into `out`, oldest first: at most `commands_max`,
    /// and no more once `bytes_max` event bytes were taken (at least one command
    /// is taken). Returns whether commands remain; if none do, the next push
    /// rings the doorbell again.
    pub fn take(&self, out: &mut Vec<Command>, commands_max: usize, bytes_max: usize) -> bool {
        let mut queue = self.lock();
        let mut bytes = 0;
        while out.len() < commands_max && bytes < bytes_max {
            let Some(command) = queue.commands.pop_front() else {
                break;
            };
            bytes += command.bytes();
            out.push(command);
        }
        let more = !queue.commands.is_empty();
        if !more {
            // Under the lock: a sender that pushes after this sees `false` and rings.
            self.notified.store(false, Ordering::SeqCst);
        }
        more
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliver(n: u8) -> Command {
        Command::deliver(
            HashedTopic::new("t"),
            &Arc::from("t"),
            u64::from(n),
            Bytes::from(vec![n; usize::from(n)]),
            0,
        )
    }

    /// The doorbell's count (reset by reading it), 0 if it has not rung.
    fn rings(inbox: &Inbox) -> u64 {
        let mut pollfd = libc::pollfd {
            fd: sys::raw(inbox.doorbell()),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no waiting.
        if unsafe { libc::poll(&mut pollfd, 1, 0) } != 1 {
            return 0;
        }
        let mut count = 0u64;
        // SAFETY: reads 8 bytes into a live u64 from our eventfd, which poll says is readable.
        let n = unsafe {
            libc::read(
                sys::raw(inbox.doorbell()),
                (&mut count as *mut u64).cast(),
                8,
            )
        };
        if n == 8 {
            count
        } else {
            0
        }
    }

    #[test]
    fn a_full_inbox_hands_the_command_back() {
        let inbox = Inbox::new(2).unwrap();
        assert!(inbox.push(deliver(1)).is_ok());
        assert!(inbox.push(deliver(2)).is_ok());
        assert!(matches!(
            inbox.push(deliver(3)),
            Err(Command::Deliver { .. })
        ));
        let mut out = Vec::new();
        assert!(!inbox.take(&mut out, 100, usize::MAX));
        assert_eq!(out.len(), 2);
        assert!(inbox.push(deliver(4)).is_ok());
    }

    #[test]
    fn the_doorbell_rings_once_per_batch() {
        let inbox = Inbox::new(100).unwrap();
        for i in 0..10 {
            inbox.push(deliver(i)).unwrap();
        }
        assert_eq!(rings(&inbox), 1);
        let mut out = Vec::new();
        assert!(inbox.take(&mut out, 4, usize::MAX), "six remain");
        inbox.push(deliver(11)).unwrap();
        assert_eq!(rings(&inbox), 0, "no ring while commands remain");
        assert!(!inbox.take(&mut out, 100, usize::MAX));
        assert_eq!(out.len(), 11);
        inbox.push(deliver(12)).unwrap();
        assert_eq!(rings(&inbox), 1, "rings again after the last was taken");
    }

    #[test]
    fn a_turn_takes_at_most_its_byte_budget_but_always_one() {
        let inbox = Inbox::new(100).unwrap();
        for n in [50, 50, 50, 200] {
            inbox.push(deliver(n)).unwrap();
        }
        let mut out = Vec::new();
        assert!(inbox.take(&mut out, 100, 100));
        assert_eq!(out.len(), 2, "stops once 100 bytes were taken");
        out.clear();
        assert!(inbox.take(&mut out, 100, 1));
        assert_eq!(out.len(), 1, "one command even over the budget");
        out.clear();
        assert!(!inbox.take(&mut out, 100, 1));
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn reservations_hold_places_and_give_them_back_unused() {
        let inbox = Inbox::new(2).unwrap();
        let a = inbox.reserve().unwrap();
        let b = inbox.reserve().unwrap();
        assert!(inbox.reserve().is_none());
        assert!(inbox.push(deliver(1)).is_err(), "reserved places are taken");
        drop(b);
        a.push(deliver(2));
        assert!(inbox.push(deliver(3)).is_ok(), "the unused place came back");
        assert!(inbox.reserve().is_none());
        let mut out = Vec::new();
        inbox.take(&mut out, 10, usize::MAX);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn a_batch_reservation_queues_in_order_with_one_ring_and_returns_the_rest() {
        let inbox = Inbox::new(10).unwrap();
        inbox.push(deliver(1)).unwrap();
        let mut batch = inbox.reserve_up_to(20);
        assert_eq!(batch.places(), 9, "only what is free");
        assert!(inbox.reserve().is_none());
        assert_eq!(rings(&inbox), 1, "the first push rang");
        let mut out = Vec::new();
        assert!(!inbox.take(&mut out, 10, usize::MAX));
        batch.stage(deliver(2));
        batch.stage(deliver(3));
        assert_eq!(rings(&inbox), 0, "nothing queued before the commit");
        batch.commit();
        assert_eq!(rings(&inbox), 1, "one ring for the batch");
        assert!(!inbox.take(&mut out, 10, usize::MAX));
        let seqs: Vec<u64> = out
            .iter()
            .map(|c| match c {
                Command::Deliver { seq, .. } => *seq,
                Command::Subscribed(_) => unreachable!(),
            })
            .collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert_eq!(
            inbox.reserve_up_to(20).places(),
            10,
            "the unused places came back"
        );
        let empty = inbox.reserve_up_to(5);
        empty.commit();
        assert_eq!(rings(&inbox), 0, "an empty commit does not ring");
    }

    #[test]
    #[should_panic(expected = "staged commands dropped uncommitted")]
    fn dropping_staged_commands_is_a_bug() {
        let inbox = Inbox::new(10).unwrap();
        let mut batch = inbox.reserve_up_to(2);
        batch.stage(deliver(1));
        drop(batch);
    }

    #[test]
    fn shutdown_needs_no_queue_space() {
        let inbox = Inbox::new(1).unwrap();
        inbox.push(deliver(1)).unwrap();
        assert!(inbox.push(deliver(2)).is_err());
        let deadline = Instant::now();
        inbox.request_shutdown(deadline);
        inbox.request_shutdown(deadline + std::time::Duration::from_secs(9));
        assert_eq!(inbox.shutdown_requested(), Some(deadline), "the first wins");
        assert!(rings(&inbox) >= 1);
    }
}
