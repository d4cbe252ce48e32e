//! `runner logs …`: the operator's log maintenance (retention by hand).

use clap::Subcommand;

use super::{render, Output};
use crate::app::App;
use crate::error::Result;
use crate::logs::lines::human_size;

#[derive(Subcommand, Debug)]
pub enum LogsCommand {
    /// Delete the log lines of changes that ended longer ago than DURATION and give the space back; the changes,
    /// their steps and their other events are kept. `RUNNER_LOG_RETENTION` does the same automatically.
    Prune {
        /// e.g. `30d`, `12h`, `2w`.
        #[arg(long, value_parser = crate::logs::limits::parse_duration)]
        older_than: std::time::Duration,
    },
}

pub async fn logs(app: &App, cmd: LogsCommand, out: Output) -> Result<()> {
    match cmd {
        LogsCommand::Prune { older_than } => {
            let pruned = crate::logs::retention::prune_older_than(&app.store, older_than).await?;
            match out {
                Output::Json => render::json(&serde_json::json!({
                    "changes": pruned.changes,
                    "chunks": pruned.chunks,
                    "log_bytes": pruned.text_bytes,
                    "store_bytes_before": pruned.store_bytes_before,
                    "store_bytes_after": pruned.store_bytes_after,
                })),
                Output::Text => println!(
                    "pruned {} of log lines of {} changes; the store went from {} to {}",
                    human_size(pruned.text_bytes),
                    pruned.changes,
                    human_size(pruned.store_bytes_before),
                    human_size(pruned.store_bytes_after),
                ),
            }
            Ok(())
        }
    }
}

/// Prints what `show-logs` selects: text for people (`[action] line`, optionally time-stamped), or one JSON object
/// per log line for log shippers. Buffered: 15 MB of lines print in well under a second. A closed stdout (`| head`)
/// ends the output quietly.
pub struct LogPrinter {
    out: Output,
    timestamps: bool,
    renderer: render::EventRenderer,
    actions: std::collections::HashMap<String, String>,
    writer: std::io::BufWriter<std::io::Stdout>,
    closed: bool,
}

impl LogPrinter {
    pub fn new(out: Output, timestamps: bool) -> LogPrinter {
        LogPrinter {
            out,
            timestamps,
            renderer: render::EventRenderer::new(out, false),
            actions: std::collections::HashMap::new(),
            writer: std::io::BufWriter::with_capacity(256 * 1024, std::io::stdout()),
            closed: false,
        }
    }

    /// True once stdout is gone: nothing more needs reading.
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Remembers step names from any record, shown or not.
    pub fn learn(&mut self, record: &EventRecord) {
        if let Event::StepState {
            step_id, action, ..
        } = &record.event
        {
            self.actions.insert(step_id.clone(), action.clone());
        }
        self.renderer.learn(record);
    }

    pub fn show(&mut self, record: &EventRecord) {
        use std::io::Write;
        if self.closed {
            return;
        }
        let written = match (&record.event, self.out) {
            (_, Output::Json) => match crate::logs::view::json_line(
                record,
                crate::logs::view::event_step(&record.event)
                    .and_then(|s| self.actions.get(s))
                    .map(String::as_str),
            ) {
                Some(line) => writeln!(self.writer, "{line}"),
                None => Ok(()),
            },
            (Event::Log { step_id, line, .. }, Output::Text) => {
                let action = self
                    .actions
                    .get(step_id)
                    .cloned()
                    .unwrap_or_else(|| step_id.chars().take(8).collect());
                if self.timestamps {
                    writeln!(self.writer, "{} [{action}] {line}", record.at)
                } else {
                    writeln!(self.writer, "[{action}] {line}")
                }
            }
            (_, Output::Text) => {
                // Other events are rare: the shared renderer prints them after what is buffered.
                let flushed = self.writer.flush();
                if flushed.is_ok() {
                    if self.timestamps {
                        print!("{} ", record.at);
                    }
                    self.renderer.show(record);
                }
                flushed
            }
        };
        if written.is_err() {
            self.closed = true;
        }
    }

    pub fn flush(&mut self) {
        use std::io::Write;
        if self.writer.flush().is_err() {
            self.closed = true;
        }
    }
}

use crate::events::{Event, EventRecord};
