//! One benchmark client over rumqttc, the same shape for MQTT 3.1.1 and MQTT 5: a `Handle` that
//! sends requests and an `EventStream` that drives the connection and reports what the scenarios
//! count (CONNACK, deliveries, publish acknowledgements, SUBACK codes).

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::Packet as V5Packet;
use rumqttc::v5::mqttbytes::QoS as V5QoS;
use rumqttc::{Outgoing, Packet as V4Packet, QoS as V4QoS};

use super::options::{Connection, MqttVersion};

/// What the scenarios need to know about the traffic of one connection.
#[derive(Debug)]
pub enum ClientEvent {
    /// CONNACK success.
    Connected,
    /// A PUBLISH delivered to this client.
    Delivered(Bytes),
    /// A PUBLISH of ours left the client (QoS 0: that is all it gets).
    Sent,
    /// PUBACK (QoS 1) or PUBCOMP (QoS 2) for one of ours.
    Acknowledged,
    /// SUBACK; `granted` is false if the broker refused a filter.
    Subscribed { granted: bool },
    /// Anything the scenarios do not count (PINGRESP, PUBREL, ...).
    Other,
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The broker answered CONNACK with a failure code.
    #[error("connection refused by the broker: {0}")]
    Refused(String),
    /// Anything else: socket closed, timeout, protocol error.
    #[error("{0}")]
    Failed(String),
}

/// Sends requests to the connection's event loop.
#[derive(Clone)]
pub enum Handle {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// Drives one connection; must be polled for anything to happen. One per client, so the size
/// difference between the variants costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub enum EventStream {
    V4(rumqttc::EventLoop),
    V5(rumqttc::v5::EventLoop),
}

/// Request queue per client: small, so a fast publisher feels the socket's back-pressure.
const REQUEST_QUEUE: usize = 64;

/// Builds a client for `client_id` as `conn` says (not connected until the stream is polled).
pub fn new_client(
    conn: &Connection,
    client_id: &str,
    credentials: Option<(&str, &str)>,
    payload_size: usize,
) -> (Handle, EventStream) {
    let max_packet = (payload_size + 1024).max(1024 * 1024);
    match conn.version {
        MqttVersion::V311 => {
            let mut options = rumqttc::MqttOptions::new(client_id, conn.host.clone(), conn.port);
            options
                .set_keep_alive(Duration::from_secs(conn.keep_alive))
                .set_clean_session(true)
                .set_max_packet_size(max_packet, max_packet)
                .set_inflight(conn.inflight);
            if let Some((user, pass)) = credentials {
                options.set_credentials(user, pass);
            }
            if let Some(ca) = &conn.tls_ca {
                options.set_transport(rumqttc::Transport::tls(ca.clone(), None, None));
            }
            let (client, eventloop) = rumqttc::AsyncClient::new(options, REQUEST_QUEUE);
            (Handle::V4(client), EventStream::V4(eventloop))
        }
        MqttVersion::V5 => {
            let mut options =
                rumqttc::v5::MqttOptions::new(client_id, conn.host.clone(), conn.port);
            options
                .set_keep_alive(Duration::from_secs(conn.keep_alive))
                .set_clean_start(true)
                .set_max_packet_size(Some(max_packet as u32))
                .set_outgoing_inflight_upper_limit(conn.inflight);
            if let Some((user, pass)) = credentials {
                options.set_credentials(user, pass);
            }
            if let Some(ca) = &conn.tls_ca {
                options.set_transport(rumqttc::Transport::tls(ca.clone(), None, None));
            }
            let (client, eventloop) = rumqttc::v5::AsyncClient::new(options, REQUEST_QUEUE);
            (Handle::V5(client), EventStream::V5(eventloop))
        }
    }
}

fn v4_qos(qos: u8) -> V4QoS {
    match qos {
        0 => V4QoS::AtMostOnce,
        1 => V4QoS::AtLeastOnce,
        _ => V4QoS::ExactlyOnce,
    }
}

fn v5_qos(qos: u8) -> V5QoS {
    match qos {
        0 => V5QoS::AtMostOnce,
        1 => V5QoS::AtLeastOnce,
        _ => V5QoS::ExactlyOnce,
    }
}

