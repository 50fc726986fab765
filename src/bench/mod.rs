//! `mqtt-bench`: load and latency scenarios against any MQTT broker (this adapter, Mosquitto,
//! rumqttd), used by `benches/compare` and by operators sizing a deployment. Every client is a
//! rumqttc connection on one tokio runtime; refused connects and lost messages are counted and
//! reported, never hidden.

pub mod client;
pub mod options;
pub mod payload;
pub mod report;
pub mod storm;
pub mod traffic;

pub use options::{Cli, OptionError, Scenario};
pub use report::Report;

/// Runs the chosen scenario to its end and returns what it measured.
pub async fn run(scenario: &Scenario) -> Result<Report, OptionError> {
    match scenario {
        Scenario::FanIn(t) => traffic::run_throughput("fan-in", t).await,
        Scenario::FanOut(t) => traffic::run_throughput("fan-out", t).await,
        Scenario::Pairs(t) => traffic::run_throughput("pairs", t).await,
        Scenario::Latency(l) => traffic::run_latency(l).await,
        Scenario::ConnectStorm(s) => storm::run(s).await,
    }
}
