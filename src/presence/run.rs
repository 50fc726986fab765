//! The `presence` command's loop: replay the backlog, then print the state once (`--once`),
//! redraw a live table (a terminal), or print one line per change (a pipe, or `--json`).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use super::report::{change_line, table, write_snapshot_json};
use super::source::{self, Entry, EventSource, SourceError};
use super::state::{Change, Presence};
use crate::config::PresenceArgs;

/// Rows the live table shows; `--json` lists everything.
const TABLE_ROWS: usize = 40;
/// Least time between two redraws of the live table.
const REDRAW_EVERY: Duration = Duration::from_millis(250);

/// Why `presence` stopped before it was done.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("cannot write to stdout: {0}")]
    Output(#[from] std::io::Error),
}

/// How the state is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Once { json: bool },
    Table,
    Lines { json: bool },
}

/// Runs the command until the backlog is printed (`--once`) or until SIGINT/SIGTERM.
pub async fn run(args: &PresenceArgs) -> Result<(), PresenceError> {
    let mode = match (args.once, args.json) {
        (true, json) => Mode::Once { json },
        (false, false) if std::io::stdout().is_terminal() => Mode::Table,
        (false, json) => Mode::Lines { json },
    };
    if let Mode::Once { .. } = mode {
        return replay(args, mode, &mut None).await;
    }
    let mut screen = (mode == Mode::Table).then(Screen::enter);
    // A signal ends following as a normal exit; dropping the screen then restores the terminal.
    tokio::select! {
        result = replay(args, mode, &mut screen) => result,
        _ = stop_signal() => Ok(()),
    }
}

/// Reads the backlog, prints it as `mode` says, then follows (unless `--once`).
async fn replay(
    args: &PresenceArgs,
    mode: Mode,
    screen: &mut Option<Screen>,
) -> Result<(), PresenceError> {
    let mut source = source::open(args.es_url.as_deref(), args.event_layout).await?;
    let mut presence = Presence::new();
    let started = Instant::now();
    let mut entries = Vec::new();
    loop {
        entries.clear();
        let done = source.backlog(&mut entries).await?;
        apply(&mut presence, &mut entries);
        if let Some(screen) = screen.as_mut() {
            screen.draw_throttled(&format!(
                "reading the stream: {} events…\n",
                presence.events
            ))?;
        }
        if done {
            break;
        }
    }
    tracing::debug!(events = presence.events, elapsed = ?started.elapsed(), "backlog read");

    let mut out = std::io::stdout().lock();
    match mode {
        Mode::Once { json: true } => {
            let mut out = std::io::BufWriter::with_capacity(256 * 1024, out);
            write_snapshot_json(&presence, &mut out)?;
            out.flush()?;
            return Ok(());
        }
        Mode::Once { json: false } => {
            write!(out, "{}", table(&presence, usize::MAX))?;
            return Ok(());
        }
        Mode::Lines { json } => {
            // Start from the whole picture: everyone online now, as changes from nobody.
            for (key, online) in presence.online() {
                let change = Change::Sessions {
                    key: key.clone(),
                    sessions: online.sessions,
                    at: online.since,
                    reason: None,
                };
                writeln!(out, "{}", change_line(&change, json))?;
            }
            out.flush()?;
        }
        Mode::Table => {}
    }
    drop(out);
    if let Mode::Lines { .. } = mode {
        presence.record_changes();
    }
    follow(&mut *source, &mut presence, mode, screen, &mut entries).await
}

async fn follow(
    source: &mut dyn EventSource,
    presence: &mut Presence,
    mode: Mode,
    screen: &mut Option<Screen>,
    entries: &mut Vec<Entry>,
) -> Result<(), PresenceError> {
    // Whether the table on screen is older than the state (redraws are throttled).
    let mut stale = true;
    loop {
        if let Some(screen) = screen.as_mut().filter(|_| stale) {
            stale = !screen.draw_throttled(&table(presence, TABLE_ROWS))?;
        }
        entries.clear();
        source.follow(entries).await?;
        stale |= !entries.is_empty();
        apply(presence, entries);
        let changes = presence.take_changes();
        if let Mode::Lines { json } = mode {
            let mut out = std::io::stdout().lock();
            for change in &changes {
                writeln!(out, "{}", change_line(change, json))?;
            }
            out.flush()?;
        }
    }
}

fn apply(presence: &mut Presence, entries: &mut Vec<Entry>) {
    for entry in entries.drain(..) {
        match entry {
            Ok(event) => presence.apply(event),
            Err(bad) => {
                if presence.malformed == 0 {
                    tracing::warn!(
                        "skipping a stored entry that is not a connection event: {}",
                        bad.0.escape_debug()
                    );
                }
                presence.malformed();
            }
        }
    }
}

async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The terminal while the live table is shown: the alternate screen, cursor hidden, both
/// undone on drop.
struct Screen {
    last_draw: Option<Instant>,
}

impl Screen {
    fn enter() -> Screen {
        print!("\x1b[?1049h\x1b[?25l");
        Screen { last_draw: None }
    }

    /// Redraws in place, at most every [`REDRAW_EVERY`]; `false` if it was too early to.
    fn draw_throttled(&mut self, text: &str) -> std::io::Result<bool> {
        if self.last_draw.is_some_and(|t| t.elapsed() < REDRAW_EVERY) {
            return Ok(false);
        }
        self.last_draw = Some(Instant::now());
        let mut frame = String::with_capacity(text.len() + 64);
        frame.push_str("\x1b[H");
        for line in text.lines() {
            frame.push_str(line);
            // Clear what a longer previous frame left on this line.
            frame.push_str("\x1b[K\n");
        }
        frame.push_str("\x1b[J");
        let mut out = std::io::stdout().lock();
        out.write_all(frame.as_bytes())?;
        out.flush()?;
        Ok(true)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        print!("\x1b[?25h\x1b[?1049l");
        let _ = std::io::stdout().flush();
    }
}
