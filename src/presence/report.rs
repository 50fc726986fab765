//! How the presence state is shown: the JSON object for scripts, the table and summary for a
//! terminal, and one line per change for a pipe.

use std::fmt::Write as _;
use std::io::Write;
use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;
use serde_json::json;

use super::state::{Change, Presence};

/// Writes `{"anomalies": [...], "events": {...}, "instances": {...}, "online": [...]}` as it
/// goes, one online entry at a time: a large answer is never built in memory first.
pub fn write_snapshot_json(presence: &Presence, out: &mut impl Write) -> std::io::Result<()> {
    #[derive(Serialize)]
    struct OnlineEntry<'a> {
        client_id: &'a str,
        instance: &'a str,
        online_since: i64,
        sessions: u32,
    }
    // Keys in the order serde_json writes an object's (sorted), as before streaming.
    // The small parts go through `Value`, which sorts their keys too.
    let small =
        |value: Result<serde_json::Value, serde_json::Error>| value.map_err(std::io::Error::from);
    out.write_all(b"{\"anomalies\":")?;
    let anomalies = small(serde_json::to_value(
        presence.anomalies().collect::<Vec<_>>(),
    ))?;
    serde_json::to_writer(&mut *out, &anomalies)?;
    out.write_all(b",\"events\":")?;
    let events = json!({
        "malformed": presence.malformed,
        "read": presence.events,
        "repeats": presence.repeats,
    });
    serde_json::to_writer(&mut *out, &events)?;
    out.write_all(b",\"instances\":")?;
    let instances = small(serde_json::to_value(presence.instances()))?;
    serde_json::to_writer(&mut *out, &instances)?;
    out.write_all(b",\"online\":[")?;
    for (i, (key, online)) in presence.online().into_iter().enumerate() {
        if i > 0 {
            out.write_all(b",")?;
        }
        let entry = OnlineEntry {
            client_id: &key.client_id,
            instance: &key.instance,
            online_since: online.since,
            sessions: online.sessions,
        };
        serde_json::to_writer(&mut *out, &entry)?;
    }
    out.write_all(b"]")?;
    out.write_all(b"}\n")
}

/// Unix nanoseconds as RFC 3339 UTC, to the second.
pub fn timestamp(ns: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).unwrap_or(0));
    humantime::format_rfc3339_seconds(at).to_string()
}

/// The online table (at most `max_rows` rows), then the summary.
pub fn table(presence: &Presence, max_rows: usize) -> String {
    let online = presence.online();
    let rows: Vec<[String; 4]> = online
        .iter()
        .take(max_rows)
        .map(|(key, o)| {
            [
                display_name(&key.client_id),
                display_name(&key.instance),
                timestamp(o.since),
                o.sessions.to_string(),
            ]
        })
        .collect();
    let headers = ["CLIENT ID", "INSTANCE", "ONLINE SINCE", "SESSIONS"];
    let mut widths = headers.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; 4]| {
        let _ = writeln!(
            out,
            "{:<w0$}  {:<w1$}  {:<w2$}  {:>w3$}",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        );
    };
    line(headers);
    for row in &rows {
        line([&row[0], &row[1], &row[2], &row[3]]);
    }
    if online.len() > rows.len() {
        let _ = writeln!(
            out,
            "… and {} more (--json lists all)",
            online.len() - rows.len()
        );
    }
    out.push('\n');
    out.push_str(&summary(presence));
    out
}

/// The summary: totals, then one line per instance.
pub fn summary(presence: &Presence) -> String {
    let stats = presence.instances().values();
    let (online, sessions, connects, disconnects, unmatched) =
        stats.fold((0, 0, 0, 0, 0), |t, s| {
            (
                t.0 + s.online,
                t.1 + s.sessions,
                t.2 + s.connects,
                t.3 + s.disconnects,
                t.4 + s.unmatched_disconnects,
            )
        });
    let mut out = format!(
        "online now: {online} clients, {sessions} sessions | seen: {connects} connects, \
         {disconnects} disconnects | anomalies: {unmatched} disconnects without a connect"
    );
    if presence.repeats > 0 || presence.malformed > 0 {
        let _ = write!(
            out,
            " | {} repeated events skipped, {} malformed entries",
            presence.repeats, presence.malformed
        );
    }
    out.push('\n');
    for (instance, s) in presence.instances() {
        let _ = write!(
            out,
            "  {}: {} online ({} sessions), {} connects, {} disconnects",
            display_name(instance),
            s.online,
            s.sessions,
            s.connects,
            s.disconnects
        );
        if s.unmatched_disconnects > 0 {
            let _ = write!(out, ", {} without a connect", s.unmatched_disconnects);
        }
        if s.crash_recoveries > 0 {
            let _ = write!(
                out,
                ", {} crash recoveries closed {} sessions",
                s.crash_recoveries, s.closed_by_recovery
            );
        }
        if let Some(takeovers) = s.disconnect_reasons.get("takeover") {
            let _ = write!(out, ", {takeovers} takeovers");
        }
        let _ = writeln!(out, ", last event {}", timestamp(s.last_event_at));
    }
    if let Some(last) = presence.anomalies().last() {
        let _ = writeln!(
            out,
            "  latest anomaly: disconnect of {} on {} at {} with no open session",
            display_name(&last.client_id),
            display_name(&last.instance),
            timestamp(last.occurred_at)
        );
    }
    out
}

