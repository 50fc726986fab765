//! How a retained message is written in the state store: keyed by its topic, the value holds a
//! version byte, the QoS, the expiry as Unix time (an `Instant` means nothing to the next
//! process), the MQTT 5 properties passed on to subscribers, then the payload.
//!
//! ```text
//! u8 version (1) | u8 qos | u64 expires_at_unix_ms (0: never) | u8 has_properties
//! [properties] | payload (the rest)
//! properties: opt u8 payload_format | opt u32 expiry_interval | opt str response_topic |
//!             opt bytes correlation_data | u32 count, (str, str)* user | opt str content_type
//! str/bytes: u32 length (big endian) then the bytes; opt: u8 0 | u8 1 then the value
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rumqttd::protocol::PublishProperties;

use crate::broker::{Message, Origin};

const VERSION: u8 = 1;

/// Unix time in milliseconds now.
pub(crate) fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Encodes `message` (its topic is the key, written apart) as of `now` / `now_ms`.
pub(super) fn encode(message: &Message, now: Instant, now_ms: u64, out: &mut Vec<u8>) {
    out.clear();
    out.push(VERSION);
    out.push(message.qos);
    let expires_ms = message.expires_at.map_or(0, |at| {
        let left = at.saturating_duration_since(now).as_millis();
        now_ms
            .saturating_add(u64::try_from(left).unwrap_or(u64::MAX))
            .max(1)
    });
    out.extend_from_slice(&expires_ms.to_be_bytes());
    match message.properties.as_deref() {
        None => out.push(0),
        Some(p) => {
            out.push(1);
            opt(out, p.payload_format_indicator, |out, v| out.push(v));
            opt(out, p.message_expiry_interval, |out, v| {
                out.extend_from_slice(&v.to_be_bytes())
            });
            opt(out, p.response_topic.as_deref(), |out, v| {
                bytes(out, v.as_bytes())
            });
            opt(out, p.correlation_data.as_deref(), bytes);
            let count = u32::try_from(p.user_properties.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&count.to_be_bytes());
            for (k, v) in p.user_properties.iter().take(count as usize) {
                bytes(out, k.as_bytes());
                bytes(out, v.as_bytes());
            }
            opt(out, p.content_type.as_deref(), |out, v| {
                bytes(out, v.as_bytes())
            });
        }
    }
    out.extend_from_slice(&message.payload);
}

pub(super) fn opt<T>(out: &mut Vec<u8>, value: Option<T>, write: impl FnOnce(&mut Vec<u8>, T)) {
    match value {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            write(out, v);
        }
    }
}

pub(super) fn bytes(out: &mut Vec<u8>, b: &[u8]) {
    let len = u32::try_from(b.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&b[..len as usize]);
}

/// What a stored value holds, decoded.
#[derive(Debug)]
pub(super) enum Decoded {
    Message(Arc<Message>),
    /// Its expiry passed while it was stored.
    Expired,
}

/// Decodes a value written by [`encode`] for `topic`, as of `now` / `now_ms`; `None` when it
/// is not one (a newer version, or damaged).
pub(super) fn decode(topic: &str, value: &[u8], now: Instant, now_ms: u64) -> Option<Decoded> {
    let mut r = Reader(value);
    if r.u8()? != VERSION {
        return None;
    }
    let qos = r.u8()?;
    let expires_ms = u64::from_be_bytes(r.take(8)?.try_into().ok()?);
    let expires_at = match expires_ms {
        0 => None,
        at if at <= now_ms => return Some(Decoded::Expired),
        at => Some(now + Duration::from_millis(at - now_ms)),
    };
    let properties = match r.u8()? {
        0 => None,
        1 => {
            let payload_format_indicator = r.opt(Reader::u8)?;
            let message_expiry_interval =
                r.opt(|r| Some(u32::from_be_bytes(r.take(4)?.try_into().ok()?)))?;
            let response_topic = r.opt(Reader::string)?;
            let correlation_data = r.opt(|r| Some(Bytes::copy_from_slice(r.bytes()?)))?;
            let count = u32::from_be_bytes(r.take(4)?.try_into().ok()?);
            let mut user_properties = Vec::new();
            for _ in 0..count {
                user_properties.push((r.string()?, r.string()?));
            }
            let content_type = r.opt(Reader::string)?;
            Some(Box::new(PublishProperties {
                payload_format_indicator,
                message_expiry_interval,
                topic_alias: None,
                response_topic,
                correlation_data,
                user_properties,
                subscription_identifiers: Vec::new(),
                content_type,
            }))
        }
        _ => return None,
    };
    Some(Decoded::Message(Arc::new(Message {
        topic: Bytes::copy_from_slice(topic.as_bytes()),
        payload: Bytes::copy_from_slice(r.0),
        qos: qos.min(2),
        retain: true,
        properties,
        // Published by no session of this process: No Local never hides it.
        origin: Origin::Bus,
        expires_at,
    })))
}

