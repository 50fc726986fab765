//! The SuperMQ topic scheme: which channel a PUBLISH topic or SUBSCRIBE filter names, and the
//! canonical form under which it is routed (so `/m/d/c/ch/a%2Fb`, `m/d/c/ch/a.b` and
//! `m/d/c/ch/a/b` meet, here and on every other instance through the bus).
//!
//! The bus writes a channel as the subject `m.<domain>.c.<channel>.<a>.<b>`, so a name is safe on
//! it only if it cannot add, remove or merge subject tokens: [`check_bus_name`] is the rule every
//! domain and channel id obeys (registry, platform answers, topics), and a subtopic's `.` is a
//! level separator, as SuperMQ's own adapters read it.

use percent_encoding::percent_decode_str;

/// What a topic or filter addresses, once parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicKind {
    /// `m/<domain>/c/<channel>[/<subtopic>]`: needs channel authorization.
    Channel(ChannelTopic),
    /// `hc/<domain>`: a health topic any authenticated client may use.
    Health { domain: String },
    /// Anything else: only plain ACL grants or anonymous filters can allow it.
    Plain,
}

/// A parsed channel topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelTopic {
    pub domain: String,
    pub channel: String,
    /// Normalised subtopic with `/` separators (empty when none), e.g. `a/b`.
    pub subtopic: String,
}

impl ChannelTopic {
    /// The topic (or filter) under which the message is routed inside the broker.
    pub fn canonical(&self) -> String {
        if self.subtopic.is_empty() {
            format!("m/{}/c/{}", self.domain, self.channel)
        } else {
            format!("m/{}/c/{}/{}", self.domain, self.channel, self.subtopic)
        }
    }

    /// The subtopic as the message bus writes it (`a.b`).
    pub fn dotted_subtopic(&self) -> String {
        self.subtopic.replace('/', ".")
    }
}

/// Why a topic was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("wildcards are not allowed in a published topic")]
    WildcardInPublish,
    #[error("wildcards are not allowed in the domain or channel of a filter")]
    WildcardInChannel,
    #[error("subtopic is malformed: {0}")]
    BadSubtopic(&'static str),
    #[error("domain and channel must not be empty")]
    EmptyChannel,
    #[error("filter is not a valid MQTT filter")]
    BadFilter,
    #[error("topic holds the null character U+0000")]
    NullCharacter,
    #[error("topic is {len} bytes long, more than the {max} allowed")]
    TooLong { len: usize, max: usize },
    #[error("topic has {levels} levels, more than the {max} allowed")]
    TooManyLevels { levels: usize, max: usize },
    #[error("domain or channel {0}")]
    BadName(&'static str),
}

/// Checks a domain or channel id (or a route naming one) against what the bus can carry as one
/// subject token: not empty, and no `.` (the token separator), `*` or `>` (NATS wildcards),
/// whitespace or control characters, nor `/`, `+` or `#` (which no topic level can name).
/// Without this, domain `d1.c.ch1` with channel `z` would be subject `m.d1.c.ch1.c.z`: channel
/// `ch1` of domain `d1` on every other instance. The error says what is wrong.
pub fn check_bus_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty");
    }
    for c in name.chars() {
        match c {
            '.' => return Err("contains '.', the bus's level separator"),
            '*' | '>' => return Err("contains '*' or '>', wildcards on the bus"),
            '/' | '+' | '#' => return Err("contains '/', '+' or '#'"),
            c if c.is_whitespace() => return Err("contains whitespace"),
            c if c.is_control() => return Err("contains a control character"),
            _ => {}
        }
    }
    Ok(())
}

/// Whether a topic or filter that is not a channel topic would reach channel messages all the
/// same: a topic in the channel namespace (first level `m`, after an optional leading `/`, as
/// channel topics are read), or a filter whose first level is a wildcard (`#`, `+/…`), which
/// matches every channel's canonical topic. Plain grants (`[[acl]]`, `[anonymous]`) never allow
/// these: only channel connections grant channels.
pub fn reaches_channels(topic_or_filter: &str) -> bool {
    let first = topic_or_filter.split('/').next().unwrap_or("");
    let trimmed = topic_or_filter.strip_prefix('/').unwrap_or(topic_or_filter);
    first == "+" || first == "#" || trimmed.split('/').next() == Some("m")
}

