//! Real MQTT clients (rumqttc 3.1.1 and 5) driven on a task, with the waits the tests need.
//!
//! Each client's event loop runs on its own task and stops at its first error, so a connection the
//! adapter closes shows up as one error and is never silently reconnected.

use std::collections::VecDeque;

use rumqttc::v5;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::adapter::WAIT;

/// Options for a 3.1.1 client with credentials and a 30 s keep-alive.
pub fn v4_options(port: u16, mqtt_id: &str, user: &str, pass: &str) -> rumqttc::MqttOptions {
    let mut opts = rumqttc::MqttOptions::new(mqtt_id, "127.0.0.1", port);
    opts.set_credentials(user, pass)
        .set_keep_alive(std::time::Duration::from_secs(30));
    opts
}

/// Options for an MQTT 5 client with credentials and a 30 s keep-alive.
pub fn v5_options(port: u16, mqtt_id: &str, user: &str, pass: &str) -> v5::MqttOptions {
    let mut opts = v5::MqttOptions::new(mqtt_id, "127.0.0.1", port);
    opts.set_credentials(user, pass)
        .set_keep_alive(std::time::Duration::from_secs(30));
    opts
}

/// A connected MQTT 3.1.1 client.
pub struct V4Client {
    pub client: rumqttc::AsyncClient,
    pub connack: rumqttc::ConnAck,
    events: mpsc::UnboundedReceiver<Result<rumqttc::Event, String>>,
    backlog: VecDeque<rumqttc::Event>,
    task: JoinHandle<()>,
}

