//! A lean reader of the one Redis reply the backlog is made of: `XRANGE` entries, parsed from
//! the bytes straight into events, keeping only the fields presence uses. (The redis crate's
//! parser built an owned value for every field of every entry, then a second copy for the typed
//! result: most of a replay's CPU.) Used on plain TCP connections; `rediss://` and Unix sockets
//! go through the redis crate.

use std::fmt;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Entry, SourceError};
use crate::events::EventLayout;
use crate::presence::event::{MalformedEvent, StreamEvent};

/// A stream entry id: milliseconds and sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    pub fn parse(text: &[u8]) -> Option<StreamId> {
        let text = std::str::from_utf8(text).ok()?;
        let (ms, seq) = text.split_once('-').unwrap_or((text, "0"));
        Some(StreamId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// One `XRANGE` entry, decoded.
#[derive(Debug)]
pub struct Decoded {
    pub id: StreamId,
    pub entry: Entry,
}

/// A reply that is not what `XRANGE` returns.
#[derive(Debug, PartialEq, Eq)]
pub struct ProtocolError(pub String);

fn store_error(message: impl fmt::Display) -> SourceError {
    SourceError::Store {
        store: "redis",
        message: message.to_string(),
    }
}

/// Bytes asked of the socket per read when the buffer runs short.
const READ_CHUNK: usize = 256 * 1024;

/// A plain TCP connection to Redis speaking RESP2 (no `HELLO`), for `XRANGE` pages.
pub struct RawConnection {
    stream: TcpStream,
    buf: BytesMut,
    timeout: Duration,
}

impl RawConnection {
    /// Connects as `info` says (`AUTH`, `SELECT`); `None` when it is not plain TCP.
    pub async fn open(
        info: &redis::ConnectionInfo,
        timeout: Duration,
    ) -> Result<Option<RawConnection>, SourceError> {
        let redis::ConnectionAddr::Tcp(host, port) = info.addr() else {
            return Ok(None);
        };
        let stream = tokio::time::timeout(timeout, TcpStream::connect((host.as_str(), *port)))
            .await
            .map_err(|_| store_error(format!("cannot connect to {host}:{port}: timed out")))?
            .map_err(|e| store_error(format!("cannot connect to {host}:{port}: {e}")))?;
        let _ = stream.set_nodelay(true);
        let mut conn = RawConnection {
            stream,
            buf: BytesMut::new(),
            timeout,
        };
        let settings = info.redis_settings();
        if let Some(password) = settings.password() {
            match settings.username() {
                Some(user) => {
                    conn.send(&[b"AUTH", user.as_bytes(), password.as_bytes()])
                        .await?
                }
                None => conn.send(&[b"AUTH", password.as_bytes()]).await?,
            }
            conn.expect_ok().await?;
        }
        if settings.db() != 0 {
            let db = settings.db().to_string();
            conn.send(&[b"SELECT", db.as_bytes()]).await?;
            conn.expect_ok().await?;
        }
        Ok(Some(conn))
    }

    async fn send(&mut self, args: &[&[u8]]) -> Result<(), SourceError> {
        let mut out = Vec::with_capacity(64 + args.iter().map(|a| a.len() + 16).sum::<usize>());
        out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for arg in args {
            out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            out.extend_from_slice(arg);
            out.extend_from_slice(b"\r\n");
        }
        self.stream.write_all(&out).await.map_err(store_error)
    }

    /// Reads more of the reply; an error when Redis closed or took longer than the timeout.
    async fn fill(&mut self) -> Result<(), SourceError> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        match tokio::time::timeout(self.timeout, self.stream.read_buf(&mut self.buf)).await {
            Err(_) => Err(store_error("no reply within the timeout")),
            Ok(Err(e)) => Err(store_error(e)),
            Ok(Ok(0)) => Err(store_error("connection closed by Redis")),
            Ok(Ok(_)) => Ok(()),
        }
    }

    async fn expect_ok(&mut self) -> Result<(), SourceError> {
        loop {
            if let Some(end) = find_crlf(&self.buf, 0) {
                let line = self.buf.split_to(end + 2);
                return match line.first() {
                    Some(b'+') => Ok(()),
                    _ => Err(store_error(
                        String::from_utf8_lossy(&line[..end])
                            .trim_start_matches('-')
                            .to_owned(),
                    )),
                };
            }
            self.fill().await?;
        }
    }

    /// `XRANGE stream start end COUNT count`, decoded as `layout` writes events.
    pub async fn xrange(
        &mut self,
        stream: &str,
        start: &str,
        end: &str,
        count: usize,
        layout: EventLayout,
    ) -> Result<Vec<Decoded>, SourceError> {
        let count = count.to_string();
        self.send(&[
            b"XRANGE",
            stream.as_bytes(),
            start.as_bytes(),
            end.as_bytes(),
            b"COUNT",
            count.as_bytes(),
        ])
        .await?;
        let entries = loop {
            match array_header(&self.buf).map_err(|e| store_error(e.0))? {
                Some((n, used)) => {
                    self.buf.advance(used);
                    break n;
                }
                None => self.fill().await?,
            }
        };
        let mut out = Vec::with_capacity(entries);
        while out.len() < entries {
            match entry(&self.buf, layout).map_err(|e| store_error(e.0))? {
                Some((decoded, used)) => {
                    self.buf.advance(used);
                    out.push(decoded);
                }
                None => self.fill().await?,
            }
        }
        // A page's buffer is not kept beyond the reply.
        if self.buf.is_empty() && self.buf.capacity() > 4 * READ_CHUNK {
            self.buf = BytesMut::new();
        }
        Ok(out)
    }
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    let rest = buf.get(from..)?;
    memchr_crlf(rest).map(|i| from + i)
}

