//! connect-storm: N clients CONNECT with credentials at a target rate (with a bound on handshakes
//! in flight), each holds its connection for a while, then disconnects. Counts accepted, refused
//! and failed connects and times CONNECT -> CONNACK.
//!
//! MQTT 3.1.1 and 5 over TCP use a lean client (rumqttc's packet codecs on a plain socket, no
//! event loop): a storm is many short sessions, and rumqttc's event loop cost the load generator
//! about 46 µs of CPU per connect, more than the broker under test on a shared machine. TLS goes
//! through rumqttc's client. `--source` binds each lean client's socket to a source address of
//! its own (round-robin), so a storm is not bounded by one address's ephemeral ports.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::client::{new_client, ClientError, EventStream, Handle};
use super::options::{Connection, OptionError, Storm};
use super::report::{latency_histogram, progress, Percentiles, Report};

const CONNECT_WAIT: Duration = Duration::from_secs(30);

enum Outcome {
    /// Accepted after this many ns; CONNACK arrived at `at_ns` after the run's start.
    Accepted {
        latency_ns: u64,
        at_ns: u64,
    },
    Refused,
    Failed,
}

pub async fn run(storm: &Storm) -> Result<Report, OptionError> {
    if storm.clients == 0 {
        return Err(OptionError::Zero("--clients"));
    }
    if storm.concurrency == 0 {
        return Err(OptionError::Zero("--concurrency"));
    }
    let mut conn = Connection::resolve(&storm.common, 100)?;
    if storm.source.is_some() && conn.tls_ca.is_some() {
        return Err(OptionError::SourceWithTls);
    }
    conn.sources = storm.source.clone();
    let bar = progress(storm.clients as u64, "connects", storm.common.json);
    let handshakes = Arc::new(Semaphore::new(storm.concurrency));
    let live = Arc::new(AtomicU64::new(0));
    let peak = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut pace = (storm.rate > 0).then(|| {
        let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / storm.rate as f64));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        t
    });
    let mut clients = JoinSet::new();
    for n in 0..storm.clients {
        if let Some(pace) = pace.as_mut() {
            pace.tick().await;
        }
        let permit = match handshakes.clone().acquire_owned().await {
            Ok(permit) => permit,
            Err(_) => break,
        };
        let (conn, live, peak, hold, bar) = (
            conn.clone(),
            live.clone(),
            peak.clone(),
            storm.hold,
            bar.clone(),
        );
        clients.spawn(async move {
            let (began, connected) = connect(&conn, n).await;
            let connack = Instant::now();
            drop(permit);
            bar.inc(1);
            let mut client = match connected {
                Ok(client) => client,
                Err(outcome) => return outcome,
            };
            let outcome = Outcome::Accepted {
                latency_ns: connack.duration_since(began).as_nanos() as u64,
                at_ns: connack.duration_since(start).as_nanos() as u64,
            };
            let now = live.fetch_add(1, Ordering::Relaxed) + 1;
            peak.fetch_max(now, Ordering::Relaxed);
            let kept = client.hold(hold, conn.keep_alive).await;
            live.fetch_sub(1, Ordering::Relaxed);
            if !kept {
                // The broker closed an accepted connection during the hold.
                return Outcome::Failed;
            }
            client.disconnect().await;
            outcome
        });
    }
    let (mut accepted, mut refused, mut failed, mut last_ns) = (0u64, 0u64, 0u64, 0u64);
    let mut connack = latency_histogram();
    while let Some(result) = clients.join_next().await {
        match result {
            Ok(Outcome::Accepted { latency_ns, at_ns }) => {
                accepted += 1;
                connack.saturating_record(latency_ns);
                last_ns = last_ns.max(at_ns);
            }
            Ok(Outcome::Refused) => refused += 1,
            Ok(Outcome::Failed) | Err(_) => failed += 1,
        }
    }
    bar.finish_and_clear();
    let window = Duration::from_nanos(last_ns);
    Ok(Report {
        scenario: "connect-storm",
        broker: format!("{}:{}", conn.host, conn.port),
        mqtt_version: conn.version,
        qos: None,
        payload_size: None,
        clients: storm.clients,
        connected: accepted,
        refused_connects: refused,
        failed_connects: failed,
        refused_subscriptions: 0,
        sent: 0,
        acknowledged: 0,
        expected: 0,
        received: 0,
        lost: 0,
        elapsed_s: start.elapsed().as_secs_f64(),
        connects_per_s: (accepted > 0 && !window.is_zero())
            .then(|| accepted as f64 / window.as_secs_f64()),
        msgs_per_s: None,
        peak_connected: Some(peak.load(Ordering::Relaxed)),
        latency: None,
        connack_latency: Percentiles::from_ns(&connack),
    })
}

