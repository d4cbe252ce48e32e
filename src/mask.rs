//! Secret masking: one matcher (Aho-Corasick, leftmost-longest) for whole texts — reasons, errors, event
//! messages — and a streaming form for the bytes of every log and build stream, which keeps its state across
//! chunk and line boundaries so a value split between two reads, or spread over several lines, is still masked.
//!
//! A multi-line secret (a PEM key) is masked whole and also line by line, so printing one of its lines, or the
//! whole key with other line endings, shows `***` too. Masking touches message text only: an event's structure
//! (its kind, ids, states, stream) is never rewritten, so a secret whose value is `run` or `log` changes nothing
//! but the text it appears in.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use std::sync::Arc;

use crate::events::Event;

/// What a secret value is replaced with.
pub const MASK: &str = "***";

/// Lines of a multi-line secret shorter than this are not masked on their own (a `}` or `--` line would otherwise
/// turn every such line of every log into `***`); the whole value still is.
const MIN_LINE_PATTERN: usize = 4;

/// Replaces secret values with [`MASK`]. Cheap to clone; an empty masker passes everything through.
#[derive(Clone, Default)]
pub struct Masker {
    inner: Option<Arc<Patterns>>,
}

struct Patterns {
    matcher: AhoCorasick,
    patterns: Vec<Vec<u8>>,
    /// Indexes into `patterns` by first byte: finds where a pattern may begin in the tail of a stream.
    by_first_byte: Vec<Vec<usize>>,
    longest: usize,
}

impl std::fmt::Debug for Masker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the values themselves.
        let count = self.inner.as_ref().map_or(0, |p| p.patterns.len());
        write!(f, "Masker({count} patterns)")
    }
}

impl Masker {
    /// A masker for these secret values (empty values are ignored).
    pub fn new<I, S>(values: I) -> Masker
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut patterns: Vec<Vec<u8>> = vec![];
        for value in values {
            let value = value.as_ref();
            if value.is_empty() {
                continue;
            }
            // Surrounding whitespace (a key file's final newline) is not part of what must not show, and keeping
            // it would swallow the line break after the value.
            let trimmed = value.trim();
            let whole = if trimmed.is_empty() { value } else { trimmed };
            patterns.push(whole.as_bytes().to_vec());
            if value.contains('\n') {
                patterns.extend(
                    value
                        .lines()
                        .map(str::trim)
                        .filter(|line| line.len() >= MIN_LINE_PATTERN)
                        .map(|line| line.as_bytes().to_vec()),
                );
            }
        }
        patterns.sort();
        patterns.dedup();
        if patterns.is_empty() {
            return Masker::default();
        }
        let matcher = AhoCorasickBuilder::new()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&patterns)
            .expect("a few secret values always fit the matcher");
        let mut by_first_byte = vec![Vec::new(); 256];
        for (i, p) in patterns.iter().enumerate() {
            by_first_byte[p[0] as usize].push(i);
        }
        let longest = patterns.iter().map(Vec::len).max().unwrap_or(0);
        Masker {
            inner: Some(Arc::new(Patterns {
                matcher,
                patterns,
                by_first_byte,
                longest,
            })),
        }
    }

    /// True when there is nothing to mask.
    pub fn is_empty(&self) -> bool {
        self.inner.is_none()
    }

    /// The text with every secret value replaced.
    pub fn mask(&self, text: &str) -> String {
        match &self.inner {
            None => text.to_owned(),
            Some(p) => {
                let mut out = String::with_capacity(text.len());
                p.matcher.replace_all_with(text, &mut out, |_, _, dst| {
                    dst.push_str(MASK);
                    true
                });
                out
            }
        }
    }

    /// Bytes with every secret value replaced.
    pub fn mask_bytes(&self, bytes: &[u8]) -> Vec<u8> {
        match &self.inner {
            None => bytes.to_vec(),
            Some(p) => {
                let mut out = Vec::with_capacity(bytes.len());
                p.matcher
                    .replace_all_with_bytes(bytes, &mut out, |_, _, dst| {
                        dst.extend_from_slice(MASK.as_bytes());
                        true
                    });
                out
            }
        }
    }

    /// An optional text, masked.
    pub fn mask_opt(&self, text: Option<String>) -> Option<String> {
        text.map(|t| self.mask(&t))
    }

    /// Masks the message text of an event (reasons, phase messages, build vertex names, log lines); its kind, ids,
    /// states and stream stay exactly as they were.
    pub fn mask_event(&self, event: Event) -> Event {
        if self.is_empty() {
            return event;
        }
        match event {
            Event::ChangeState { state, reason } => Event::ChangeState {
                state,
                reason: self.mask_opt(reason),
            },
            Event::StepState {
                step_id,
                parent_id,
                action,
                state,
                reason,
            } => Event::StepState {
                step_id,
                parent_id,
                action,
                state,
                reason: self.mask_opt(reason),
            },
            Event::Phase {
                step_id,
                phase,
                message,
            } => Event::Phase {
                step_id,
                phase,
                message: self.mask(&message),
            },
            Event::Build {
                step_id,
                vertex,
                status,
            } => Event::Build {
                step_id,
                vertex: self.mask(&vertex),
                status,
            },
            Event::Log {
                step_id,
                stream,
                line,
            } => Event::Log {
                step_id,
                stream,
                line: self.mask(&line),
            },
        }
    }

    /// A streaming masker over one byte stream.
    pub fn stream(&self) -> MaskStream {
        MaskStream {
            masker: self.clone(),
            pending: Vec::new(),
        }
    }
}