impl V4Client {
    /// Connects and waits for the CONNACK; a refused or failed CONNECT is returned as the error.
    pub async fn try_connect(
        opts: rumqttc::MqttOptions,
    ) -> Result<V4Client, rumqttc::ConnectionError> {
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 64);
        let connack = tokio::time::timeout(WAIT, async {
            loop {
                if let rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack)) =
                    eventloop.poll().await?
                {
                    return Ok::<_, rumqttc::ConnectionError>(ack);
                }
            }
        })
        .await
        .expect("no CONNACK within the wait")?;
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(event) => {
                        if tx.send(Ok(event)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                }
            }
        });
        Ok(V4Client {
            client,
            connack,
            events,
            backlog: VecDeque::new(),
            task,
        })
    }

    /// Connects with credentials and asserts success.
    pub async fn connect(port: u16, mqtt_id: &str, user: &str, pass: &str) -> V4Client {
        V4Client::connect_with(v4_options(port, mqtt_id, user, pass)).await
    }

    pub async fn connect_with(opts: rumqttc::MqttOptions) -> V4Client {
        let id = opts.client_id();
        V4Client::try_connect(opts)
            .await
            .unwrap_or_else(|e| panic!("3.1.1 client {id:?} failed to connect: {e}"))
    }

    /// The first event (backlog first) matching `pred`; others are kept for later waits.
    pub async fn wait_for<T>(&mut self, mut pred: impl FnMut(&rumqttc::Event) -> Option<T>) -> T {
        if let Some(at) = self.backlog.iter().position(|e| pred(e).is_some()) {
            let event = self.backlog.remove(at).expect("index in range");
            return pred(&event).expect("matched before");
        }
        loop {
            match tokio::time::timeout(WAIT, self.events.recv()).await {
                Err(_) => panic!("3.1.1 client: awaited event did not come within {WAIT:?}"),
                Ok(None) => panic!("3.1.1 client: event loop gone"),
                Ok(Some(Err(e))) => panic!("3.1.1 client: connection ended: {e}"),
                Ok(Some(Ok(event))) => match pred(&event) {
                    Some(found) => return found,
                    None => self.backlog.push_back(event),
                },
            }
        }
    }

    /// Subscribes and asserts the SUBACK grants every filter.
    pub async fn subscribe(&mut self, filter: &str, qos: rumqttc::QoS) {
        self.client
            .subscribe(filter, qos)
            .await
            .expect("queue SUBSCRIBE");
        let codes = self
            .wait_for(|e| match e {
                rumqttc::Event::Incoming(rumqttc::Packet::SubAck(ack)) => {
                    Some(ack.return_codes.clone())
                }
                _ => None,
            })
            .await;
        assert!(
            codes
                .iter()
                .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_))),
            "SUBACK for {filter:?}: {codes:?}"
        );
    }

    /// Publishes and, for QoS 1/2, waits until the adapter acknowledged it (PUBACK / PUBCOMP).
    pub async fn publish(&mut self, topic: &str, qos: rumqttc::QoS, retain: bool, payload: &[u8]) {
        self.client
            .publish(topic, qos, retain, payload.to_vec())
            .await
            .expect("queue PUBLISH");
        match qos {
            rumqttc::QoS::AtMostOnce => {
                self.wait_for(|e| {
                    matches!(e, rumqttc::Event::Outgoing(rumqttc::Outgoing::Publish(_)))
                        .then_some(())
                })
                .await
            }
            rumqttc::QoS::AtLeastOnce => {
                self.wait_for(|e| {
                    matches!(e, rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))).then_some(())
                })
                .await
            }
            rumqttc::QoS::ExactlyOnce => {
                self.wait_for(|e| {
                    matches!(e, rumqttc::Event::Incoming(rumqttc::Packet::PubComp(_))).then_some(())
                })
                .await
            }
        }
    }

    /// The next PUBLISH the adapter delivers.
    pub async fn next_publish(&mut self) -> rumqttc::Publish {
        self.wait_for(|e| match e {
            rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => Some(p.clone()),
            _ => None,
        })
        .await
    }

    /// Sends DISCONNECT and waits until the event loop wrote it.
    pub async fn disconnect(mut self) {
        self.client.disconnect().await.expect("queue DISCONNECT");
        self.wait_for(|e| {
            matches!(e, rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)).then_some(())
        })
        .await;
        // Let the event loop run until the adapter closes the socket, so the DISCONNECT is flushed.
        let _ = tokio::time::timeout(WAIT, async {
            while let Some(Ok(_)) = self.events.recv().await {}
        })
        .await;
    }

    /// Asserts the adapter closes the connection (the event loop reports an error) within the wait.
    pub async fn expect_closed(&mut self) -> String {
        loop {
            match tokio::time::timeout(WAIT, self.events.recv()).await {
                Err(_) => {
                    panic!("3.1.1 client: the adapter did not close the connection within {WAIT:?}")
                }
                Ok(None) => return "event loop gone".into(),
                Ok(Some(Err(e))) => return e,
                Ok(Some(Ok(event))) => self.backlog.push_back(event),
            }
        }
    }

    /// Drops the connection without DISCONNECT (the socket is closed by dropping the event loop).
    pub fn drop_abruptly(self) {
        self.task.abort();
    }
}

impl Drop for V4Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A connected MQTT 5 client.
pub struct V5Client {
    pub client: v5::AsyncClient,
    pub connack: v5::mqttbytes::v5::ConnAck,
    events: mpsc::UnboundedReceiver<Result<v5::Event, String>>,
    backlog: VecDeque<v5::Event>,
    task: JoinHandle<()>,
}

type V5Packet = v5::mqttbytes::v5::Packet;

impl V5Client {
    /// Waits (bounded) until the connection ends and returns the error the event loop reported;
    /// a server DISCONNECT shows up here (rumqttc reports it as `ServerDisconnect`).
    pub async fn expect_closed(&mut self) -> String {
        loop {
            match tokio::time::timeout(WAIT, self.events.recv()).await {
                Err(_) => panic!(
                    "MQTT 5 client: the adapter did not close the connection within {WAIT:?}"
                ),
                Ok(None) => return "event loop gone".into(),
                Ok(Some(Err(e))) => return e,
                Ok(Some(Ok(event))) => self.backlog.push_back(event),
            }
        }
    }

