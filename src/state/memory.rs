//! The `memory` state backend: nothing is kept beyond the broker core's own memory, so a restart
//! forgets every retained message (the adapter's behaviour before the state store).

use std::sync::Arc;

use super::{StateError, StateStore, StateTicket};
use crate::broker::Message;

#[derive(Debug, Default, Clone, Copy)]
pub struct MemoryState;

impl StateStore for MemoryState {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn load_retained(&self) -> Result<Vec<Arc<Message>>, StateError> {
        Ok(Vec::new())
    }

    fn put_retained(&self, _message: &Arc<Message>) -> StateTicket {
        StateTicket::done()
    }

    fn clear_retained(&self, _topic: &str) -> StateTicket {
        StateTicket::done()
    }

    fn close(&self) {}
}
