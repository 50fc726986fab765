//! Follows `events.supermq.clients` on RabbitMQ: a queue of this instance's own (named by a
//! UUID, so every instance gets every event) bound to the topic exchange `events`. The queue is
//! durable and outlives a broken connection for [`QUEUE_EXPIRES`], so events published while the
//! consumer reconnects wait in it; it is deleted by the broker once unused that long. Each event
//! is acknowledged after it was handled.

use std::str::FromStr;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use tokio_util::sync::CancellationToken;

use super::event::{PlatformEvent, STREAM};
use super::{Backoff, Dispatch};

const EXCHANGE: &str = "events";
const TIMEOUT: Duration = Duration::from_secs(5);
/// How long the queue outlives its consumer (RabbitMQ `x-expires`).
pub const QUEUE_EXPIRES: Duration = Duration::from_secs(600);
/// Unacknowledged deliveries the broker sends ahead.
const PREFETCH: u16 = 100;

pub struct AmqpConsumer {
    url: String,
    routing_key: String,
    queue: String,
}

impl AmqpConsumer {
    pub fn new(url: &str) -> Result<Self, String> {
        AMQPUri::from_str(url)?;
        Ok(AmqpConsumer {
            url: url.to_owned(),
            routing_key: format!("events.{STREAM}"),
            queue: format!("mqtt-adapter.{STREAM}.{}", uuid::Uuid::new_v4()),
        })
    }

    pub async fn run(self, mut dispatch: Dispatch, shutdown: CancellationToken) {
        let mut backoff = Backoff::new();
        loop {
            match self.follow(&mut dispatch, &mut backoff, &shutdown).await {
                Ok(()) => return,
                Err(e) => tracing::warn!(error = %e, queue = %self.queue,
                    "platform events (amqp): connection lost; reconnecting"),
            }
            if !backoff.wait(&shutdown).await {
                return;
            }
        }
    }

    async fn follow(
        &self,
        dispatch: &mut Dispatch,
        backoff: &mut Backoff,
        shutdown: &CancellationToken,
    ) -> Result<(), lapin::Error> {
        let setup = async {
            let conn = Connection::connect(&self.url, ConnectionProperties::default()).await?;
            let channel = conn.create_channel().await?;
            channel
                .exchange_declare(
                    EXCHANGE.into(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            let mut arguments = FieldTable::default();
            arguments.insert(
                "x-expires".into(),
                AMQPValue::LongUInt(QUEUE_EXPIRES.as_millis() as u32),
            );
            channel
                .queue_declare(
                    self.queue.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    arguments,
                )
                .await?;
            channel
                .queue_bind(
                    self.queue.as_str().into(),
                    EXCHANGE.into(),
                    self.routing_key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            channel
                .basic_qos(PREFETCH, BasicQosOptions::default())
                .await?;
            let consumer = channel
                .basic_consume(
                    self.queue.as_str().into(),
                    "mqtt-adapter".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>((conn, consumer))
        };
        let (conn, mut consumer) = match tokio::time::timeout(TIMEOUT, setup).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(lapin::Error::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect timed out",
                )))
            }
        };
        tracing::info!(queue = %self.queue, routing_key = %self.routing_key,
            "platform events: following events.supermq.clients on amqp");
        backoff.reset();
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = conn.close(200, "shutting down".into()).await;
                    return Ok(());
                }
                next = consumer.next() => next,
            };
            let delivery = match next {
                None => {
                    return Err(lapin::Error::from(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "consumer cancelled by the broker",
                    )))
                }
                Some(delivery) => delivery?,
            };
            let position = delivery.delivery_tag.to_string();
            dispatch
                .event("amqp", &position, PlatformEvent::from_json(&delivery.data))
                .await;
            delivery.ack(BasicAckOptions::default()).await?;
        }
    }
}