    pub async fn try_connect(opts: v5::MqttOptions) -> Result<V5Client, v5::ConnectionError> {
        let (client, mut eventloop) = v5::AsyncClient::new(opts, 64);
        let connack = tokio::time::timeout(WAIT, async {
            loop {
                if let v5::Event::Incoming(V5Packet::ConnAck(ack)) = eventloop.poll().await? {
                    return Ok::<_, v5::ConnectionError>(ack);
                }
            }
        })
        .await
        .expect("no CONNACK within the wait")?;
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(event) => {
                        if tx.send(Ok(event)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                }
            }
        });
        Ok(V5Client {
            client,
            connack,
            events,
            backlog: VecDeque::new(),
            task,
        })
    }

    pub async fn connect(port: u16, mqtt_id: &str, user: &str, pass: &str) -> V5Client {
        V5Client::connect_with(v5_options(port, mqtt_id, user, pass)).await
    }

    pub async fn connect_with(opts: v5::MqttOptions) -> V5Client {
        let id = opts.client_id();
        V5Client::try_connect(opts)
            .await
            .unwrap_or_else(|e| panic!("MQTT 5 client {id:?} failed to connect: {e}"))
    }

    pub async fn wait_for<T>(&mut self, mut pred: impl FnMut(&v5::Event) -> Option<T>) -> T {
        if let Some(at) = self.backlog.iter().position(|e| pred(e).is_some()) {
            let event = self.backlog.remove(at).expect("index in range");
            return pred(&event).expect("matched before");
        }
        loop {
            match tokio::time::timeout(WAIT, self.events.recv()).await {
                Err(_) => panic!("MQTT 5 client: awaited event did not come within {WAIT:?}"),
                Ok(None) => panic!("MQTT 5 client: event loop gone"),
                Ok(Some(Err(e))) => panic!("MQTT 5 client: connection ended: {e}"),
                Ok(Some(Ok(event))) => match pred(&event) {
                    Some(found) => return found,
                    None => self.backlog.push_back(event),
                },
            }
        }
    }

    pub async fn subscribe(&mut self, filter: &str, qos: v5::mqttbytes::QoS) {
        self.client
            .subscribe(filter, qos)
            .await
            .expect("queue SUBSCRIBE");
        let codes = self
            .wait_for(|e| match e {
                v5::Event::Incoming(V5Packet::SubAck(ack)) => Some(ack.return_codes.clone()),
                _ => None,
            })
            .await;
        assert!(
            codes
                .iter()
                .all(|c| matches!(c, v5::mqttbytes::v5::SubscribeReasonCode::Success(_))),
            "SUBACK for {filter:?}: {codes:?}"
        );
    }

    /// Publishes (with optional user properties) and waits for the adapter's ack at QoS 1/2.
    pub async fn publish(
        &mut self,
        topic: &str,
        qos: v5::mqttbytes::QoS,
        retain: bool,
        payload: &[u8],
        user_properties: &[(&str, &str)],
    ) {
        if user_properties.is_empty() {
            self.client
                .publish(topic, qos, retain, payload.to_vec())
                .await
                .expect("queue PUBLISH");
        } else {
            let properties = v5::mqttbytes::v5::PublishProperties {
                user_properties: user_properties
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            };
            self.client
                .publish_with_properties(topic, qos, retain, payload.to_vec(), properties)
                .await
                .expect("queue PUBLISH");
        }
        match qos {
            v5::mqttbytes::QoS::AtMostOnce => {
                self.wait_for(|e| {
                    matches!(e, v5::Event::Outgoing(rumqttc::Outgoing::Publish(_))).then_some(())
                })
                .await
            }
            v5::mqttbytes::QoS::AtLeastOnce => {
                self.wait_for(|e| {
                    matches!(e, v5::Event::Incoming(V5Packet::PubAck(_))).then_some(())
                })
                .await
            }
            v5::mqttbytes::QoS::ExactlyOnce => {
                self.wait_for(|e| {
                    matches!(e, v5::Event::Incoming(V5Packet::PubComp(_))).then_some(())
                })
                .await
            }
        }
    }

    pub async fn next_publish(&mut self) -> v5::mqttbytes::v5::Publish {
        self.wait_for(|e| match e {
            v5::Event::Incoming(V5Packet::Publish(p)) => Some(p.clone()),
            _ => None,
        })
        .await
    }

    pub async fn disconnect(mut self) {
        self.client.disconnect().await.expect("queue DISCONNECT");
        self.wait_for(|e| {
            matches!(e, v5::Event::Outgoing(rumqttc::Outgoing::Disconnect)).then_some(())
        })
        .await;
        let _ = tokio::time::timeout(WAIT, async {
            while let Some(Ok(_)) = self.events.recv().await {}
        })
        .await;
    }
}

