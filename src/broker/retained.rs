//! Retained messages: the last retained PUBLISH of each topic, kept in memory in a trie of topic
//! levels so a new subscription's filter walks only the topics it can match. An empty retained
//! payload clears the topic. The store is bounded in topics and in bytes (a message's
//! [`Message::size`]), in all and per publishing client: one client holds at most its share of
//! each, so one tenant filling the store cannot refuse every other tenant's retained messages.
//! Past a bound a retained message is refused (and counted by the caller); clearing always works.

use std::collections::HashMap;
use std::sync::Arc;

use super::message::Message;

/// How much the retained store keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetainedLimits {
    /// Retained topics in all.
    pub max_messages: usize,
    /// Bytes of retained messages in all.
    pub max_bytes: usize,
    /// The share (percent, 1..=100) of both bounds one publishing client may hold.
    pub client_share_percent: u8,
}

impl RetainedLimits {
    /// No bounds.
    pub const UNLIMITED: RetainedLimits = RetainedLimits {
        max_messages: usize::MAX,
        max_bytes: usize::MAX,
        client_share_percent: 100,
    };

    fn share(&self, total: usize) -> usize {
        let percent = usize::from(self.client_share_percent.clamp(1, 100));
        if percent == 100 {
            return total;
        }
        match total.checked_mul(percent) {
            Some(product) => (product / 100).max(1),
            None => total / 100 * percent,
        }
    }
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    message: Option<Stored>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.message.is_none()
    }
}

/// A retained message, who published it and what it is charged.
#[derive(Debug)]
struct Stored {
    message: Arc<Message>,
    owner: Box<str>,
    size: usize,
}

/// What one publishing client holds.
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    messages: usize,
    bytes: usize,
}

/// What storing a retained PUBLISH did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retained {
    Stored,
    Cleared,
    /// Beyond a bound: not retained (what the topic held before stays).
    Refused,
}

#[derive(Debug)]
pub struct RetainedStore {
    root: Node,
    len: usize,
    bytes: usize,
    limits: RetainedLimits,
    owners: HashMap<Box<str>, Usage>,
}

impl RetainedStore {
    pub fn new(limits: RetainedLimits) -> Self {
        RetainedStore {
            root: Node::default(),
            len: 0,
            bytes: 0,
            limits,
            owners: HashMap::new(),
        }
    }

    /// Stores `message`, published by client `owner`, as its topic's retained message, or clears
    /// the topic if the payload is empty.
    pub fn store(&mut self, message: Arc<Message>, owner: &str) -> Retained {
        let topic = message.topic_str().to_owned();
        if message.payload.is_empty() {
            if let Some(old) = clear(&mut self.root, topic.split('/')) {
                self.release(&old);
            }
            return Retained::Cleared;
        }
        let size = message.size();
        if !self.accepts(&topic, owner, size) {
            return Retained::Refused;
        }
        let old = {
            let mut node = &mut self.root;
            for level in topic.split('/') {
                node = node.children.entry(level.into()).or_default();
            }
            node.message.replace(Stored {
                message,
                owner: owner.into(),
                size,
            })
        };
        if let Some(old) = &old {
            self.release(old);
        }
        self.len += 1;
        self.bytes += size;
        let usage = self.owners.entry(owner.into()).or_default();
        usage.messages += 1;
        usage.bytes += size;
        Retained::Stored
    }

    fn release(&mut self, old: &Stored) {
        self.len -= 1;
        self.bytes -= old.size;
        if let Some(usage) = self.owners.get_mut(&old.owner) {
            usage.messages -= 1;
            usage.bytes -= old.size;
            if usage.messages == 0 {
                self.owners.remove(&old.owner);
            }
        }
    }