/// Masks one byte stream fed in pieces of any size. It holds back only the tail that could still be the start of
/// a secret (at most the longest value less one byte), so output is never later than it must be.
pub struct MaskStream {
    masker: Masker,
    pending: Vec<u8>,
}

impl MaskStream {
    /// Feeds `bytes`; appends to `out` everything that can no longer be part of a secret, masked.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        let Some(p) = self.masker.inner.clone() else {
            out.extend_from_slice(bytes);
            return;
        };
        self.pending.extend_from_slice(bytes);
        let buffer = &self.pending;
        let cut = p.undecided_from(buffer);
        let mut emitted = 0;
        for m in p.matcher.find_iter(buffer.as_slice()) {
            if m.start() >= cut {
                break;
            }
            out.extend_from_slice(&buffer[emitted..m.start()]);
            out.extend_from_slice(MASK.as_bytes());
            emitted = m.end();
        }
        if emitted < cut {
            out.extend_from_slice(&buffer[emitted..cut]);
            emitted = cut;
        }
        self.pending.drain(..emitted);
    }

    /// Ends the stream: appends what was held back, masked.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let rest = std::mem::take(&mut self.pending);
        out.extend_from_slice(&self.masker.mask_bytes(&rest));
    }

    /// Bytes held back, waiting to see whether they begin a secret.
    pub fn held(&self) -> usize {
        self.pending.len()
    }
}

