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
pub const PUBREL: u8 = 6;
pub const SUBSCRIBE: u8 = 8;
pub const UNSUBSCRIBE: u8 = 10;
pub const DISCONNECT: u8 = 14;

/// Whether the fixed header's flag bits are the ones MQTT fixes for the packet type (PUBREL,
/// SUBSCRIBE and UNSUBSCRIBE 0b0010, everything but PUBLISH 0).
pub fn fixed_flags_valid(header: &FrameHeader) -> bool {
    let flags = header.byte1 & 0x0F;
    match header.packet_type() {
        PUBLISH => true,
        PUBREL | SUBSCRIBE | UNSUBSCRIBE => flags == 0b0010,
        _ => flags == 0,
    }
}

/// A variable byte integer at `at`: (value, bytes it took).
fn varint(body: &[u8], at: usize) -> Option<(usize, usize)> {
    let (len, value) = rumqttd::protocol::v4::length(body.get(at..)?.iter()).ok()?;
    Some((value, len))
}

/// A two-byte length-prefixed field at `at`: the range of its content.
fn field(body: &[u8], at: usize) -> Option<std::ops::Range<usize>> {
    let len = u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]) as usize;
    let range = at + 2..at + 2 + len;
    (range.end <= body.len()).then_some(range)
}

/// What the session reads from a CONNECT's raw bytes before the codec parses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectLayout {
    /// The connect flags byte (bit 0 is reserved and must be 0).
    pub flags: u8,
    /// Where the password is in the frame, if present.
    pub password: Option<std::ops::Range<usize>>,
}

/// Locates the connect flags and the password in a complete CONNECT frame of protocol
/// `level` (4 or 5); `None` if the frame is too short for what its flags announce.
pub fn connect_layout(frame: &[u8], header: &FrameHeader, level: u8) -> Option<ConnectLayout> {
    let body = frame.get(header.header_len..header.frame_len())?;
    let name = field(body, 0)?;
    let flags = *body.get(name.end + 1)?;
    let mut at = name.end + 4; // level, flags, keep alive
    if level == 5 {
        let (len, used) = varint(body, at)?;
        at += used + len;
    }
    at = field(body, at)?.end; // client identifier
    if flags & 0x04 != 0 {
        if level == 5 {
            let (len, used) = varint(body, at)?;
            at += used + len;
        }
        at = field(body, at)?.end; // will topic
        at = field(body, at)?.end; // will payload
    }
    if flags & 0x80 != 0 {
        at = field(body, at)?.end; // user name
    }
    let password = if flags & 0x40 != 0 {
        let range = field(body, at)?;
        Some(range.start + header.header_len..range.end + header.header_len)
    } else {
        None
    };
    Some(ConnectLayout { flags, password })
}

/// Checks what the codec lets through in a complete SUBSCRIBE or UNSUBSCRIBE frame: at least
/// one filter, and in a SUBSCRIBE no reserved option bit set, QoS at most 2 and (MQTT 5) retain
/// handling at most 2. The error says what is malformed.
pub fn check_subscription(
    frame: &[u8],
    header: &FrameHeader,
    v5: bool,
) -> Result<(), &'static str> {
    let body = frame
        .get(header.header_len..header.frame_len())
        .ok_or("truncated packet")?;
    let mut at = 2; // packet identifier
    if v5 {
        let (len, used) = varint(body, at).ok_or("malformed properties")?;
        at += used + len;
    }
    let subscribe = header.packet_type() == SUBSCRIBE;
    let mut filters = 0;
    while at < body.len() {
        at = field(body, at).ok_or("truncated topic filter")?.end;
        filters += 1;
        if subscribe {
            let options = *body.get(at).ok_or("missing subscription options")?;
            at += 1;
            let reserved = if v5 { 0xC0 } else { 0xFC };
            if options & reserved != 0 {
                return Err("reserved subscription option bits set");
            }
            if options & 0b11 == 3 {
                return Err("subscription QoS 3");
            }
            if v5 && (options >> 4) & 0b11 == 3 {
                return Err("retain handling 3");
            }
        }
    }
    if filters == 0 {
        return Err("no topic filter");
    }
    Ok(())
}

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

