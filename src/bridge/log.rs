//! The outbound message log: every device message for the bus is kept in the durable
//! [`Log`](crate::log::Log) before the device is acknowledged, then delivered from there. A
//! record carries everything the bus needs (subject, QoS, the encoded `messaging.Message`) and
//! an id made of the run that wrote it and its place in that run: the `Nats-Msg-Id` stays the
//! same across retries and restarts, and two runs never share one, so JetStream's duplicate
//! window drops replays and nothing else.
//!
//! Record layout: `version (1) | qos (1) | run (16) | sequence (u64 LE) | created (i64 LE) |
//! subject length (u16 LE) | subject | body`.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::log::{Kind, WhenFull};

const VERSION: u8 = 1;
const FIXED: usize = 1 + 1 + 16 + 8 + 8 + 2;

/// One device message waiting for the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusRecord {
    /// The run (process start) that wrote it, and its sequence in that run: its message id.
    pub run: [u8; 16],
    pub sequence: u64,
    /// The QoS the device published with.
    pub qos: u8,
    /// When it was logged (Unix ns).
    pub created: i64,
    pub subject: String,
    /// The encoded `messaging.Message`.
    pub body: Bytes,
}

impl BusRecord {
    /// A record to append; its run and sequence are set by the log.
    pub fn new(subject: String, qos: u8, body: Bytes) -> BusRecord {
        BusRecord {
            run: [0; 16],
            sequence: 0,
            qos,
            created: 0,
            subject,
            body,
        }
    }

    /// The `Nats-Msg-Id` of the message.
    pub fn message_id(&self) -> String {
        format!(
            "{}-{}",
            uuid::Uuid::from_bytes(self.run).simple(),
            self.sequence
        )
    }
}

/// The message log's [`Kind`]: it numbers the records of this run in log order.
pub struct Messages {
    run: [u8; 16],
    next: AtomicU64,
}

impl Messages {
    /// A new run: its records get ids no earlier run used.
    pub fn new_run() -> Messages {
        Messages {
            run: *uuid::Uuid::new_v4().as_bytes(),
            next: AtomicU64::new(1),
        }
    }
}

impl Kind for Messages {
    type Record = BusRecord;
    type State = ();

    const FILES: &'static str = "messages";
    const WHAT: &'static str = "message";
    const WHEN_FULL: WhenFull = WhenFull::PushBack;
    const DELIVER_UNSYNCED: bool = true;
    const MAX_BATCH: usize = 2048;

    fn encode(record: &BusRecord, out: &mut Vec<u8>) {
        let subject = record.subject.as_bytes();
        let subject = &subject[..subject.len().min(usize::from(u16::MAX))];
        out.reserve(FIXED + subject.len() + record.body.len());
        out.push(VERSION);
        out.push(record.qos);
        out.extend_from_slice(&record.run);
        out.extend_from_slice(&record.sequence.to_le_bytes());
        out.extend_from_slice(&record.created.to_le_bytes());
        out.extend_from_slice(&(subject.len() as u16).to_le_bytes());
        out.extend_from_slice(subject);
        out.extend_from_slice(&record.body);
    }

    fn decode(payload: &[u8]) -> Option<BusRecord> {
        let (fixed, rest) = payload.split_first_chunk::<FIXED>()?;
        if fixed[0] != VERSION {
            return None;
        }
        let run: [u8; 16] = fixed[2..18].try_into().ok()?;
        let sequence = u64::from_le_bytes(fixed[18..26].try_into().ok()?);
        let created = i64::from_le_bytes(fixed[26..34].try_into().ok()?);
        let len = usize::from(u16::from_le_bytes([fixed[34], fixed[35]]));
        let subject = std::str::from_utf8(rest.get(..len)?).ok()?;
        Some(BusRecord {
            run,
            sequence,
            qos: fixed[1],
            created,
            subject: subject.to_owned(),
            body: Bytes::copy_from_slice(&rest[len..]),
        })
    }

    fn delivered(_: &BusRecord) -> bool {
        true
    }

    fn time(record: &BusRecord) -> i64 {
        record.created
    }

    fn size(record: &BusRecord) -> usize {
        FIXED + record.subject.len() + record.body.len()
    }

    fn apply(_: &mut (), _: &BusRecord) {}

    fn snapshot(_: &()) -> Vec<BusRecord> {
        Vec::new()
    }

    fn stamp(&self, record: &mut BusRecord) {
        record.run = self.run;
        record.sequence = self.next.fetch_add(1, Ordering::Relaxed);
        record.created = crate::clock::unix_nanos();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_ids_differ_between_runs() {
        let (a, b) = (Messages::new_run(), Messages::new_run());
        let mut first = BusRecord::new("m.d1.c.ch1.a".into(), 1, Bytes::from_static(b"body"));
        a.stamp(&mut first);
        let mut second = first.clone();
        a.stamp(&mut second);
        let mut other = first.clone();
        b.stamp(&mut other);
        let mut bytes = Vec::new();
        Messages::encode(&first, &mut bytes);
        assert_eq!(Messages::decode(&bytes), Some(first.clone()));
        assert_eq!(
            Messages::decode(&bytes[..FIXED + 3]).map(|r| r.body.len()),
            None
        );
        assert_ne!(first.message_id(), second.message_id());
        assert_ne!(first.message_id(), other.message_id());
        assert_eq!(second.sequence, first.sequence + 1);
    }
}
