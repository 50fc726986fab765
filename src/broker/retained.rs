//! Retained messages: the last retained PUBLISH of each topic, kept in memory in a trie of topic
//! levels so a new subscription's filter walks only the topics it can match. An empty retained
//! payload clears the topic. The number of retained topics is bounded: past the bound a new topic
//! is refused (and counted by the caller); an existing topic can always be replaced or cleared.

use std::collections::HashMap;
use std::sync::Arc;

use super::message::Message;

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    message: Option<Arc<Message>>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.message.is_none()
    }
}

/// What storing a retained PUBLISH did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retained {
    Stored,
    Cleared,
    /// A new topic beyond the bound: not retained.
    Refused,
}

#[derive(Debug)]
pub struct RetainedStore {
    root: Node,
    len: usize,
    max: usize,
}

impl RetainedStore {
    pub fn new(max: usize) -> Self {
        RetainedStore {
            root: Node::default(),
            len: 0,
            max,
        }
    }

    /// Stores `message` as its topic's retained message, or clears the topic if the payload is
    /// empty.
    pub fn store(&mut self, message: Arc<Message>) -> Retained {
        let topic = message.topic_str().to_owned();
        if message.payload.is_empty() {
            if clear(&mut self.root, topic.split('/')) {
                self.len -= 1;
            }
            return Retained::Cleared;
        }
        let mut node = &mut self.root;
        for level in topic.split('/') {
            if !node.children.contains_key(level) && self.len >= self.max {
                // Only an existing topic may be replaced once the store is full.
                return Retained::Refused;
            }
            node = node.children.entry(level.into()).or_default();
        }
        match node.message.replace(message) {
            Some(_) => {}
            None if self.len >= self.max => {
                node.message = None;
                prune(&mut self.root, topic.split('/'));
                return Retained::Refused;
            }
            None => self.len += 1,
        }
        Retained::Stored
    }

    /// Whether storing a message on `topic` would be kept: there is room, or the topic holds
    /// one already (replaced).
    pub fn accepts(&self, topic: &str) -> bool {
        if self.len < self.max {
            return true;
        }
        let mut node = &self.root;
        for level in topic.split('/') {
            match node.children.get(level) {
                Some(child) => node = child,
                None => return false,
            }
        }
        node.message.is_some()
    }

    /// Retained topics held.
    pub fn len(&self) -> usize {
        self.len
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
        if let Some(m) = &node.message {
            found(m);
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
                if let Some(m) = &node.message {
                    found(m);
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
    if let Some(m) = &node.message {
        found(m);
    }
    for child in node.children.values() {
        subtree(child, found);
    }
}

/// Clears the topic; true if it held a message.
fn clear<'a>(node: &mut Node, mut levels: impl Iterator<Item = &'a str>) -> bool {
    match levels.next() {
        None => node.message.take().is_some(),
        Some(level) => {
            let Some(child) = node.children.get_mut(level) else {
                return false;
            };
            let cleared = clear(child, levels);
            if child.is_empty() {
                node.children.remove(level);
            }
            cleared
        }
    }
}

fn prune<'a>(node: &mut Node, mut levels: impl Iterator<Item = &'a str>) {
    if let Some(level) = levels.next() {
        if let Some(child) = node.children.get_mut(level) {
            prune(child, levels);
            if child.is_empty() {
                node.children.remove(level);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::message::Origin;

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
        let mut s = RetainedStore::new(100);
        for t in ["a", "a/b", "a/b/c", "x/b", "$SYS/up"] {
            assert_eq!(s.store(msg(t, "v")), Retained::Stored);
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
        let mut s = RetainedStore::new(100);
        s.store(msg("a/b", "1"));
        s.store(msg("a/b", "2"));
        assert_eq!(s.len(), 1);
        let mut payload = Vec::new();
        s.for_each_match("a/b", |m| payload.push(m.payload.clone()));
        assert_eq!(payload, ["2"]);
        assert_eq!(s.store(msg("a/b", "")), Retained::Cleared);
        assert!(s.is_empty());
        assert!(s.root.is_empty(), "cleared branches are pruned");
    }

    #[test]
    fn bound_refuses_new_topics_but_not_replacements() {
        let mut s = RetainedStore::new(2);
        s.store(msg("a", "1"));
        s.store(msg("b/c", "1"));
        assert_eq!(s.store(msg("b/d", "1")), Retained::Refused);
        assert_eq!(s.store(msg("b", "1")), Retained::Refused);
        assert!(s.accepts("a") && s.accepts("b/c"));
        assert!(!s.accepts("b") && !s.accepts("b/d") && !s.accepts("z"));
        assert_eq!(s.store(msg("a", "2")), Retained::Stored);
        assert_eq!(s.len(), 2);
        assert_eq!(topics(&s, "#"), ["a", "b/c"]);
    }
}
