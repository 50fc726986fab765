//! rumqttd 0.20 as shipped: its own MQTT 3.1.1 and 5 listeners and its static username/password
//! map, nothing of ours in front. The comparison baseline for `benches/compare`.
//!
//! Usage: rumqttd-plain <v4-port> <v5-port> <username> <password>

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [v4_port, v5_port, username, password] = args.as_slice() else {
        eprintln!("usage: rumqttd-plain <v4-port> <v5-port> <username> <password>");
        return ExitCode::from(2);
    };
    // Segments sized as the adapter sizes its router (1 MiB x 4 per filter), and room for the
    // 10,000-idle-connection measurement. rumqttd refuses keep-alive 0: the load tool uses 60 s.
    let config = format!(
        r#"
id = 0
[router]
max_connections = 20010
max_outgoing_packet_count = 200
max_segment_size = 1048576
max_segment_count = 4

[v4.1]
name = "v4"
listen = "127.0.0.1:{v4_port}"
next_connection_delay_ms = 0
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 1048576
max_inflight_count = 100
auth = {{ {username:?} = {password:?} }}

[v5.1]
name = "v5"
listen = "127.0.0.1:{v5_port}"
next_connection_delay_ms = 0
[v5.1.connections]
connection_timeout_ms = 60000
max_payload_size = 1048576
max_inflight_count = 100
auth = {{ {username:?} = {password:?} }}
"#
    );
    let config: rumqttd::Config = match toml::from_str(&config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: bad rumqttd config (check the ports): {e}");
            return ExitCode::from(2);
        }
    };
    let mut broker = rumqttd::Broker::new(config);
    match broker.start() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: rumqttd stopped: {e}");
            ExitCode::from(1)
        }
    }
}
