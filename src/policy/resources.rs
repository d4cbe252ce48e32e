//! Step container limits: the operator's defaults and maximums (`[steps]`), and what one action may ask for.

use super::PolicyError;
use std::path::PathBuf;

/// `[steps]` of the policy: a step gets the default unless its action asks for less, or for more up to the
/// maximum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResourceLimits {
    /// Bytes.
    pub memory: u64,
    pub max_memory: u64,
    pub cpus: f64,
    pub max_cpus: f64,
    pub pids: u64,
    pub max_pids: u64,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        ResourceLimits {
            memory: 1 << 30,
            max_memory: 4 << 30,
            cpus: 1.0,
            max_cpus: 2.0,
            pids: 512,
            max_pids: 4096,
        }
    }
}

/// What an action asks for; `None` takes the operator's default.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ResourceRequest {
    pub memory: Option<u64>,
    pub cpus: Option<f64>,
    pub pids: Option<u64>,
}

/// The limits one step container runs with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepResources {
    pub memory: u64,
    pub cpus: f64,
    pub pids: u64,
}

/// The smallest memory limit Docker accepts is 6 MB; anything below that is a typo.
pub const MIN_MEMORY: u64 = 6 << 20;

impl ResourceLimits {
    /// The limits for a step whose action asks for `request`. Asking for more than a maximum is an error that
    /// names the setting raising it (`policy` is the policy file's path, for the message).
    pub fn resolve(
        &self,
        request: &ResourceRequest,
        policy: &std::path::Path,
    ) -> Result<StepResources, PolicyError> {
        let over = |what: &'static str, asked: String, maximum: String, setting: &'static str| {
            PolicyError::OverLimit {
                what,
                asked,
                maximum,
                setting,
                path: policy.to_owned(),
            }
        };
        let memory = match request.memory {
            None => self.memory,
            Some(m) if m > self.max_memory => {
                return Err(over(
                    "memory",
                    format_size(m),
                    format_size(self.max_memory),
                    "max_memory",
                ))
            }
            Some(m) if m < MIN_MEMORY => {
                return Err(PolicyError::BelowMinimum {
                    what: "memory",
                    asked: format_size(m),
                    minimum: format_size(MIN_MEMORY),
                })
            }
            Some(m) => m,
        };
        let cpus = match request.cpus {
            None => self.cpus,
            Some(c) if !(c.is_finite() && c > 0.0) => {
                return Err(PolicyError::BelowMinimum {
                    what: "cpus",
                    asked: c.to_string(),
                    minimum: "a number above 0".into(),
                })
            }
            Some(c) if c > self.max_cpus => {
                return Err(over(
                    "cpus",
                    c.to_string(),
                    self.max_cpus.to_string(),
                    "max_cpus",
                ))
            }
            Some(c) => c,
        };
        let pids = match request.pids {
            None => self.pids,
            Some(0) => {
                return Err(PolicyError::BelowMinimum {
                    what: "pids",
                    asked: "0".into(),
                    minimum: "1".into(),
                })
            }
            Some(p) if p > self.max_pids => {
                return Err(over(
                    "pids",
                    p.to_string(),
                    self.max_pids.to_string(),
                    "max_pids",
                ))
            }
            Some(p) => p,
        };
        Ok(StepResources { memory, cpus, pids })
    }

    /// Checks the values read from `[steps]` agree with one another.
    pub(super) fn check(&self, path: &std::path::Path) -> Result<(), PolicyError> {
        let invalid = |setting: &str, problem: String| PolicyError::Invalid {
            path: PathBuf::from(path),
            setting: format!("steps.{setting}"),
            problem,
        };
        for (setting, value) in [("memory", self.memory), ("max_memory", self.max_memory)] {
            if value < MIN_MEMORY {
                return Err(invalid(
                    setting,
                    format!(
                        "{} is below the minimum of {}",
                        format_size(value),
                        format_size(MIN_MEMORY)
                    ),
                ));
            }
        }
        if self.memory > self.max_memory {
            return Err(invalid(
                "memory",
                format!(
                    "the default {} is above max_memory {}",
                    format_size(self.memory),
                    format_size(self.max_memory)
                ),
            ));
        }
        for (setting, value) in [("cpus", self.cpus), ("max_cpus", self.max_cpus)] {
            if !(value.is_finite() && value > 0.0 && value <= 1024.0) {
                return Err(invalid(
                    setting,
                    format!("{value} is not a number of CPUs between 0 and 1024"),
                ));
            }
        }
        if self.cpus > self.max_cpus {
            return Err(invalid(
                "cpus",
                format!(
                    "the default {} is above max_cpus {}",
                    self.cpus, self.max_cpus
                ),
            ));
        }
        for (setting, value) in [("pids", self.pids), ("max_pids", self.max_pids)] {
            if value == 0 || value > i64::MAX as u64 {
                return Err(invalid(
                    setting,
                    format!("{value} is not a process count of at least 1"),
                ));
            }
        }
        if self.pids > self.max_pids {
            return Err(invalid(
                "pids",
                format!(
                    "the default {} is above max_pids {}",
                    self.pids, self.max_pids
                ),
            ));
        }
        Ok(())
    }
}