/// One line for one change: JSON or text.
pub fn change_line(change: &Change, as_json: bool) -> String {
    if as_json {
        let value = match change {
            Change::Sessions {
                key,
                sessions,
                at,
                reason,
            } => json!({
                "change": if *sessions == 0 { "offline" } else { "online" },
                "client_id": key.client_id,
                "instance": key.instance,
                "sessions": sessions,
                "at": at,
                "reason": reason,
            }),
            Change::Recovered {
                instance,
                closed,
                at,
            } => json!({
                "change": "crash_recovery",
                "instance": instance,
                "closed_sessions": closed,
                "at": at,
            }),
            Change::Anomaly(anomaly) => json!({
                "change": "anomaly",
                "client_id": anomaly.client_id,
                "instance": anomaly.instance,
                "at": anomaly.occurred_at,
                "reason": anomaly.reason,
            }),
        };
        return value.to_string();
    }
    match change {
        Change::Sessions {
            key,
            sessions,
            at,
            reason,
        } => {
            let state = if *sessions == 0 { "offline" } else { "online " };
            let mut line = format!(
                "{} {state} {} on {} ({sessions} sessions)",
                timestamp(*at),
                display_name(&key.client_id),
                display_name(&key.instance)
            );
            if let Some(reason) = reason {
                let _ = write!(line, " reason {reason}");
            }
            line
        }
        Change::Recovered {
            instance,
            closed,
            at,
        } => format!(
            "{} restart {} came back after a crash: {closed} sessions closed",
            timestamp(*at),
            display_name(instance)
        ),
        Change::Anomaly(a) => format!(
            "{} anomaly disconnect of {} on {} with no open session{}",
            timestamp(a.occurred_at),
            display_name(&a.client_id),
            display_name(&a.instance),
            a.reason
                .as_deref()
                .map(|r| format!(" (reason {r})"))
                .unwrap_or_default()
        ),
    }
}

/// The empty name (the default instance, anonymous clients) shown so it can be seen.
fn display_name(name: &str) -> String {
    if name.is_empty() {
        "\"\"".to_owned()
    } else {
        name.chars().filter(|c| !c.is_control()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventType;
    use crate::presence::event::StreamEvent;

    fn presence() -> Presence {
        let mut p = Presence::new();
        let event = |client: &str, instance: &str, event_type, at| StreamEvent {
            client_id: client.into(),
            event_type,
            instance: instance.into(),
            occurred_at: at,
            reason: None,
        };
        p.apply(event(
            "c1",
            "a",
            EventType::Connect,
            1_700_000_000_000_000_000,
        ));
        p.apply(event(
            "c2",
            "",
            EventType::Connect,
            1_700_000_001_000_000_000,
        ));
        p.apply(event(
            "ghost",
            "a",
            EventType::Disconnect,
            1_700_000_002_000_000_000,
        ));
        p
    }

    #[test]
    fn json_lists_the_online_set_and_the_instances() {
        let mut out = Vec::new();
        write_snapshot_json(&presence(), &mut out).unwrap();
        assert!(out.ends_with(b"}\n"));
        let value: serde_json::Value = serde_json::from_slice(&out).expect("one JSON object");
        let online = value["online"].as_array().expect("online array");
        assert_eq!(online.len(), 2);
        assert_eq!(online[0]["instance"], "");
        assert_eq!(online[1]["client_id"], "c1");
        assert_eq!(online[1]["online_since"], 1_700_000_000_000_000_000i64);
        assert_eq!(value["instances"]["a"]["unmatched_disconnects"], 1);
        assert_eq!(value["anomalies"][0]["client_id"], "ghost");
    }

    #[test]
    fn table_shows_rows_summary_and_anomalies() {
        // c1's online since appears in its row only.
        assert!(table(&presence(), 2).contains("2023-11-14T22:13:20Z"));
        let text = table(&presence(), 1);
        assert!(!text.contains("2023-11-14T22:13:20Z"), "{text}");
        assert!(text.contains("… and 1 more"), "{text}");
        assert!(text.contains("online now: 2 clients, 2 sessions"), "{text}");
        assert!(text.contains("1 without a connect"), "{text}");
        assert!(
            text.contains("latest anomaly: disconnect of ghost"),
            "{text}"
        );
    }
}
