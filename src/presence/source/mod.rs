//! Where `presence` reads events from: the stream every adapter instance writes to, read from
//! its beginning. A source first yields the backlog (what the stream held when it was opened),
//! then, when following, what arrives after it. Sources are chosen by `SMQ_ES_URL`'s scheme,
//! like the adapter's sinks.

mod nats;
mod redis;
mod resp;

use async_trait::async_trait;

pub use self::nats::JetStreamSource;
pub use self::redis::RedisStreamSource;
use super::event::{MalformedEvent, StreamEvent};
use crate::events::EventLayout;

/// One stored entry, read back: an event, or why it is not one.
pub type Entry = Result<StreamEvent, MalformedEvent>;

/// A failure to read the stream; the message says what to check.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "presence needs an event store: set SMQ_ES_URL (or --es-url) to redis://… or nats://…"
    )]
    NoUrl,
    #[error("{url:?}: presence reads redis:// or nats:// event stores ({scheme}:// cannot be replayed from the start)")]
    Unsupported { url: String, scheme: String },
    #[error("{url:?} is not a valid event store URL: {message}")]
    BadUrl { url: String, message: String },
    #[error("{store}: {message}")]
    Store {
        store: &'static str,
        message: String,
    },
}

/// A connection-event stream, read in order from its first entry.
#[async_trait]
pub trait EventSource: Send {
    /// Appends the next entries of the backlog to `out`; `true` once the backlog is exhausted
    /// (then `out` may have received nothing).
    async fn backlog(&mut self, out: &mut Vec<Entry>) -> Result<bool, SourceError>;

    /// Waits a little (about a second at most) for entries written after the backlog and
    /// appends them to `out`; returns with nothing added when none came.
    async fn follow(&mut self, out: &mut Vec<Entry>) -> Result<(), SourceError>;
}

/// The source for an `SMQ_ES_URL` written in `layout`; connects and finds the end of the
/// backlog.
pub async fn open(
    url: Option<&str>,
    layout: EventLayout,
) -> Result<Box<dyn EventSource>, SourceError> {
    let url = match url.map(str::trim) {
        None | Some("") => return Err(SourceError::NoUrl),
        Some(url) => url,
    };
    let scheme = url
        .split_once("://")
        .map(|(s, _)| s.to_ascii_lowercase())
        .ok_or_else(|| SourceError::BadUrl {
            url: url.into(),
            message: "no scheme; use redis:// or nats://".into(),
        })?;
    match scheme.as_str() {
        "redis" => Ok(Box::new(RedisStreamSource::open(url, layout).await?)),
        "nats" => Ok(Box::new(JetStreamSource::open(url, layout).await?)),
        _ => Err(SourceError::Unsupported {
            url: url.into(),
            scheme,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn urls_it_cannot_read_say_what_to_use() {
        let err = |url: Option<&'static str>| async move {
            open(url, EventLayout::Seed)
                .await
                .err()
                .expect("must fail")
                .to_string()
        };
        assert!(err(None).await.contains("SMQ_ES_URL"));
        assert!(err(Some("amqp://guest:guest@localhost/"))
            .await
            .contains("redis:// or nats://"));
        assert!(err(Some("localhost:6379")).await.contains("no scheme"));
    }
}
