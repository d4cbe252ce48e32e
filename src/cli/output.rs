//! Writing to the terminal or a pipe. Inside the CLI, `println!`, `print!`, `eprintln!` and `eprint!` are these
//! macros rather than std's, which panic when the reader went away: with a closed stdout
//! (`runner change show-logs ID | head -1`) the command ends quietly with exit code 0, as `head` meant it to; a
//! closed stderr is ignored.

use std::io::Write;

/// Writes to stdout; when nobody reads it any more, ends the process quietly.
pub(crate) fn stdout(args: std::fmt::Arguments<'_>) {
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        stdout_failed(e)
    }
}

/// Writes to stderr, ignoring a closed one: there is nowhere left to report that.
pub(crate) fn stderr(args: std::fmt::Arguments<'_>) {
    let _ = std::io::stderr().lock().write_fmt(args);
}

fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    stderr(format_args!("error: failed to write to stdout: {e}\n"));
    std::process::exit(1)
}

macro_rules! println {
    () => { $crate::cli::output::stdout(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::cli::output::stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

#[allow(unused_macros)]
macro_rules! print {
    ($($arg:tt)*) => { $crate::cli::output::stdout(format_args!($($arg)*)) };
}

macro_rules! eprintln {
    () => { $crate::cli::output::stderr(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::cli::output::stderr(format_args!("{}\n", format_args!($($arg)*))) };
}

#[allow(unused_macros)]
macro_rules! eprint {
    ($($arg:tt)*) => { $crate::cli::output::stderr(format_args!($($arg)*)) };
}