    fn find(&self, topic: &str) -> Option<&Stored> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.message.as_ref()
    }

    /// Whether a message of `size` bytes on `topic` from client `owner` would be kept: with what
    /// the topic holds now replaced, the store and the client's share stay within their bounds.
    /// The owner `""` (a message restored from the state store or applied from another
    /// instance, whose publisher is not kept) is charged to no client's share.
    pub fn accepts(&self, topic: &str, owner: &str, size: usize) -> bool {
        let old = self.find(topic);
        let (old_size, mine) = old.map_or((0, false), |o| (o.size, *o.owner == *owner));
        let len = self.len + usize::from(old.is_none());
        let bytes = self.bytes - old_size + size;
        let usage = self.owners.get(owner).copied().unwrap_or_default();
        let (own_messages, own_bytes) = if mine {
            (usage.messages, usage.bytes - old_size + size)
        } else {
            (usage.messages + 1, usage.bytes + size)
        };
        len <= self.limits.max_messages
            && bytes <= self.limits.max_bytes
            && (owner.is_empty()
                || (own_messages <= self.limits.share(self.limits.max_messages)
                    && own_bytes <= self.limits.share(self.limits.max_bytes)))
    }

    /// Retained topics held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Bytes of the retained messages held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Calls `found` with every retained message whose topic `filter` matches (a filter starting
    /// with a wildcard skips topics starting with `$`).
    pub fn for_each_match(&self, filter: &str, mut found: impl FnMut(&Arc<Message>)) {
        walk(&self.root, Some(filter), true, &mut found);
    }
}

fn walk(node: &Node, filter: Option<&str>, root: bool, found: &mut impl FnMut(&Arc<Message>)) {
    let Some(filter) = filter else {
        if let Some(stored) = &node.message {
            found(&stored.message);
        }
        return;
    };
    let (level, rest) = match filter.split_once('/') {
        Some((level, rest)) => (level, Some(rest)),
        None => (filter, None),
    };
    match level {
        "#" => {
            // `a/#` includes `a` itself.
            if !root {
                if let Some(stored) = &node.message {
                    found(&stored.message);
                }
            }
            for (name, child) in &node.children {
                if !(root && name.starts_with('$')) {
                    subtree(child, found);
                }
            }
        }
        "+" => {
            for (name, child) in &node.children {
                if !(root && name.starts_with('$')) {
                    walk(child, rest, false, found);
                }
            }
        }
        literal => {
            if let Some(child) = node.children.get(literal) {
                walk(child, rest, false, found);
            }
        }
    }
}

fn subtree(node: &Node, found: &mut impl FnMut(&Arc<Message>)) {
    if let Some(stored) = &node.message {
        found(&stored.message);
    }
    for child in node.children.values() {
        subtree(child, found);
    }
}

