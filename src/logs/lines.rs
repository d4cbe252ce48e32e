//! From the raw bytes of a step's streams to the lines a log keeps: masked as one stream per step and output
//! stream (so a secret split across reads or lines is still caught), split into lines, long lines cut into
//! pieces with a visible marker, and the per-step and per-change caps applied with a visible truncation notice.
//! Pure: memory per stream is bounded by the line cap plus the longest secret.

use std::collections::HashMap;

use super::LogLimits;
use crate::executor::Stream;
use crate::mask::{MaskStream, Masker};

/// Ends every piece of a line that was longer than the line cap, except the last.
pub const LINE_CONTINUES: &str = " [runner: line too long, continues on the next line]";

/// A line ready to be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLine {
    pub step_id: String,
    pub stream: Stream,
    pub line: String,
}

struct StreamState {
    mask: MaskStream,
    partial: Vec<u8>,
}

#[derive(Default)]
struct StepState {
    streams: HashMap<Stream, StreamState>,
    kept: u64,
    truncated: bool,
    dropped_bytes: u64,
    dropped_lines: u64,
}

/// Turns the output of a change's steps into lines, one state per step and stream.
pub struct LineAssembler {
    masker: Masker,
    limits: LogLimits,
    steps: HashMap<String, StepState>,
    change_kept: u64,
    scratch: Vec<u8>,
}

impl LineAssembler {
    pub fn new(masker: Masker, limits: LogLimits) -> LineAssembler {
        LineAssembler {
            masker,
            limits,
            steps: HashMap::new(),
            change_kept: 0,
            scratch: Vec::new(),
        }
    }

    /// Feeds raw bytes of one stream of a step; appends the lines they complete.
    pub fn push(&mut self, step_id: &str, stream: Stream, bytes: &[u8], out: &mut Vec<OutputLine>) {
        let masker = self.masker.clone();
        let step = self.steps.entry(step_id.to_owned()).or_default();
        let state = step.streams.entry(stream).or_insert_with(|| StreamState {
            mask: masker.stream(),
            partial: Vec::new(),
        });
        self.scratch.clear();
        state.mask.push(bytes, &mut self.scratch);
        state.partial.extend_from_slice(&self.scratch);
        let mut lines = Vec::new();
        split_lines(&mut state.partial, self.limits.line_max, &mut lines);
        for line in lines {
            self.keep(step_id, stream, line, out);
        }
    }

    /// Releases what a step's streams hold back (the tail kept to see whether it begins a secret, and the
    /// unfinished last line), e.g. when its build ends and its run begins. Its caps carry on.
    pub fn flush_step(&mut self, step_id: &str, out: &mut Vec<OutputLine>) {
        let Some(step) = self.steps.get_mut(step_id) else {
            return;
        };
        let mut streams: Vec<Stream> = step.streams.keys().copied().collect();
        streams.sort_by_key(|s| *s == Stream::Stderr);
        let mut lines = Vec::new();
        for stream in streams {
            let Some(mut state) = step.streams.remove(&stream) else {
                continue;
            };
            let mut rest = Vec::new();
            state.mask.finish(&mut rest);
            state.partial.extend_from_slice(&rest);
            split_lines(&mut state.partial, self.limits.line_max, &mut lines);
            if !state.partial.is_empty() {
                lines.push(std::mem::take(&mut state.partial));
            }
            for line in lines.drain(..) {
                keep_line(
                    step,
                    &mut self.change_kept,
                    &self.limits,
                    step_id,
                    stream,
                    line,
                    out,
                );
            }
        }
    }

    /// Ends a step's output: [`flush_step`](Self::flush_step), then a summary of what the caps dropped. The
    /// step's next output (a retry) starts afresh.
    pub fn finish_step(&mut self, step_id: &str, out: &mut Vec<OutputLine>) {
        self.flush_step(step_id, out);
        let Some(step) = self.steps.remove(step_id) else {
            return;
        };
        if step.dropped_lines > 0 {
            out.push(OutputLine {
                step_id: step_id.to_owned(),
                stream: Stream::Stderr,
                line: format!(
                    "[runner] {} more lines ({} bytes) of this step's output were not kept",
                    step.dropped_lines, step.dropped_bytes
                ),
            });
        }
    }

