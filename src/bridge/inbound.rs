//! Bridge in, by interest: the instance subscribes on NATS only to the subjects its sessions'
//! subscriptions need (each channel filter translated: `+` to `*`, `#` to `>` plus its parent
//! subject), follows the broker core's [`FilterInterest`] as filters gain their first and lose
//! their last subscription, and publishes what arrives into the core, like a device PUBLISH, at
//! the QoS its original publisher used (the [`QOS_HEADER`]; QoS 1 for a message without one,
//! e.g. from another platform adapter). The connection is `no_echo`, so this instance never
//! receives its own messages. Publishing into the core never waits: each subscriber's queue
//! takes the message or counts it as dropped.
//!
//! Two subscriptions can match one subject (`m.d.c.ch.>` and `m.d.c.ch.a.*`), and NATS then
//! delivers the message once to each: only the copy that arrives through the first matching
//! subject (in string order) is published into the core, so local subscribers get it once.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::StreamExt;
use prost::Message as _;
use tokio_stream::StreamMap;
use tokio_util::sync::CancellationToken;

use super::message::{topic_for, Message};
use super::{BridgeMetrics, QOS_HEADER};
use crate::broker::interest::FilterInterest;
use crate::broker::{self, Broker, Origin};
use crate::events::nats::subject_matches;

/// Longest wait for the server to confirm new subscriptions.
const SYNC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The QoS a bus message without [`QOS_HEADER`] is delivered with at most.
const DEFAULT_QOS: u8 = 1;

/// The NATS subjects an MQTT filter needs, if it can match channel topics at all.
pub fn subjects_for(filter: &str) -> Vec<String> {
    let levels: Vec<&str> = filter.split('/').collect();
    if !matches!(levels[0], "m" | "+" | "#") {
        return Vec::new();
    }
    let mut subject = String::from("m");
    for level in levels.iter().skip(1) {
        match *level {
            "#" => {
                // `a/#` also matches `a` itself.
                return vec![format!("{subject}.>"), subject];
            }
            "+" => subject.push_str(".*"),
            l if l.is_empty() || l.contains(['.', '*', '>', ' ', '\t', '\r', '\n']) => {
                // No bus subject has such a token.
                return Vec::new();
            }
            l => {
                subject.push('.');
                subject.push_str(l);
            }
        }
    }
    if levels[0] == "#" {
        return vec!["m.>".to_owned()];
    }
    vec![subject]
}

/// The subjects subscribed now, indexed by channel for the duplicate check.
#[derive(Default)]
struct Subjects {
    all: BTreeSet<String>,
    /// Subjects naming a domain and channel, by `m.<domain>.c.<channel>`.
    by_channel: HashMap<String, BTreeSet<String>>,
    /// Subjects with a wildcard among their first four tokens.
    wide: BTreeSet<String>,
}

/// `m.<domain>.c.<channel>` of a subject or pattern, when none of those tokens is a wildcard.
fn channel_key(subject: &str) -> Option<&str> {
    let mut end = 0;
    for (i, token) in subject.split('.').enumerate().take(4) {
        if matches!(token, "*" | ">") {
            return None;
        }
        end += token.len() + usize::from(i > 0);
        if i == 3 {
            return Some(&subject[..end]);
        }
    }
    None
}

impl Subjects {
    fn insert(&mut self, subject: String) {
        match channel_key(&subject) {
            Some(key) => {
                self.by_channel
                    .entry(key.to_owned())
                    .or_default()
                    .insert(subject.clone());
            }
            None => {
                self.wide.insert(subject.clone());
            }
        }
        self.all.insert(subject);
    }

    fn remove(&mut self, subject: &str) {
        match channel_key(subject) {
            Some(key) => {
                if let Some(set) = self.by_channel.get_mut(key) {
                    set.remove(subject);
                    if set.is_empty() {
                        self.by_channel.remove(key);
                    }
                }
            }
            None => {
                self.wide.remove(subject);
            }
        }
        self.all.remove(subject);
    }

    /// Whether `via` is the first subscribed subject matching `subject`.
    fn first_match(&self, subject: &str, via: &str) -> bool {
        let narrow = channel_key(subject).and_then(|k| self.by_channel.get(k));
        let first = narrow
            .into_iter()
            .flatten()
            .chain(self.wide.iter())
            .filter(|p| subject_matches(p, subject))
            .min();
        first.is_none_or(|f| f == via)
    }
}

