//! The log's on-disk record: `length (u32 LE) | crc32 of the payload (u32 LE) | payload`, the
//! payload a JSON [`Record`]. The length and checksum let start-up tell a good record from a
//! torn or corrupt one without trusting anything after it.

use serde::{Deserialize, Serialize};

use crate::events::ConnectionEvent;

const HEADER: usize = 8;
/// Larger than any event (client ids are at most 64 KiB); a bigger length is corruption.
const MAX_PAYLOAD: usize = 1 << 20;

/// What the log keeps, one record each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Record {
    /// An emitted event of the session keyed `session` (unique among open sessions; its
    /// `connect` and `disconnect` carry the same key).
    Event {
        session: String,
        event: ConnectionEvent,
    },
    /// A session open when this segment began: not an event, never delivered. With these at
    /// its head, a segment does not need the ones before it to tell which sessions are open.
    Open {
        session: String,
        client_id: String,
        since: i64,
    },
}

/// The result of reading one record from the front of some bytes.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Frame {
    /// A good record and its length on disk.
    Record(Record, usize),
    /// A good frame (length and checksum) whose payload this version cannot read.
    Unknown(usize),
    /// Fewer bytes than a header, or than the length the header announces.
    Incomplete,
    /// A length or checksum that cannot be right.
    Corrupt,
}

pub(super) fn encode(record: &Record, out: &mut Vec<u8>) {
    let payload = serde_json::to_vec(record).expect("records always serialize");
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
}

pub(super) fn decode(bytes: &[u8]) -> Frame {
    let Some((header, rest)) = bytes.split_first_chunk::<HEADER>() else {
        return Frame::Incomplete;
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len == 0 || len > MAX_PAYLOAD {
        return Frame::Corrupt;
    }
    let Some(payload) = rest.get(..len) else {
        return Frame::Incomplete;
    };
    if crc32fast::hash(payload) != crc {
        return Frame::Corrupt;
    }
    match serde_json::from_slice(payload) {
        Ok(record) => Frame::Record(record, HEADER + len),
        Err(_) => Frame::Unknown(HEADER + len),
    }
}

/// Walks the good records of `bytes` in order; `stop` tells why it ended (`Incomplete` also at
/// a clean end) and where.
pub(super) struct Records<'a> {
    bytes: &'a [u8],
    pub at: usize,
    pub stop: Option<Frame>,
}

impl<'a> Records<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Records {
            bytes,
            at: 0,
            stop: None,
        }
    }
}

impl Iterator for Records<'_> {
    /// A record and its offset in the bytes; `None` payload for one this version cannot read.
    type Item = (usize, Option<Record>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.stop.is_some() || self.at == self.bytes.len() {
            return None;
        }
        let at = self.at;
        match decode(&self.bytes[at..]) {
            Frame::Record(record, n) => {
                self.at += n;
                Some((at, Some(record)))
            }
            Frame::Unknown(n) => {
                self.at += n;
                Some((at, None))
            }
            stop => {
                self.stop = Some(stop);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::test_event;

    fn record(i: i64) -> Record {
        Record::Event {
            session: format!("s{i}"),
            event: test_event(i),
        }
    }

    #[test]
    fn round_trip_and_damage_is_detected() {
        let mut bytes = Vec::new();
        encode(&record(1), &mut bytes);
        let one = bytes.len();
        encode(&record(2), &mut bytes);
        assert_eq!(decode(&bytes), Frame::Record(record(1), one));
        assert_eq!(decode(&bytes[..one - 1]), Frame::Incomplete);
        assert_eq!(decode(&bytes[..3]), Frame::Incomplete);
        let mut flipped = bytes.clone();
        flipped[one + 10] ^= 0x40;
        assert_eq!(decode(&flipped[one..]), Frame::Corrupt);
        let mut huge = bytes.clone();
        huge[3] = 0xff;
        assert_eq!(decode(&huge), Frame::Corrupt);
        let all: Vec<_> = Records::new(&bytes).collect();
        assert_eq!(all, [(0, Some(record(1))), (one, Some(record(2)))]);
    }

    #[test]
    fn a_good_frame_of_an_unknown_record_is_skipped_by_its_length() {
        let mut bytes = Vec::new();
        let payload = br#"{"future":{}}"#;
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        bytes.extend_from_slice(payload);
        encode(&record(3), &mut bytes);
        let all: Vec<_> = Records::new(&bytes).map(|(_, r)| r).collect();
        assert_eq!(all, [None, Some(record(3))]);
    }
}
