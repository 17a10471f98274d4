//! The queue from the links' subscriptions to one consumer (the delivery loop, the cluster
//! calls), bounded in bytes.
//!
//! The Redis client hands messages over from its reader and cannot be made to wait, so a
//! message that would pass the bound is dropped here, and the consumer is told which link lost
//! messages: an [`Event::Overflow`] goes into the queue at that point, after the messages
//! taken before and ahead of those taken after, at most one per link at a time. The consumer
//! treats it like any other gap (see `delivery`): nothing is dropped silently, and memory
//! stays within `BUS_BACKLOG_BYTES` plus one message, whatever the traffic.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
};

use tokio::sync::mpsc;

use super::Item;

/// What comes out of the queue.
#[derive(Debug)]
pub enum Event {
    Message(Item),
    /// Messages of this link were dropped at the bound since the link's previous event.
    Overflow(usize),
    /// This link came (back) up with every channel subscribed: what was published while it
    /// was down never reached this replica.
    Up(usize),
}

/// What one queued message weighs: its bytes and the bookkeeping around them.
fn weight(item: &Item) -> usize {
    item.payload.len() + item.chan.len() + std::mem::size_of::<Event>()
}

struct Shared {
    /// Bytes of the messages queued now.
    bytes: AtomicUsize,
    limit: usize,
    /// Per link: an `Overflow` is queued and not yet taken.
    overflowing: Box<[AtomicBool]>,
    /// Messages dropped at the bound, ever.
    dropped: AtomicU64,
}

/// The sending end, held by every link for each channel of the subscription. Cheap to clone.
#[derive(Clone)]
pub struct Queue {
    tx: mpsc::UnboundedSender<Event>,
    shared: Arc<Shared>,
}

/// The consumer's end.
pub struct Incoming {
    rx: mpsc::UnboundedReceiver<Event>,
    shared: Arc<Shared>,
}

/// A queue for `links` links holding at most `limit` bytes of messages (one message more
/// when it alone is larger).
pub fn bounded(links: usize, limit: usize) -> (Queue, Incoming) {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        bytes: AtomicUsize::new(0),
        limit,
        overflowing: (0..links).map(|_| AtomicBool::new(false)).collect(),
        dropped: AtomicU64::new(0),
    });
    (
        Queue {
            tx,
            shared: shared.clone(),
        },
        Incoming { rx, shared },
    )
}

impl Queue {
    /// Queues `item`, or drops it and queues an `Overflow` of its link when the queue is full.
    /// False when the consumer is gone.
    pub fn push(&self, item: Item) -> bool {
        let w = weight(&item);
        let s = &self.shared;
        let taken = s
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n == 0 || n + w <= s.limit).then_some(n + w)
            })
            .is_ok();
        if taken {
            if self.tx.send(Event::Message(item)).is_ok() {
                return true;
            }
            s.bytes.fetch_sub(w, Ordering::AcqRel);
            return false;
        }
        s.dropped.fetch_add(1, Ordering::Relaxed);
        let link = item.link;
        match s.overflowing.get(link) {
            Some(flag) if !flag.swap(true, Ordering::AcqRel) => {
                self.tx.send(Event::Overflow(link)).is_ok()
            }
            _ => !self.tx.is_closed(),
        }
    }

    /// Queues a control event (never dropped: at most one per link change).
    pub fn signal(&self, event: Event) -> bool {
        self.tx.send(event).is_ok()
    }

    /// Whether both ends are the same queue (links keep one entry per queue, not per channel).
    pub fn same(&self, other: &Queue) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

impl Incoming {
    pub async fn recv(&mut self) -> Option<Event> {
        let event = self.rx.recv().await?;
        match &event {
            Event::Message(item) => {
                self.shared.bytes.fetch_sub(weight(item), Ordering::AcqRel);
            }
            Event::Overflow(link) => {
                if let Some(flag) = self.shared.overflowing.get(*link) {
                    flag.store(false, Ordering::Release);
                }
            }
            Event::Up(_) => {}
        }
        Some(event)
    }

    /// The next message, skipping control events (for consumers that have no use for them).
    pub async fn recv_message(&mut self) -> Option<Item> {
        loop {
            if let Event::Message(item) = self.recv().await? {
                return Some(item);
            }
        }
    }

    /// Events waiting now.
    pub fn len(&self) -> usize {
        self.rx.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// Bytes of the messages waiting now.
    pub fn bytes(&self) -> usize {
        self.shared.bytes.load(Ordering::Acquire)
    }

    /// A handle on the counters that outlives a move of `self` into a task.
    pub fn stats(&self) -> QueueStats {
        QueueStats(self.shared.clone())
    }
}

/// The queue's counters, for metrics.
#[derive(Clone)]
pub struct QueueStats(Arc<Shared>);

impl QueueStats {
    pub fn bytes(&self) -> usize {
        self.0.bytes.load(Ordering::Acquire)
    }

    /// Messages dropped at the bound (each one recovered as a gap).
    pub fn dropped(&self) -> u64 {
        self.0.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(link: usize, n: usize) -> Item {
        Item {
            link,
            chan: "c".into(),
            payload: vec![b'x'; n],
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_says_so_once_per_link_in_place() {
        let one = weight(&item(0, 100));
        let (q, mut rx) = bounded(2, 2 * one);
        assert!(q.push(item(0, 100)));
        assert!(q.push(item(1, 100)));
        // Full: these are dropped, and each link is told once.
        for _ in 0..5 {
            assert!(q.push(item(0, 100)));
        }
        assert!(q.push(item(1, 100)));
        assert_eq!(rx.bytes(), 2 * one);
        assert_eq!(rx.stats().dropped(), 6);
        let mut seen = Vec::new();
        while let Ok(Some(e)) =
            tokio::time::timeout(std::time::Duration::from_millis(10), rx.recv()).await
        {
            seen.push(match e {
                Event::Message(i) => format!("m{}", i.link),
                Event::Overflow(l) => format!("o{l}"),
                Event::Up(l) => format!("u{l}"),
            });
        }
        assert_eq!(seen, ["m0", "m1", "o0", "o1"]);
        assert_eq!(rx.bytes(), 0);
        // Taken: room again, and a new overflow is told again.
        assert!(q.push(item(0, 100)));
        assert!(q.push(item(0, 100)));
        assert!(q.push(item(0, 100)));
        assert!(matches!(rx.recv().await, Some(Event::Message(_))));
        assert!(matches!(rx.recv().await, Some(Event::Message(_))));
        assert!(matches!(rx.recv().await, Some(Event::Overflow(0))));
    }

    #[tokio::test]
    async fn a_message_larger_than_the_bound_passes_alone() {
        let (q, mut rx) = bounded(1, 10);
        assert!(q.push(item(0, 1000)));
        assert!(q.push(item(0, 1)));
        assert!(matches!(rx.recv().await, Some(Event::Message(i)) if i.payload.len() == 1000));
        assert!(matches!(rx.recv().await, Some(Event::Overflow(0))));
        assert_eq!(rx.bytes(), 0);
    }
}
