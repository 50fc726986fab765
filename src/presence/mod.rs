//! `mqtt-adapter presence`: who is online, rebuilt from the connection events every adapter
//! instance writes to the event stream. `source/` reads the stream (Redis or NATS) from its
//! start, `event` decodes entries, `state` pairs them per (instance, client id), `recent`
//! skips repeats of at-least-once delivery, `report` prints, `run` ties them together.

pub mod event;
pub mod recent;
pub mod report;
pub mod run;
pub mod source;
pub mod state;

pub use event::StreamEvent;
pub use run::{run, PresenceError};
pub use state::{Change, Presence};
