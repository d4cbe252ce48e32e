//! The stored form of log lines: a run of consecutive lines of a change (of any of its steps) packed into one
//! blob — the step ids once, then per line its step, stream, time offset and bytes — compressed with zstd.
//! Lines are numbered by the change's event sequence, so a chunk covers `first_seq..=last_seq` and events keep
//! pointing at their lines.

use crate::executor::Stream;

/// How a chunk's data is stored.
pub const ENCODING_ZSTD: &str = "zstd";
pub const ENCODING_RAW: &str = "raw";

/// zstd's fast levels compress logs 4–10× at hundreds of MB/s; higher levels cost time the ingestion needs.
const ZSTD_LEVEL: i32 = 3;

/// One line in a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkLine {
    pub step_id: String,
    pub stream: Stream,
    /// Unix milliseconds.
    pub at_ms: i64,
    pub line: String,
}

/// A chunk ready to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedChunk {
    pub encoding: &'static str,
    pub raw_len: usize,
    pub data: Vec<u8>,
}

/// A chunk that cannot be read back.
#[derive(Debug, thiserror::Error)]
#[error("a stored log chunk is corrupt: {0}")]
pub struct CorruptChunk(pub String);

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn get_varint(data: &[u8], at: &mut usize) -> Result<u64, CorruptChunk> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *data
            .get(*at)
            .ok_or_else(|| CorruptChunk("it ends inside a number".into()))?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(CorruptChunk("a number is too long".into()))
}

fn get_bytes<'a>(data: &'a [u8], at: &mut usize) -> Result<&'a [u8], CorruptChunk> {
    let len = get_varint(data, at)? as usize;
    let end = at
        .checked_add(len)
        .filter(|end| *end <= data.len())
        .ok_or_else(|| CorruptChunk("a length points past its end".into()))?;
    let bytes = &data[*at..end];
    *at = end;
    Ok(bytes)
}

/// Packs lines (at least one) into a chunk.
pub fn encode(lines: &[ChunkLine]) -> EncodedChunk {
    let mut steps: Vec<&str> = vec![];
    let mut raw = Vec::with_capacity(lines.iter().map(|l| l.line.len() + 4).sum::<usize>() + 64);
    for line in lines {
        if !steps.contains(&line.step_id.as_str()) {
            steps.push(&line.step_id);
        }
    }
    put_varint(&mut raw, steps.len() as u64);
    for step in &steps {
        put_varint(&mut raw, step.len() as u64);
        raw.extend_from_slice(step.as_bytes());
    }
    let base = lines.first().map_or(0, |l| l.at_ms);
    put_varint(&mut raw, base.max(0) as u64);
    let mut previous = base;
    for line in lines {
        let step = steps.iter().position(|s| *s == line.step_id).unwrap_or(0);
        put_varint(&mut raw, step as u64);
        raw.push(match line.stream {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        });
        put_varint(&mut raw, (line.at_ms - previous).max(0) as u64);
        previous = previous.max(line.at_ms);
        put_varint(&mut raw, line.line.len() as u64);
        raw.extend_from_slice(line.line.as_bytes());
    }
    match zstd::bulk::compress(&raw, ZSTD_LEVEL) {
        Ok(data) if data.len() < raw.len() => EncodedChunk {
            encoding: ENCODING_ZSTD,
            raw_len: raw.len(),
            data,
        },
        _ => EncodedChunk {
            encoding: ENCODING_RAW,
            raw_len: raw.len(),
            data: raw,
        },
    }
}

/// Unpacks a chunk.
pub fn decode(encoding: &str, raw_len: usize, data: &[u8]) -> Result<Vec<ChunkLine>, CorruptChunk> {
    let raw;
    let data = match encoding {
        ENCODING_RAW => data,
        ENCODING_ZSTD => {
            raw = zstd::bulk::decompress(data, raw_len)
                .map_err(|e| CorruptChunk(format!("it does not decompress: {e}")))?;
            &raw[..]
        }
        other => return Err(CorruptChunk(format!("unknown encoding {other:?}"))),
    };
    let mut at = 0;
    let step_count = get_varint(data, &mut at)? as usize;
    let mut steps = Vec::with_capacity(step_count.min(1024));
    for _ in 0..step_count {
        steps.push(String::from_utf8_lossy(get_bytes(data, &mut at)?).into_owned());
    }
    let mut time = get_varint(data, &mut at)? as i64;
    let mut lines = vec![];
    while at < data.len() {
        let step = get_varint(data, &mut at)? as usize;
        let step_id = steps
            .get(step)
            .ok_or_else(|| CorruptChunk("a line names a step it does not list".into()))?
            .clone();
        let stream = match data.get(at) {
            Some(0) => Stream::Stdout,
            Some(1) => Stream::Stderr,
            _ => return Err(CorruptChunk("a line has no valid stream".into())),
        };
        at += 1;
        time = time.saturating_add(get_varint(data, &mut at)? as i64);
        let bytes = get_bytes(data, &mut at)?;
        lines.push(ChunkLine {
            step_id,
            stream,
            at_ms: time,
            line: String::from_utf8_lossy(bytes).into_owned(),
        });
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(step: &str, stream: Stream, at_ms: i64, text: &str) -> ChunkLine {
        ChunkLine {
            step_id: step.into(),
            stream,
            at_ms,
            line: text.into(),
        }
    }

    #[test]
    fn a_chunk_reads_back_exactly_what_was_packed() {
        let lines = vec![
            line("step-a", Stream::Stdout, 1_700_000_000_000, "hello"),
            line("step-b", Stream::Stderr, 1_700_000_000_005, ""),
            line("step-a", Stream::Stdout, 1_700_000_000_900, "wörld ✓"),
        ];
        let chunk = encode(&lines);
        assert_eq!(
            decode(chunk.encoding, chunk.raw_len, &chunk.data).unwrap(),
            lines
        );
    }

    #[test]
    fn repetitive_output_is_stored_compressed() {
        let lines: Vec<ChunkLine> = (0..2000)
            .map(|i| {
                line(
                    "s",
                    Stream::Stdout,
                    1_000 + i,
                    &format!("compiling module {i} ... ok"),
                )
            })
            .collect();
        let text_bytes: usize = lines.iter().map(|l| l.line.len() + 1).sum();
        let chunk = encode(&lines);
        assert_eq!(chunk.encoding, ENCODING_ZSTD);
        assert!(
            chunk.data.len() * 4 < text_bytes,
            "{} vs {text_bytes}",
            chunk.data.len()
        );
        assert_eq!(
            decode(chunk.encoding, chunk.raw_len, &chunk.data).unwrap(),
            lines
        );
    }

    #[test]
    fn corrupt_chunks_are_errors_not_panics() {
        let chunk = encode(&[line("s", Stream::Stdout, 5, "hello")]);
        let raw = decode(ENCODING_RAW, 0, &[1, 200, 1]);
        assert!(raw.is_err());
        assert!(decode("lz77", 0, &chunk.data).is_err());
        assert!(decode(
            ENCODING_ZSTD,
            chunk.raw_len,
            &chunk.data[..chunk.data.len() / 2]
        )
        .is_err());
        for cut in 0..chunk.raw_len {
            let mut packed = vec![];
            put_varint(&mut packed, 1);
            let _ = decode(ENCODING_RAW, 0, &packed[..cut.min(packed.len())]);
        }
        assert!(
            decode(ENCODING_RAW, 0, &[0, 0, 3, 0, 0, 1, b'x']).is_err(),
            "step 3 of 0"
        );
    }
}
