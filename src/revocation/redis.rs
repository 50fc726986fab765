//! Follows `supermq.clients` on Redis Streams: `XREAD BLOCK` from the newest entry that existed
//! when the consumer first connected, then from the last entry it read. After an error it
//! reconnects and goes on from that last id, so an outage skips nothing the store kept.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, AsyncConnectionConfig};
use tokio_util::sync::CancellationToken;

use super::event::{PlatformEvent, STREAM};
use super::{Backoff, Dispatch};

/// How long one XREAD waits for new entries before it is issued again.
const BLOCK: Duration = Duration::from_secs(5);
/// Entries read per XREAD.
const COUNT: usize = 100;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct RedisConsumer {
    client: redis::Client,
    /// The last entry read; `None` until the newest entry at start-up is known.
    last_id: Option<String>,
}

impl RedisConsumer {
    pub fn new(url: &str) -> Result<Self, redis::RedisError> {
        Ok(RedisConsumer {
            client: redis::Client::open(url)?,
            last_id: None,
        })
    }

    async fn connect(&self) -> Result<MultiplexedConnection, redis::RedisError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            // A blocked XREAD answers within BLOCK; beyond a margin the server is gone.
            .set_response_timeout(Some(BLOCK + CONNECT_TIMEOUT));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// The id of the newest entry, or `0-0` for an empty (or missing) stream.
    async fn newest_id(conn: &mut MultiplexedConnection) -> Result<String, redis::RedisError> {
        let newest: Vec<(String, Vec<String>)> = redis::cmd("XREVRANGE")
            .arg(STREAM)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(conn)
            .await?;
        Ok(newest
            .into_iter()
            .next()
            .map(|(id, _)| id)
            .unwrap_or_else(|| "0-0".to_owned()))
    }

    pub async fn run(mut self, mut dispatch: Dispatch, shutdown: CancellationToken) {
        let mut backoff = Backoff::new();
        loop {
            match self.follow(&mut dispatch, &mut backoff, &shutdown).await {
                Ok(()) => return,
                Err(e) => tracing::warn!(error = %e,
                    "platform events (redis): connection lost; reconnecting"),
            }
            if !backoff.wait(&shutdown).await {
                return;
            }
        }
    }

    /// Reads until shutdown (`Ok`) or a store error.
    async fn follow(
        &mut self,
        dispatch: &mut Dispatch,
        backoff: &mut Backoff,
        shutdown: &CancellationToken,
    ) -> Result<(), redis::RedisError> {
        let mut conn = self.connect().await?;
        let last_id = match &self.last_id {
            Some(id) => id.clone(),
            None => {
                let id = Self::newest_id(&mut conn).await?;
                self.last_id = Some(id.clone());
                id
            }
        };
        tracing::info!(stream = STREAM, after = %last_id,
            "platform events: following supermq.clients on redis");
        backoff.reset();
        let options = StreamReadOptions::default()
            .block(BLOCK.as_millis() as usize)
            .count(COUNT);
        loop {
            let ids = [self.last_id.clone().unwrap_or(last_id.clone())];
            let read: Option<StreamReadReply> = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                read = conn.xread_options(&[STREAM], &ids, &options) => read?,
            };
            let Some(reply) = read else { continue };
            for key in reply.keys {
                for entry in key.ids {
                    let fields: HashMap<String, String> = entry
                        .map
                        .iter()
                        .filter_map(|(k, v)| {
                            redis::from_redis_value_ref::<String>(v)
                                .ok()
                                .map(|v| (k.clone(), v))
                        })
                        .collect();
                    dispatch
                        .event("redis", &entry.id, PlatformEvent::from_fields(&fields))
                        .await;
                    self.last_id = Some(entry.id);
                }
            }
        }
    }
}
