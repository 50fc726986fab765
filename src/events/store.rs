//! Chooses the event sink from `SMQ_ES_URL`'s scheme: `redis://`, `nats://`, `amqp://`, or
//! stdout when unset. Only the URL is checked here; stores are reached lazily, so one that is
//! down at start-up delays events instead of stopping the adapter.

use super::{AmqpSink, EventLayout, EventSink, JetStreamSink, RedisStreamSink, StdoutSink};

/// An `SMQ_ES_URL` the adapter cannot use; the message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum StoreUrlError {
    #[error(
        "{url:?} has no scheme; use redis://, nats:// or amqp:// (or leave it unset for stdout)"
    )]
    NoScheme { url: String },
    #[error("{url:?}: unknown scheme {scheme:?}; use redis://, nats:// or amqp:// (or leave it unset for stdout)")]
    UnknownScheme { url: String, scheme: String },
    #[error("{url:?} is not a valid {store} URL: {message}")]
    Invalid {
        url: String,
        store: &'static str,
        message: String,
    },
}

/// Whether events go to an external store (and so need the spool and session journal).
pub fn is_external(url: Option<&str>) -> bool {
    !matches!(url.map(str::trim), None | Some(""))
}

/// The sink for `url`, writing `layout`.
pub fn event_sink(
    url: Option<&str>,
    layout: EventLayout,
) -> Result<Box<dyn EventSink>, StoreUrlError> {
    let url = match url.map(str::trim) {
        None | Some("") => return Ok(Box::new(StdoutSink::new(layout))),
        Some(url) => url,
    };
    let Some((scheme, _)) = url.split_once("://") else {
        return Err(StoreUrlError::NoScheme { url: url.into() });
    };
    let invalid = |store, message: String| StoreUrlError::Invalid {
        url: url.into(),
        store,
        message,
    };
    match scheme.to_ascii_lowercase().as_str() {
        "redis" => RedisStreamSink::new(url, layout)
            .map(|s| Box::new(s) as Box<dyn EventSink>)
            .map_err(|e| invalid("Redis", e.to_string())),
        "nats" => JetStreamSink::new(url, layout)
            .map(|s| Box::new(s) as Box<dyn EventSink>)
            .map_err(|e| invalid("NATS", e)),
        "amqp" => AmqpSink::new(url, layout)
            .map(|s| Box::new(s) as Box<dyn EventSink>)
            .map_err(|e| invalid("AMQP", e)),
        other => Err(StoreUrlError::UnknownScheme {
            url: url.into(),
            scheme: other.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_choose_sinks() {
        let name = |url| {
            event_sink(url, EventLayout::Seed)
                .map(|s| s.name())
                .expect("valid url")
        };
        assert_eq!(name(None), "stdout");
        assert_eq!(name(Some("redis://127.0.0.1:6379")), "redis");
        assert_eq!(name(Some("nats://127.0.0.1:4222")), "nats");
        assert_eq!(name(Some("amqp://guest:guest@127.0.0.1:5672/%2f")), "amqp");
    }

    #[test]
    fn bad_urls_say_what_to_use() {
        let err = |url| {
            event_sink(Some(url), EventLayout::Seed)
                .err()
                .expect("must fail")
                .to_string()
        };
        assert!(err("kafka://x:1").contains("unknown scheme"));
        assert!(err("127.0.0.1:6379").contains("no scheme"));
        assert!(err("redis://host:notaport").contains("not a valid Redis URL"));
    }
}