fn memchr_crlf(buf: &[u8]) -> Option<usize> {
    let mut at = 0;
    while let Some(i) = buf[at..].iter().position(|&b| b == b'\r') {
        let i = at + i;
        if buf.get(i + 1) == Some(&b'\n') {
            return Some(i);
        }
        at = i + 1;
    }
    None
}

/// `<prefix><decimal>\r\n` at `at`: the number and where the line ends. `Ok(None)` when the
/// line is not all in `buf` yet.
fn number_line(buf: &[u8], at: usize, prefix: u8) -> Result<Option<(i64, usize)>, ProtocolError> {
    let Some(&first) = buf.get(at) else {
        return Ok(None);
    };
    let Some(end) = find_crlf(buf, at) else {
        return Ok(None);
    };
    if first == b'-' {
        return Err(ProtocolError(
            String::from_utf8_lossy(&buf[at + 1..end]).into_owned(),
        ));
    }
    if first != prefix {
        return Err(ProtocolError(format!(
            "expected {:?}, got {:?}",
            prefix as char,
            String::from_utf8_lossy(&buf[at..end.min(at + 40)])
        )));
    }
    let n = std::str::from_utf8(&buf[at + 1..end])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ProtocolError("bad length in reply".into()))?;
    Ok(Some((n, end + 2)))
}

/// The `*<n>` that opens an array reply: its length and the bytes it took.
fn array_header(buf: &[u8]) -> Result<Option<(usize, usize)>, ProtocolError> {
    Ok(number_line(buf, 0, b'*')?.map(|(n, used)| (usize::try_from(n).unwrap_or(0), used)))
}

/// A bulk string at `at`: its bytes' range and where it ends.
fn bulk(buf: &[u8], at: usize) -> Result<Option<(std::ops::Range<usize>, usize)>, ProtocolError> {
    let Some((len, start)) = number_line(buf, at, b'$')? else {
        return Ok(None);
    };
    let len = usize::try_from(len).map_err(|_| ProtocolError("null bulk string".into()))?;
    let end = start + len;
    if buf.len() < end + 2 {
        return Ok(None);
    }
    Ok(Some((start..end, end + 2)))
}

/// One whole entry `[id, [field, value, …]]` at the start of `buf`, decoded, and the bytes it
/// took; `Ok(None)` while it is not all in `buf`.
fn entry(buf: &[u8], layout: EventLayout) -> Result<Option<(Decoded, usize)>, ProtocolError> {
    let Some((2, at)) = number_line(buf, 0, b'*')? else {
        return match number_line(buf, 0, b'*')? {
            None => Ok(None),
            Some((n, _)) => Err(ProtocolError(format!("an entry of {n} items"))),
        };
    };
    let Some((id, mut at)) = bulk(buf, at)? else {
        return Ok(None);
    };
    let id = StreamId::parse(&buf[id]).ok_or_else(|| ProtocolError("bad entry id".into()))?;
    let Some((fields, next)) = number_line(buf, at, b'*')? else {
        return Ok(None);
    };
    at = next;
    let fields = usize::try_from(fields).unwrap_or(0);
    let mut ranges = FieldRanges::default();
    for _ in 0..fields {
        let Some((range, next)) = bulk(buf, at)? else {
            return Ok(None);
        };
        ranges.push(range);
        at = next;
    }
    let item = |i: usize| &buf[ranges.get(i)];
    let entry = match layout {
        EventLayout::Seed => {
            if fields % 2 != 0 {
                Err(MalformedEvent(format!(
                    "odd number of field/value items ({fields})"
                )))
            } else {
                StreamEvent::from_redis_pairs(
                    (0..fields / 2).map(|i| (item(2 * i), item(2 * i + 1))),
                )
            }
        }
        EventLayout::Supermq => match fields {
            2 if item(0) == b"data" => StreamEvent::from_supermq_json(item(1)),
            _ => Err(MalformedEvent(format!(
                "entry is not one data field ({fields} items)"
            ))),
        },
    };
    Ok(Some((Decoded { id, entry }, at)))
}

