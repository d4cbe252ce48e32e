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
