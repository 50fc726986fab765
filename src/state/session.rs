//! How a persistent session is written in the state store. Two kinds of value:
//!
//! - the session record, keyed by the session key: how long it outlives its connection, when
//!   its connection ended, its subscriptions, its will and its next packet id allocation. It is
//!   written on CONNECT, SUBSCRIBE, UNSUBSCRIBE, when the connection ends and at checkpoints;
//! - its deliveries, keyed by (session key, position): the in-flight window with packet ids,
//!   then the queued QoS 1/2 deliveries. An offline session's new deliveries are appended one by
//!   one; a checkpoint (or the end of a connection) rewrites them all from memory.
//!
//! ```text
//! key:      str client_id | str mqtt_client_id
//! record:   u8 version (1) | u8 expiry (0 with the connection, 1 after, 2 never) | u64 expiry_ms
//!           | u64 ended_unix_ms (0: attached) | u64 next_seq
//!           | u32 count, (str filter | u8 qos | u8 flags (1 no local, 2 retain as published)
//!                         | opt u32 id)*
//!           | opt will
//! will:     u8 due (0 after the end, 1 at) | u64 ms | u8 protocol (4, 5) | str peer
//!           | str topic | u8 retain | message
//! delivery: u8 version (1) | u8 kind (0 queued, 1 unacked, 2 released) | u64 seq
//!           | [u8 qos | u8 retain | u32 count, u32 id* | str topic | message]   (not for released)
//! message:  the retained record (record.rs) of the message
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::record::{self, Decoded, Reader};
use crate::broker::{Delivery, Expiry, Kept, Message, SessionKey, SubOptions};

const VERSION: u8 = 1;

/// When a kept will is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WillDue {
    /// This long after its connection ends (the connection is attached).
    AfterEnd(Duration),
    /// At this Unix time in milliseconds (the connection has ended).
    At(u64),
}

/// A will kept with its session, with what publishing it needs besides the message.
#[derive(Debug, Clone)]
pub struct KeptWill {
    pub message: Arc<Message>,
    pub due: WillDue,
    /// 4 (MQTT 3.1.1) or 5.
    pub protocol: u8,
    /// The peer address of the connection that set it.
    pub peer: String,
}

/// A persistent session as the state store keeps it (its deliveries are kept apart).
#[derive(Debug, Clone)]
pub struct SessionRecord {
    pub key: SessionKey,
    pub expiry: Expiry,
    /// Unix time in milliseconds its connection ended; `None` while one is attached.
    pub ended_ms: Option<u64>,
    /// The mailbox's next packet id allocation.
    pub next_seq: u64,
    pub subscriptions: Vec<(String, SubOptions)>,
    pub will: Option<KeptWill>,
}

/// A session as read back at start-up.
#[derive(Debug)]
pub struct LoadedSession {
    pub record: SessionRecord,
    /// Its deliveries in order; those whose message expiry passed are left out.
    pub deliveries: Vec<Kept>,
}

pub(super) fn encode_key(key: &SessionKey, out: &mut Vec<u8>) {
    out.clear();
    record::bytes(out, key.client_id.as_bytes());
    record::bytes(out, key.mqtt_client_id.as_bytes());
}

