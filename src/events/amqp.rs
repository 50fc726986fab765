//! RabbitMQ sink: each event is published to the durable topic exchange `events` with the
//! [`EventLayout`]'s routing key and body (seed: `events.supermq.mqtt`, JSON; supermq:
//! `events.supermq.mqtt.client_<action>`, a protobuf `messaging.Message` as SuperMQ's publisher
//! sends it), persistent delivery; the channel is in confirm mode
//! and a batch counts as delivered once the broker confirmed every message. Connects lazily and
//! starts over with a new connection after any error.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};

use super::{ConnectionEvent, EventLayout, EventSink, SinkError};

const EXCHANGE: &str = "events";
const TIMEOUT: Duration = Duration::from_secs(5);
/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;
/// The `app_id` SuperMQ's RabbitMQ publisher stamps on its messages.
const SUPERMQ_APP_ID: &str = "supermq-publisher";

pub struct AmqpSink {
    url: String,
    layout: EventLayout,
    link: Option<(Connection, Channel)>,
}

impl AmqpSink {
    /// Checks the URL; connects on the first batch.
    pub fn new(url: &str, layout: EventLayout) -> Result<Self, String> {
        AMQPUri::from_str(url)?;
        Ok(AmqpSink {
            url: url.to_owned(),
            layout,
            link: None,
        })
    }

    fn error(message: impl std::fmt::Display) -> SinkError {
        SinkError {
            store: "amqp",
            message: message.to_string(),
        }
    }

    async fn channel(&mut self) -> Result<Channel, SinkError> {
        if let Some((conn, channel)) = &self.link {
            if conn.status().connected() && channel.status().connected() {
                return Ok(channel.clone());
            }
        }
        self.link = None;
        let setup = async {
            let conn = Connection::connect(&self.url, ConnectionProperties::default()).await?;
            let channel = conn.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
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
            Ok::<_, lapin::Error>((conn, channel))
        };
        let (conn, channel) = tokio::time::timeout(TIMEOUT, setup)
            .await
            .map_err(|_| Self::error("connect timed out"))?
            .map_err(Self::error)?;
        tracing::info!("connected to the RabbitMQ event store");
        self.link = Some((conn, channel.clone()));
        Ok(channel)
    }
}

#[async_trait]
impl EventSink for AmqpSink {
    fn name(&self) -> &'static str {
        "amqp"
    }

    async fn publish(&mut self, batch: &[ConnectionEvent]) -> Result<(), SinkError> {
        let channel = self.channel().await?;
        let layout = self.layout;
        let send = async {
            let mut properties = BasicProperties::default()
                .with_delivery_mode(PERSISTENT)
                .with_content_type(layout.content_type().into());
            if layout == EventLayout::Supermq {
                // As SuperMQ's publisher sets them (it sends an empty header table too).
                properties = properties
                    .with_app_id(SUPERMQ_APP_ID.into())
                    .with_headers(FieldTable::default());
            }
            // Publish the whole batch, then wait for the confirms: one round trip per batch.
            let mut confirms = Vec::with_capacity(batch.len());
            for event in batch.iter().filter(|e| layout.carries(e)) {
                let confirm = channel
                    .basic_publish(
                        EXCHANGE.into(),
                        layout.subject(event).as_str().into(),
                        BasicPublishOptions::default(),
                        &layout.body(event),
                        properties.clone(),
                    )
                    .await
                    .map_err(Self::error)?;
                confirms.push(confirm);
            }
            for confirm in confirms {
                match confirm.await.map_err(Self::error)? {
                    Confirmation::Ack(_) => {}
                    Confirmation::Nack(_) => return Err(Self::error("broker refused (nack)")),
                    Confirmation::NotRequested => {
                        return Err(Self::error("channel is not in confirm mode"))
                    }
                }
            }
            Ok(())
        };
        let result = tokio::time::timeout(TIMEOUT, send)
            .await
            .unwrap_or_else(|_| Err(Self::error("publish confirms timed out")));
        if result.is_err() {
            self.link = None;
        }
        result
    }
}
