//! A raw MQTT socket with hand-written packets, for what a real client library will not do:
//! exact reason codes, malformed input, abrupt closes, silence.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::adapter::WAIT;

pub const V311: u8 = 4;
pub const V5: u8 = 5;

/// Packet types of the fixed header (high nibble).
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const PUBREC: u8 = 5;
pub const SUBACK: u8 = 9;
pub const UNSUBACK: u8 = 11;
pub const PINGRESP: u8 = 13;

/// Encodes an MQTT variable byte integer (remaining length, property length).
pub fn varint(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            return out;
        }
    }
}

/// A length-prefixed UTF-8 string.
pub fn string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

fn binary(b: &[u8]) -> Vec<u8> {
    let mut out = (b.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(b);
    out
}

/// A packet with this first byte (type and flags) and body.
pub fn packet(first_byte: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first_byte];
    out.extend(varint(body.len()));
    out.extend_from_slice(body);
    out
}

/// A will for [`Connect`].
pub struct Will<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub qos: u8,
    pub retain: bool,
}

/// The fields of a CONNECT this suite needs.
pub struct Connect<'a> {
    pub version: u8,
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    /// Binary data: MQTT does not require a password to be UTF-8.
    pub password: Option<&'a [u8]>,
    pub keep_alive: u16,
    pub clean: bool,
    pub will: Option<Will<'a>>,
    /// MQTT 5 CONNECT properties, encoded (e.g. [`session_expiry`]).
    pub properties: Vec<u8>,
}

/// The MQTT 5 Session Expiry Interval property.
pub fn session_expiry(seconds: u32) -> Vec<u8> {
    let mut out = vec![0x11];
    out.extend_from_slice(&seconds.to_be_bytes());
    out
}

impl<'a> Connect<'a> {
    /// A clean-session CONNECT with credentials and a 30 s keep-alive.
    pub fn new(version: u8, client_id: &'a str, username: &'a str, password: &'a str) -> Self {
        Connect {
            version,
            client_id,
            username: Some(username),
            password: Some(password.as_bytes()),
            keep_alive: 30,
            clean: true,
            will: None,
            properties: Vec::new(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut flags = 0u8;
        if self.clean {
            flags |= 0x02;
        }
        if let Some(will) = &self.will {
            flags |= 0x04 | (will.qos << 3);
            if will.retain {
                flags |= 0x20;
            }
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        if self.username.is_some() {
            flags |= 0x80;
        }
        let mut body = string("MQTT");
        body.push(self.version);
        body.push(flags);
        body.extend_from_slice(&self.keep_alive.to_be_bytes());
        if self.version == V5 {
            body.extend(varint(self.properties.len()));
            body.extend_from_slice(&self.properties);
        }
        body.extend(string(self.client_id));
        if let Some(will) = &self.will {
            if self.version == V5 {
                body.push(0); // no will properties
            }
            body.extend(string(will.topic));
            body.extend(binary(will.payload));
        }
        if let Some(username) = self.username {
            body.extend(string(username));
        }
        if let Some(password) = self.password {
            body.extend(binary(password));
        }
        packet(0x10, &body)
    }
}

/// PUBLISH; `user_properties` are only encoded for MQTT 5.
pub fn publish(
    version: u8,
    topic: &str,
    qos: u8,
    pkid: u16,
    payload: &[u8],
    user_properties: &[(&str, &str)],
) -> Vec<u8> {
    let mut body = string(topic);
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    if version == V5 {
        let mut props = Vec::new();
        for (key, value) in user_properties {
            props.push(0x26);
            props.extend(string(key));
            props.extend(string(value));
        }
        body.extend(varint(props.len()));
        body.extend(props);
    }
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1), &body)
}

/// SUBSCRIBE with one or more (filter, qos) pairs.
pub fn subscribe(version: u8, pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if version == V5 {
        body.push(0);
    }
    for (filter, qos) in filters {
        body.extend(string(filter));
        body.push(*qos);
    }
    packet(0x82, &body)
}

/// UNSUBSCRIBE of one or more filters.
pub fn unsubscribe(version: u8, pkid: u16, filters: &[&str]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if version == V5 {
        body.push(0);
    }
    for filter in filters {
        body.extend(string(filter));
    }
    packet(0xA2, &body)
}

/// PUBACK for an incoming QoS 1 PUBLISH (same bytes in both versions).
pub fn puback(pkid: u16) -> Vec<u8> {
    let mut out = vec![0x40, 0x02];
    out.extend_from_slice(&pkid.to_be_bytes());
    out
}

pub fn pingreq() -> Vec<u8> {
    vec![0xC0, 0x00]
}

pub fn disconnect(version: u8) -> Vec<u8> {
    if version == V5 {
        vec![0xE0, 0x01, 0x00]
    } else {
        vec![0xE0, 0x00]
    }
}

/// A packet read back: type (high nibble), flags (low nibble), body after the remaining length.
#[derive(Debug, Clone)]
pub struct Packet {
    pub kind: u8,
    pub flags: u8,
    pub body: Vec<u8>,
}

impl Packet {
    /// The CONNACK return code (3.1.1) or reason code (5).
    pub fn connack_code(&self) -> u8 {
        assert_eq!(self.kind, CONNACK, "expected CONNACK, got {self:?}");
        self.body[1]
    }

