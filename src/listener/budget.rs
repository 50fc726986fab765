//! The bytes a socket may send before its CONNECT is accepted. Over TCP and TLS the session reads
//! the CONNECT frame itself and bounds it (`SMQ_MQTT_ADAPTER_MAX_CONNECT_SIZE`); over WebSocket
//! the library below it buffers a whole message (up to the maximum packet size) before the session
//! sees a byte, so the raw stream under it is bounded instead, until the session lifts the bound
//! once the device is authenticated.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Lifts a socket's pre-authentication bound (the session holds it in its `ConnectionInfo`).
#[derive(Debug, Clone, Default)]
pub struct ConnectBudget(Arc<AtomicBool>);

impl ConnectBudget {
    /// The device is authenticated: its reads are no longer bounded.
    pub fn lift(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn lifted(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// A stream that fails its reads once more than `limit` bytes came in before its budget was
/// lifted. A read may overshoot by at most the caller's buffer, so what is held stays near the
/// limit.
pub struct Budgeted<S> {
    inner: S,
    budget: ConnectBudget,
    read: usize,
    limit: usize,
    /// Counted once when the bound is hit.
    hit: Option<prometheus::IntCounter>,
}

impl<S> Budgeted<S> {
    pub fn new(inner: S, limit: usize, hit: prometheus::IntCounter) -> (Self, ConnectBudget) {
        let budget = ConnectBudget::default();
        let stream = Budgeted {
            inner,
            budget: budget.clone(),
            read: 0,
            limit,
            hit: Some(hit),
        };
        (stream, budget)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Budgeted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.limit == usize::MAX || this.budget.lifted() {
            this.limit = usize::MAX;
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        if this.read > this.limit {
            return Poll::Ready(Err(too_much(this.limit)));
        }
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        this.read += buf.filled().len() - before;
        if this.read > this.limit {
            if let Some(hit) = this.hit.take() {
                hit.inc();
            }
            return Poll::Ready(Err(too_much(this.limit)));
        }
        Poll::Ready(Ok(()))
    }
}

fn too_much(limit: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("more than {limit} bytes before the CONNECT was accepted (SMQ_MQTT_ADAPTER_MAX_CONNECT_SIZE)"),
    )
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Budgeted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn reads_fail_beyond_the_limit_until_lifted() {
        let counter = prometheus::IntCounter::new("hits", "hits").expect("counter");
        let (mut device, adapter) = tokio::io::duplex(64 * 1024);
        let (mut stream, budget) = Budgeted::new(adapter, 100, counter.clone());
        device.write_all(&[1; 100]).await.expect("write");
        let mut buf = [0u8; 100];
        stream
            .read_exact(&mut buf)
            .await
            .expect("within the budget");
        device.write_all(&[1; 1]).await.expect("write");
        assert!(stream.read(&mut buf).await.is_err(), "one byte too many");
        assert_eq!(counter.get(), 1);

        let counter = prometheus::IntCounter::new("hits", "hits").expect("counter");
        let (mut device, adapter) = tokio::io::duplex(64 * 1024);
        let (mut stream, budget2) = Budgeted::new(adapter, 10, counter.clone());
        budget2.lift();
        device.write_all(&[1; 1000]).await.expect("write");
        let mut big = [0u8; 1000];
        stream.read_exact(&mut big).await.expect("lifted");
        assert_eq!(counter.get(), 0);
        drop(budget);
    }
}
