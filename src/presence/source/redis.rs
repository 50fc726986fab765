//! Reads `supermq.mqtt` from Redis: the backlog with `XRANGE` in pages up to the entry that was
//! last when the source opened (so a busy stream cannot keep `--once` reading forever), then
//! new entries with a blocking `XREAD`. A task reads the backlog a few pages ahead, so Redis,
//! the parsing of its replies and the pairing of events run at the same time.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use tokio::sync::mpsc;

use super::{Entry, EventSource, SourceError};
use crate::events::STREAM;
use crate::presence::event::StreamEvent;

/// Entries per round trip.
const PAGE: usize = 10_000;
/// How long one `XREAD` waits for new entries, in milliseconds.
const BLOCK_MS: u64 = 1_000;
/// Backlog pages read ahead of the pairing.
const READ_AHEAD: usize = 4;
/// Connecting, and any one reply (a page of entries, a blocked `XREAD`), must finish within this.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A stream entry as Redis returns it: its id and its flat field/value list.
type RawEntry = (String, Vec<String>);
/// A decoded backlog page and the id of its last entry, or why reading stopped.
type Page = Result<(Vec<Entry>, String), SourceError>;

pub struct RedisStreamSource {
    conn: MultiplexedConnection,
    /// Id of the last entry read; `None` before the first.
    last_id: Option<String>,
    /// Decoded backlog pages with the id of each page's last entry; `None` once all are read.
    backlog: Option<mpsc::Receiver<Page>>,
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
        let backlog = last.into_iter().next().map(|(end, _)| {
            let (pages, receiver) = mpsc::channel(READ_AHEAD);
            tokio::spawn(read_backlog(conn.clone(), end, pages));
            receiver
        });
        Ok(RedisStreamSource {
            conn,
            last_id: None,
            backlog,
        })
    }
}

/// Pages through the stream from its first entry to `end`, decoding each page; stops after
/// `end`, at an error, or when the source is dropped.
async fn read_backlog(mut conn: MultiplexedConnection, end: String, pages: mpsc::Sender<Page>) {
    let mut start = "-".to_owned();
    loop {
        let result: Result<Vec<RawEntry>, _> = redis::cmd("XRANGE")
            .arg(STREAM)
            .arg(&start)
            .arg(&end)
            .arg("COUNT")
            .arg(PAGE)
            .query_async(&mut conn)
            .await;
        let entries = match result {
            Ok(entries) => entries,
            Err(e) => {
                let _ = pages.send(Err(store_error(e))).await;
                return;
            }
        };
        // A short page is the last: the end entry, or the stream was trimmed past it meanwhile.
        let Some(last) = entries.last().map(|(id, _)| id.clone()) else {
            return;
        };
        let done = entries.len() < PAGE || last == end;
        let decoded = decode(entries);
        if pages.send(Ok((decoded, last.clone()))).await.is_err() || done {
            return;
        }
        // `(id` is exclusive: the next page starts after this one's last entry.
        start = format!("({last}");
    }
}

fn decode(entries: Vec<RawEntry>) -> Vec<Entry> {
    entries
        .into_iter()
        .map(|(_, fields)| StreamEvent::from_redis_fields(fields))
        .collect()
}

#[async_trait]
impl EventSource for RedisStreamSource {
    async fn backlog(&mut self, out: &mut Vec<Entry>) -> Result<bool, SourceError> {
        let Some(pages) = &mut self.backlog else {
            return Ok(true);
        };
        match pages.recv().await {
            Some(Ok((entries, last))) => {
                out.extend(entries);
                self.last_id = Some(last);
                Ok(false)
            }
            Some(Err(e)) => Err(e),
            None => {
                self.backlog = None;
                Ok(true)
            }
        }
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
            if let Some((last, _)) = entries.last() {
                self.last_id = Some(last.clone());
            }
            out.extend(decode(entries));
        }
        Ok(())
    }
}