/// Follows the core's interest and publishes bus messages into the core until shutdown.
pub(super) async fn receive(
    client: async_nats::Client,
    broker: Arc<Broker>,
    metrics: Arc<BridgeMetrics>,
    shutdown: CancellationToken,
) {
    let interest: Arc<FilterInterest> = broker.interest();
    let mut subjects = Subjects::default();
    let mut streams: StreamMap<String, async_nats::Subscriber> = StreamMap::new();
    let mut resync = true;
    loop {
        if resync {
            resync = false;
            let (filters, generation) = interest.filters();
            let wanted: BTreeSet<String> = filters.iter().flat_map(|f| subjects_for(f)).collect();
            let changed = wanted != subjects.all;
            let gone: Vec<String> = subjects.all.difference(&wanted).cloned().collect();
            for subject in gone {
                subjects.remove(&subject);
                // Dropping the subscriber unsubscribes.
                streams.remove(&subject);
            }
            for subject in wanted.difference(&subjects.all.clone()) {
                match client.subscribe(subject.clone()).await {
                    Ok(subscriber) => {
                        subjects.insert(subject.clone());
                        streams.insert(subject.clone(), subscriber);
                    }
                    Err(e) => {
                        tracing::warn!(subject = %subject.escape_debug(), error = %e, "message bus bridge: cannot subscribe; trying again on the next change");
                    }
                }
            }
            metrics
                .in_subjects
                .store(subjects.all.len() as u64, Ordering::Relaxed);
            // Once the server has the subscriptions (a flush's round trip), a SUBACK waiting
            // for them may go: what is published on the bus after it reaches the subscriber.
            // Without a connection there is nothing to wait for (they are sent on reconnect).
            if changed && client.connection_state() == async_nats::connection::State::Connected {
                let _ = tokio::time::timeout(SYNC_TIMEOUT, client.flush()).await;
            }
            interest.mark_synced(generation);
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = interest.changed() => resync = true,
            Some((via, message)) = streams.next(), if !streams.is_empty() => {
                if !subjects.first_match(message.subject.as_str(), &via) {
                    continue;
                }
                deliver(&broker, &metrics, message);
            }
        }
    }
}

fn deliver(broker: &Broker, metrics: &BridgeMetrics, message: async_nats::Message) {
    let qos = message
        .headers
        .as_ref()
        .and_then(|h| h.get(QOS_HEADER))
        .and_then(|v| v.as_str().parse::<u8>().ok())
        .unwrap_or(DEFAULT_QOS)
        .min(2);
    let decoded = Message::decode(message.payload.clone());
    let (Some(topic), Ok(decoded)) = (topic_for(message.subject.as_str()), decoded) else {
        let invalid = metrics.in_invalid.fetch_add(1, Ordering::Relaxed) + 1;
        if invalid.is_power_of_two() {
            tracing::warn!(subject = %message.subject.as_str().escape_debug(), invalid,
                "message bus bridge: not a channel subject or not a messaging.Message; skipped");
        }
        return;
    };
    broker.publish(broker::Message::new(
        topic,
        decoded.payload,
        qos,
        false,
        Origin::Bus,
    ));
    metrics.in_delivered.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_become_the_subjects_they_need() {
        assert_eq!(subjects_for("m/d1/c/ch1"), ["m.d1.c.ch1"]);
        assert_eq!(subjects_for("m/d1/c/ch1/a/+/b"), ["m.d1.c.ch1.a.*.b"]);
        assert_eq!(subjects_for("m/d1/c/ch1/#"), ["m.d1.c.ch1.>", "m.d1.c.ch1"]);
        assert_eq!(subjects_for("#"), ["m.>"]);
        assert_eq!(subjects_for("+/d1/#"), ["m.d1.>", "m.d1"]);
        assert!(subjects_for("hc/d1").is_empty());
        assert!(subjects_for("sensors/#").is_empty());
        assert!(subjects_for("m/d1/c/ch1/a.b").is_empty());
        assert!(subjects_for("m/d1/c/ch1//x").is_empty());
    }

    #[test]
    fn only_the_first_matching_subject_delivers() {
        let mut subjects = Subjects::default();
        for s in ["m.d1.c.ch1.>", "m.d1.c.ch1.a.*", "m.>", "m.d2.c.ch2"] {
            subjects.insert(s.to_owned());
        }
        // `m.>` sorts before the others: it delivers whatever it matches.
        assert!(subjects.first_match("m.d1.c.ch1.a.x", "m.>"));
        assert!(!subjects.first_match("m.d1.c.ch1.a.x", "m.d1.c.ch1.>"));
        assert!(!subjects.first_match("m.d1.c.ch1.a.x", "m.d1.c.ch1.a.*"));
        subjects.remove("m.>");
        assert!(subjects.first_match("m.d1.c.ch1.a.x", "m.d1.c.ch1.>"));
        assert!(!subjects.first_match("m.d1.c.ch1.a.x", "m.d1.c.ch1.a.*"));
        assert!(subjects.first_match("m.d2.c.ch2", "m.d2.c.ch2"));
        assert_eq!(channel_key("m.d1.c.ch1.a"), Some("m.d1.c.ch1"));
        assert_eq!(channel_key("m.d1.c.ch1"), Some("m.d1.c.ch1"));
        assert_eq!(channel_key("m.*.c.ch1"), None);
        assert_eq!(channel_key("m.d1"), None);
    }
}