/// One storm client once its CONNECT was accepted.
enum StormClient {
    /// TCP: the lean client.
    Lean(raw::Session),
    /// TLS: rumqttc's client (boxed: a held lean session stays small).
    Full(Box<(Handle, EventStream)>),
}

/// Connects client `n`: when the CONNECT began (the client built) and the accepted client, or
/// the outcome of a refused or failed connect.
async fn connect(conn: &Connection, n: usize) -> (Instant, Result<StormClient, Outcome>) {
    let client_id = conn.client_id("storm", n);
    let credentials = conn.credentials_for(n);
    if conn.tls_ca.is_none() {
        let began = Instant::now();
        let connected = match raw::connect(conn, n, &client_id, credentials).await {
            Ok(raw::Connack::Accepted(session)) => Ok(StormClient::Lean(session)),
            Ok(raw::Connack::Refused) => Err(Outcome::Refused),
            Err(_) => Err(Outcome::Failed),
        };
        return (began, connected);
    }
    let (handle, mut stream) = new_client(conn, &client_id, credentials, 64);
    let began = Instant::now();
    let connected = match tokio::time::timeout(CONNECT_WAIT, stream.connected()).await {
        Ok(Ok(())) => Ok(StormClient::Full(Box::new((handle, stream)))),
        Ok(Err(ClientError::Refused(_))) => Err(Outcome::Refused),
        Ok(Err(ClientError::Failed(_))) | Err(_) => Err(Outcome::Failed),
    };
    (began, connected)
}

impl StormClient {
    /// Keeps the connection served (pings) for `hold`; false when the broker closed it.
    async fn hold(&mut self, hold: Duration, keep_alive: u64) -> bool {
        match self {
            StormClient::Lean(session) => session.hold(hold, keep_alive).await,
            StormClient::Full(full) => tokio::time::timeout(hold, async {
                let stream = &mut full.1;
                loop {
                    match stream.next().await {
                        Ok(Some(_)) => continue,
                        _ => return,
                    }
                }
            })
            .await
            .is_err(),
        }
    }

    /// DISCONNECT, then waits (at most 2 s) for the broker to close.
    async fn disconnect(self) {
        match self {
            StormClient::Lean(session) => session.disconnect().await,
            StormClient::Full(full) => {
                let (handle, mut stream) = *full;
                handle.disconnect().await;
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while let Ok(Some(_)) = stream.next().await {}
                })
                .await;
            }
        }
    }
}

/// The lean storm client (MQTT 3.1.1 and 5 over TCP): CONNECT, CONNACK, hold (answering nothing
/// but keeping the connection alive with PINGREQ), DISCONNECT.
mod raw {
    use std::net::SocketAddr;
    use std::time::Duration;

