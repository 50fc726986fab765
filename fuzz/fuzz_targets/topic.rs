//! Topic and filter handling: the SuperMQ parser and its normalisation, the size bounds, and the
//! broker core's subscription trie and retained store, checked against a plain level-by-level
//! matcher. Input: lines; the last is a topic, the others filters.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqtt_adapter::broker::retained::{RetainedLimits, RetainedStore};
use mqtt_adapter::broker::trie::Trie;
use mqtt_adapter::broker::{Message, Origin};
use mqtt_adapter::topic::{self, TopicBounds, TopicKind, Usage};

/// MQTT 4.7 matching, written as plainly as possible.
fn matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let levels: Vec<&str> = topic.split('/').collect();
    for (i, f) in filter.split('/').enumerate() {
        if f == "#" {
            return true;
        }
        match levels.get(i) {
            Some(level) if f == "+" || f == *level => {}
            _ => return false,
        }
    }
    levels.len() == filter.split('/').count()
}

/// A filter is levels; `#` only alone and last, `+` only alone; no U+0000.
fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| {
        (!l.contains('#') || (*l == "#" && i == levels.len() - 1))
            && (!l.contains('+') || *l == "+")
    })
}

fn check_parse(text: &str, usage: Usage) {
    if let Ok(TopicKind::Channel(c)) = topic::parse(text, usage) {
        // The canonical form is a fixed point: parsing it again names the same channel.
        let canonical = c.canonical();
        match topic::parse(&canonical, usage) {
            Ok(TopicKind::Channel(again)) => assert_eq!(again, c, "{text:?} -> {canonical:?}"),
            other => panic!("{text:?} -> {canonical:?} -> {other:?}"),
        }
        assert!(!c.dotted_subtopic().contains(".."), "{text:?}");
    }
    let _ = TopicBounds {
        max_length: 64,
        max_levels: 8,
    }
    .check(text.as_bytes());
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines: Vec<&str> = text.split('\n').take(16).collect();
    let Some(topic) = lines.pop() else {
        return;
    };
    check_parse(topic, Usage::Publish);
    for filter in &lines {
        check_parse(filter, Usage::Subscribe);
    }

    let topic_ok = !topic.is_empty() && !topic.contains(['+', '#', '\0']);
    let mut trie: Trie<usize, ()> = Trie::default();
    let filters: Vec<&str> = lines.iter().copied().filter(|f| valid_filter(f)).collect();
    for (key, filter) in filters.iter().enumerate() {
        trie.insert(filter, key, ());
    }
    if topic_ok {
        let mut found: Vec<usize> = Vec::new();
        trie.for_each_match(topic, |k, _| found.push(*k));
        found.sort_unstable();
        let want: Vec<usize> = (0..filters.len())
            .filter(|&k| matches(topic, filters[k]))
            .collect();
        assert_eq!(found, want, "topic {topic:?}, filters {filters:?}");

        let mut retained = RetainedStore::new(RetainedLimits {
            max_messages: 4,
            max_bytes: 1 << 20,
            client_share_percent: 50,
        });
        let message = Message::new(topic.to_owned().into(), "v".into(), 1, true, Origin::Bus);
        retained.store(message, "fuzz");
        for filter in &filters {
            let mut hits = 0;
            retained.for_each_match(filter, |_| hits += 1);
            assert_eq!(
                hits,
                usize::from(matches(topic, filter)),
                "retained {topic:?} by {filter:?}"
            );
        }
    }
    // Removing every filter leaves an empty trie.
    for (key, filter) in filters.iter().enumerate() {
        trie.remove(filter, key);
    }
    assert!(trie.is_empty() && trie.node_count() == 0, "{filters:?}");
});