    /// Ends every step still open.
    pub fn finish_all(&mut self, out: &mut Vec<OutputLine>) {
        let mut ids: Vec<String> = self.steps.keys().cloned().collect();
        ids.sort();
        for id in ids {
            self.finish_step(&id, out);
        }
    }

    fn keep(&mut self, step_id: &str, stream: Stream, line: Vec<u8>, out: &mut Vec<OutputLine>) {
        let step = self.steps.get_mut(step_id).expect("the step was just fed");
        keep_line(
            step,
            &mut self.change_kept,
            &self.limits,
            step_id,
            stream,
            line,
            out,
        );
    }
}

fn keep_line(
    step: &mut StepState,
    change_kept: &mut u64,
    limits: &LogLimits,
    step_id: &str,
    stream: Stream,
    mut line: Vec<u8>,
    out: &mut Vec<OutputLine>,
) {
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    let size = line.len() as u64 + 1;
    if !step.truncated {
        let over = if step.kept + size > limits.step_max {
            Some(("step", limits.step_max, super::limits::ENV_STEP_MAX))
        } else if *change_kept + size > limits.change_max {
            Some(("change", limits.change_max, super::limits::ENV_CHANGE_MAX))
        } else {
            None
        };
        match over {
            None => {
                step.kept += size;
                *change_kept += size;
                out.push(OutputLine {
                    step_id: step_id.to_owned(),
                    stream,
                    line: String::from_utf8(line)
                        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
                });
                return;
            }
            Some((what, cap, variable)) => {
                step.truncated = true;
                out.push(OutputLine {
                    step_id: step_id.to_owned(),
                    stream: Stream::Stderr,
                    line: format!(
                        "[runner] log truncated: the output passed the cap of {} per {what} ({variable}); the rest \
                         of this step's output is counted, not kept",
                        human_size(cap)
                    ),
                });
            }
        }
    }
    step.dropped_bytes += size;
    step.dropped_lines += 1;
}

/// Moves the complete lines of `partial` to `lines`; a line longer than `line_max` is cut into pieces, each but
/// the last ending with [`LINE_CONTINUES`]. What is left in `partial` is shorter than `line_max`.
fn split_lines(partial: &mut Vec<u8>, line_max: usize, lines: &mut Vec<Vec<u8>>) {
    let mut start = 0;
    loop {
        let rest = &partial[start..];
        let newline = memchr_newline(rest);
        match newline {
            Some(n) if n <= line_max => {
                lines.push(rest[..n].to_vec());
                start += n + 1;
            }
            _ if rest.len() > line_max => {
                let cut = char_boundary(rest, line_max);
                let mut piece = rest[..cut].to_vec();
                piece.extend_from_slice(LINE_CONTINUES.as_bytes());
                lines.push(piece);
                start += cut;
            }
            _ => break,
        }
    }
    partial.drain(..start);
}

fn memchr_newline(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|b| *b == b'\n')
}

/// The largest cut at or below `max` that does not split a UTF-8 character (or `max` if none is found nearby).
fn char_boundary(bytes: &[u8], max: usize) -> usize {
    (max.saturating_sub(3)..=max)
        .rev()
        .find(|&i| i > 0 && (i >= bytes.len() || bytes[i] & 0xC0 != 0x80))
        .unwrap_or(max)
}

