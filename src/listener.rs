//! Accepts device connections and hands each to its own session task. Accepting never waits on
//! a device: handshakes and the CONNECT read happen in the session task, under timeouts.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use crate::session::{self, SessionContext};

/// Runs the MQTT-over-TCP accept loop until shutdown.
pub async fn serve_tcp(listener: TcpListener, ctx: Arc<SessionContext>, sessions: TaskTracker) {
    loop {
        let accepted = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Small packets must not wait for Nagle + delayed ACK; writes are coalesced.
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(%peer, error = %e, "TCP_NODELAY not set");
                }
                sessions.spawn(session::serve(ctx.clone(), stream, peer));
            }
            Err(e) => {
                // Typically out of file descriptors: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
