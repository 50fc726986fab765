//! The adapter binary: reads the configuration, serves until SIGTERM/SIGINT, then drains.

use std::process::ExitCode;

use mqtt_adapter::auth::StaticRegistry;
use mqtt_adapter::{Config, Server};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

// rumqttd gives every link queues sized for hundreds of packets that idle devices never fill;
// jemalloc keeps untouched pages of those allocations out of RSS and returns freed ones.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::from_env_and_args() {
        Ok(config) => config,
        Err(e) => e.exit(),
    };
    // The router logs every link at info; keep it quiet unless asked for by name.
    let directives = if config.log_level.contains("rumqttd") {
        config.log_level.clone()
    } else {
        format!("{},rumqttd=warn", config.log_level)
    };
    let filter = match EnvFilter::try_new(&directives) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "error: SMQ_MQTT_ADAPTER_LOG_LEVEL: {:?} is not a log filter: {e}",
                config.log_level
            );
            return ExitCode::from(2);
        }
    };
    // stdout carries connection events only: logs go to stderr.
    // rumqttd's router opens ERROR-level spans for every publish (formatting the topic); no filter
    // level turns them off, and under load they cost the router thread ~40% of its time (perf,
    // benches/RESULTS.md). Its events still pass the filter; its spans never do.
    let router_spans_off = tracing_subscriber::filter::filter_fn(|meta| {
        !(meta.is_span() && meta.target().starts_with("rumqttd"))
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .finish()
        .with(router_spans_off)
        .init();

    let server = match Server::start(&config).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if server.uses_demo_registry() {
        eprintln!(
            "No SMQ_MQTT_ADAPTER_CLIENTS_FILE given: serving the built-in demo registry. Try:"
        );
        for line in StaticRegistry::demo_commands(server.mqtt_addr().port()) {
            eprintln!("  {line}");
        }
    }

    if let Err(e) = shutdown_signal().await {
        eprintln!("error: cannot listen for signals: {e}");
        return ExitCode::from(1);
    }
    tracing::info!("shutting down");
    if server.shutdown().await {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn shutdown_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