    /// The PUBACK reason code (0 when the packet omits it, as MQTT 5 allows).
    pub fn puback_reason(&self) -> u8 {
        assert_eq!(self.kind, PUBACK, "expected PUBACK, got {self:?}");
        self.body.get(2).copied().unwrap_or(0)
    }

    /// The PUBREC reason code (0 when omitted).
    pub fn pubrec_reason(&self) -> u8 {
        assert_eq!(self.kind, PUBREC, "expected PUBREC, got {self:?}");
        self.body.get(2).copied().unwrap_or(0)
    }

    /// The QoS of an incoming PUBLISH.
    pub fn publish_qos(&self) -> u8 {
        assert_eq!(self.kind, PUBLISH, "expected PUBLISH, got {self:?}");
        (self.flags >> 1) & 0x03
    }

    /// The packet id of an incoming QoS 1/2 PUBLISH (3.1.1 layout).
    pub fn publish_pkid(&self) -> u16 {
        let len = u16::from_be_bytes([self.body[0], self.body[1]]) as usize;
        u16::from_be_bytes([self.body[2 + len], self.body[3 + len]])
    }

    /// SUBACK return/reason codes, past the packet id and (MQTT 5) the properties.
    pub fn suback_codes(&self, version: u8) -> Vec<u8> {
        assert_eq!(self.kind, SUBACK, "expected SUBACK, got {self:?}");
        let mut at = 2;
        if version == V5 {
            let (len, used) = read_varint(&self.body[at..]).expect("SUBACK property length");
            at += used + len;
        }
        self.body[at..].to_vec()
    }

    /// Topic and payload of an incoming PUBLISH (MQTT 3.1.1 layout only).
    pub fn publish_v311(&self) -> (String, Vec<u8>) {
        assert_eq!(self.kind, PUBLISH, "expected PUBLISH, got {self:?}");
        let len = u16::from_be_bytes([self.body[0], self.body[1]]) as usize;
        let topic = String::from_utf8(self.body[2..2 + len].to_vec()).expect("utf-8 topic");
        let mut at = 2 + len;
        if (self.flags >> 1) & 0x03 > 0 {
            at += 2;
        }
        (topic, self.body[at..].to_vec())
    }
}

pub fn read_varint(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, byte) in bytes.iter().take(4).enumerate() {
        value |= ((byte & 0x7F) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// How a read ended when no packet came.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadEnd {
    /// The peer closed the socket (EOF or reset).
    Closed,
    /// Nothing arrived in time.
    Timeout,
}

/// A raw TCP connection to the adapter.
pub struct RawClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    pub async fn open(port: u16) -> RawClient {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("TCP connect to adapter");
        stream.set_nodelay(true).expect("nodelay");
        RawClient {
            stream,
            buf: Vec::new(),
        }
    }

    /// Opens a socket from `source` (a loopback address such as 127.0.0.2, so the adapter sees
    /// another peer IP); the error is the connect's.
    pub async fn open_from(port: u16, source: std::net::IpAddr) -> std::io::Result<RawClient> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(std::net::SocketAddr::new(source, 0))?;
        let stream = socket
            .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
            .await?;
        stream.set_nodelay(true)?;
        Ok(RawClient {
            stream,
            buf: Vec::new(),
        })
    }