    use bytes::BytesMut;
    use rumqttc::mqttbytes::v4::{self, Packet};
    use rumqttc::mqttbytes::Error as CodecError;
    use rumqttc::v5::mqttbytes::v5 as mqtt5;
    use rumqttc::v5::mqttbytes::Error as Codec5Error;
    use rumqttc::ConnectReturnCode;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpSocket, TcpStream};

    use super::{Connection, CONNECT_WAIT};
    use crate::bench::options::MqttVersion;

    pub enum Connack {
        Accepted(Session),
        Refused,
    }

    pub struct Session {
        stream: TcpStream,
        buf: BytesMut,
    }

    /// Connects client `n` and reads the CONNACK (within [`CONNECT_WAIT`]); an error is a
    /// failed connect.
    pub async fn connect(
        conn: &Connection,
        n: usize,
        client_id: &str,
        credentials: Option<(&str, &str)>,
    ) -> std::io::Result<Connack> {
        tokio::time::timeout(CONNECT_WAIT, handshake(conn, n, client_id, credentials))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no CONNACK"))?
    }

    /// A TCP connection to the broker, from client `n`'s source address if `--source` gave any.
    async fn open(conn: &Connection, n: usize) -> std::io::Result<TcpStream> {
        let Some(source) = conn.sources.as_ref().map(|s| s.for_client(n)) else {
            return TcpStream::connect((conn.host.as_str(), conn.port)).await;
        };
        let broker = tokio::net::lookup_host((conn.host.as_str(), conn.port))
            .await?
            .find(|a| a.is_ipv4() == source.is_ipv4())
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::AddrNotAvailable,
                    format!("{} has no address of the family of {source}", conn.host),
                )
            })?;
        let socket = if source.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        bind_port_at_connect(&socket);
        socket.bind(SocketAddr::new(source, 0))?;
        socket.connect(broker).await
    }

    /// Lets the kernel choose the source port at connect time (per source, destination pair)
    /// rather than at bind time, where every bound socket needs a port of its own.
    #[cfg(target_os = "linux")]
    fn bind_port_at_connect(socket: &TcpSocket) {
        use std::os::fd::AsRawFd;
        let on: libc::c_int = 1;
        // SAFETY: a valid socket descriptor and a c_int option value of the size given. A
        // failure only loses the optimisation: the bind then picks the port.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn bind_port_at_connect(_: &TcpSocket) {}

    async fn handshake(
        conn: &Connection,
        n: usize,
        client_id: &str,
        credentials: Option<(&str, &str)>,
    ) -> std::io::Result<Connack> {
        let mut stream = open(conn, n).await?;
        stream.set_nodelay(true)?;
        let keep_alive = u16::try_from(conn.keep_alive).unwrap_or(u16::MAX);
        let mut out = BytesMut::with_capacity(64);
        match conn.version {
            MqttVersion::V311 => {
                let mut connect = v4::Connect::new(client_id);
                connect.keep_alive = keep_alive;
                connect.clean_session = true;
                if let Some((user, pass)) = credentials {
                    connect.set_login(user, pass);
                }
                connect.write(&mut out).map_err(invalid)?;
            }
            MqttVersion::V5 => {
                let connect = mqtt5::Connect {
                    keep_alive,
                    client_id: client_id.to_owned(),
                    clean_start: true,
                    properties: None,
                };
                let login = credentials.map(|(user, pass)| mqtt5::Login::new(user, pass));
                connect.write(&None, &login, &mut out).map_err(invalid)?;
            }
        }
        stream.write_all(&out).await?;
        let mut buf = BytesMut::with_capacity(64);
        loop {
            // Some(accepted) once a CONNACK is whole; None while more bytes are needed.
            let connack = match conn.version {
                MqttVersion::V311 => match v4::read(&mut buf, 1024) {
                    Ok(Packet::ConnAck(ack)) => Some(ack.code == ConnectReturnCode::Success),
                    Ok(other) => return Err(invalid(format!("{other:?} before CONNACK"))),
                    Err(CodecError::InsufficientBytes(_)) => None,
                    Err(e) => return Err(invalid(e)),
                },
                MqttVersion::V5 => match mqtt5::Packet::read(&mut buf, Some(64 * 1024)) {
                    Ok(mqtt5::Packet::ConnAck(ack)) => {
                        Some(ack.code == mqtt5::ConnectReturnCode::Success)
                    }
                    Ok(other) => return Err(invalid(format!("{other:?} before CONNACK"))),
                    Err(Codec5Error::InsufficientBytes(_)) => None,
                    Err(e) => return Err(invalid(e)),
                },
            };
            match connack {
                Some(true) => return Ok(Connack::Accepted(Session { stream, buf })),
                Some(false) => return Ok(Connack::Refused),
                None => {
                    if stream.read_buf(&mut buf).await? == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                }
            }
        }
    }

    fn invalid(e: impl ToString) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
    }

    impl Session {
        /// Keeps the connection for `hold` (PINGREQ every `keep_alive` seconds); false when the
        /// broker closed it meanwhile.
        pub async fn hold(&mut self, hold: Duration, keep_alive: u64) -> bool {
            if hold.is_zero() {
                return true;
            }
            let period = Duration::from_secs(keep_alive.max(1));
            let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            let served = async {
                loop {
                    tokio::select! {
                        _ = ping.tick() => {
                            if self.stream.write_all(&[0xC0, 0x00]).await.is_err() {
                                return;
                            }
                        }
                        read = self.stream.read_buf(&mut self.buf) => {
                            if !matches!(read, Ok(n) if n > 0) {
                                return;
                            }
                            // PINGRESP and anything else the broker sends is not counted.
                            self.buf.clear();
                        }
                    }
                }
            };
            tokio::time::timeout(hold, served).await.is_err()
        }

        /// DISCONNECT, then waits (at most 2 s) for the broker to close.
        pub async fn disconnect(mut self) {
            if self.stream.write_all(&[0xE0, 0x00]).await.is_err() {
                return;
            }
            let _ = self.stream.shutdown().await;
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while matches!(self.stream.read_buf(&mut self.buf).await, Ok(n) if n > 0) {
                    self.buf.clear();
                }
            })
            .await;
        }
    }
}
