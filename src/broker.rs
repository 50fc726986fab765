//! The embedded broker: rumqttd's router running in its own thread, and the links sessions use
//! to drive it. No rumqttd listener is ever opened; the adapter's sessions speak MQTT to devices.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{Disconnect, DisconnectReasonCode, Packet};
use rumqttd::{Notification, Router, RouterConfig};

type LinkFactory =
    dyn Fn(&str, bool) -> Result<(LinkTx, LinkRx, Notification), LinkRefused> + Send + Sync;

/// The router did not accept a link (it is gone, or refused the id).
#[derive(Debug, thiserror::Error)]
#[error("router refused the link: {0}")]
pub struct LinkRefused(String);

/// Inbound packets a new link's queue holds before it has to grow.
const LINK_QUEUE_START: usize = 8;

/// The router plus the bookkeeping that keeps its per-client state bounded.
pub struct Broker {
    connect: Box<LinkFactory>,
    names: Mutex<RouterNames>,
}

/// Router-side names. Clean sessions borrow a name from a pool (`c:<n>`), so the router's
/// never-freed per-name state is bounded by the peak number of concurrent sessions instead of
/// growing with every client id ever seen. Persistent sessions need a stable name: `p:<id>`.
#[derive(Default)]
struct RouterNames {
    free: Vec<u32>,
    next: u32,
    /// Client ids with persistent state in the router, with a generation bumped by every
    /// persistent session, so an expiry scheduled by an older session is recognised as stale.
    persistent: HashMap<String, u64>,
    generation: u64,
}

/// A router name held by a session, returned to the pool when released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouterName {
    Pooled(u32),
    Persistent(String),
}

impl RouterName {
    /// The id the router knows the link by. The router refuses ids containing `+ $ # /`, which
    /// MQTT client identifiers may hold, so those are percent-encoded.
    pub fn as_router_id(&self) -> String {
        const RESERVED: &AsciiSet = &CONTROLS.add(b'+').add(b'$').add(b'#').add(b'/').add(b'%');
        match self {
            RouterName::Pooled(n) => format!("c:{n}"),
            RouterName::Persistent(id) => format!("p:{}", utf8_percent_encode(id, RESERVED)),
        }
    }
}

/// Sizing of the router. Every subscription filter that carries traffic holds up to
/// `segment_size × segment_count` bytes of recent messages; a subscriber further behind than that
/// on one filter loses the oldest.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub max_connections: usize,
    pub segment_size: usize,
    pub segment_count: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            max_connections: 100_000,
            segment_size: 8 * 1024 * 1024,
            segment_count: 4,
        }
    }
}

impl Broker {
    /// Spawns the router thread.
    pub fn start(config: &BrokerConfig) -> Arc<Broker> {
        let router = Router::new(
            0,
            RouterConfig {
                max_connections: config.max_connections,
                max_outgoing_packet_count: 200,
                max_segment_size: config.segment_size,
                max_segment_count: config.segment_count,
                custom_segment: None,
                initialized_filters: None,
                shared_subscriptions_strategy: Default::default(),
            },
        );
        let router_tx = router.spawn();
        let connect = move |name: &str, clean: bool| {
            LinkBuilder::new(name, router_tx.clone())
                .clean_session(clean)
                .build()
                .map_err(|e: LinkError| LinkRefused(e.to_string()))
        };
        Arc::new(Broker {
            connect: Box::new(connect),
            names: Mutex::new(RouterNames::default()),
        })
    }

    /// Picks the router name for a session of MQTT client `client_id`. A clean session also
    /// discards what a previous persistent session of that client left in the router.
    pub fn name_for(&self, client_id: &str, clean: bool) -> RouterName {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        if !clean {
            names.generation += 1;
            let generation = names.generation;
            names.persistent.insert(client_id.to_owned(), generation);
            return RouterName::Persistent(client_id.to_owned());
        }
        if names.persistent.remove(client_id).is_some() {
            // Connecting this name with clean = true makes the router drop the old state.
            return RouterName::Persistent(client_id.to_owned());
        }
        match names.free.pop() {
            Some(n) => RouterName::Pooled(n),
            None => {
                names.next += 1;
                RouterName::Pooled(names.next)
            }
        }
    }

    /// The generation of `client_id`'s persistent state, if it has any.
    pub fn persistent_generation(&self, client_id: &str) -> Option<u64> {
        let names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        names.persistent.get(client_id).copied()
    }

    /// Discards `client_id`'s persistent router state if it is still of `generation`: the
    /// router drops a session's state when a clean link takes its name.
    pub async fn expire(self: &Arc<Self>, client_id: &str, generation: u64) {
        {
            let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
            if names.persistent.get(client_id) != Some(&generation) {
                return;
            }
            names.persistent.remove(client_id);
        }
        match self
            .link(&RouterName::Persistent(client_id.to_owned()), true)
            .await
        {
            Ok((mut link_tx, _link_rx, _ack)) => {
                let disconnect = Packet::Disconnect(
                    Disconnect {
                        reason_code: DisconnectReasonCode::NormalDisconnection,
                    },
                    None,
                );
                if let Err(e) = link_tx.send(disconnect).await {
                    tracing::warn!(client_id, error = %e, "expired session not released");
                }
            }
            Err(e) => tracing::warn!(client_id, error = %e, "expired session not discarded"),
        }
    }

    /// Returns a name to the pool once its link has been disconnected from the router.
    pub fn release(&self, name: RouterName) {
        if let RouterName::Pooled(n) = name {
            self.names
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .free
                .push(n);
        }
    }

    /// Registers a link with the router. Blocks until the router answers, so it runs on the
    /// blocking pool, never on an async worker.
    pub async fn link(
        self: &Arc<Self>,
        name: &RouterName,
        clean: bool,
    ) -> Result<(LinkTx, LinkRx, Notification), LinkRefused> {
        let broker = self.clone();
        let id = name.as_router_id();
        tokio::task::spawn_blocking(move || {
            let (link_tx, link_rx, ack) = (broker.connect)(&id, clean)?;
            // rumqttd sizes every link's inbound queue for 200 packets (~78 KB); most devices
            // never queue more than a few, and the queue grows again when one does.
            link_tx.buffer().shrink_to(LINK_QUEUE_START);
            Ok((link_tx, link_rx, ack))
        })
        .await
        .unwrap_or_else(|e| Err(LinkRefused(e.to_string())))
    }

    /// Registers a link under a fixed router id (for the bus bridge, not for device sessions);
    /// like [`Broker::link`], the blocking registration runs on the blocking pool.
    pub async fn named_link(
        self: &Arc<Self>,
        id: &str,
    ) -> Result<(LinkTx, LinkRx, Notification), LinkRefused> {
        let broker = self.clone();
        let id = id.to_owned();
        tokio::task::spawn_blocking(move || (broker.connect)(&id, true))
            .await
            .unwrap_or_else(|e| Err(LinkRefused(e.to_string())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_ids_avoid_reserved_characters() {
        let id = RouterName::Persistent("a/b+#$%".into()).as_router_id();
        assert!(!"+$#/".chars().any(|c| id.contains(c)), "{id}");
        assert_ne!(
            id,
            RouterName::Persistent("a%2Fb+#$%".into()).as_router_id()
        );
    }
}