    /// Wraps a connected socket.
    pub fn from_stream(stream: TcpStream) -> RawClient {
        RawClient {
            stream,
            buf: Vec::new(),
        }
    }

    /// Sends `connect` and reads the answer: the CONNACK code, or how the socket ended without
    /// one within [`WAIT`].
    pub async fn handshake(&mut self, connect: &Connect<'_>) -> Result<u8, ReadEnd> {
        self.send(&connect.encode()).await;
        let ack = self.read_packet(WAIT).await?;
        Ok(ack.connack_code())
    }

    /// The socket itself, for a caller that reads or writes in bulk (benchmarks).
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    /// Opens a socket, sends `connect` and returns the CONNACK code with the client.
    pub async fn connect(port: u16, connect: &Connect<'_>) -> (RawClient, u8) {
        let mut client = RawClient::open(port).await;
        client.send(&connect.encode()).await;
        let ack = client.expect_packet().await;
        let code = ack.connack_code();
        (client, code)
    }

    /// Like [`RawClient::connect`], but `None` when the adapter cannot be reached or closes
    /// before answering (it may have been killed).
    pub async fn try_connect(port: u16, connect: &Connect<'_>) -> Option<(RawClient, u8)> {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream.set_nodelay(true).ok()?;
        let mut client = RawClient {
            stream,
            buf: Vec::new(),
        };
        client.send(&connect.encode()).await;
        let ack = client.read_packet(WAIT).await.ok()?;
        let code = ack.connack_code();
        Some((client, code))
    }

    /// Like [`RawClient::connect`] but asserts the CONNECT was accepted.
    pub async fn connect_ok(port: u16, connect: &Connect<'_>) -> RawClient {
        let (client, code) = RawClient::connect(port, connect).await;
        assert_eq!(code, 0, "CONNACK code for client {:?}", connect.client_id);
        client
    }

    /// Writes bytes; a write error (peer already closed) is ignored, the next read reports it.
    pub async fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// Reads one packet, or reports close / timeout.
    pub async fn read_packet(&mut self, wait: Duration) -> Result<Packet, ReadEnd> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if self.buf.len() >= 2 {
                if let Some((len, used)) = read_varint(&self.buf[1..]) {
                    let total = 1 + used + len;
                    if self.buf.len() >= total {
                        let packet = Packet {
                            kind: self.buf[0] >> 4,
                            flags: self.buf[0] & 0x0F,
                            body: self.buf[1 + used..total].to_vec(),
                        };
                        self.buf.drain(..total);
                        return Ok(packet);
                    }
                }
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(ReadEnd::Timeout),
                Ok(Ok(0)) | Ok(Err(_)) => return Err(ReadEnd::Closed),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next packet within [`WAIT`], or a panic.
    pub async fn expect_packet(&mut self) -> Packet {
        match self.read_packet(WAIT).await {
            Ok(packet) => packet,
            Err(end) => panic!("expected a packet from the adapter, got {end:?}"),
        }
    }

    /// The next packet of `kind`, skipping others (e.g. PUBLISHes while awaiting an ack).
    pub async fn expect_kind(&mut self, kind: u8) -> Packet {
        loop {
            let packet = self.expect_packet().await;
            if packet.kind == kind {
                return packet;
            }
        }
    }

    /// Asserts the adapter closes this socket within `wait`, ignoring packets sent before the close.
    pub async fn expect_closed_within(&mut self, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read_packet(left).await {
                Ok(_) => continue,
                Err(ReadEnd::Closed) => return,
                Err(ReadEnd::Timeout) => {
                    panic!("the adapter did not close the socket within {wait:?}")
                }
            }
        }
    }

    pub async fn expect_closed(&mut self) {
        self.expect_closed_within(WAIT).await;
    }

    /// PINGREQ → PINGRESP: proves the session is alive and served.
    pub async fn ping(&mut self) {
        self.send(&pingreq()).await;
        let packet = self.expect_packet().await;
        assert_eq!(packet.kind, PINGRESP, "expected PINGRESP, got {packet:?}");
    }

    /// Sends SUBSCRIBE and returns the SUBACK codes.
    pub async fn subscribe(&mut self, version: u8, pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
        self.send(&subscribe(version, pkid, filters)).await;
        self.expect_kind(SUBACK).await.suback_codes(version)
    }
}