pub(super) fn decode_key(value: &[u8]) -> Option<SessionKey> {
    let mut r = Reader(value);
    let key = SessionKey {
        client_id: r.string()?,
        mqtt_client_id: r.string()?,
    };
    r.0.is_empty().then_some(key)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn u64_of(r: &mut Reader<'_>) -> Option<u64> {
    Some(u64::from_be_bytes(r.take(8)?.try_into().ok()?))
}

fn u32_of(r: &mut Reader<'_>) -> Option<u32> {
    Some(u32::from_be_bytes(r.take(4)?.try_into().ok()?))
}

/// Writes a message with its topic (the retained record has no room for the topic).
fn put_message(
    message: &Message,
    now: Instant,
    now_ms: u64,
    scratch: &mut Vec<u8>,
    out: &mut Vec<u8>,
) {
    record::bytes(out, message.topic.as_ref());
    out.push(u8::from(message.retain));
    record::encode(message, now, now_ms, scratch);
    record::bytes(out, scratch);
}

/// Reads what [`put_message`] wrote: `Some(None)` for a message whose expiry passed.
fn get_message(r: &mut Reader<'_>, now: Instant, now_ms: u64) -> Option<Option<Arc<Message>>> {
    let topic = r.string()?;
    let retain = r.u8()? != 0;
    let value = r.bytes()?;
    match record::decode(&topic, value, now, now_ms)? {
        Decoded::Expired => Some(None),
        Decoded::Message(m) => {
            let mut m = Arc::try_unwrap(m).ok()?;
            m.retain = retain;
            Some(Some(Arc::new(m)))
        }
    }
}

pub(super) fn encode_record(record: &SessionRecord, now: Instant, now_ms: u64, out: &mut Vec<u8>) {
    out.clear();
    out.push(VERSION);
    let (kind, after) = match record.expiry {
        Expiry::WithConnection => (0, 0),
        Expiry::After(d) => (1, ms(d)),
        Expiry::Never => (2, 0),
    };
    out.push(kind);
    out.extend_from_slice(&after.to_be_bytes());
    out.extend_from_slice(&record.ended_ms.unwrap_or(0).to_be_bytes());
    out.extend_from_slice(&record.next_seq.to_be_bytes());
    let count = u32::try_from(record.subscriptions.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&count.to_be_bytes());
    for (filter, options) in record.subscriptions.iter().take(count as usize) {
        record::bytes(out, filter.as_bytes());
        out.push(options.qos);
        out.push(u8::from(options.no_local) | u8::from(options.retain_as_published) << 1);
        record::opt(out, options.id, |out, id| {
            out.extend_from_slice(&id.to_be_bytes())
        });
    }
    let mut scratch = Vec::new();
    match &record.will {
        None => out.push(0),
        Some(will) => {
            out.push(1);
            let (due, at) = match will.due {
                WillDue::AfterEnd(d) => (0, ms(d)),
                WillDue::At(at) => (1, at),
            };
            out.push(due);
            out.extend_from_slice(&at.to_be_bytes());
            out.push(will.protocol);
            record::bytes(out, will.peer.as_bytes());
            put_message(&will.message, now, now_ms, &mut scratch, out);
        }
    }
}

/// Reads a session record; `None` when it is not one this version wrote.
pub(super) fn decode_record(
    key: SessionKey,
    value: &[u8],
    now: Instant,
    now_ms: u64,
) -> Option<SessionRecord> {
    let mut r = Reader(value);
    if r.u8()? != VERSION {
        return None;
    }
    let kind = r.u8()?;
    let after = u64_of(&mut r)?;
    let expiry = match kind {
        0 => Expiry::WithConnection,
        1 => Expiry::After(Duration::from_millis(after)),
        2 => Expiry::Never,
        _ => return None,
    };
    let ended_ms = Some(u64_of(&mut r)?).filter(|&e| e > 0);
    let next_seq = u64_of(&mut r)?;
    let count = u32_of(&mut r)?;
    let mut subscriptions = Vec::new();
    for _ in 0..count {
        let filter = r.string()?;
        let qos = r.u8()?.min(2);
        let flags = r.u8()?;
        let id = r.opt(u32_of)?;
        subscriptions.push((
            filter,
            SubOptions {
                qos,
                no_local: flags & 1 != 0,
                retain_as_published: flags & 2 != 0,
                id,
            },
        ));
    }
    let will = match r.u8()? {
        0 => None,
        1 => {
            let due = r.u8()?;
            let at = u64_of(&mut r)?;
            let due = match due {
                0 => WillDue::AfterEnd(Duration::from_millis(at)),
                1 => WillDue::At(at),
                _ => return None,
            };
            let protocol = r.u8()?;
            let peer = r.string()?;
            // A will whose message expiry passed is not published.
            get_message(&mut r, now, now_ms)?.map(|message| KeptWill {
                message,
                due,
                protocol,
                peer,
            })
        }
        _ => return None,
    };
    Some(SessionRecord {
        key,
        expiry,
        ended_ms,
        next_seq,
        subscriptions,
        will,
    })
}

pub(super) fn encode_delivery(kept: &Kept, now: Instant, now_ms: u64, out: &mut Vec<u8>) {
    out.clear();
    out.push(VERSION);
    let (kind, seq, delivery) = match kept {
        Kept::Queued(d) => (0, 0, Some(d)),
        Kept::Unacked { seq, delivery } => (1, *seq, Some(delivery)),
        Kept::Released { seq } => (2, *seq, None),
    };
    out.push(kind);
    out.extend_from_slice(&seq.to_be_bytes());
    if let Some(d) = delivery {
        out.push(d.qos);
        out.push(u8::from(d.retain));
        let count = u32::try_from(d.ids.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&count.to_be_bytes());
        for id in d.ids.iter().take(count as usize) {
            out.extend_from_slice(&id.to_be_bytes());
        }
        let mut scratch = Vec::new();
        put_message(&d.message, now, now_ms, &mut scratch, out);
    }
}

/// Reads a kept delivery: `Some(None)` for one whose message expiry passed (dropped, as the
/// mailbox drops it when it comes up for writing).
pub(super) fn decode_delivery(value: &[u8], now: Instant, now_ms: u64) -> Option<Option<Kept>> {
    let mut r = Reader(value);
    if r.u8()? != VERSION {
        return None;
    }
    let kind = r.u8()?;
    let seq = u64_of(&mut r)?;
    if kind == 2 {
        return Some(Some(Kept::Released { seq }));
    }
    let qos = r.u8()?.min(2);
    let retain = r.u8()? != 0;
    let count = u32_of(&mut r)?;
    let mut ids = Vec::new();
    for _ in 0..count {
        ids.push(u32_of(&mut r)?);
    }
    let Some(message) = get_message(&mut r, now, now_ms)? else {
        return Some(None);
    };
    let delivery = Delivery {
        message,
        qos,
        retain,
        ids,
        shared: None,
    };
    match kind {
        0 => Some(Some(Kept::Queued(delivery))),
        1 => Some(Some(Kept::Unacked { seq, delivery })),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::Origin;

    #[test]
    fn a_record_with_subscriptions_and_a_will_comes_back_the_same() {
        let now = Instant::now();
        let key = SessionKey {
            client_id: "c\n1".into(),
            mqtt_client_id: "dev".into(),
        };
        let record = SessionRecord {
            key: key.clone(),
            expiry: Expiry::After(Duration::from_secs(90)),
            ended_ms: Some(5_000),
            next_seq: 42,
            subscriptions: vec![
                ("a/+".into(), SubOptions::qos(1)),
                (
                    "b/#".into(),
                    SubOptions {
                        qos: 2,
                        no_local: true,
                        retain_as_published: true,
                        id: Some(7),
                    },
                ),
            ],
            will: Some(KeptWill {
                message: Message::new("w/t".into(), "gone".into(), 1, true, Origin::Bus),
                due: WillDue::At(9_000),
                protocol: 5,
                peer: "127.0.0.1:5000".into(),
            }),
        };
        let mut out = Vec::new();
        encode_record(&record, now, 1_000, &mut out);
        let back = decode_record(key.clone(), &out, now, 1_000).expect("decoded");
        assert_eq!(back.key, key);
        assert_eq!(back.expiry, record.expiry);
        assert_eq!(back.ended_ms, Some(5_000));
        assert_eq!(back.next_seq, 42);
        assert_eq!(back.subscriptions, record.subscriptions);
        let will = back.will.expect("will");
        assert_eq!(
            (will.due, will.protocol, will.peer.as_str()),
            (WillDue::At(9_000), 5, "127.0.0.1:5000")
        );
        assert_eq!(
            (
                &will.message.topic[..],
                &will.message.payload[..],
                will.message.retain
            ),
            (&b"w/t"[..], &b"gone"[..], true)
        );
        let mut k = Vec::new();
        encode_key(&key, &mut k);
        assert_eq!(decode_key(&k), Some(key));
        assert!(
            decode_record(back.key, &[2], now, 0).is_none(),
            "a newer version is not read"
        );
    }

    #[test]
    fn deliveries_come_back_with_their_place_in_the_window() {
        let now = Instant::now();
        let delivery = Delivery {
            message: Message::new("t".into(), "p".into(), 2, false, Origin::Bus),
            qos: 1,
            retain: true,
            ids: vec![3, 4],
            shared: None,
        };
        let mut out = Vec::new();
        for kept in [
            Kept::Queued(delivery.clone()),
            Kept::Unacked {
                seq: 9,
                delivery: delivery.clone(),
            },
            Kept::Released { seq: 10 },
        ] {
            encode_delivery(&kept, now, 1_000, &mut out);
            let back = decode_delivery(&out, now, 1_000)
                .expect("decoded")
                .expect("not expired");
            match (kept, back) {
                (Kept::Queued(_), Kept::Queued(d)) => {
                    assert_eq!(
                        (d.qos, d.retain, &d.ids[..], &d.message.payload[..]),
                        (1, true, &[3, 4][..], &b"p"[..])
                    );
                }
                (Kept::Unacked { seq: a, .. }, Kept::Unacked { seq: b, .. }) => assert_eq!(a, b),
                (Kept::Released { seq: a }, Kept::Released { seq: b }) => assert_eq!(a, b),
                (a, b) => panic!("{a:?} came back as {b:?}"),
            }
        }
    }
}