impl Handle {
    /// Queues a PUBLISH; waits while the request queue is full.
    pub async fn publish(&self, topic: &str, qos: u8, payload: Bytes) -> Result<(), ClientError> {
        let result = match self {
            Handle::V4(c) => c
                .publish_bytes(topic, v4_qos(qos), false, payload)
                .await
                .map_err(|e| e.to_string()),
            Handle::V5(c) => c
                .publish_bytes(topic, v5_qos(qos), false, payload)
                .await
                .map_err(|e| e.to_string()),
        };
        result.map_err(ClientError::Failed)
    }

    pub async fn subscribe(&self, filter: &str, qos: u8) -> Result<(), ClientError> {
        let result = match self {
            Handle::V4(c) => c
                .subscribe(filter, v4_qos(qos))
                .await
                .map_err(|e| e.to_string()),
            Handle::V5(c) => c
                .subscribe(filter, v5_qos(qos))
                .await
                .map_err(|e| e.to_string()),
        };
        result.map_err(ClientError::Failed)
    }

    /// Queues a DISCONNECT; the stream ends once it is sent.
    pub async fn disconnect(&self) {
        // A client whose connection already ended has nothing to disconnect.
        let _ = match self {
            Handle::V4(c) => c.disconnect().await.map_err(|e| e.to_string()),
            Handle::V5(c) => c.disconnect().await.map_err(|e| e.to_string()),
        };
    }
}

impl EventStream {
    /// The next event of this connection. Returns `Ok(None)` once our DISCONNECT has been sent.
    pub async fn next(&mut self) -> Result<Option<ClientEvent>, ClientError> {
        match self {
            EventStream::V4(eventloop) => match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(packet)) => Ok(Some(match packet {
                    V4Packet::ConnAck(_) => ClientEvent::Connected,
                    V4Packet::Publish(p) => ClientEvent::Delivered(p.payload),
                    V4Packet::PubAck(_) | V4Packet::PubComp(_) => ClientEvent::Acknowledged,
                    V4Packet::SubAck(ack) => ClientEvent::Subscribed {
                        granted: ack
                            .return_codes
                            .iter()
                            .all(|code| matches!(code, rumqttc::SubscribeReasonCode::Success(_))),
                    },
                    _ => ClientEvent::Other,
                })),
                Ok(rumqttc::Event::Outgoing(Outgoing::Disconnect)) => Ok(None),
                Ok(rumqttc::Event::Outgoing(Outgoing::Publish(_))) => Ok(Some(ClientEvent::Sent)),
                Ok(rumqttc::Event::Outgoing(_)) => Ok(Some(ClientEvent::Other)),
                Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                    Err(ClientError::Refused(format!("{code:?}")))
                }
                Err(e) => Err(ClientError::Failed(e.to_string())),
            },
            EventStream::V5(eventloop) => match eventloop.poll().await {
                Ok(rumqttc::v5::Event::Incoming(packet)) => Ok(Some(match packet {
                    V5Packet::ConnAck(_) => ClientEvent::Connected,
                    V5Packet::Publish(p) => ClientEvent::Delivered(p.payload),
                    V5Packet::PubAck(_) | V5Packet::PubComp(_) => ClientEvent::Acknowledged,
                    V5Packet::SubAck(ack) => ClientEvent::Subscribed {
                        granted: ack.return_codes.iter().all(|code| {
                            matches!(
                                code,
                                rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
                            )
                        }),
                    },
                    _ => ClientEvent::Other,
                })),
                Ok(rumqttc::v5::Event::Outgoing(Outgoing::Disconnect)) => Ok(None),
                Ok(rumqttc::v5::Event::Outgoing(Outgoing::Publish(_))) => {
                    Ok(Some(ClientEvent::Sent))
                }
                Ok(rumqttc::v5::Event::Outgoing(_)) => Ok(Some(ClientEvent::Other)),
                Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
                    Err(ClientError::Refused(format!("{code:?}")))
                }
                Err(e) => Err(ClientError::Failed(e.to_string())),
            },
        }
    }

    /// Polls until CONNACK: `Ok` on success, the refusal or failure otherwise.
    pub async fn connected(&mut self) -> Result<(), ClientError> {
        loop {
            match self.next().await? {
                Some(ClientEvent::Connected) => return Ok(()),
                Some(_) => continue,
                None => return Err(ClientError::Failed("disconnected before CONNACK".into())),
            }
        }
    }
}