/// How long a PUBLISH topic or SUBSCRIBE filter may be, as sent by the device: in bytes, and in
/// levels (`a/b/c` has three).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicBounds {
    pub max_length: usize,
    pub max_levels: usize,
}

impl TopicBounds {
    /// MQTT's own bound only (a topic is at most 65,535 bytes).
    pub const UNLIMITED: TopicBounds = TopicBounds {
        max_length: usize::MAX,
        max_levels: usize::MAX,
    };

    /// Refuses a topic beyond the bounds; cheap enough to run before any lookup.
    pub fn check(&self, topic: &[u8]) -> Result<(), TopicError> {
        if topic.len() > self.max_length {
            return Err(TopicError::TooLong {
                len: topic.len(),
                max: self.max_length,
            });
        }
        self.check_levels(topic)
    }

    /// Refuses a topic with more levels than the bound. Run on the topic as sent and again on
    /// its canonical form, where `%2F` and a subtopic's `.` have become levels.
    pub fn check_levels(&self, topic: &[u8]) -> Result<(), TopicError> {
        if self.max_levels < usize::MAX {
            let levels = 1 + topic.iter().filter(|&&b| b == b'/').count();
            if levels > self.max_levels {
                return Err(TopicError::TooManyLevels {
                    levels,
                    max: self.max_levels,
                });
            }
        }
        Ok(())
    }

    /// The metric label of a refusal by these bounds.
    pub fn limit_name(error: &TopicError) -> Option<&'static str> {
        match error {
            TopicError::TooLong { .. } => Some("topic_length"),
            TopicError::TooManyLevels { .. } => Some("topic_levels"),
            _ => None,
        }
    }
}

/// Whether the text is a PUBLISH topic name or a SUBSCRIBE filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Publish,
    Subscribe,
}

/// Whether a topic, or a subscription filter taken level by level, falls under the grant
/// `filter` (`+` one level, a trailing `#` the rest, its parent level included). A topic
/// starting with `$` is matched by no grant whose first level is a wildcard (MQTT 4.7.2), but
/// by a literal `$x/#`. Works on whole levels, so any UTF-8 text is safe.
pub fn matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut levels = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            return true;
        }
        match levels.next() {
            // A subscription's `#` is broader than any grant level but `#`.
            Some("#") | None => return false,
            Some(level) if f != "+" && f != level => return false,
            Some(_) => {}
        }
    }
    levels.next().is_none()
}

/// Parses a PUBLISH topic or SUBSCRIBE filter by the SuperMQ scheme.
pub fn parse(topic: &str, usage: Usage) -> Result<TopicKind, TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    // MQTT 4.7.3: no topic name or filter holds U+0000.
    if topic.contains('\0') {
        return Err(TopicError::NullCharacter);
    }
    if usage == Usage::Publish && (topic.contains('+') || topic.contains('#')) {
        return Err(TopicError::WildcardInPublish);
    }
    if usage == Usage::Subscribe && !rumqttd::protocol::valid_filter(topic) {
        return Err(TopicError::BadFilter);
    }
    let trimmed = topic.strip_prefix('/').unwrap_or(topic);
    let mut levels = trimmed.splitn(5, '/');
    match (levels.next(), levels.next(), levels.next(), levels.next()) {
        (Some("m"), Some(domain), Some("c"), Some(channel)) => {
            if domain.is_empty() || channel.is_empty() {
                return Err(TopicError::EmptyChannel);
            }
            if is_wild(domain) || is_wild(channel) {
                return Err(TopicError::WildcardInChannel);
            }
            check_bus_name(domain)
                .and_then(|()| check_bus_name(channel))
                .map_err(TopicError::BadName)?;
            let subtopic = match levels.next() {
                Some(rest) => normalise_subtopic(rest, usage)?,
                None => String::new(),
            };
            Ok(TopicKind::Channel(ChannelTopic {
                domain: domain.to_owned(),
                channel: channel.to_owned(),
                subtopic,
            }))
        }
        (Some("hc"), Some(domain), None, None)
            if !is_wild(domain) && check_bus_name(domain).is_ok() =>
        {
            Ok(TopicKind::Health {
                domain: domain.to_owned(),
            })
        }
        _ => Ok(TopicKind::Plain),
    }
}

