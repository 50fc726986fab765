//! The wire codec of one session: rumqttd's MQTT 3.1.1 or MQTT 5 codec, chosen by the CONNECT's
//! protocol level. Writing to a 3.1.1 device strips MQTT 5 properties first (rumqttd's 3.1.1
//! encoder panics on them).

use bytes::BytesMut;
use rumqttd::protocol::{self, v4::V4, v5::V5, Packet, Protocol};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolVersion {
    V311,
    V5,
}

impl ProtocolVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            ProtocolVersion::V311 => "3.1.1",
            ProtocolVersion::V5 => "5",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Codec {
    version: ProtocolVersion,
    max_packet_size: usize,
}

impl Codec {
    pub fn new(version: ProtocolVersion, max_packet_size: usize) -> Self {
        Codec {
            version,
            max_packet_size,
        }
    }

    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    /// Parses one complete frame from the front of `buf`.
    pub fn read(&self, buf: &mut BytesMut) -> Result<Packet, protocol::Error> {
        match self.version {
            ProtocolVersion::V311 => V4.read_mut(buf, self.max_packet_size),
            ProtocolVersion::V5 => V5.read_mut(buf, self.max_packet_size),
        }
    }

    /// Encodes a packet for this device onto `buf`.
    pub fn write(&self, packet: Packet, buf: &mut BytesMut) -> Result<usize, protocol::Error> {
        match self.version {
            ProtocolVersion::V311 => V4.write(strip_properties(packet), buf),
            ProtocolVersion::V5 => {
                let disconnect = matches!(packet, Packet::Disconnect(_, None));
                let start = buf.len();
                let n = V5.write(packet, buf)?;
                // rumqttd writes a DISCONNECT's (empty) property length without counting it in
                // the remaining length: the frame would end one byte early. Found by fuzzing.
                if disconnect && buf.len() == start + 4 && buf[start + 1] == 1 {
                    buf[start + 1] = 2;
                }
                Ok(n)
            }
        }
    }
}

/// Drops every MQTT 5 property, for a 3.1.1 device.
fn strip_properties(packet: Packet) -> Packet {
    match packet {
        Packet::Connect(c, _, will, _, login) => Packet::Connect(c, None, will, None, login),
        Packet::ConnAck(p, _) => Packet::ConnAck(p, None),
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::PubAck(p, _) => Packet::PubAck(p, None),
        Packet::Subscribe(p, _) => Packet::Subscribe(p, None),
        Packet::SubAck(p, _) => Packet::SubAck(p, None),
        Packet::PubRec(p, _) => Packet::PubRec(p, None),
        Packet::PubRel(p, _) => Packet::PubRel(p, None),
        Packet::PubComp(p, _) => Packet::PubComp(p, None),
        Packet::Unsubscribe(p, _) => Packet::Unsubscribe(p, None),
        Packet::UnsubAck(p, _) => Packet::UnsubAck(p, None),
        Packet::Disconnect(p, _) => Packet::Disconnect(p, None),
        other @ (Packet::PingReq(_) | Packet::PingResp(_)) => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::{Publish, PublishProperties};

    #[test]
    fn v5_disconnect_with_a_reason_is_one_whole_frame() {
        use rumqttd::protocol::{Disconnect, DisconnectReasonCode};
        let packet = Packet::Disconnect(
            Disconnect {
                reason_code: DisconnectReasonCode::MalformedPacket,
            },
            None,
        );
        let mut buf = BytesMut::new();
        Codec::new(ProtocolVersion::V5, 1024)
            .write(packet, &mut buf)
            .expect("encodes");
        // Remaining length 2: the reason code and an empty property length.
        assert_eq!(&buf[..], &[0xE0, 2, 0x81, 0]);
    }

    #[test]
    fn v311_write_drops_publish_properties() {
        let props = PublishProperties {
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        };
        let packet = Packet::Publish(Publish::new("a/b", "hi", false), Some(props));
        let mut buf = BytesMut::new();
        Codec::new(ProtocolVersion::V311, 1024)
            .write(packet, &mut buf)
            .expect("encodes");
        assert_eq!(&buf[..], &[0x30, 7, 0, 3, b'a', b'/', b'b', b'h', b'i']);
    }
}