/// Clears the topic; what it held.
fn clear<'a>(node: &mut Node, mut levels: impl Iterator<Item = &'a str>) -> Option<Stored> {
    match levels.next() {
        None => node.message.take(),
        Some(level) => {
            let child = node.children.get_mut(level)?;
            let cleared = clear(child, levels);
            if child.is_empty() {
                node.children.remove(level);
            }
            cleared
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::message::Origin;

    fn limits(max_messages: usize) -> RetainedLimits {
        RetainedLimits {
            max_messages,
            ..RetainedLimits::UNLIMITED
        }
    }

    fn msg(topic: &'static str, payload: &'static str) -> Arc<Message> {
        Message::new(topic.into(), payload.into(), 1, true, Origin::Bus)
    }

    fn topics(store: &RetainedStore, filter: &str) -> Vec<String> {
        let mut out = Vec::new();
        store.for_each_match(filter, |m| out.push(m.topic_str().to_owned()));
        out.sort_unstable();
        out
    }

    #[test]
    fn filters_find_retained_topics() {
        let mut s = RetainedStore::new(limits(100));
        for t in ["a", "a/b", "a/b/c", "x/b", "$SYS/up"] {
            assert_eq!(s.store(msg(t, "v"), "o"), Retained::Stored);
        }
        assert_eq!(topics(&s, "a/#"), ["a", "a/b", "a/b/c"]);
        assert_eq!(topics(&s, "+/b"), ["a/b", "x/b"]);
        assert_eq!(topics(&s, "#"), ["a", "a/b", "a/b/c", "x/b"]);
        assert_eq!(topics(&s, "$SYS/#"), ["$SYS/up"]);
        assert_eq!(topics(&s, "a/b"), ["a/b"]);
        assert_eq!(topics(&s, "a/+/c"), ["a/b/c"]);
    }

    #[test]
    fn empty_payload_clears_and_replacing_keeps_one() {
        let mut s = RetainedStore::new(limits(100));
        s.store(msg("a/b", "1"), "o");
        s.store(msg("a/b", "2"), "p");
        assert_eq!(s.len(), 1);
        let mut payload = Vec::new();
        s.for_each_match("a/b", |m| payload.push(m.payload.clone()));
        assert_eq!(payload, ["2"]);
        assert_eq!(s.store(msg("a/b", ""), "o"), Retained::Cleared);
        assert!(s.is_empty());
        assert_eq!(s.bytes(), 0);
        assert!(s.owners.is_empty());
        assert!(s.root.is_empty(), "cleared branches are pruned");
    }

    #[test]
    fn bound_refuses_new_topics_but_not_replacements() {
        let mut s = RetainedStore::new(limits(2));
        s.store(msg("a", "1"), "o");
        s.store(msg("b/c", "1"), "o");
        assert_eq!(s.store(msg("b/d", "1"), "o"), Retained::Refused);
        assert_eq!(s.store(msg("b", "1"), "o"), Retained::Refused);
        assert!(s.accepts("a", "o", 2) && s.accepts("b/c", "o", 4));
        assert!(!s.accepts("b", "o", 2) && !s.accepts("b/d", "o", 4) && !s.accepts("z", "o", 2));
        assert_eq!(s.store(msg("a", "2"), "o"), Retained::Stored);
        assert_eq!(s.len(), 2);
        assert_eq!(topics(&s, "#"), ["a", "b/c"]);
    }

    #[test]
    fn bytes_and_one_clients_share_are_bounded() {
        let mut s = RetainedStore::new(RetainedLimits {
            max_messages: 10,
            max_bytes: 100,
            client_share_percent: 50,
        });
        // Each message is 1 (topic) + 10 (payload) bytes.
        for t in ["a", "b", "c", "d"] {
            assert_eq!(s.store(msg(t, "0123456789"), "greedy"), Retained::Stored);
        }
        // A fifth would make 55 bytes: beyond greedy's share of 50.
        assert_eq!(s.store(msg("e", "0123456789"), "greedy"), Retained::Refused);
        assert_eq!(s.store(msg("e", "0123456789"), "other"), Retained::Stored);
        // Replacing with a larger message counts the difference.
        assert_eq!(
            s.store(msg("a", "0123456789012"), "greedy"),
            Retained::Stored
        );
        assert_eq!(s.bytes(), 5 * 11 + 3);
        // Taking over another's topic moves it to the new owner's account.
        assert_eq!(s.store(msg("e", "01234"), "greedy"), Retained::Refused);
        assert_eq!(s.store(msg("a", ""), "greedy"), Retained::Cleared);
        assert_eq!(s.store(msg("e", "0123456789"), "greedy"), Retained::Stored);
        assert!(!s.owners.contains_key("other"));
        assert_eq!(s.len(), 4);
        assert_eq!(s.bytes(), 44);
        // Restored or another instance's (no owner): only the store's bounds apply.
        // Five of them (55 bytes) are beyond one client's share of 50.
        for t in ["f", "g", "h", "i", "j"] {
            assert_eq!(s.store(msg(t, "0123456789"), ""), Retained::Stored);
        }
        assert_eq!(s.store(msg("k", "0123456789"), ""), Retained::Refused);
    }
}
