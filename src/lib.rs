//! MQTT adapter for SuperMQ-family IoT platforms: devices connect over MQTT 3.1.1 or 5; every
//! CONNECT is authenticated, every PUBLISH and SUBSCRIBE authorized against the platform's
//! channels; messages are routed by the in-process broker core; every session produces exactly
//! one `connect` and one `disconnect` event.

pub mod admin;
pub mod auth;
pub mod bench;
pub mod bridge;
pub mod broker;
pub mod clock;
pub mod config;
pub mod events;
pub mod hooks;
pub mod http;
pub mod listener;
pub mod log;
pub mod metrics;
pub mod presence;
pub mod revocation;
pub mod server;
pub mod session;
pub mod state;
pub mod topic;

pub use config::Config;
pub use server::{Server, StartError};
