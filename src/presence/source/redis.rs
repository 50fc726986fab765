//! Reads the connection events from Redis: `supermq.mqtt`, or in the `supermq` layout the two
//! streams `events.supermq.mqtt.client_connect` and `…client_disconnect` merged into one order.
//! The backlog is everything up to the entry that was last in each stream when the source opened
//! (so a busy stream cannot keep `--once` reading forever); then new entries come with a
//! blocking `XREAD`.
//!
//! The backlog is read in parallel: each stream's id range is cut into slices by time, and up
//! to [`READERS`] slices are paged through with `XRANGE` at once, each on its own connection and
//! task (so Redis prepares one reply while others are parsed, on every core), then handed on in
//! stream order. On plain TCP the replies are parsed by a lean reader (`resp.rs`) that keeps
//! only the fields presence uses.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::{self, BoxStream, StreamExt};
use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use tokio::sync::mpsc;

use super::resp::{Decoded, RawConnection, StreamId};
use super::{Entry, EventSource, SourceError};
use crate::events::{EventLayout, STREAM};
use crate::presence::event::{MalformedEvent, StreamEvent};

/// Entries per `XRANGE` round trip.
const PAGE: usize = 10_000;
/// Entries per slice of a stream (about; slices are cut by time).
const SLICE: u64 = 50_000;
/// Slices read at once, each on its own connection.
const READERS: usize = 4;
/// How long one `XREAD` waits for new entries, in milliseconds.
const BLOCK_MS: u64 = 1_000;
/// Merged backlog pages handed on ahead of the pairing.
const READ_AHEAD: usize = 4;
/// Connecting, and any one reply (a page of entries, a blocked `XREAD`), must finish within this.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A stream entry as the redis crate returns it: its id and its flat field/value list.
type RawEntry = (String, Vec<String>);
/// A merged backlog page and, per stream, the id of its last entry in the page, or why reading
/// stopped.
type Page = Result<(Vec<Entry>, Vec<Option<StreamId>>), SourceError>;
/// One stream's backlog, in order, a slice at a time.
type Slices = BoxStream<'static, Result<Vec<Decoded>, SourceError>>;

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
    last_ids: Vec<Option<StreamId>>,
    /// Merged backlog pages with the ids of each page's last entries; `None` once all are read.
    backlog: Option<mpsc::Receiver<Page>>,
}

fn store_error(e: impl std::fmt::Display) -> SourceError {
    SourceError::Store {
        store: "redis",
        message: e.to_string(),
    }
}