impl Patterns {
    /// Where the longest suffix of `buffer` that is a proper prefix of some pattern begins (`buffer.len()` if
    /// none): matches starting before it are final, whatever bytes come next.
    fn undecided_from(&self, buffer: &[u8]) -> usize {
        let len = buffer.len();
        let from = len.saturating_sub(self.longest.saturating_sub(1));
        for q in from..len {
            let tail = &buffer[q..];
            let candidates = &self.by_first_byte[buffer[q] as usize];
            if candidates.iter().any(|&i| {
                let pattern = &self.patterns[i];
                pattern.len() > tail.len() && pattern.starts_with(tail)
            }) {
                return q;
            }
        }
        len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{ChangeState, StepState};
    use crate::executor::Stream;

    /// Feeds `text` in pieces of `size` bytes and returns the masked whole.
    fn streamed(masker: &Masker, text: &str, size: usize) -> String {
        let mut stream = masker.stream();
        let mut out = vec![];
        for piece in text.as_bytes().chunks(size.max(1)) {
            stream.push(piece, &mut out);
        }
        stream.finish(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_longest_value_wins_where_two_overlap() {
        let m = Masker::new(["abc", "abcdef", ""]);
        assert_eq!(m.mask("x abcdef y abc"), "x *** y ***");
        assert_eq!(m.mask("abcde"), "***de");
    }

    #[test]
    fn a_value_split_across_any_two_chunks_is_masked() {
        let m = Masker::new(["s3cr3t-value", "s3cr3t"]);
        let text = "token=s3cr3t-value; short=s3cr3t; end s3cr3";
        let whole = m.mask(text);
        assert_eq!(whole, "token=***; short=***; end s3cr3");
        for size in 1..text.len() {
            assert_eq!(streamed(&m, text, size), whole, "pieces of {size} bytes");
        }
    }

    #[test]
    fn every_line_of_a_multi_line_secret_is_masked() {
        let pem = "-----BEGIN TEST KEY-----\nMIIBOgIBAAJBAKj34GkxFhD9\nQ2V5cGFydDEyMzQ1Njc4OTA=\n-----END TEST KEY-----\n";
        let m = Masker::new([pem]);
        // Printed whole, in pieces that cut through lines.
        for size in [1, 5, 17, 64] {
            let out = streamed(&m, &format!("key:\n{pem}done\n"), size);
            assert_eq!(out, "key:\n***\ndone\n", "pieces of {size} bytes");
        }
        // Printed with other line endings, or one line alone.
        let crlf = pem.replace('\n', "\r\n");
        let out = m.mask(&crlf);
        assert!(!out.contains("MIIBOgIBAAJBAKj34GkxFhD9"), "{out}");
        assert!(!out.contains("Q2V5cGFydDEyMzQ1Njc4OTA="), "{out}");
        assert_eq!(m.mask("line: Q2V5cGFydDEyMzQ1Njc4OTA="), "line: ***");
    }

    #[test]
    fn the_stream_holds_back_only_what_may_begin_a_secret() {
        let m = Masker::new(["password123"]);
        let mut stream = m.stream();
        let mut out = vec![];
        stream.push(b"hello world\n", &mut out);
        assert_eq!(out, b"hello world\n", "nothing here can begin the secret");
        out.clear();
        stream.push(b"pass", &mut out);
        assert_eq!(out, b"");
        assert_eq!(stream.held(), 4);
        stream.push(b"port\n", &mut out);
        assert_eq!(out, b"passport\n");
    }

    #[test]
    fn a_secret_equal_to_a_field_name_leaves_events_intact() {
        let m = Masker::new(["run", "log", "error", "type", "step_id", "stdout"]);
        let events = [
            Event::Log {
                step_id: "step-1".into(),
                stream: Stream::Stdout,
                line: "run the log".into(),
            },
            Event::StepState {
                step_id: "step-1".into(),
                parent_id: None,
                action: "run".into(),
                state: StepState::Error,
                reason: Some("error: run failed".into()),
            },
            Event::ChangeState {
                state: ChangeState::Error,
                reason: Some("type".into()),
            },
        ];
        let masked: Vec<Event> = events.iter().cloned().map(|e| m.mask_event(e)).collect();
        assert_eq!(
            masked[0],
            Event::Log {
                step_id: "step-1".into(),
                stream: Stream::Stdout,
                line: "*** the ***".into(),
            }
        );
        assert!(
            matches!(&masked[1], Event::StepState { step_id, action, state: StepState::Error, reason: Some(r), .. }
                if step_id == "step-1" && action == "run" && r == "***: *** failed")
        );
        // Still serialises and reads back as the same kind of event.
        for e in &masked {
            let text = serde_json::to_string(e).unwrap();
            let back: Event = serde_json::from_str(&text).unwrap();
            assert_eq!(&back, e);
        }
    }

    #[test]
    fn an_empty_masker_passes_everything_through() {
        let m = Masker::new(Vec::<String>::new());
        assert!(m.is_empty());
        assert_eq!(streamed(&m, "abc", 1), "abc");
        assert_eq!(m.mask("abc"), "abc");
    }
}