/// Walks the MQTT 5 property list that starts (with its length) at `at` in `body`, calling
/// `each(id, value)` for every property; `None` when it is malformed or holds an identifier no
/// packet may carry (the codec then reports it).
fn scan_properties(body: &[u8], at: usize, mut each: impl FnMut(u8, &[u8])) -> Option<usize> {
    let (len, used) = varint(body, at)?;
    let mut p = at + used;
    let end = p.checked_add(len).filter(|&end| end <= body.len())?;
    let len16 = |at: usize| field(body, at).map(|r| r.end - at);
    while p < end {
        let id = body[p];
        p += 1;
        let size = match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => 1,
            0x13 | 0x21 | 0x22 | 0x23 => 2,
            0x02 | 0x11 | 0x18 | 0x27 => 4,
            0x0B => varint(body, p)?.1,
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1A | 0x1C | 0x1F => len16(p)?,
            0x26 => {
                let key = len16(p)?;
                key + len16(p + key)?
            }
            _ => return None,
        };
        let value = body.get(p..p + size).filter(|_| p + size <= end)?;
        each(id, value);
        p += size;
    }
    Some(end)
}

/// The MQTT 5 property User Property, the only one a PUBLISH may repeat.
const USER_PROPERTY: u8 = 0x26;
/// The MQTT 5 property Subscription Identifier.
const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;

/// Checks what the codec lets through in the properties of a complete MQTT 5 PUBLISH frame from a
/// device: a property other than User Property given twice (the codec keeps the last), and a
/// Subscription Identifier, which only the server sends (MQTT 3.3.4). Both are protocol errors.
pub fn check_publish_properties(frame: &[u8], header: &FrameHeader) -> Result<(), &'static str> {
    let Some(body) = frame.get(header.header_len..header.frame_len()) else {
        return Ok(());
    };
    let Some(topic) = field(body, 0) else {
        return Ok(());
    };
    let at = topic.end + if header.publish_qos() > 0 { 2 } else { 0 };
    let mut seen = 0u64;
    let mut error = None;
    scan_properties(body, at, |id, _| {
        if id == SUBSCRIPTION_IDENTIFIER {
            error.get_or_insert("a Subscription Identifier in a PUBLISH from a client");
        } else if id != USER_PROPERTY {
            let bit = 1u64 << (id & 63);
            if seen & bit != 0 {
                error.get_or_insert("a PUBLISH property given more than once");
            }
            seen |= bit;
        }
    });
    error.map_or(Ok(()), Err)
}