/// The id of a stream's first or last entry (`XRANGE`/`XREVRANGE … COUNT 1`).
async fn edge(
    conn: &mut MultiplexedConnection,
    command: &str,
    stream: &str,
) -> Result<Option<StreamId>, SourceError> {
    let (from, to) = if command == "XRANGE" {
        ("-", "+")
    } else {
        ("+", "-")
    };
    let found: Vec<RawEntry> = redis::cmd(command)
        .arg(stream)
        .arg(from)
        .arg(to)
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await
        .map_err(store_error)?;
    Ok(found
        .into_iter()
        .next()
        .and_then(|(id, _)| StreamId::parse(id.as_bytes())))
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
        let readers = Arc::new(Readers {
            info: client.get_connection_info().clone(),
            idle: Mutex::new(Vec::new()),
            shared: conn.clone(),
        });
        let mut cursors = Vec::with_capacity(streams.len());
        for stream in &streams {
            // An empty stream has no backlog.
            let cursor = match edge(&mut conn, "XREVRANGE", stream).await? {
                None => Cursor::done(),
                Some(end) => {
                    let first = edge(&mut conn, "XRANGE", stream).await?.unwrap_or(end);
                    let len: u64 = redis::cmd("XLEN")
                        .arg(stream)
                        .query_async(&mut conn)
                        .await
                        .map_err(store_error)?;
                    let slices = slices(first, end, len);
                    Cursor::new(read_slices(readers.clone(), stream.clone(), slices, layout))
                }
            };
            cursors.push(cursor);
        }
        let backlog = cursors.iter().any(|c| !c.done).then(|| {
            let (pages, receiver) = mpsc::channel(READ_AHEAD);
            tokio::spawn(read_backlog(cursors, pages));
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

/// One `XRANGE` range: `start` and `end` as Redis reads them (`-`, `1700000000000`, `(1-2`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Slice {
    start: String,
    end: String,
    /// The backlog's last entry is this slice's end.
    end_id: Option<StreamId>,
}

/// Cuts `first..=end` into slices of about [`SLICE`] entries by time (milliseconds of the ids):
/// consecutive, not overlapping, the last ending exactly at `end`.
fn slices(first: StreamId, end: StreamId, len: u64) -> Vec<Slice> {
    let count = len.div_ceil(SLICE).max(1);
    let span = end.ms.saturating_sub(first.ms) + 1;
    let width = span.div_ceil(count).max(1);
    let mut out = Vec::new();
    let mut from = first.ms;
    loop {
        let last = from.saturating_add(width - 1);
        let start = if out.is_empty() {
            "-".to_owned()
        } else {
            // A bare millisecond starts at its first sequence number and ends at its last.
            from.to_string()
        };
        if last >= end.ms {
            out.push(Slice {
                start,
                end: end.to_string(),
                end_id: Some(end),
            });
            return out;
        }
        out.push(Slice {
            start,
            end: last.to_string(),
            end_id: None,
        });
        from = last + 1;
    }
}

/// The connections slices are read on: plain TCP ones with the lean reader, kept for the next
/// slice; otherwise (TLS, Unix socket) the redis crate's connection.
struct Readers {
    info: redis::ConnectionInfo,
    idle: Mutex<Vec<RawConnection>>,
    shared: MultiplexedConnection,
}

impl Readers {
    fn take(&self) -> Option<RawConnection> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn give_back(&self, conn: RawConnection) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
    }
}

/// A stream's slices, [`READERS`] read at once (each in a task), yielded in order.
fn read_slices(
    readers: Arc<Readers>,
    stream: String,
    slices: Vec<Slice>,
    layout: EventLayout,
) -> Slices {
    stream::iter(slices)
        .map(move |slice| {
            let (readers, stream) = (readers.clone(), stream.clone());
            tokio::spawn(async move { read_slice(&readers, &stream, &slice, layout).await })
        })
        .buffered(READERS)
        .map(|joined| joined.map_err(|e| store_error(format!("slice reader failed: {e}")))?)
        .boxed()
}

/// Pages through one slice.
async fn read_slice(
    readers: &Readers,
    stream: &str,
    slice: &Slice,
    layout: EventLayout,
) -> Result<Vec<Decoded>, SourceError> {
    let mut raw = match readers.take() {
        Some(conn) => Some(conn),
        None => RawConnection::open(&readers.info, TIMEOUT).await?,
    };
    let mut out = Vec::new();
    let mut start = slice.start.clone();
    loop {
        let page = match raw.as_mut() {
            Some(conn) => {
                conn.xrange(stream, &start, &slice.end, PAGE, layout)
                    .await?
            }
            None => {
                crate_xrange(readers.shared.clone(), stream, &start, &slice.end, layout).await?
            }
        };
        let full = page.len() == PAGE;
        let last = page.last().map(|d| d.id);
        out.extend(page);
        match last {
            // A short page is the slice's last (or the stream was trimmed past it).
            Some(last) if full && Some(last) != slice.end_id => start = format!("({last}"),
            _ => break,
        }
    }
    if let Some(conn) = raw {
        readers.give_back(conn);
    }
    Ok(out)
}

/// One page through the redis crate (TLS and Unix socket connections).
async fn crate_xrange(
    mut conn: MultiplexedConnection,
    stream: &str,
    start: &str,
    end: &str,
    layout: EventLayout,
) -> Result<Vec<Decoded>, SourceError> {
    let entries: Vec<RawEntry> = redis::cmd("XRANGE")
        .arg(stream)
        .arg(start)
        .arg(end)
        .arg("COUNT")
        .arg(PAGE)
        .query_async(&mut conn)
        .await
        .map_err(store_error)?;
    entries
        .into_iter()
        .map(|entry| decode(entry, layout))
        .collect()
}

/// Where reading one stream's backlog stands.
struct Cursor {
    slices: Option<Slices>,
    /// Read and not yet merged: (order key, id, entry).
    buffered: VecDeque<(OrderKey, StreamId, Entry)>,
    /// Nothing more to read from Redis.
    done: bool,
}

impl Cursor {
    fn new(slices: Slices) -> Self {
        Cursor {
            slices: Some(slices),
            buffered: VecDeque::new(),
            done: false,
        }
    }

    fn done() -> Self {
        Cursor {
            slices: None,
            buffered: VecDeque::new(),
            done: true,
        }
    }

    /// A cursor over entries already read in full (an `XREAD` reply).
    fn complete(entries: Vec<Decoded>) -> Self {
        let mut cursor = Cursor::done();
        cursor.buffered = entries.into_iter().map(keyed).collect();
        cursor
    }
}

/// How entries of different streams are ordered: the millisecond of the Redis id (the server's
/// arrival time), then `occurred_at` (strictly increasing per adapter instance) within one
/// millisecond. Entries of one stream always keep their stream order.
type OrderKey = (u64, i64);

fn keyed(decoded: Decoded) -> (OrderKey, StreamId, Entry) {
    let key = (
        decoded.id.ms,
        decoded.entry.as_ref().map_or(0, |e| e.occurred_at),
    );
    (key, decoded.id, decoded.entry)
}

/// Moves entries from the cursors to `out` in merged order, for as long as the order is known:
/// until a cursor with more to read has nothing buffered. Records per cursor the last id moved.
fn merge(cursors: &mut [Cursor], out: &mut Vec<Entry>, last_ids: &mut [Option<StreamId>]) {
    // One stream (the seed layout): its order is the order.
    if let [cursor] = cursors {
        if let Some((_, id, _)) = cursor.buffered.back() {
            last_ids[0] = Some(*id);
        }
        out.extend(cursor.buffered.drain(..).map(|(_, _, entry)| entry));
        return;
    }
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

/// Reads every stream's backlog slice by slice, merging them; stops after the ends, at an
/// error, or when the source is dropped.
async fn read_backlog(mut cursors: Vec<Cursor>, pages: mpsc::Sender<Page>) {
    loop {
        for cursor in cursors
            .iter_mut()
            .filter(|c| c.buffered.is_empty() && !c.done)
        {
            let next = match cursor.slices.as_mut() {
                Some(slices) => slices.next().await,
                None => None,
            };
            match next {
                None => {
                    cursor.done = true;
                    cursor.slices = None;
                }
                Some(Ok(entries)) => cursor.buffered.extend(entries.into_iter().map(keyed)),
                Some(Err(e)) => {
                    let _ = pages.send(Err(e)).await;
                    return;
                }
            }
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

/// An entry read through the redis crate.
fn decode((id, fields): RawEntry, layout: EventLayout) -> Result<Decoded, SourceError> {
    let id = StreamId::parse(id.as_bytes())
        .ok_or_else(|| store_error(format!("entry id {id:?} is not a stream id")))?;
    let entry = match layout {
        EventLayout::Seed => StreamEvent::from_redis_fields(fields),
        EventLayout::Supermq => match <[String; 2]>::try_from(fields) {
            Ok([name, data]) if name == "data" => StreamEvent::from_supermq_json(data.as_bytes()),
            Ok(other) => Err(MalformedEvent(format!(
                "entry without a data field: {other:?}"
            ))),
            Err(fields) => Err(MalformedEvent(format!(
                "entry is not one data field: {fields:?}"
            ))),
        },
    };
    Ok(Decoded { id, entry })
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
            cmd.arg(last.map_or_else(|| "0-0".to_owned(), |id| id.to_string()));
        }
        let reply: Option<Vec<(String, Vec<RawEntry>)>> =
            cmd.query_async(&mut self.conn).await.map_err(store_error)?;
        let mut cursors: Vec<Cursor> = self.streams.iter().map(|_| Cursor::done()).collect();
        for (stream, entries) in reply.unwrap_or_default() {
            if let Some(i) = self.streams.iter().position(|s| *s == stream) {
                let decoded = entries
                    .into_iter()
                    .map(|entry| decode(entry, self.layout))
                    .collect::<Result<_, _>>()?;
                cursors[i] = Cursor::complete(decoded);
            }
        }
        merge(&mut cursors, out, &mut self.last_ids);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ms: u64, seq: u64) -> StreamId {
        StreamId { ms, seq }
    }

    #[test]
    fn slices_cover_the_backlog_once_and_end_at_its_last_entry() {
        let cut = slices(id(1000, 0), id(1099, 7), 200_000);
        assert_eq!(cut.len(), 4);
        assert_eq!(cut[0].start, "-");
        assert_eq!(cut[0].end, "1024");
        assert_eq!(cut[1].start, "1025");
        assert_eq!(cut[3].end, "1099-7");
        assert_eq!(cut[3].end_id, Some(id(1099, 7)));
        assert!(cut[..3].iter().all(|s| s.end_id.is_none()));
        for pair in cut.windows(2) {
            let end: u64 = pair[0].end.parse().unwrap();
            assert_eq!(pair[1].start, (end + 1).to_string());
        }
    }

    #[test]
    fn a_small_or_instant_backlog_is_one_slice() {
        for (first, end, len) in [(id(5, 0), id(5, 9), 10), (id(5, 0), id(9, 0), 3)] {
            let cut = slices(first, end, len);
            assert_eq!(cut.len(), 1, "{cut:?}");
            assert_eq!((cut[0].start.as_str(), cut[0].end_id), ("-", Some(end)));
        }
        // Many entries in one millisecond: still one slice, never an empty range.
        let cut = slices(id(5, 0), id(5, 999_999), 1_000_000);
        assert_eq!(cut.len(), 1);
    }
}
