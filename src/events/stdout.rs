//! The default sink when no event store is configured: one JSON object per line on stdout (the
//! [`EventLayout`]'s JSON: the seed's, or SuperMQ's `data` object), which carries nothing else
//! (logs go to stderr).

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;

use super::{ConnectionEvent, EventLayout, EventSink, SinkError};

#[derive(Debug)]
pub struct StdoutSink {
    out: tokio::io::Stdout,
    layout: EventLayout,
}

impl StdoutSink {
    pub fn new(layout: EventLayout) -> Self {
        StdoutSink {
            out: tokio::io::stdout(),
            layout,
        }
    }
}

impl Default for StdoutSink {
    fn default() -> Self {
        Self::new(EventLayout::Seed)
    }
}

#[async_trait]
impl EventSink for StdoutSink {
    fn name(&self) -> &'static str {
        "stdout"
    }

    async fn publish(&mut self, batch: &[ConnectionEvent]) -> Result<(), SinkError> {
        let mut text = String::with_capacity(batch.len() * 100);
        for event in batch.iter().filter(|e| self.layout.carries(e)) {
            text.push_str(&self.layout.line(event));
            text.push('\n');
        }
        let io = |e: std::io::Error| SinkError {
            store: "stdout",
            message: e.to_string(),
        };
        self.out.write_all(text.as_bytes()).await.map_err(io)?;
        self.out.flush().await.map_err(io)
    }
}
