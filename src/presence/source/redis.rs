//! Reads `supermq.mqtt` from Redis: the backlog with `XRANGE` in pages up to the entry that was
//! last when the source opened (so a busy stream cannot keep `--once` reading forever), then
//! new entries with a blocking `XREAD`.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;

use super::{Entry, EventSource, SourceError};
use crate::events::STREAM;
use crate::presence::event::StreamEvent;

/// Entries per round trip.
const PAGE: usize = 10_000;
/// How long one `XREAD` waits for new entries, in milliseconds.
const BLOCK_MS: u64 = 1_000;
/// Connecting, and any one reply (a page of entries, a blocked `XREAD`), must finish within this.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A stream entry as Redis returns it: its id and its flat field/value list.
type RawEntry = (String, Vec<String>);

pub struct RedisStreamSource {
    conn: MultiplexedConnection,
    /// Id of the last entry read; `None` before the first.
    last_id: Option<String>,
    /// Id of the last entry of the backlog; `None` once it is read (or was empty).
    backlog_end: Option<String>,
}

fn store_error(e: impl std::fmt::Display) -> SourceError {
    SourceError::Store {
        store: "redis",
        message: e.to_string(),
    }
}

impl RedisStreamSource {
    pub async fn open(url: &str) -> Result<Self, SourceError> {
        let client = redis::Client::open(url).map_err(|e| SourceError::BadUrl {
            url: url.into(),
            message: e.to_string(),
        })?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| store_error(format!("cannot connect to {url}: {e}")))?;
        let last: Vec<RawEntry> = redis::cmd("XREVRANGE")
            .arg(STREAM)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await
            .map_err(store_error)?;
        Ok(RedisStreamSource {
            conn,
            last_id: None,
            backlog_end: last.into_iter().next().map(|(id, _)| id),
        })
    }

    fn push(&mut self, entries: Vec<RawEntry>, out: &mut Vec<Entry>) {
        out.reserve(entries.len());
        for (id, fields) in entries {
            out.push(StreamEvent::from_redis_fields(&fields));
            self.last_id = Some(id);
        }
    }
}

#[async_trait]
impl EventSource for RedisStreamSource {
    async fn backlog(&mut self, out: &mut Vec<Entry>) -> Result<bool, SourceError> {
        let Some(end) = self.backlog_end.clone() else {
            return Ok(true);
        };
        // `(id` is exclusive: the page starts after the last entry read.
        let start = match &self.last_id {
            Some(id) => format!("({id}"),
            None => "-".to_owned(),
        };
        let entries: Vec<RawEntry> = redis::cmd("XRANGE")
            .arg(STREAM)
            .arg(start)
            .arg(&end)
            .arg("COUNT")
            .arg(PAGE)
            .query_async(&mut self.conn)
            .await
            .map_err(store_error)?;
        let short = entries.len() < PAGE;
        self.push(entries, out);
        // Done at the end entry, or when a short page shows it was trimmed away meanwhile.
        let done = short || self.last_id.as_deref() == Some(end.as_str());
        if done {
            self.backlog_end = None;
        }
        Ok(done)
    }

    async fn follow(&mut self, out: &mut Vec<Entry>) -> Result<(), SourceError> {
        let after = self.last_id.clone().unwrap_or_else(|| "0-0".to_owned());
        let reply: Option<Vec<(String, Vec<RawEntry>)>> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(PAGE)
            .arg("BLOCK")
            .arg(BLOCK_MS)
            .arg("STREAMS")
            .arg(STREAM)
            .arg(after)
            .query_async(&mut self.conn)
            .await
            .map_err(store_error)?;
        for (_stream, entries) in reply.unwrap_or_default() {
            self.push(entries, out);
        }
        Ok(())
    }
}