pub(super) struct Reader<'a>(pub(super) &'a [u8]);

impl<'a> Reader<'a> {
    pub(super) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    pub(super) fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    pub(super) fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = u32::from_be_bytes(self.take(4)?.try_into().ok()?);
        self.take(len as usize)
    }

    pub(super) fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }

    /// `Some(None)` for an absent value, `None` when the bytes are not an option.
    pub(super) fn opt<T>(
        &mut self,
        read: impl FnOnce(&mut Self) -> Option<T>,
    ) -> Option<Option<T>> {
        match self.u8()? {
            0 => Some(None),
            1 => read(self).map(Some),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(message: &Message, now: Instant, now_ms: u64) -> Option<Decoded> {
        let mut out = Vec::new();
        encode(message, now, now_ms, &mut out);
        decode(message.topic_str(), &out, now, now_ms)
    }

    #[test]
    fn a_message_with_every_property_comes_back_the_same() {
        let now = Instant::now();
        let properties = PublishProperties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(60),
            topic_alias: None,
            response_topic: Some("r/t".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01")),
            user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
            subscription_identifiers: Vec::new(),
            content_type: Some("text/plain".into()),
        };
        let message = Message {
            topic: "a/b".into(),
            payload: "payload".into(),
            qos: 2,
            retain: true,
            properties: Some(Box::new(properties.clone())),
            origin: Origin::Session(7),
            expires_at: Some(now + Duration::from_secs(60)),
        };
        let Some(Decoded::Message(back)) = roundtrip(&message, now, 1_000_000) else {
            panic!("not decoded");
        };
        assert_eq!(back.topic, message.topic);
        assert_eq!(back.payload, message.payload);
        assert_eq!(back.qos, 2);
        assert!(back.retain);
        assert_eq!(back.properties.as_deref(), Some(&properties));
        assert_eq!(back.expires_at, message.expires_at);
    }

    #[test]
    fn a_plain_message_and_an_expired_one() {
        let now = Instant::now();
        let plain = Message::new("t".into(), "v".into(), 1, true, Origin::Bus);
        let Some(Decoded::Message(back)) = roundtrip(&plain, now, 5_000) else {
            panic!("not decoded");
        };
        assert!(back.properties.is_none() && back.expires_at.is_none());

        let mut out = Vec::new();
        let expiring = Message {
            expires_at: Some(now + Duration::from_secs(1)),
            ..Message::clone_fields(&plain)
        };
        encode(&expiring, now, 5_000, &mut out);
        // Read back two seconds later (by the wall clock of the next process).
        let later = decode("t", &out, Instant::now(), 7_000);
        assert!(matches!(later, Some(Decoded::Expired)), "{later:?}");
    }

    #[test]
    fn damaged_or_newer_values_are_not_read() {
        assert!(decode("t", &[], Instant::now(), 0).is_none());
        assert!(decode("t", &[2, 1], Instant::now(), 0).is_none());
        assert!(decode("t", &[1, 1, 0, 0], Instant::now(), 0).is_none());
    }

    impl Message {
        fn clone_fields(m: &Message) -> Message {
            Message {
                topic: m.topic.clone(),
                payload: m.payload.clone(),
                qos: m.qos,
                retain: m.retain,
                properties: m.properties.clone(),
                origin: m.origin,
                expires_at: m.expires_at,
            }
        }
    }
}
