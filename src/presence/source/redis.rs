//! Reads the connection events from Redis: `supermq.mqtt`, or in the `supermq` layout the two
//! streams `events.supermq.mqtt.client_connect` and `…client_disconnect` merged into one order.
//! The backlog is read with `XRANGE` in pages up to the entry that was last in each stream when
//! the source opened (so a busy stream cannot keep `--once` reading forever), then new entries
//! with a blocking `XREAD`. A task reads the backlog a few pages ahead, so Redis, the parsing of
//! its replies and the pairing of events run at the same time.

use std::collections::VecDeque;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use tokio::sync::mpsc;

use super::{Entry, EventSource, SourceError};
use crate::events::{EventLayout, STREAM};
use crate::presence::event::{MalformedEvent, StreamEvent};

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
/// A decoded backlog page and, per stream, the id of its last entry in the page, or why reading
/// stopped.
type Page = Result<(Vec<Entry>, Vec<Option<String>>), SourceError>;

/// The streams a layout's connection events are in.
fn streams(layout: EventLayout) -> Vec<String> {
    match layout {
        EventLayout::Seed => vec![STREAM.to_owned()],
        EventLayout::Supermq => vec![
            format!("events.{STREAM}.client_connect"),
            format!("events.{STREAM}.client_disconnect"),
        ],
    }
}

pub struct RedisStreamSource {
    conn: MultiplexedConnection,
    layout: EventLayout,
    streams: Vec<String>,
    /// Per stream, the id of the last entry read; `None` before the first.
    last_ids: Vec<Option<String>>,
    /// Decoded backlog pages with the ids of each page's last entries; `None` once all are read.
    backlog: Option<mpsc::Receiver<Page>>,
}

fn store_error(e: impl std::fmt::Display) -> SourceError {
    SourceError::Store {
        store: "redis",
        message: e.to_string(),
    }
}

impl RedisStreamSource {
    pub async fn open(url: &str, layout: EventLayout) -> Result<Self, SourceError> {
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
        let streams = streams(layout);
        let mut cursors = Vec::with_capacity(streams.len());
        for stream in &streams {
            let last: Vec<RawEntry> = redis::cmd("XREVRANGE")
                .arg(stream)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut conn)
                .await
                .map_err(store_error)?;
            // An empty stream has no backlog.
            let end = last.into_iter().next().map(|(end, _)| end);
            cursors.push(Cursor::new(stream.clone(), end));
        }
        let backlog = cursors.iter().any(|c| !c.done).then(|| {
            let (pages, receiver) = mpsc::channel(READ_AHEAD);
            tokio::spawn(read_backlog(conn.clone(), cursors, layout, pages));
            receiver
        });
        Ok(RedisStreamSource {
            conn,
            layout,
            last_ids: vec![None; streams.len()],
            streams,
            backlog,
        })
    }
}

/// Where reading one stream's backlog stands.
struct Cursor {
    stream: String,
    /// The backlog's last entry.
    end: String,
    /// `XRANGE` start of the next page.
    start: String,
    /// Read and not yet merged: (order key, id, entry).
    buffered: VecDeque<(OrderKey, String, Entry)>,
    /// Nothing more to read from Redis.
    done: bool,
}

impl Cursor {
    fn new(stream: String, end: Option<String>) -> Self {
        Cursor {
            stream,
            done: end.is_none(),
            end: end.unwrap_or_default(),
            start: "-".to_owned(),
            buffered: VecDeque::new(),
        }
    }

    /// A cursor over entries already read in full (an `XREAD` reply).
    fn complete(entries: Vec<RawEntry>, layout: EventLayout) -> Self {
        let mut cursor = Cursor::new(String::new(), None);
        cursor.buffered = decode(entries, layout).collect();
        cursor
    }
}

/// How entries of different streams are ordered: the millisecond of the Redis id (the server's
/// arrival time), then `occurred_at` (strictly increasing per adapter instance) within one
/// millisecond. Entries of one stream always keep their stream order.
type OrderKey = (u64, i64);

fn order_key(id: &str, entry: &Entry) -> OrderKey {
    let ms = id
        .split_once('-')
        .map_or(id, |(ms, _)| ms)
        .parse()
        .unwrap_or(0);
    (ms, entry.as_ref().map_or(0, |e| e.occurred_at))
}

