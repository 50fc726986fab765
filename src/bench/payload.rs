//! The benchmark payload: a sequence number and the send time, padded to the requested size, so a
//! subscriber can measure publish -> deliver latency without a second channel.

use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes the header takes: sequence number (u64) + send time in ns since the run's epoch (u64).
pub const HEADER: usize = 16;

/// Builds payload `seq` of `size` bytes stamped with the time since `epoch`.
pub fn encode(seq: u64, epoch: Instant, size: usize) -> Bytes {
    let mut buf = BytesMut::with_capacity(size.max(HEADER));
    buf.put_u64(seq);
    buf.put_u64(epoch.elapsed().as_nanos() as u64);
    buf.resize(size.max(HEADER), b'x');
    buf.freeze()
}

/// Nanoseconds from the payload's send stamp to now, or `None` for a payload not made by [`encode`].
pub fn latency_ns(payload: &[u8], epoch: Instant) -> Option<u64> {
    let stamp: [u8; 8] = payload.get(8..16)?.try_into().ok()?;
    let sent = u64::from_be_bytes(stamp);
    Some((epoch.elapsed().as_nanos() as u64).saturating_sub(sent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_pads_and_stamps() {
        let epoch = Instant::now();
        let payload = encode(7, epoch, 64);
        assert_eq!(payload.len(), 64);
        assert_eq!(u64::from_be_bytes(payload[..8].try_into().unwrap()), 7);
        assert!(latency_ns(&payload, epoch).is_some());
        assert_eq!(latency_ns(b"short", epoch), None);
        assert_eq!(encode(1, epoch, 4).len(), HEADER);
    }
}
