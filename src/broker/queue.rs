//! One session's outgoing side: the delivery queue (bounded by messages and bytes) and the
//! in-flight window of QoS 1/2 PUBLISHes the device has not acknowledged yet, with their packet
//! ids. Both start unallocated and give their memory back once drained, so an idle session
//! holds no buffer. When the queue is full, a QoS 1/2 delivery evicts the oldest QoS 0 one; with
//! none to evict, the new delivery is dropped. Every drop is reported to the caller, who counts it.

use std::collections::VecDeque;
use std::sync::Arc;

use super::message::Message;

/// Bounds of one session's delivery queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    pub max_messages: usize,
    pub max_bytes: usize,
}

/// One message on its way to one session, at the QoS it is delivered with.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub message: Arc<Message>,
    pub qos: u8,
    /// The RETAIN flag as written to the device.
    pub retain: bool,
    /// MQTT 5 subscription identifiers of the matching subscriptions (usually none).
    pub ids: Vec<u32>,
    /// The shared subscription group it came through, if any: handed to another member if this
    /// session leaves the group before the device has it.
    pub shared: Option<u64>,
}

/// What to write to the device next.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// A PUBLISH; `pkid` is 0 for QoS 0.
    Publish {
        delivery: Delivery,
        pkid: u16,
        dup: bool,
    },
    /// A PUBREL for a QoS 2 delivery the device has PUBRECed.
    Release(u16),
}

/// One delivery of a mailbox as it is kept beyond the process (see [`Mailbox::image`]).
#[derive(Debug, Clone)]
pub enum Kept {
    /// Waiting in the queue.
    Queued(Delivery),
    /// Written with the packet id of allocation `seq`, not acknowledged yet.
    Unacked { seq: u64, delivery: Delivery },
    /// PUBRECed by the device and PUBREL written (allocation `seq`), waiting for PUBCOMP.
    Released { seq: u64 },
}

/// A mailbox's kept deliveries, in order, and its next packet id allocation.
#[derive(Debug, Clone, Default)]
pub struct MailboxImage {
    pub next_seq: u64,
    pub entries: Vec<Kept>,
}

#[derive(Debug)]
enum Flight {
    /// Sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Unacked(Delivery),
    /// PUBREC received and PUBREL sent, waiting for PUBCOMP.
    Released,
}

#[derive(Debug)]
struct InFlight {
    pkid: u16,
    /// Allocation number, which also gives the packet id (see [`Mailbox::pkid_for`]).
    seq: u64,
    flight: Flight,
}

/// The outcome of offering a delivery to a queue.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pushed {
    /// The queue was empty before: the connection may be asleep and needs a wake-up.
    pub was_empty: bool,
    /// Deliveries dropped (the new one, or a QoS 0 one it evicted).
    pub dropped: u32,
    /// This push started a drop episode (the first drop since the queue last had room).
    pub episode: bool,
    /// The new delivery is in the queue.
    pub queued: bool,
}

#[derive(Debug, Default)]
pub struct Mailbox {
    queue: VecDeque<Delivery>,
    bytes: usize,
    /// QoS 0 deliveries in `queue`, so a full queue of QoS 1 is not scanned for one to evict.
    qos0: usize,
    inflight: VecDeque<InFlight>,
    next_seq: u64,
    dropping: bool,
}

/// Capacity above which an emptied buffer is released rather than kept for reuse.
const KEEP_CAPACITY: usize = 16;

impl Mailbox {
    /// Queues `delivery` unless the bounds forbid it. A queue that is empty takes one delivery
    /// whatever its size, so no single message is undeliverable.
    pub fn push(&mut self, delivery: Delivery, limits: QueueLimits) -> Pushed {
        let was_empty = self.queue.is_empty();
        let size = delivery.message.size();
        let mut dropped = 0;
        if !was_empty && self.over(size, limits) {
            if delivery.qos == 0 || !self.evict_qos0(size, limits) {
                let episode = !std::mem::replace(&mut self.dropping, true);
                return Pushed {
                    was_empty,
                    dropped: 1,
                    episode,
                    queued: false,
                };
            }
            dropped = 1;
        }
        let episode = dropped > 0 && !std::mem::replace(&mut self.dropping, true);
        if dropped == 0 {
            self.dropping = false;
        }
        self.bytes += size;
        if delivery.qos == 0 {
            self.qos0 += 1;
        }
        self.queue.push_back(delivery);
        Pushed {
            was_empty,
            dropped,
            episode,
            queued: true,
        }
    }

