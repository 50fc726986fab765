//! The bus message format (`messaging.Message`, generated from `proto/messaging`) and the
//! mapping between MQTT channel topics and NATS subjects:
//! `m/<domain>/c/<channel>/<a>/<b>` <-> `m.<domain>.c.<channel>.<a>.<b>`.

use bytes::Bytes;

use crate::topic::ChannelTopic;

/// Code generated from `proto/messaging/messaging.proto`.
pub mod proto {
    tonic::include_proto!("messaging");
}

pub use proto::Message;

/// `Message.protocol` of messages this adapter publishes.
pub const PROTOCOL: &str = "mqtt";

/// The NATS subject a device message on `channel` is published to.
pub fn subject_for(channel: &ChannelTopic) -> String {
    if channel.subtopic.is_empty() {
        format!("m.{}.c.{}", channel.domain, channel.channel)
    } else {
        format!(
            "m.{}.c.{}.{}",
            channel.domain,
            channel.channel,
            channel.dotted_subtopic()
        )
    }
}

/// The MQTT topic a bus message on `subject` is delivered to; `None` when the subject is not a
/// channel subject (`m.<domain>.c.<channel>[.<subtopic>]`).
pub fn topic_for(subject: &str) -> Option<Bytes> {
    let mut levels = subject.split('.');
    let (Some("m"), Some(domain), Some("c"), Some(channel)) =
        (levels.next(), levels.next(), levels.next(), levels.next())
    else {
        return None;
    };
    if domain.is_empty() || channel.is_empty() {
        return None;
    }
    let mut topic = format!("m/{domain}/c/{channel}");
    for level in levels {
        if level.is_empty() {
            return None;
        }
        topic.push('/');
        topic.push_str(level);
    }
    Some(Bytes::from(topic))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel(subtopic: &str) -> ChannelTopic {
        ChannelTopic {
            domain: "d1".into(),
            channel: "ch1".into(),
            subtopic: subtopic.into(),
        }
    }

    #[test]
    fn subjects_and_topics_map_both_ways() {
        assert_eq!(subject_for(&channel("")), "m.d1.c.ch1");
        assert_eq!(subject_for(&channel("a/b")), "m.d1.c.ch1.a.b");
        assert_eq!(
            topic_for("m.d1.c.ch1.a.b").as_deref(),
            Some(&b"m/d1/c/ch1/a/b"[..])
        );
        assert_eq!(topic_for("m.d1.c.ch1").as_deref(), Some(&b"m/d1/c/ch1"[..]));
    }

    #[test]
    fn non_channel_subjects_are_refused() {
        for subject in [
            "m.d1",
            "m.d1.x.ch1",
            "events.supermq.mqtt",
            "m..c.ch1",
            "m.d1.c.ch1..a",
        ] {
            assert_eq!(topic_for(subject), None, "{subject}");
        }
    }
}