impl Drop for V5Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A running `mosquitto_sub -C 1` that has its SUBACK, so a publish made now reaches it.
pub struct MosquittoSub {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl MosquittoSub {
    /// Starts `mosquitto_sub` (`version` is `mqttv311` or `mqttv5`) and waits for its SUBACK.
    pub async fn start(
        port: u16,
        version: &str,
        mqtt_id: &str,
        user: &str,
        pass: &str,
        topic: &str,
    ) -> MosquittoSub {
        use tokio::io::AsyncBufReadExt;
        // stdbuf: mosquitto_sub block-buffers stdout into a pipe, which would hide the SUBACK line.
        let mut child = tokio::process::Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub"])
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", version])
            .args(["-i", mqtt_id, "-u", user, "-P", pass, "-t", topic])
            .args(["-q", "1", "-C", "1", "-W", "10", "-d"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn mosquitto_sub");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        tokio::time::timeout(WAIT, async {
            loop {
                match lines.next_line().await {
                    Ok(Some(line)) if line.contains("SUBACK") => return,
                    Ok(Some(_)) => continue,
                    _ => panic!("mosquitto_sub ended before its SUBACK"),
                }
            }
        })
        .await
        .expect("mosquitto_sub got no SUBACK within the wait");
        MosquittoSub { child, lines }
    }

    /// Waits for `payload` as a printed message line, then for a successful exit (`-C 1`).
    pub async fn expect_message(mut self, payload: &str) {
        tokio::time::timeout(WAIT, async {
            loop {
                match self.lines.next_line().await {
                    Ok(Some(line)) if line == payload => return,
                    Ok(Some(_)) => continue,
                    _ => panic!("mosquitto_sub ended without printing {payload:?}"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("mosquitto_sub did not receive {payload:?} within the wait"));
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("mosquitto_sub did not exit after its message")
            .expect("wait mosquitto_sub");
        assert!(status.success(), "mosquitto_sub exit status {status}");
    }
}

/// Runs `mosquitto_pub` once and asserts it succeeded.
#[allow(clippy::too_many_arguments)] // mirrors the CLI flags one to one
pub async fn mosquitto_pub(
    port: u16,
    version: &str,
    mqtt_id: &str,
    user: &str,
    pass: &str,
    topic: &str,
    payload: &str,
    qos: u8,
) {
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", version])
            .args([
                "-i", mqtt_id, "-u", user, "-P", pass, "-t", topic, "-m", payload,
            ])
            .args(["-q", &qos.to_string()])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("mosquitto_pub did not finish within the wait")
    .expect("run mosquitto_pub");
    assert!(
        out.status.success(),
        "mosquitto_pub failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs the paho-mqtt (Python) script `tests/<script>` with `args`, within `wait`, and asserts
/// it succeeded; `what` names it in the failure, with the script's output.
pub async fn run_paho(script: &str, args: &[&str], wait: std::time::Duration, what: &str) {
    let path = format!("{}/tests/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::time::timeout(
        wait,
        tokio::process::Command::new("python3")
            .arg(&path)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("paho-mqtt {what}: did not finish within {wait:?}"))
    .expect("run python3");
    assert!(
        out.status.success(),
        "paho-mqtt {what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