/// The field ranges of one entry: inline up to 16 (every event written has fewer), then on the
/// heap.
#[derive(Default)]
struct FieldRanges {
    inline: [(usize, usize); 16],
    len: usize,
    spill: Vec<std::ops::Range<usize>>,
}

impl FieldRanges {
    fn push(&mut self, range: std::ops::Range<usize>) {
        match self.inline.get_mut(self.len) {
            Some(slot) => *slot = (range.start, range.end),
            None => self.spill.push(range),
        }
        self.len += 1;
    }

    fn get(&self, i: usize) -> std::ops::Range<usize> {
        match self.inline.get(i) {
            Some(&(start, end)) => start..end,
            None => self.spill[i - self.inline.len()].clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventType;

    fn bulk_of(s: &str) -> String {
        format!("${}\r\n{s}\r\n", s.len())
    }

    fn entry_bytes(id: &str, fields: &[&str]) -> String {
        let mut out = format!("*2\r\n{}*{}\r\n", bulk_of(id), fields.len());
        for f in fields {
            out.push_str(&bulk_of(f));
        }
        out
    }

    const SEED: [&str; 10] = [
        "client_id",
        "c1",
        "event_type",
        "connect",
        "instance",
        "a",
        "occurred_at",
        "17",
        "mqtt_client_id",
        "dev-1",
    ];

    #[test]
    fn decodes_a_seed_entry_and_skips_the_fields_presence_does_not_use() {
        let bytes = entry_bytes("1700-3", &SEED);
        let (decoded, used) = entry(bytes.as_bytes(), EventLayout::Seed)
            .unwrap()
            .expect("complete");
        assert_eq!(used, bytes.len());
        assert_eq!(decoded.id, StreamId { ms: 1700, seq: 3 });
        let event = decoded.entry.expect("an event");
        assert_eq!(
            (
                event.client_id.as_str(),
                event.event_type,
                event.instance.as_str(),
                event.occurred_at
            ),
            ("c1", EventType::Connect, "a", 17)
        );
        assert_eq!(event.reason, None);
    }

    #[test]
    fn every_cut_of_an_entry_is_incomplete_not_an_error() {
        let bytes = entry_bytes("1700-3", &SEED);
        for cut in 0..bytes.len() {
            assert!(
                entry(&bytes.as_bytes()[..cut], EventLayout::Seed)
                    .unwrap()
                    .is_none(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_bad_entry_is_malformed_and_a_bad_reply_an_error() {
        let bytes = entry_bytes("1-1", &["client_id", "c1", "event_type"]);
        let (decoded, _) = entry(bytes.as_bytes(), EventLayout::Seed).unwrap().unwrap();
        assert!(decoded.entry.is_err());
        let bytes = entry_bytes("1-1", &["client_id", "c1"]);
        let (decoded, _) = entry(bytes.as_bytes(), EventLayout::Supermq)
            .unwrap()
            .unwrap();
        assert!(decoded.entry.is_err());
        assert_eq!(
            array_header(b"-WRONGTYPE Operation against a key\r\n"),
            Err(ProtocolError("WRONGTYPE Operation against a key".into()))
        );
        assert!(entry(b"+OK\r\n", EventLayout::Seed).is_err());
        assert_eq!(array_header(b"*0\r\n"), Ok(Some((0, 4))));
    }

    #[test]
    fn decodes_a_supermq_entry() {
        let json = r#"{"operation":"mqtt.client_disconnect","client_id":"c2","instance":"b","occurred_at":5}"#;
        let bytes = entry_bytes("9-0", &["data", json]);
        let (decoded, _) = entry(bytes.as_bytes(), EventLayout::Supermq)
            .unwrap()
            .unwrap();
        let event = decoded.entry.unwrap();
        assert_eq!(
            (event.client_id.as_str(), event.event_type),
            ("c2", EventType::Disconnect)
        );
    }

    #[test]
    fn stream_ids_parse_and_print() {
        let id = StreamId::parse(b"1700000000000-12").unwrap();
        assert_eq!(id.to_string(), "1700000000000-12");
        assert_eq!(StreamId::parse(b"5"), Some(StreamId { ms: 5, seq: 0 }));
        assert_eq!(StreamId::parse(b"x-1"), None);
        assert!(StreamId { ms: 1, seq: 9 } < StreamId { ms: 2, seq: 0 });
    }
}