/// The Session Expiry Interval a complete MQTT 5 DISCONNECT frame sets, if it sets one.
pub fn disconnect_session_expiry(frame: &[u8], header: &FrameHeader) -> Option<u32> {
    let body = frame.get(header.header_len..header.frame_len())?;
    if body.len() < 2 {
        return None;
    }
    let mut expiry = None;
    scan_properties(body, 1, |id, value| {
        if let (0x11, Ok(bytes)) = (id, <[u8; 4]>::try_from(value)) {
            expiry = Some(u32::from_be_bytes(bytes));
        }
    })?;
    expiry
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

    fn frame(byte1: u8, body: &[u8]) -> (Vec<u8>, FrameHeader) {
        let mut f = vec![byte1, body.len() as u8];
        f.extend_from_slice(body);
        let header = peek_header(&f, 1000).expect("header").expect("complete");
        (f, header)
    }

    #[test]
    fn publish_properties_repeated_or_server_only_are_refused() {
        // QoS 1 PUBLISH on "t", packet id 1, then properties.
        let publish = |props: &[u8]| {
            let mut body = vec![0, 1, b't', 0, 1, props.len() as u8];
            body.extend_from_slice(props);
            frame(0x32, &body)
        };
        let expiry = [0x02, 0, 0, 0, 5];
        let (f, h) = publish(&expiry);
        assert_eq!(check_publish_properties(&f, &h), Ok(()));
        let (f, h) = publish(&[&expiry[..], &expiry[..]].concat());
        assert!(check_publish_properties(&f, &h).is_err());
        let user = [0x26, 0, 1, b'k', 0, 1, b'v'];
        let (f, h) = publish(&[&user[..], &user[..], &expiry[..]].concat());
        assert_eq!(
            check_publish_properties(&f, &h),
            Ok(()),
            "user properties repeat"
        );
        let (f, h) = publish(&[0x0B, 1]);
        assert!(check_publish_properties(&f, &h).is_err());
        // Malformed properties are left to the codec.
        let (f, h) = publish(&[0x02, 0]);
        assert_eq!(check_publish_properties(&f, &h), Ok(()));
    }

    #[test]
    fn disconnect_session_expiry_is_read() {
        let (f, h) = frame(0xE0, &[0x00, 5, 0x11, 0, 0, 0, 9]);
        assert_eq!(disconnect_session_expiry(&f, &h), Some(9));
        let (f, h) = frame(0xE0, &[0x04]);
        assert_eq!(disconnect_session_expiry(&f, &h), None);
        let (f, h) = frame(0xE0, &[]);
        assert_eq!(disconnect_session_expiry(&f, &h), None);
    }

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
    fn connect_layout_finds_flags_and_password() {
        // 3.1.1, user name "u" and password [0xff, 0x00].
        let mut c = vec![0x10, 0];
        c.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 60]);
        c.extend_from_slice(&[0, 1, b'i', 0, 1, b'u', 0, 2, 0xff, 0x00]);
        c[1] = (c.len() - 2) as u8;
        let h = peek_header(&c, 1000).unwrap().unwrap();
        let layout = connect_layout(&c, &h, 4).unwrap();
        assert_eq!(layout.flags, 0xC2);
        assert_eq!(&c[layout.password.unwrap()], &[0xff, 0x00]);
        // Announcing a password that is not there.
        let short = &c[..c.len() - 4];
        let mut short = short.to_vec();
        short[1] = (short.len() - 2) as u8;
        let h = peek_header(&short, 1000).unwrap().unwrap();
        assert_eq!(connect_layout(&short, &h, 4), None);
    }

    #[test]
    fn subscription_checks() {
        let sub = |options: u8| [0x82, 6, 0, 1, 0, 1, b't', options];
        // MQTT 5: an empty property length after the packet id.
        let sub5 = |options: u8| [0x82, 7, 0, 1, 0, 0, 1, b't', options];
        let check = |f: &[u8], v5| {
            let h = peek_header(f, 1000).unwrap().unwrap();
            check_subscription(f, &h, v5)
        };
        assert_eq!(check(&sub(1), false), Ok(()));
        assert!(check(&sub(0x04), false).is_err(), "reserved bit in 3.1.1");
        assert!(check(&sub(3), false).is_err(), "QoS 3");
        assert!(check(&sub5(0x80), true).is_err(), "reserved bit in 5");
        assert!(check(&sub5(0x30), true).is_err(), "retain handling 3");
        assert_eq!(check(&sub5(0x2C), true), Ok(()));
        assert!(check(&[0x82, 2, 0, 1], false).is_err(), "no filter");
        assert!(check(&[0xA2, 3, 0, 1, 0], true).is_err(), "no filter in v5");
        assert!(fixed_flags_valid(
            &peek_header(&sub(1), 9).unwrap().unwrap()
        ));
        assert!(!fixed_flags_valid(
            &peek_header(&[0x80, 0], 9).unwrap().unwrap()
        ));
        assert!(!fixed_flags_valid(
            &peek_header(&[0x41, 0], 9).unwrap().unwrap()
        ));
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
