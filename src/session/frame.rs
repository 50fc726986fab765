//! Looks at raw MQTT frames before the codec parses them: protocol version of a CONNECT, packet
//! type, PUBLISH QoS and packet id. The codec's own types keep some of these private, and a few
//! packet types make it panic, so the session checks them here first.

/// The fixed header of the next frame in a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub byte1: u8,
    /// Length of the fixed header (type byte + remaining-length bytes).
    pub header_len: usize,
    pub remaining_len: usize,
}

impl FrameHeader {
    pub fn packet_type(&self) -> u8 {
        self.byte1 >> 4
    }

    pub fn frame_len(&self) -> usize {
        self.header_len + self.remaining_len
    }

    /// QoS bits of a PUBLISH (3 is invalid).
    pub fn publish_qos(&self) -> u8 {
        (self.byte1 >> 1) & 0b11
    }
}

/// Why the bytes cannot be framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("malformed remaining length")]
    MalformedLength,
    #[error("packet of {0} bytes exceeds the maximum packet size")]
    TooLarge(usize),
}

/// Parses the fixed header; `Ok(None)` while more bytes are needed to know the frame's length.
pub fn peek_header(buf: &[u8], max_packet_size: usize) -> Result<Option<FrameHeader>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (len_len, remaining_len) = match rumqttd::protocol::v4::length(buf[1..].iter()) {
        Ok(v) => v,
        Err(rumqttd::protocol::Error::InsufficientBytes(_)) => return Ok(None),
        Err(_) => return Err(FrameError::MalformedLength),
    };
    let header = FrameHeader {
        byte1: buf[0],
        header_len: 1 + len_len,
        remaining_len,
    };
    if header.frame_len() > max_packet_size {
        return Err(FrameError::TooLarge(header.frame_len()));
    }
    Ok(Some(header))
}

/// MQTT packet types a client may send to a server (CONNECT is only valid first).
pub fn client_may_send(packet_type: u8) -> bool {
    matches!(packet_type, 1 | 3..=8 | 10 | 12 | 14)
}

pub const CONNECT: u8 = 1;
pub const PUBLISH: u8 = 3;
pub const DISCONNECT: u8 = 14;

/// The protocol level byte of a complete CONNECT frame (4 = 3.1.1, 5 = 5, 3 = 3.1), or `None`
/// when the frame does not carry a valid protocol name.
pub fn connect_protocol_level(frame: &[u8], header: &FrameHeader) -> Option<u8> {
    let body = frame.get(header.header_len..header.frame_len())?;
    let name_len = u16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize;
    let name = body.get(2..2 + name_len)?;
    if name != b"MQTT" && name != b"MQIsdp" {
        return None;
    }
    body.get(2 + name_len).copied()
}

/// The packet identifier of a complete QoS 1/2 PUBLISH frame.
pub fn publish_packet_id(frame: &[u8], header: &FrameHeader) -> Option<u16> {
    let body = frame.get(header.header_len..header.frame_len())?;
    let topic_len = u16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize;
    let id = body.get(2 + topic_len..4 + topic_len)?;
    Some(u16::from_be_bytes([id[0], id[1]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_needs_complete_length() {
        assert_eq!(peek_header(&[0x30], 1000), Ok(None));
        assert_eq!(peek_header(&[0x30, 0x80], 1000), Ok(None));
        let h = peek_header(&[0x30, 0x80, 0x01], 1000).unwrap().unwrap();
        assert_eq!((h.header_len, h.remaining_len), (3, 128));
    }

    #[test]
    fn oversize_and_malformed_lengths_are_errors() {
        assert_eq!(
            peek_header(&[0x30, 0x7f], 100),
            Err(FrameError::TooLarge(129))
        );
        assert_eq!(
            peek_header(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], usize::MAX),
            Err(FrameError::MalformedLength)
        );
    }

    #[test]
    fn reads_protocol_level_and_packet_id() {
        let connect = [0x10, 10, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60];
        let h = peek_header(&connect, 1000).unwrap().unwrap();
        assert_eq!(connect_protocol_level(&connect, &h), Some(5));
        let publish = [0x32, 7, 0, 1, b't', 0x12, 0x34, b'x', b'y'];
        let h = peek_header(&publish, 1000).unwrap().unwrap();
        assert_eq!(h.publish_qos(), 1);
        assert_eq!(publish_packet_id(&publish, &h), Some(0x1234));
    }
}
