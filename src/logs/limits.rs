//! The operator's log limits: the longest line kept whole, the output a step and a change may keep, and how long
//! logs are kept. Read from the environment once, with clear errors for values that do not parse.

use std::time::Duration;

/// One MiB.
const MIB: u64 = 1024 * 1024;

/// Limits on what a change's log keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// A line longer than this is split into pieces of this size, each but the last ending with
    /// [`crate::logs::LINE_CONTINUES`]. Keeps every stored line, and every gRPC message, far below 4 MiB.
    pub line_max: usize,
    /// Output kept per step; past it a truncation notice is logged and the rest is counted, not kept.
    pub step_max: u64,
    /// Output kept per change (all its steps together).
    pub change_max: u64,
    /// Logs of changes that ended longer ago than this are pruned automatically (`None`: kept until
    /// `runner logs prune`).
    pub retention: Option<Duration>,
}

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits {
            line_max: MIB as usize,
            step_max: 100 * MIB,
            change_max: 1024 * MIB,
            retention: None,
        }
    }
}

/// A log setting that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("{variable}={value:?} is not valid: {problem}")]
pub struct LimitError {
    pub variable: &'static str,
    pub value: String,
    pub problem: String,
}

pub const ENV_LINE_MAX: &str = "RUNNER_LOG_LINE_MAX";
pub const ENV_STEP_MAX: &str = "RUNNER_LOG_STEP_MAX";
pub const ENV_CHANGE_MAX: &str = "RUNNER_LOG_CHANGE_MAX";
pub const ENV_RETENTION: &str = "RUNNER_LOG_RETENTION";

/// The smallest line cap: room for a marker and some text.
const MIN_LINE_MAX: u64 = 256;

impl LogLimits {
    /// Defaults, overridden by `RUNNER_LOG_LINE_MAX`, `RUNNER_LOG_STEP_MAX`, `RUNNER_LOG_CHANGE_MAX` (sizes such as
    /// `100MB`, `1GiB`, `65536`) and `RUNNER_LOG_RETENTION` (a duration such as `30d`, or `off`).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<LogLimits, LimitError> {
        let mut limits = LogLimits::default();
        let size = |variable: &'static str| -> Result<Option<u64>, LimitError> {
            get(variable)
                .map(|value| {
                    parse_size(&value).map_err(|problem| LimitError {
                        variable,
                        value,
                        problem,
                    })
                })
                .transpose()
        };
        if let Some(line) = size(ENV_LINE_MAX)? {
            if !(MIN_LINE_MAX..=(16 * MIB)).contains(&line) {
                return Err(LimitError {
                    variable: ENV_LINE_MAX,
                    value: line.to_string(),
                    problem:
                        "give a size from 256 bytes to 16MiB (gRPC messages must stay under 4 MiB)"
                            .into(),
                });
            }
            limits.line_max = line as usize;
        }
        if let Some(step) = size(ENV_STEP_MAX)? {
            limits.step_max = step;
        }
        if let Some(change) = size(ENV_CHANGE_MAX)? {
            limits.change_max = change;
        }
        if let Some(value) = get(ENV_RETENTION) {
            limits.retention = match value.trim() {
                "" | "off" | "none" => None,
                text => Some(parse_duration(text).map_err(|problem| LimitError {
                    variable: ENV_RETENTION,
                    value: value.clone(),
                    problem,
                })?),
            };
        }
        Ok(limits)
    }

    /// [`LogLimits::from_lookup`] over the process environment.
    pub fn from_env() -> Result<LogLimits, LimitError> {
        LogLimits::from_lookup(|name| std::env::var(name).ok())
    }
}

/// `100MB`, `100M`, `1GiB`, `512k`, `65536` → bytes. Decimal and binary suffixes both mean powers of 1024 (what
/// people mean for log sizes).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| {
        "give a whole number of bytes, optionally with a unit (KB, MB, GB), e.g. 100MB".to_owned()
    })?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => MIB,
        "g" | "gb" | "gib" => 1024 * MIB,
        other => return Err(format!("unknown unit {other:?}; use B, KB, MB or GB")),
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| "the size is too large".to_owned())
}

/// `30d`, `12h`, `90m`, `1w`, `45s` → a duration; overflow and unknown units are errors, never panics.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| "give a number with a unit (s, m, h, d, w), e.g. 30d".to_owned())?;
    let seconds: u64 = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        "" => return Err("add a unit (s, m, h, d, w), e.g. 30d".to_owned()),
        other => return Err(format!("unknown unit {other:?}; use s, m, h, d or w")),
    };
    number
        .checked_mul(seconds)
        .filter(|s| *s <= 100 * 365 * 86_400)
        .map(Duration::from_secs)
        .ok_or_else(|| "the duration is too long (at most 100 years)".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_and_without_units() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("100MB"), Ok(100 * MIB));
        assert_eq!(parse_size("1GiB"), Ok(1024 * MIB));
        assert_eq!(parse_size(" 512k "), Ok(512 * 1024));
        assert!(parse_size("lots").unwrap_err().contains("whole number"));
        assert!(parse_size("5 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_size("99999999999999999999GB").is_err());
        assert!(parse_size("18446744073709551615GB")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn durations_parse_and_overflow_is_an_error() {
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("90m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("30").unwrap_err().contains("add a unit"));
        assert!(parse_duration("99999999999999999999h").is_err());
        assert!(parse_duration("9999999999w")
            .unwrap_err()
            .contains("too long"));
    }

    #[test]
    fn limits_come_from_the_environment_with_errors_naming_the_variable() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let limits =
            LogLimits::from_lookup(env(&[(ENV_STEP_MAX, "5MB"), (ENV_RETENTION, "7d")])).unwrap();
        assert_eq!(limits.step_max, 5 * MIB);
        assert_eq!(limits.retention, Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(limits.line_max, LogLimits::default().line_max);
        let err = LogLimits::from_lookup(env(&[(ENV_CHANGE_MAX, "big")])).unwrap_err();
        assert!(err.to_string().contains(ENV_CHANGE_MAX), "{err}");
        let err = LogLimits::from_lookup(env(&[(ENV_LINE_MAX, "64MB")])).unwrap_err();
        assert!(err.to_string().contains("16MiB"), "{err}");
    }
}
