//! What a run measured: one `Report`, printed as a table for people or as JSON for scripts, and
//! the live progress line (drawn only on a terminal).

use std::io::IsTerminal;
use std::time::Duration;

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use super::options::MqttVersion;

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub samples: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Percentiles {
    /// From a histogram of nanoseconds; `None` when it holds no sample.
    pub fn from_ns(histogram: &Histogram<u64>) -> Option<Percentiles> {
        if histogram.is_empty() {
            return None;
        }
        let us = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
        Some(Percentiles {
            samples: histogram.len(),
            p50_us: us(0.5),
            p90_us: us(0.9),
            p99_us: us(0.99),
            p999_us: us(0.999),
            max_us: histogram.max() as f64 / 1000.0,
        })
    }
}

/// A histogram for nanosecond latencies from 1 µs to 60 s at 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3)
        .expect("constant histogram bounds are valid")
}

/// Every figure of one run. Counts are always present (zero is a result); rates and latencies only
/// where the scenario measures them.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: &'static str,
    pub broker: String,
    pub mqtt_version: MqttVersion,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qos: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_size: Option<usize>,
    pub clients: usize,
    /// Clients whose CONNECT got CONNACK success.
    pub connected: u64,
    /// Clients whose CONNECT the broker refused (bad credentials, ...).
    pub refused_connects: u64,
    /// Clients whose connection failed otherwise (socket, timeout, protocol), or ended early.
    pub failed_connects: u64,
    /// SUBSCRIBE filters the broker refused.
    pub refused_subscriptions: u64,
    /// PUBLISHes written by the publishers.
    pub sent: u64,
    /// PUBACK/PUBCOMP received (QoS 1/2).
    pub acknowledged: u64,
    /// Deliveries the subscribers should have had: sent x subscribers of each message.
    pub expected: u64,
    pub received: u64,
    /// expected - received, never negative (duplicates count in `received`).
    pub lost: u64,
    pub elapsed_s: f64,
    /// Deliveries per second, from the first publish to the last delivery.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msgs_per_s: Option<f64>,
    /// Accepted connects per second, from the first CONNECT to the last CONNACK.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connects_per_s: Option<f64>,
    /// Most clients connected at the same moment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_connected: Option<u64>,
    /// Publish -> deliver latency.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<Percentiles>,
    /// CONNECT -> CONNACK latency.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connack_latency: Option<Percentiles>,
}

impl Report {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a report of numbers and strings always serializes")
    }

    /// The human-readable final table.
    pub fn to_table(&self) -> String {
        let mut rows: Vec<(String, String)> = vec![
            ("scenario".into(), self.scenario.into()),
            (
                "broker".into(),
                format!(
                    "{} (MQTT {})",
                    self.broker,
                    match self.mqtt_version {
                        MqttVersion::V311 => "3.1.1",
                        MqttVersion::V5 => "5",
                    }
                ),
            ),
        ];
        if let Some(qos) = self.qos {
            rows.push(("qos".into(), qos.to_string()));
        }
        if let Some(size) = self.payload_size {
            rows.push(("payload".into(), format!("{size} B")));
        }
        rows.push(("clients".into(), self.clients.to_string()));
        rows.push(("connected".into(), self.connected.to_string()));
        rows.push(("refused connects".into(), self.refused_connects.to_string()));
        rows.push(("failed connects".into(), self.failed_connects.to_string()));
        if self.refused_subscriptions > 0 {
            rows.push((
                "refused subscriptions".into(),
                self.refused_subscriptions.to_string(),
            ));
        }
        if self.scenario != "connect-storm" {
            rows.push(("sent".into(), self.sent.to_string()));
            if self.qos.unwrap_or(0) > 0 {
                rows.push(("acknowledged".into(), self.acknowledged.to_string()));
            }
            rows.push(("expected".into(), self.expected.to_string()));
            rows.push(("received".into(), self.received.to_string()));
            rows.push(("lost".into(), self.lost.to_string()));
        }
        rows.push(("elapsed".into(), format!("{:.3} s", self.elapsed_s)));
        if let Some(rate) = self.msgs_per_s {
            rows.push(("throughput".into(), format!("{rate:.0} msgs/s")));
        }
        if let Some(rate) = self.connects_per_s {
            rows.push(("connect rate".into(), format!("{rate:.0} connects/s")));
        }
        if let Some(peak) = self.peak_connected {
            rows.push(("peak connected".into(), peak.to_string()));
        }
        for (name, p) in [
            ("latency", &self.latency),
            ("connack latency", &self.connack_latency),
        ] {
            if let Some(p) = p {
                rows.push((
                    name.into(),
                    format!(
                        "p50 {:.0} µs  p90 {:.0} µs  p99 {:.0} µs  p99.9 {:.0} µs  max {:.0} µs  ({} samples)",
                        p.p50_us, p.p90_us, p.p99_us, p.p999_us, p.max_us, p.samples
                    ),
                ));
            }
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        rows.iter()
            .map(|(k, v)| format!("{k:<width$}  {v}\n"))
            .collect()
    }
}

/// The live progress line: drawn on stderr when it is a terminal and no JSON was asked for.
pub fn progress(total: u64, unit: &str, json: bool) -> ProgressBar {
    let target = if !json && std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(total), target);
    if let Ok(style) = ProgressStyle::with_template(&format!(
        "{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {unit}  {{msg}}"
    )) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