fn is_wild(level: &str) -> bool {
    level.contains('+') || level.contains('#')
}

/// SuperMQ's subtopic rules: percent-decode, trim `/` and spaces at both ends, read `.` as a
/// level separator (the bus does: `a.b` and `a/b` are one subtopic there, so they are one here
/// too, and a message is delivered under the same topic on every instance), then refuse what the
/// bus cannot carry. Returns the levels joined by `/`.
fn normalise_subtopic(raw: &str, usage: Usage) -> Result<String, TopicError> {
    let decoded = percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| TopicError::BadSubtopic("not UTF-8 after percent-decoding"))?;
    if decoded.contains('\0') {
        return Err(TopicError::NullCharacter);
    }
    // Decoded once, a subtopic must not decode again (`%2541` -> `%41`): else its canonical form
    // would name another subtopic when parsed, or none (found by fuzzing). A `%` that starts no
    // escape (`50%`) is kept as it is.
    if decoded
        .as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && w[1].is_ascii_hexdigit() && w[2].is_ascii_hexdigit())
    {
        return Err(TopicError::BadSubtopic("percent-encoded twice"));
    }
    let trimmed = decoded.trim_matches(|c| c == '/' || c == ' ');
    // Any whitespace or control character, not only the space: a line break in a subject would
    // be read by NATS as the end of a protocol line.
    if trimmed.contains(|c: char| c.is_whitespace() || c.is_control()) {
        return Err(TopicError::BadSubtopic(
            "contains whitespace or a control character",
        ));
    }
    if trimmed.contains('*') || trimmed.contains('>') {
        return Err(TopicError::BadSubtopic("contains '*' or '>'"));
    }
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    let canonical = trimmed.replace('.', "/");
    if canonical.split('/').any(str::is_empty) {
        return Err(TopicError::BadSubtopic("contains an empty level or '..'"));
    }
    let mut levels = canonical.split('/').peekable();
    while let Some(level) = levels.next() {
        let wild = is_wild(level);
        if wild && usage == Usage::Publish {
            return Err(TopicError::WildcardInPublish);
        }
        if wild && level.len() != 1 {
            return Err(TopicError::BadSubtopic("a wildcard must be a whole level"));
        }
        // Decoding may make one (`%23/a`): the filter must still be a valid MQTT filter.
        if level == "#" && levels.peek().is_some() {
            return Err(TopicError::BadSubtopic("'#' must be the last level"));
        }
    }
    Ok(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_match_by_whole_levels() {
        assert!(matches("a/b/c", "a/+/c"));
        assert!(matches("a/b", "a/#"));
        assert!(matches("a", "a/#"));
        assert!(matches("a/+", "a/+"));
        assert!(!matches("a/+", "a/b"));
        assert!(!matches("a/#", "a/+"));
        assert!(!matches("a/b/c", "a/b"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("$SYS/x", "#"));
        assert!(!matches("$SYS/x", "+/x"));
        // Only a wildcard first level skips `$` topics (MQTT 4.7.2): a literal `$` grant matches.
        assert!(matches("$x/y", "$x/#"));
        assert!(matches("$x/y", "$x/+"));
        assert!(!matches("$x/y", "$z/#"));
        // Found by fuzzing: a multi-byte first character made a byte slice panic.
        assert!(!matches("é/x", "a/#"));
        assert!(matches("é/x", "é/+"));
    }

    fn channel(topic: &str, usage: Usage) -> ChannelTopic {
        match parse(topic, usage) {
            Ok(TopicKind::Channel(c)) => c,
            other => panic!("{topic}: {other:?}"),
        }
    }

    #[test]
    fn channel_topic_with_and_without_subtopic() {
        let c = channel("m/d1/c/ch1", Usage::Publish);
        assert_eq!(
            (c.domain.as_str(), c.channel.as_str(), c.subtopic.as_str()),
            ("d1", "ch1", "")
        );
        assert_eq!(c.canonical(), "m/d1/c/ch1");
        let c = channel("/m/d1/c/ch1/a/b/", Usage::Publish);
        assert_eq!(c.subtopic, "a/b");
        assert_eq!(c.dotted_subtopic(), "a.b");
        assert_eq!(c.canonical(), "m/d1/c/ch1/a/b");
    }

    #[test]
    fn subtopic_is_percent_decoded() {
        assert_eq!(channel("m/d/c/ch/a%2Fb", Usage::Publish).subtopic, "a/b");
        assert!(parse("m/d/c/ch/a%20b", Usage::Publish).is_err());
        assert_eq!(channel("m/d/c/ch/50%", Usage::Publish).subtopic, "50%");
        assert_eq!(channel("m/d/c/ch/a%25", Usage::Publish).subtopic, "a%");
    }

    /// Found by fuzzing: `%23/#` decoded to `#/#`, not a valid filter.
    #[test]
    fn a_decoded_filter_must_still_be_a_valid_filter() {
        assert_eq!(
            parse("m/d/c/ch/%23/#", Usage::Subscribe),
            Err(TopicError::BadSubtopic("'#' must be the last level"))
        );
        assert_eq!(channel("m/d/c/ch/a/%23", Usage::Subscribe).subtopic, "a/#");
        assert_eq!(channel("m/d/c/ch/%2B/b", Usage::Subscribe).subtopic, "+/b");
    }

    /// Found by fuzzing: `a%25aF` decoded to `a%aF`, a canonical form that no longer parsed (its
    /// messages were not bridged), and `a%2541` to `a%41`, one that parsed as `aA`.
    #[test]
    fn a_subtopic_encoded_twice_is_refused_so_the_canonical_form_is_a_fixed_point() {
        for usage in [Usage::Publish, Usage::Subscribe] {
            for twice in [
                "/m/d2/c/m///c/1h0hm/a%25aFb/%",
                "m/d/c/ch/a%2541",
                "m/d/c/ch/%2525",
            ] {
                assert_eq!(
                    parse(twice, usage),
                    Err(TopicError::BadSubtopic("percent-encoded twice")),
                    "{twice}"
                );
            }
            for once in [
                "m/d/c/ch/50%",
                "m/d/c/ch/a%25/b%2Fc",
                "m/d/c/ch/%25%",
                "m/d/c/ch/%4",
            ] {
                let c = channel(once, usage);
                assert_eq!(channel(&c.canonical(), usage), c, "{once}");
            }
        }
    }

    #[test]
    fn publish_refuses_wildcards_and_bus_characters() {
        for bad in [
            "m/d/c/ch/+",
            "m/d/c/ch/a/#",
            "m/d/c/ch/a*",
            "m/d/c/ch/a>b",
            "m/d/c/ch/a b",
        ] {
            assert!(parse(bad, Usage::Publish).is_err(), "{bad}");
        }
    }

    #[test]
    fn subscribe_allows_whole_level_wildcards_in_subtopic_only() {
        assert_eq!(channel("m/d/c/ch/#", Usage::Subscribe).subtopic, "#");
        assert_eq!(channel("m/d/c/ch/+/t", Usage::Subscribe).subtopic, "+/t");
        assert_eq!(
            parse("m/+/c/ch", Usage::Subscribe),
            Err(TopicError::WildcardInChannel)
        );
        assert_eq!(
            parse("m/d/c/#", Usage::Subscribe),
            Err(TopicError::WildcardInChannel)
        );
        assert!(parse("m/d/c/ch/a+", Usage::Subscribe).is_err());
    }

    #[test]
    fn null_character_is_refused_raw_and_percent_encoded() {
        for usage in [Usage::Publish, Usage::Subscribe] {
            assert_eq!(
                parse("m/d1/c/ch1/a%00b", usage),
                Err(TopicError::NullCharacter)
            );
            assert_eq!(
                parse("m/d1/c/ch1/a\0b", usage),
                Err(TopicError::NullCharacter)
            );
            assert_eq!(parse("plain/\0", usage), Err(TopicError::NullCharacter));
        }
    }

    #[test]
    fn bounds_count_bytes_and_levels() {
        let bounds = TopicBounds {
            max_length: 8,
            max_levels: 3,
        };
        assert_eq!(bounds.check(b"a/b/c"), Ok(()));
        assert_eq!(
            bounds.check(b"a/b/c/d"),
            Err(TopicError::TooManyLevels { levels: 4, max: 3 })
        );
        assert_eq!(
            bounds.check(b"abcdefghi"),
            Err(TopicError::TooLong { len: 9, max: 8 })
        );
        // Empty levels count: `//` is three levels.
        assert!(bounds.check(b"///").is_err());
        assert_eq!(TopicBounds::UNLIMITED.check(&[b'/'; 1000]), Ok(()));
    }

    /// The bus reads `.` as a level separator, so a subtopic's `.` is one here too: `a.b` is
    /// delivered as `a/b` locally, as another instance delivers it from the bus.
    #[test]
    fn a_dot_in_a_subtopic_is_a_level_separator() {
        for usage in [Usage::Publish, Usage::Subscribe] {
            let c = channel("m/d/c/ch/a.b/c", usage);
            assert_eq!(c.subtopic, "a/b/c");
            assert_eq!(c.canonical(), "m/d/c/ch/a/b/c");
            assert_eq!(c.dotted_subtopic(), "a.b.c");
            assert_eq!(channel("m/d/c/ch/a%2Eb", usage).subtopic, "a/b");
            for bad in [
                "m/d/c/ch/a..b",
                "m/d/c/ch/.a",
                "m/d/c/ch/a.",
                "m/d/c/ch/a./b",
            ] {
                assert!(parse(bad, usage).is_err(), "{bad}");
            }
        }
        assert_eq!(
            channel("m/d/c/ch/a.b/+", Usage::Subscribe).subtopic,
            "a/b/+"
        );
        assert_eq!(
            channel("m/d/c/ch/a.b/#", Usage::Subscribe).subtopic,
            "a/b/#"
        );
        assert_eq!(channel("m/d/c/ch/", Usage::Publish).subtopic, "");
    }

    #[test]
    fn whitespace_and_control_characters_are_refused_in_a_subtopic() {
        for bad in ["m/d/c/ch/a\tb", "m/d/c/ch/a%0D%0APUB", "m/d/c/ch/a\u{85}b"] {
            assert!(parse(bad, Usage::Publish).is_err(), "{bad:?}");
        }
    }

    /// Domain `d1.c.ch1` with channel `z` would be subject `m.d1.c.ch1.c.z` on the bus: channel
    /// `ch1` of `d1` on every other instance.
    #[test]
    fn domain_and_channel_names_must_be_single_bus_tokens() {
        for bad in [
            "", "d1.c.ch1", "a*", "a>", "a b", "a\tb", "a\u{7f}", "a/b", "a+", "a#",
        ] {
            assert!(check_bus_name(bad).is_err(), "{bad:?}");
        }
        for good in ["d1", "4e5f-aa_b", "é", "$x"] {
            assert_eq!(check_bus_name(good), Ok(()), "{good}");
        }
        for usage in [Usage::Publish, Usage::Subscribe] {
            assert!(matches!(
                parse("m/d1.c.ch1/c/z", usage),
                Err(TopicError::BadName(_))
            ));
            assert!(matches!(
                parse("m/d1/c/ch1.x/a", usage),
                Err(TopicError::BadName(_))
            ));
        }
        assert_eq!(parse("hc/d1.x", Usage::Publish), Ok(TopicKind::Plain));
    }

    #[test]
    fn plain_topics_that_reach_channels() {
        for reach in ["m/d1/x", "/m/d1", "m", "#", "+/d1/c/ch1", "+", "m/#"] {
            assert!(reaches_channels(reach), "{reach}");
        }
        for plain in ["sensors/#", "/+/x", "/#", "mm/x", "a/m/x", "hc/#"] {
            assert!(!reaches_channels(plain), "{plain}");
        }
    }

    #[test]
    fn health_and_plain_topics() {
        assert_eq!(
            parse("hc/d1", Usage::Publish),
            Ok(TopicKind::Health {
                domain: "d1".into()
            })
        );
        assert_eq!(parse("sensors/t", Usage::Publish), Ok(TopicKind::Plain));
        assert_eq!(parse("m/d/x/ch", Usage::Publish), Ok(TopicKind::Plain));
        assert_eq!(parse("", Usage::Publish), Err(TopicError::Empty));
    }
}