/// Bytes of a size such as `1GiB`, `512Mi`, `256M`, `64k` or `1048576` (units are case-insensitive; `K`, `M`,
/// `G`, `T` are powers of 1000, `Ki`/`KiB`… powers of 1024; a trailing `B` is optional).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let whole = || format!("invalid size {text:?}: write a whole number and a unit, e.g. 512MiB");
    if unit.starts_with(['.', ',']) {
        return Err(whole());
    }
    let number: u64 = number.parse().map_err(|_| whole())?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit.strip_suffix('b').unwrap_or(&unit);
    let factor: u64 = match unit {
        "" => 1,
        "k" => 1000,
        "m" => 1000u64.pow(2),
        "g" => 1000u64.pow(3),
        "t" => 1000u64.pow(4),
        "ki" => 1 << 10,
        "mi" => 1 << 20,
        "gi" => 1 << 30,
        "ti" => 1 << 40,
        _ => {
            return Err(format!(
                "invalid unit in size {text:?}: use KiB, MiB, GiB, TiB (or K, M, G, T for powers of 1000)"
            ))
        }
    };
    number
        .checked_mul(factor)
        .filter(|bytes| *bytes <= i64::MAX as u64)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

/// A size for messages: the largest binary unit that divides it, else bytes.
pub fn format_size(bytes: u64) -> String {
    for (unit, factor) in [
        ("TiB", 1u64 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ] {
        if bytes >= factor && bytes.is_multiple_of(factor) {
            return format!("{}{unit}", bytes / factor);
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("512Mi").unwrap(), 512 << 20);
        assert_eq!(parse_size("256M").unwrap(), 256_000_000);
        assert_eq!(parse_size("64kb").unwrap(), 64_000);
        assert_eq!(parse_size(" 1048576 ").unwrap(), 1 << 20);
        assert!(parse_size("1.5GiB").unwrap_err().contains("whole number"));
        assert!(parse_size("GiB").unwrap_err().contains("whole number"));
        assert!(parse_size("5X").unwrap_err().contains("invalid unit"));
        assert!(parse_size("99999999999999999999")
            .unwrap_err()
            .contains("whole number"));
        assert!(parse_size("99999999999TiB")
            .unwrap_err()
            .contains("too large"));
        assert_eq!(format_size(3 << 30), "3GiB");
        assert_eq!(format_size(1000), "1000B");
    }

    #[test]
    fn an_action_may_ask_for_less_or_more_up_to_the_maximum() {
        let limits = ResourceLimits::default();
        let path = Path::new("/etc/policy.toml");
        let default = limits.resolve(&ResourceRequest::default(), path).unwrap();
        assert_eq!(
            default,
            StepResources {
                memory: 1 << 30,
                cpus: 1.0,
                pids: 512
            }
        );
        let asked = ResourceRequest {
            memory: Some(4 << 30),
            cpus: Some(0.5),
            pids: Some(64),
        };
        assert_eq!(
            limits.resolve(&asked, path).unwrap(),
            StepResources {
                memory: 4 << 30,
                cpus: 0.5,
                pids: 64
            }
        );
    }

    #[test]
    fn asking_above_a_maximum_names_the_setting_that_raises_it() {
        let limits = ResourceLimits::default();
        let path = Path::new("/etc/policy.toml");
        let err =
            |request: ResourceRequest| limits.resolve(&request, path).unwrap_err().to_string();
        assert_eq!(
            err(ResourceRequest {
                memory: Some(5 << 30),
                ..Default::default()
            }),
            "the step asks for memory 5GiB, above the operator's maximum 4GiB: ask for at most 4GiB, or raise `max_memory` in [steps] of /etc/policy.toml"
        );
        assert!(err(ResourceRequest {
            cpus: Some(3.0),
            ..Default::default()
        })
        .contains("raise `max_cpus`"));
        assert!(err(ResourceRequest {
            pids: Some(100_000),
            ..Default::default()
        })
        .contains("raise `max_pids`"));
        assert!(err(ResourceRequest {
            cpus: Some(f64::NAN),
            ..Default::default()
        })
        .contains("cpus"));
        assert!(err(ResourceRequest {
            memory: Some(1024),
            ..Default::default()
        })
        .contains("below the minimum"));
    }
}