/// Moves entries from the cursors to `out` in merged order, for as long as the order is known:
/// until a cursor with more to read has nothing buffered. Records per cursor the last id moved.
fn merge(cursors: &mut [Cursor], out: &mut Vec<Entry>, last_ids: &mut [Option<String>]) {
    loop {
        if cursors.iter().any(|c| c.buffered.is_empty() && !c.done) {
            return;
        }
        let next = cursors
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.buffered.front().map(|(key, _, _)| (*key, i)))
            .min();
        let Some((_, i)) = next else {
            return;
        };
        if let Some((_, id, entry)) = cursors[i].buffered.pop_front() {
            last_ids[i] = Some(id);
            out.push(entry);
        }
    }
}

/// Pages through every stream from its first entry to its end, merging them; stops after the
/// ends, at an error, or when the source is dropped.
async fn read_backlog(
    mut conn: MultiplexedConnection,
    mut cursors: Vec<Cursor>,
    layout: EventLayout,
    pages: mpsc::Sender<Page>,
) {
    loop {
        for cursor in cursors
            .iter_mut()
            .filter(|c| c.buffered.is_empty() && !c.done)
        {
            let result: Result<Vec<RawEntry>, _> = redis::cmd("XRANGE")
                .arg(&cursor.stream)
                .arg(&cursor.start)
                .arg(&cursor.end)
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
            // A short page is the last: the end entry, or the stream was trimmed past it.
            let Some(last) = entries.last().map(|(id, _)| id.clone()) else {
                cursor.done = true;
                continue;
            };
            cursor.done = entries.len() < PAGE || last == cursor.end;
            // `(id` is exclusive: the next page starts after this one's last entry.
            cursor.start = format!("({last}");
            cursor.buffered.extend(decode(entries, layout));
        }
        let mut page = Vec::new();
        let mut last_ids = vec![None; cursors.len()];
        merge(&mut cursors, &mut page, &mut last_ids);
        let finished = cursors.iter().all(|c| c.done && c.buffered.is_empty());
        if !page.is_empty() && pages.send(Ok((page, last_ids))).await.is_err() {
            return;
        }
        if finished {
            return;
        }
    }
}

fn decode(
    entries: Vec<RawEntry>,
    layout: EventLayout,
) -> impl Iterator<Item = (OrderKey, String, Entry)> {
    entries.into_iter().map(move |(id, fields)| {
        let entry = match layout {
            EventLayout::Seed => StreamEvent::from_redis_fields(fields),
            EventLayout::Supermq => match <[String; 2]>::try_from(fields) {
                Ok([name, data]) if name == "data" => {
                    StreamEvent::from_supermq_json(data.as_bytes())
                }
                Ok(other) => Err(MalformedEvent(format!(
                    "entry without a data field: {other:?}"
                ))),
                Err(fields) => Err(MalformedEvent(format!(
                    "entry is not one data field: {fields:?}"
                ))),
            },
        };
        (order_key(&id, &entry), id, entry)
    })
}

#[async_trait]
impl EventSource for RedisStreamSource {
    async fn backlog(&mut self, out: &mut Vec<Entry>) -> Result<bool, SourceError> {
        let Some(pages) = &mut self.backlog else {
            return Ok(true);
        };
        match pages.recv().await {
            Some(Ok((entries, last_ids))) => {
                out.extend(entries);
                for (mine, last) in self.last_ids.iter_mut().zip(last_ids) {
                    if last.is_some() {
                        *mine = last;
                    }
                }
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
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(PAGE)
            .arg("BLOCK")
            .arg(BLOCK_MS)
            .arg("STREAMS")
            .arg(&self.streams);
        for last in &self.last_ids {
            cmd.arg(last.as_deref().unwrap_or("0-0"));
        }
        let reply: Option<Vec<(String, Vec<RawEntry>)>> =
            cmd.query_async(&mut self.conn).await.map_err(store_error)?;
        let mut cursors: Vec<Cursor> = self
            .streams
            .iter()
            .map(|_| Cursor::complete(Vec::new(), self.layout))
            .collect();
        for (stream, entries) in reply.unwrap_or_default() {
            if let Some(i) = self.streams.iter().position(|s| *s == stream) {
                cursors[i] = Cursor::complete(entries, self.layout);
            }
        }
        merge(&mut cursors, out, &mut self.last_ids);
        Ok(())
    }
}
