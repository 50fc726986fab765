//! The subscription trie: topic filters split into levels, one node per level, `+` and `#` as
//! children of their own. A lookup walks only the branches a topic can match, so its cost
//! depends on the topic's depth and the matching filters, not on how many other subscriptions
//! exist. Nodes are pruned as soon as their last subscriber leaves. Most nodes have one child
//! or one subscriber (a device's own topic): both maps are [`SmallMap`]s, so such a node takes
//! a few dozen bytes.

use super::small_map::SmallMap;

/// One level of the trie.
#[derive(Debug)]
struct Node<K, V> {
    children: SmallMap<Box<str>, Node<K, V>>,
    /// Subscribers whose filter ends at this node.
    subscribers: SmallMap<K, V>,
}

impl<K, V> Default for Node<K, V> {
    fn default() -> Self {
        Node {
            children: SmallMap::new(),
            subscribers: SmallMap::new(),
        }
    }
}

impl<K, V> Node<K, V> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty()
    }
}

/// Filters to subscribers: `K` identifies a subscriber (one entry per subscriber and filter),
/// `V` is what a match yields.
#[derive(Debug)]
pub struct Trie<K, V> {
    root: Node<K, V>,
    len: usize,
}

impl<K, V> Default for Trie<K, V> {
    fn default() -> Self {
        Trie {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<K: std::hash::Hash + Eq + Copy, V> Trie<K, V> {
    /// Adds or replaces `key`'s subscription to `filter`; returns the value it replaced.
    pub fn insert(&mut self, filter: &str, key: K, value: V) -> Option<V> {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry_or_default(level.into());
        }
        let old = node.subscribers.insert(key, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Removes `key`'s subscription to `filter`, pruning the nodes it leaves empty.
    pub fn remove(&mut self, filter: &str, key: K) -> Option<V> {
        let removed = remove_at(&mut self.root, filter.split('/'), key);
        if removed.is_some() {
            self.len -= 1;
        }
        removed
    }

    /// Subscriptions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Nodes below the root (for tests and memory accounting).
    pub fn node_count(&self) -> usize {
        fn count<K, V>(node: &Node<K, V>) -> usize {
            node.children.values().map(|c| 1 + count(c)).sum()
        }
        count(&self.root)
    }

    /// Calls `found` with every subscription whose filter matches `topic`. A filter starting
    /// with a wildcard does not match a topic starting with `$` (MQTT 4.7.2).
    pub fn for_each_match<'a>(&'a self, topic: &str, mut found: impl FnMut(&'a K, &'a V)) {
        let dollar = topic.starts_with('$');
        walk(&self.root, Some(topic), !dollar, &mut found);
    }
}

fn remove_at<'a, K: std::hash::Hash + Eq, V>(
    node: &mut Node<K, V>,
    mut levels: impl Iterator<Item = &'a str>,
    key: K,
) -> Option<V> {
    match levels.next() {
        None => node.subscribers.remove(&key),
        Some(level) => {
            let child = node.children.get_mut(level)?;
            let removed = remove_at(child, levels, key);
            if child.is_empty() {
                node.children.remove(level);
            }
            removed
        }
    }
}

/// `rest` is the unmatched part of the topic (`None` once every level is consumed);
/// `wildcards` is false at the root of a `$` topic.
fn walk<'a, K, V>(
    node: &'a Node<K, V>,
    rest: Option<&str>,
    wildcards: bool,
    found: &mut impl FnMut(&'a K, &'a V),
) {
    if wildcards {
        // `a/#` matches `a` itself as well as everything below it.
        if let Some(all) = node.children.get("#") {
            all.subscribers.iter().for_each(|(k, v)| found(k, v));
        }
    }
    let Some(rest) = rest else {
        node.subscribers.iter().for_each(|(k, v)| found(k, v));
        return;
    };
    let (level, next) = match rest.split_once('/') {
        Some((level, next)) => (level, Some(next)),
        None => (rest, None),
    };
    if let Some(child) = node.children.get(level) {
        walk(child, next, true, found);
    }
    if wildcards {
        if let Some(any) = node.children.get("+") {
            walk(any, next, true, found);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(trie: &Trie<u32, &'static str>, topic: &str) -> Vec<&'static str> {
        let mut out = Vec::new();
        trie.for_each_match(topic, |_, v| out.push(*v));
        out.sort_unstable();
        out
    }

    #[test]
    fn levels_and_wildcards_match_as_mqtt_says() {
        let mut t = Trie::default();
        for (i, f) in ["a/b", "a/+", "a/#", "#", "+/b", "a/b/c", "+", "a/+/c"]
            .into_iter()
            .enumerate()
        {
            t.insert(f, i as u32, f);
        }
        assert_eq!(matches(&t, "a/b"), ["#", "+/b", "a/#", "a/+", "a/b"]);
        assert_eq!(matches(&t, "a"), ["#", "+", "a/#"]);
        assert_eq!(matches(&t, "a/b/c"), ["#", "a/#", "a/+/c", "a/b/c"]);
        assert_eq!(matches(&t, "x/y/z"), ["#"]);
        // Empty levels are levels.
        assert_eq!(matches(&t, "/b"), ["#", "+/b"]);
        assert_eq!(matches(&t, "a/"), ["#", "a/#", "a/+"]);
    }

    #[test]
    fn wildcards_at_the_root_skip_dollar_topics() {
        let mut t = Trie::default();
        t.insert("#", 1, "#");
        t.insert("+/x", 2, "+/x");
        t.insert("$SYS/#", 3, "$SYS/#");
        t.insert("$SYS/+", 4, "$SYS/+");
        assert_eq!(matches(&t, "$SYS/x"), ["$SYS/#", "$SYS/+"]);
        assert_eq!(matches(&t, "s/x"), ["#", "+/x"]);
    }

    #[test]
    fn removing_the_last_subscriber_prunes_the_branch() {
        let mut t = Trie::default();
        t.insert("m/d/c/ch/#", 1, "one");
        t.insert("m/d/c/ch/#", 2, "two");
        t.insert("m/d/c/other", 1, "three");
        assert_eq!(t.len(), 3);
        assert_eq!(t.remove("m/d/c/ch/#", 1), Some("one"));
        assert_eq!(matches(&t, "m/d/c/ch/x"), ["two"]);
        assert_eq!(t.remove("m/d/c/ch/#", 2), Some("two"));
        assert_eq!(t.remove("m/d/c/ch/#", 2), None);
        // Only m/d/c/other is left: four nodes.
        assert_eq!(t.node_count(), 4);
        assert_eq!(t.remove("m/d/c/other", 1), Some("three"));
        assert_eq!((t.len(), t.node_count()), (0, 0));
        assert!(t.is_empty());
    }

    #[test]
    fn insert_replaces_one_key_per_filter() {
        let mut t = Trie::default();
        assert_eq!(t.insert("a", 1, "q0"), None);
        assert_eq!(t.insert("a", 1, "q1"), Some("q0"));
        assert_eq!(t.len(), 1);
        assert_eq!(matches(&t, "a"), ["q1"]);
    }
}
