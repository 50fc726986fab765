//! The adapter binary: reads the configuration, serves until SIGTERM/SIGINT, then drains.
//! `mqtt-adapter presence` instead shows who is online, from the event stream.

use std::process::ExitCode;

use mqtt_adapter::auth::StaticRegistry;
use mqtt_adapter::config::{Invocation, PresenceArgs};
use mqtt_adapter::Server;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

// jemalloc keeps untouched pages out of RSS and returns freed ones to the system.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's compiled-in options (`_RJEM_MALLOC_CONF` in the environment still overrides them).
/// Freed pages are returned after 1 s by a background thread: without it jemalloc purges only
/// while the process allocates, so the queues of a traffic burst stayed resident once the
/// adapter went quiet (benches/RESULTS.md, "Broker core": +38 MiB after a burst, +4.7 MiB with
/// this).
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);
// SAFETY: a pointer to an immutable, 'static C string; jemalloc only reads it.
unsafe impl Sync for MallocConf {}
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: MallocConf = MallocConf(c"background_thread:true,dirty_decay_ms:1000".as_ptr());

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Invocation::from_env_and_args() {
        Ok(Invocation::Adapter(config)) => config,
        Ok(Invocation::Presence(args)) => return presence(args).await,
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

    for (old, new) in
        mqtt_adapter::config::renamed_supermq_vars(|name| std::env::var_os(name).is_some())
    {
        tracing::warn!("{old} is SuperMQ's name and is not read here: set {new}");
    }
    // Before the listeners open: a SIGTERM as soon as a port accepts is a clean shutdown, not
    // the default action (killed by the signal, nothing flushed).
    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot listen for signals: {e}");
            return ExitCode::from(1);
        }
    };
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

    while signals.next().await == Signal::Reload {
        tracing::info!("SIGHUP: reloading the clients file and the TLS certificate");
        server.reload().await;
    }
    server.begin_drain();
    let grace = config.drain_grace;
    if !grace.is_zero() {
        tracing::info!(
            seconds = grace.as_secs_f64(),
            "draining: /health is 503; sessions close after the grace period or a second signal"
        );
        let _ = tokio::time::timeout(grace, signals.next_stop()).await;
    }
    tracing::info!("shutting down");
    if server.shutdown().await {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// `mqtt-adapter presence`: warnings to stderr, the state to stdout.
async fn presence(args: PresenceArgs) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new("warn"))
        .with_writer(std::io::stderr)
        .init();
    match mqtt_adapter::presence::run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that went away (`| head`) is a normal end.
        Err(mqtt_adapter::presence::PresenceError::Output(e))
            if e.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// SIGTERM and SIGINT, either of which starts (or hurries) the shutdown; SIGHUP, which reloads.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    Stop,
    Reload,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
            _ = self.hup.recv() => Signal::Reload,
        }
    }

    async fn next_stop(&mut self) {
        while self.next().await == Signal::Reload {
            tracing::info!("SIGHUP while draining: ignored");
        }
    }
}