    fn over(&self, size: usize, limits: QueueLimits) -> bool {
        self.queue.len() >= limits.max_messages || self.bytes + size > limits.max_bytes
    }

    /// Removes QoS 0 deliveries, oldest first, until `size` more fits; false (and nothing
    /// removed beyond what was needed) when there are not enough of them.
    fn evict_qos0(&mut self, size: usize, limits: QueueLimits) -> bool {
        if self.qos0 == 0 {
            return false;
        }
        // One eviction frees one message slot; bytes may need more, but never more than all.
        while self.qos0 > 0 && self.over(size, limits) {
            let Some(i) = self.queue.iter().position(|d| d.qos == 0) else {
                break;
            };
            if let Some(old) = self.queue.remove(i) {
                self.qos0 -= 1;
                self.bytes -= old.message.size();
            }
        }
        !self.over(size, limits) || self.queue.is_empty()
    }

    /// Takes the next delivery that may be written, given that at most `window` QoS 1/2
    /// PUBLISHes may be unacknowledged; assigns its packet id and records it as in flight.
    pub fn next(&mut self, window: usize) -> Option<Outgoing> {
        let front = self.queue.front()?;
        let pkid = if front.qos == 0 {
            0
        } else {
            if self.inflight.len() >= window {
                return None;
            }
            // A packet id is reused only once the delivery holding it is acknowledged.
            if self
                .inflight
                .front()
                .is_some_and(|oldest| self.next_seq - oldest.seq >= u64::from(u16::MAX))
            {
                return None;
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            Self::pkid_for(seq)
        };
        let delivery = self.queue.pop_front()?;
        self.bytes -= delivery.message.size();
        if delivery.qos == 0 {
            self.qos0 -= 1;
        } else {
            self.inflight.push_back(InFlight {
                pkid,
                seq: self.next_seq - 1,
                flight: Flight::Unacked(delivery.clone()),
            });
        }
        if self.queue.is_empty() && self.queue.capacity() > KEEP_CAPACITY {
            self.queue = VecDeque::new();
        }
        Some(Outgoing::Publish {
            delivery,
            pkid,
            dup: false,
        })
    }

    /// Packet ids cycle through 1..=65535 in allocation order.
    fn pkid_for(seq: u64) -> u16 {
        (seq % u64::from(u16::MAX)) as u16 + 1
    }

    /// The device's PUBACK: true if it completed a QoS 1 delivery.
    pub fn puback(&mut self, pkid: u16) -> bool {
        self.complete(pkid, |f| matches!(f, Flight::Unacked(d) if d.qos == 1))
    }

    /// The device's PUBREC: true if a PUBREL is to be sent (also for a repeated PUBREC).
    pub fn pubrec(&mut self, pkid: u16) -> bool {
        match self.inflight.iter_mut().find(|f| f.pkid == pkid) {
            Some(f) => match &f.flight {
                Flight::Unacked(d) if d.qos == 2 => {
                    f.flight = Flight::Released;
                    true
                }
                Flight::Released => true,
                Flight::Unacked(_) => false,
            },
            None => false,
        }
    }

    /// Removes a delivery from the window without an acknowledgement (it was not written).
    pub fn forget(&mut self, pkid: u16) {
        self.complete(pkid, |_| true);
    }

    /// The device's PUBCOMP: true if it completed a QoS 2 delivery.
    pub fn pubcomp(&mut self, pkid: u16) -> bool {
        self.complete(pkid, |f| matches!(f, Flight::Released))
    }

    fn complete(&mut self, pkid: u16, expected: impl Fn(&Flight) -> bool) -> bool {
        let Some(i) = self
            .inflight
            .iter()
            .position(|f| f.pkid == pkid && expected(&f.flight))
        else {
            return false;
        };
        self.inflight.remove(i);
        if self.inflight.is_empty() && self.inflight.capacity() > KEEP_CAPACITY {
            self.inflight = VecDeque::new();
        }
        true
    }

    /// What a resumed connection must send first, in the original order: unacknowledged
    /// PUBLISHes again with DUP set, PUBRELs for those already PUBRECed.
    pub fn resend(&self) -> Vec<Outgoing> {
        self.inflight
            .iter()
            .map(|f| match &f.flight {
                Flight::Unacked(d) => Outgoing::Publish {
                    delivery: d.clone(),
                    pkid: f.pkid,
                    dup: true,
                },
                Flight::Released => Outgoing::Release(f.pkid),
            })
            .collect()
    }

    /// Takes out the QoS 1/2 deliveries of shared group `group` that the device does not have
    /// yet: those queued, and (`unacked`) those written but not acknowledged. The packet ids of
    /// the latter are free again.
    pub fn take_shared(&mut self, group: u64, unacked: bool) -> Vec<Delivery> {
        let ours = |d: &Delivery| d.qos > 0 && d.shared == Some(group);
        let mut taken = Vec::new();
        if unacked {
            self.inflight.retain(|f| match &f.flight {
                Flight::Unacked(d) if ours(d) => {
                    taken.push(d.clone());
                    false
                }
                _ => true,
            });
        }
        if self.queue.iter().any(ours) {
            let mut kept = VecDeque::with_capacity(self.queue.len());
            for d in self.queue.drain(..) {
                if ours(&d) {
                    self.bytes -= d.message.size();
                    taken.push(d);
                } else {
                    kept.push_back(d);
                }
            }
            self.queue = kept;
        }
        taken
    }

    /// What a restart must find of this mailbox: the in-flight window in order, then the
    /// queued QoS 1/2 deliveries (QoS 0 ones are never kept beyond the process).
    pub fn image(&self) -> MailboxImage {
        let mut entries = Vec::with_capacity(self.inflight.len() + self.queue.len() - self.qos0);
        for f in &self.inflight {
            entries.push(match &f.flight {
                Flight::Unacked(d) => Kept::Unacked {
                    seq: f.seq,
                    delivery: d.clone(),
                },
                Flight::Released => Kept::Released { seq: f.seq },
            });
        }
        entries.extend(
            self.queue
                .iter()
                .filter(|d| d.qos > 0)
                .map(|d| Kept::Queued(d.clone())),
        );
        MailboxImage {
            next_seq: self.next_seq,
            entries,
        }
    }

    /// A mailbox as [`Mailbox::image`] saw it: the window keeps its packet ids, so a resumed
    /// device gets its unacknowledged PUBLISHes again with the ids it knows.
    pub fn from_image(image: MailboxImage) -> Mailbox {
        let mut mailbox = Mailbox {
            next_seq: image.next_seq,
            ..Mailbox::default()
        };
        for kept in image.entries {
            match kept {
                Kept::Unacked { seq, delivery } => mailbox.inflight.push_back(InFlight {
                    pkid: Self::pkid_for(seq),
                    seq,
                    flight: Flight::Unacked(delivery),
                }),
                Kept::Released { seq } => mailbox.inflight.push_back(InFlight {
                    pkid: Self::pkid_for(seq),
                    seq,
                    flight: Flight::Released,
                }),
                Kept::Queued(delivery) => {
                    mailbox.bytes += delivery.message.size();
                    if delivery.qos == 0 {
                        mailbox.qos0 += 1;
                    }
                    mailbox.queue.push_back(delivery);
                }
            }
        }
        // Allocation numbers only grow: a damaged image must not make them repeat.
        if let Some(last) = mailbox.inflight.iter().map(|f| f.seq).max() {
            mailbox.next_seq = mailbox.next_seq.max(last + 1);
        }
        mailbox
    }

    /// The next packet id allocation (kept with the session record).
    pub fn image_seq(&self) -> u64 {
        self.next_seq
    }

    /// Deliveries waiting in the queue.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn queued_bytes(&self) -> usize {
        self.bytes
    }

