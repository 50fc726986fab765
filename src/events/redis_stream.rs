//! Redis Streams sink: one `XADD <key> MAXLEN ~ 1000000 * <fields>` per event, pipelined per
//! batch; the [`EventLayout`] gives key and fields (seed: `supermq.mqtt` with flat
//! `client_id … occurred_at …` pairs; supermq: `events.supermq.mqtt.client_<action>` with one
//! `data` JSON field). Connects lazily and reconnects
//! after any error, so an unreachable Redis at start-up only delays events.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;

use super::{ConnectionEvent, EventLayout, EventSink, SinkError};

/// Approximate cap of the stream's length, as the seed's stores (and SuperMQ's) trim it.
const MAX_LEN: u64 = 1_000_000;
/// How long one connection attempt or one batch may take before it counts as a failure.
const TIMEOUT: Duration = Duration::from_secs(5);

pub struct RedisStreamSink {
    client: redis::Client,
    conn: Option<MultiplexedConnection>,
    layout: EventLayout,
}

impl RedisStreamSink {
    /// Checks the URL; no connection is made until the first batch.
    pub fn new(url: &str, layout: EventLayout) -> Result<Self, redis::RedisError> {
        Ok(RedisStreamSink {
            client: redis::Client::open(url)?,
            conn: None,
            layout,
        })
    }

    fn error(message: impl std::fmt::Display) -> SinkError {
        SinkError {
            store: "redis",
            message: message.to_string(),
        }
    }

    async fn connection(&mut self) -> Result<&mut MultiplexedConnection, SinkError> {
        if self.conn.is_none() {
            let conn =
                tokio::time::timeout(TIMEOUT, self.client.get_multiplexed_async_connection())
                    .await
                    .map_err(|_| Self::error("connect timed out"))?
                    .map_err(Self::error)?;
            tracing::info!("connected to the Redis event store");
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("connection set above"))
    }
}

#[async_trait]
impl EventSink for RedisStreamSink {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn publish(&mut self, batch: &[ConnectionEvent]) -> Result<(), SinkError> {
        let mut pipe = redis::pipe();
        let layout = self.layout;
        let mut commands = 0;
        for event in batch.iter().filter(|e| layout.carries(e)) {
            let cmd = pipe
                .cmd("XADD")
                .arg(layout.redis_key(event))
                .arg("MAXLEN")
                .arg("~")
                .arg(MAX_LEN)
                .arg("*");
            for (field, value) in layout.redis_fields(event) {
                cmd.arg(field).arg(value);
            }
            commands += 1;
        }
        if commands == 0 {
            return Ok(());
        }
        let conn = self.connection().await?;
        let result = tokio::time::timeout(TIMEOUT, pipe.query_async::<Vec<String>>(conn)).await;
        match result {
            Ok(Ok(_ids)) => Ok(()),
            Ok(Err(e)) => {
                self.conn = None;
                Err(Self::error(e))
            }
            Err(_) => {
                self.conn = None;
                Err(Self::error("XADD timed out"))
            }
        }
    }
}
