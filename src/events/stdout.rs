//! The default sink when no event store is configured: one JSON object per line on stdout,
//! which carries nothing else (logs go to stderr).

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;

use super::{ConnectionEvent, EventSink, SinkError};

#[derive(Debug)]
pub struct StdoutSink {
    out: tokio::io::Stdout,
}

impl StdoutSink {
    pub fn new() -> Self {
        StdoutSink {
            out: tokio::io::stdout(),
        }
    }
}

impl Default for StdoutSink {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl EventSink for StdoutSink {
    fn name(&self) -> &'static str {
        "stdout"
    }

    async fn publish(&mut self, batch: &[ConnectionEvent]) -> Result<(), SinkError> {
        let mut text = String::with_capacity(batch.len() * 100);
        for event in batch {
            text.push_str(&event.to_json());
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