    /// QoS 1/2 deliveries written and not yet completed.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// Whether anything could be written now with `window`.
    pub fn ready(&self, window: usize) -> bool {
        self.queue
            .front()
            .is_some_and(|d| d.qos == 0 || self.inflight.len() < window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::message::Origin;

    const LIMITS: QueueLimits = QueueLimits {
        max_messages: 3,
        max_bytes: 1000,
    };

    fn delivery(payload: &'static str, qos: u8) -> Delivery {
        Delivery {
            message: Message::new("t".into(), payload.into(), qos, false, Origin::Bus),
            qos,
            retain: false,
            ids: Vec::new(),
            shared: None,
        }
    }

    #[test]
    fn an_image_keeps_the_window_with_its_packet_ids_and_the_queued_qos_1_2() {
        let mut mailbox = Mailbox::default();
        for (p, qos) in [("a", 1), ("b", 2), ("c", 0), ("d", 1)] {
            mailbox.push(
                delivery(p, qos),
                QueueLimits {
                    max_messages: 10,
                    max_bytes: 1000,
                },
            );
        }
        let first = mailbox.next(2);
        let second = mailbox.next(2);
        let (Some(Outgoing::Publish { pkid: p1, .. }), Some(Outgoing::Publish { pkid: p2, .. })) =
            (first, second)
        else {
            panic!("two publishes");
        };
        assert!(mailbox.pubrec(p2));
        let image = mailbox.image();
        assert_eq!(
            image.entries.len(),
            3,
            "the queued QoS 0 is not kept: {image:?}"
        );
        let mut back = Mailbox::from_image(image);
        let resent = back.resend();
        assert!(
            matches!(&resent[..], [Outgoing::Publish { pkid, dup: true, .. }, Outgoing::Release(r)] if *pkid == p1 && *r == p2),
            "{resent:?}"
        );
        assert!(back.puback(p1) && back.pubcomp(p2));
        let Some(Outgoing::Publish { delivery, pkid, .. }) = back.next(2) else {
            panic!("the queued one");
        };
        assert_eq!(&delivery.message.payload[..], b"d");
        assert!(pkid != p1 && pkid != p2, "a fresh packet id");
        assert!(back.next(2).is_none());
    }

    fn payloads(mailbox: &mut Mailbox) -> Vec<String> {
        std::iter::from_fn(|| mailbox.next(usize::MAX))
            .map(|o| match o {
                Outgoing::Publish { delivery, .. } => {
                    String::from_utf8_lossy(&delivery.message.payload).into_owned()
                }
                Outgoing::Release(_) => unreachable!("nothing released"),
            })
            .collect()
    }

    #[test]
    fn full_queue_drops_new_qos0_and_evicts_old_qos0_for_qos1() {
        let mut m = Mailbox::default();
        assert!(m.push(delivery("a", 0), LIMITS).was_empty);
        assert_eq!(m.push(delivery("b", 1), LIMITS).dropped, 0);
        assert_eq!(m.push(delivery("c", 0), LIMITS).dropped, 0);
        let dropped = m.push(delivery("d", 0), LIMITS);
        assert_eq!((dropped.dropped, dropped.episode), (1, true));
        // A QoS 1 delivery takes the place of the oldest QoS 0 one.
        let evicted = m.push(delivery("e", 1), LIMITS);
        assert_eq!((evicted.dropped, evicted.episode), (1, false));
        assert_eq!(payloads(&mut m), ["b", "c", "e"]);
    }

    #[test]
    fn full_queue_of_qos1_drops_the_new_one() {
        let mut m = Mailbox::default();
        for p in ["a", "b", "c"] {
            m.push(delivery(p, 1), LIMITS);
        }
        assert_eq!(m.push(delivery("d", 1), LIMITS).dropped, 1);
        assert_eq!(m.queued(), 3);
        assert_eq!(payloads(&mut m), ["a", "b", "c"]);
    }

    #[test]
    fn byte_bound_applies_but_an_empty_queue_takes_anything() {
        let limits = QueueLimits {
            max_messages: 100,
            max_bytes: 4,
        };
        let mut m = Mailbox::default();
        assert_eq!(m.push(delivery("larger than four", 1), limits).dropped, 0);
        assert_eq!(m.push(delivery("x", 1), limits).dropped, 1);
        assert_eq!(m.queued_bytes(), 17);
    }

    #[test]
    fn window_limits_unacknowledged_publishes_and_acks_free_it() {
        let mut m = Mailbox::default();
        for p in ["a", "b", "c"] {
            m.push(delivery(p, 1), LIMITS);
        }
        let first = m.next(2);
        let second = m.next(2);
        assert!(m.next(2).is_none(), "window of 2 is full");
        assert!(!m.ready(2));
        let pkid = |o: Option<Outgoing>| match o {
            Some(Outgoing::Publish { pkid, .. }) => pkid,
            other => panic!("{other:?}"),
        };
        let (p1, p2) = (pkid(first), pkid(second));
        assert_ne!(p1, p2);
        assert!(
            !m.pubcomp(p1),
            "a QoS 1 delivery is not completed by PUBCOMP"
        );
        assert!(m.puback(p2));
        assert!(!m.puback(p2), "acknowledged once");
        assert!(m.next(2).is_some());
        assert_eq!(m.inflight(), 2);
    }

    #[test]
    fn qos2_goes_through_pubrec_and_pubcomp_and_resend_keeps_order() {
        let mut m = Mailbox::default();
        m.push(delivery("one", 2), LIMITS);
        m.push(delivery("two", 1), LIMITS);
        let ids: Vec<u16> = std::iter::from_fn(|| m.next(10))
            .map(|o| match o {
                Outgoing::Publish { pkid, .. } => pkid,
                Outgoing::Release(_) => unreachable!(),
            })
            .collect();
        assert!(!m.puback(ids[0]), "QoS 2 is not completed by PUBACK");
        assert!(m.pubrec(ids[0]));
        assert!(m.pubrec(ids[0]), "a repeated PUBREC is answered again");
        let resend = m.resend();
        assert!(matches!(resend[0], Outgoing::Release(id) if id == ids[0]));
        assert!(matches!(resend[1], Outgoing::Publish { dup: true, pkid, .. } if pkid == ids[1]));
        assert!(m.pubcomp(ids[0]));
        assert!(m.puback(ids[1]));
        assert_eq!(m.inflight(), 0);
    }

    #[test]
    fn a_shared_groups_undelivered_messages_are_taken_out() {
        let mut m = Mailbox::default();
        let tagged = |p, qos, group| Delivery {
            shared: group,
            ..delivery(p, qos)
        };
        m.push(tagged("sent", 1, Some(7)), LIMITS);
        assert!(m.next(10).is_some());
        m.push(tagged("queued", 2, Some(7)), LIMITS);
        m.push(tagged("other group", 1, Some(8)), LIMITS);
        m.push(tagged("qos0", 0, Some(7)), LIMITS);
        let names = |v: Vec<Delivery>| -> Vec<String> {
            v.iter()
                .map(|d| String::from_utf8_lossy(&d.message.payload).into_owned())
                .collect()
        };
        assert_eq!(names(m.take_shared(7, false)), ["queued"]);
        assert_eq!(m.inflight(), 1);
        assert_eq!(names(m.take_shared(7, true)), ["sent"]);
        assert_eq!(m.inflight(), 0);
        assert_eq!(m.queued_bytes(), "tother group".len() + "tqos0".len());
        assert_eq!(payloads(&mut m), ["other group", "qos0"]);
    }

    #[test]
    fn packet_ids_wrap_without_zero_and_wait_for_a_stuck_one() {
        let mut m = Mailbox::default();
        let limits = QueueLimits {
            max_messages: 1,
            max_bytes: usize::MAX,
        };
        m.push(delivery("stuck", 1), limits);
        let Some(Outgoing::Publish { pkid: stuck, .. }) = m.next(usize::MAX) else {
            panic!("first delivery");
        };
        assert_eq!(stuck, 1);
        for _ in 1..u16::MAX {
            m.push(delivery("x", 1), limits);
            let Some(Outgoing::Publish { pkid, .. }) = m.next(usize::MAX) else {
                panic!("delivery");
            };
            assert_ne!(pkid, 0);
            assert!(m.puback(pkid));
        }
        // The next id would be 1 again, still held by the stuck delivery.
        m.push(delivery("y", 1), limits);
        assert!(m.next(usize::MAX).is_none());
        assert!(m.puback(stuck));
        assert!(matches!(
            m.next(usize::MAX),
            Some(Outgoing::Publish { pkid: 1, .. })
        ));
    }
}