/// `104857600` → `100 MiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["bytes", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 && value.fract() == 0.0 {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(line_max: usize, step_max: u64, change_max: u64) -> LogLimits {
        LogLimits {
            line_max,
            step_max,
            change_max,
            retention: None,
        }
    }

    fn texts(lines: &[OutputLine]) -> Vec<&str> {
        lines.iter().map(|l| l.line.as_str()).collect()
    }

    #[test]
    fn lines_are_assembled_across_reads_and_the_last_one_is_kept_at_the_end() {
        let mut a = LineAssembler::new(Masker::default(), LogLimits::default());
        let mut out = vec![];
        a.push("s", Stream::Stdout, b"one\ntw", &mut out);
        a.push("s", Stream::Stdout, b"o\r\nthr", &mut out);
        assert_eq!(texts(&out), ["one", "two"]);
        a.finish_step("s", &mut out);
        assert_eq!(texts(&out), ["one", "two", "thr"]);
    }

    #[test]
    fn a_long_line_is_split_with_a_visible_marker_and_nothing_is_lost() {
        let mut a = LineAssembler::new(Masker::default(), limits(300, u64::MAX, u64::MAX));
        let long: String = (0..1000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let mut out = vec![];
        for piece in format!("{long}\nshort\n").as_bytes().chunks(77) {
            a.push("s", Stream::Stdout, piece, &mut out);
        }
        a.finish_step("s", &mut out);
        assert_eq!(out.len(), 5, "{:?}", texts(&out));
        let joined: String = out[..4]
            .iter()
            .map(|l| l.line.trim_end_matches(LINE_CONTINUES))
            .collect();
        assert_eq!(joined, long);
        assert!(out[..3].iter().all(|l| l.line.ends_with(LINE_CONTINUES)));
        assert!(!out[3].line.ends_with(LINE_CONTINUES));
        assert_eq!(out[4].line, "short");
    }

    #[test]
    fn a_split_never_cuts_a_utf8_character() {
        let mut a = LineAssembler::new(Masker::default(), limits(256, u64::MAX, u64::MAX));
        let line = "é".repeat(300);
        let mut out = vec![];
        a.push(
            "s",
            Stream::Stdout,
            format!("{line}\n").as_bytes(),
            &mut out,
        );
        let joined: String = out
            .iter()
            .map(|l| l.line.trim_end_matches(LINE_CONTINUES))
            .collect();
        assert_eq!(joined, line);
    }

    #[test]
    fn past_the_step_cap_a_truncation_notice_is_kept_and_the_rest_counted() {
        let mut a = LineAssembler::new(Masker::default(), limits(1024, 100, u64::MAX));
        let mut out = vec![];
        for i in 0..50 {
            a.push(
                "s",
                Stream::Stdout,
                format!("line {i:04}\n").as_bytes(),
                &mut out,
            );
        }
        a.finish_step("s", &mut out);
        let kept = out.iter().filter(|l| l.line.starts_with("line ")).count();
        assert_eq!(kept, 10, "10 lines of 10 bytes fit in 100 bytes");
        let notices: Vec<&str> = out[kept..].iter().map(|l| l.line.as_str()).collect();
        assert_eq!(notices.len(), 2, "{notices:?}");
        assert!(notices[0].contains("log truncated") && notices[0].contains("RUNNER_LOG_STEP_MAX"));
        assert!(
            notices[1].contains("40 more lines (400 bytes)"),
            "{}",
            notices[1]
        );
    }

    #[test]
    fn the_change_cap_covers_all_steps_together() {
        let mut a = LineAssembler::new(Masker::default(), limits(1024, u64::MAX, 30));
        let mut out = vec![];
        a.push("a", Stream::Stdout, b"0123456789abcd\n", &mut out);
        a.push(
            "b",
            Stream::Stdout,
            b"0123456789abcd\n0123456789abcd\n",
            &mut out,
        );
        assert_eq!(out.len(), 3);
        assert!(
            out[2].line.contains("per change (RUNNER_LOG_CHANGE_MAX)"),
            "{}",
            out[2].line
        );
    }

    #[test]
    fn a_secret_split_across_reads_and_lines_is_masked() {
        let pem = "-----BEGIN K-----\nAAAAbbbbCCCC\nddddEEEEffff\n-----END K-----";
        let m = Masker::new([pem, "hunter22"]);
        let text = format!("a hunter22 b\n{pem}\nend\n");
        for size in [1, 3, 8, 19] {
            let mut a = LineAssembler::new(m.clone(), LogLimits::default());
            let mut out = vec![];
            for piece in text.as_bytes().chunks(size) {
                a.push("s", Stream::Stderr, piece, &mut out);
            }
            a.finish_step("s", &mut out);
            assert_eq!(texts(&out), ["a *** b", "***", "end"], "pieces of {size}");
        }
    }
}
