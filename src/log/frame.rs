//! The log's on-disk frame: `length (u32 LE) | crc32 of the payload (u32 LE) | payload`. The
//! length and checksum let start-up tell a good record from a torn or corrupt one without
//! trusting anything after it; what the payload means is the [`Kind`](super::Kind)'s business.

pub(super) const HEADER: usize = 8;
/// Larger than any record (an MQTT packet is at most 256 MiB); a bigger length is corruption.
pub(super) const MAX_PAYLOAD: usize = 257 << 20;

/// The result of reading one frame from the front of some bytes.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Frame<'a> {
    /// A good frame: its payload and its length on disk.
    Good(&'a [u8], usize),
    /// Fewer bytes than a header, or than the length the header announces (`Some` then: the
    /// frame's whole length).
    Incomplete(Option<usize>),
    /// A length or checksum that cannot be right.
    Corrupt,
}

/// Appends one frame holding what `payload` writes.
pub(super) fn encode(out: &mut Vec<u8>, payload: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER]);
    payload(out);
    let len = (out.len() - start - HEADER) as u32;
    let crc = crc32fast::hash(&out[start + HEADER..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
}

pub(super) fn decode(bytes: &[u8]) -> Frame<'_> {
    let Some((header, rest)) = bytes.split_first_chunk::<HEADER>() else {
        return Frame::Incomplete(None);
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len == 0 || len > MAX_PAYLOAD {
        return Frame::Corrupt;
    }
    let Some(payload) = rest.get(..len) else {
        return Frame::Incomplete(Some(HEADER + len));
    };
    if crc32fast::hash(payload) != crc {
        return Frame::Corrupt;
    }
    Frame::Good(payload, HEADER + len)
}

/// Walks the good frames of `bytes` in order; `stop` tells why it ended (`Incomplete` also at
/// a clean end) and where (`at`).
pub(super) struct Frames<'a> {
    bytes: &'a [u8],
    pub at: usize,
    pub stop: Option<Frame<'a>>,
}

impl<'a> Frames<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Frames {
            bytes,
            at: 0,
            stop: None,
        }
    }

    /// Whether the walk ended on a torn or corrupt frame (not at the clean end).
    pub fn damaged(&self) -> bool {
        self.at < self.bytes.len()
    }
}

impl<'a> Iterator for Frames<'a> {
    /// A frame's payload and its offset in the bytes.
    type Item = (usize, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.stop.is_some() || self.at == self.bytes.len() {
            return None;
        }
        let at = self.at;
        match decode(&self.bytes[at..]) {
            Frame::Good(payload, n) => {
                self.at += n;
                Some((at, payload))
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

    fn frame(payload: &[u8], out: &mut Vec<u8>) {
        encode(out, |o| o.extend_from_slice(payload));
    }

    #[test]
    fn round_trip_and_damage_is_detected() {
        let mut bytes = Vec::new();
        frame(b"first record", &mut bytes);
        let one = bytes.len();
        frame(b"second", &mut bytes);
        assert_eq!(decode(&bytes), Frame::Good(b"first record", one));
        assert_eq!(decode(&bytes[..one - 1]), Frame::Incomplete(Some(one)));
        assert_eq!(decode(&bytes[..3]), Frame::Incomplete(None));
        let mut flipped = bytes.clone();
        flipped[one + 9] ^= 0x40;
        assert_eq!(decode(&flipped[one..]), Frame::Corrupt);
        let mut huge = bytes.clone();
        huge[3] = 0xff;
        assert_eq!(decode(&huge), Frame::Corrupt);
        let all: Vec<_> = Frames::new(&bytes).collect();
        assert_eq!(all, [(0, &b"first record"[..]), (one, &b"second"[..])]);
    }

    #[test]
    fn a_walk_tells_a_clean_end_from_a_torn_one() {
        let mut bytes = Vec::new();
        frame(b"a", &mut bytes);
        frame(b"b", &mut bytes);
        let mut clean = Frames::new(&bytes);
        assert_eq!(clean.by_ref().count(), 2);
        assert!(!clean.damaged());
        let mut torn = Frames::new(&bytes[..bytes.len() - 1]);
        assert_eq!(torn.by_ref().count(), 1);
        assert!(torn.damaged());
    }
}
