//! Durations as operators write them: `30s`, `10m`, `1h`, `7d` (also `ms` and
//! `w`, and a bare number meaning seconds, as postscreen's time parameters).
//!
//! BOUNDED. Every duration is at most [`MAX`] (ten years). Durations are
//! added to clock readings and Unix times all over the daemon (deadlines,
//! expiries, kernel entries counted in 32-bit boot-time seconds); a bound
//! at parse time keeps every one of those sums far from overflow, so an
//! absurd value is an error naming itself, never a panic or a wrapped
//! expiry later.

use std::{fmt, time::Duration};

/// The longest duration accepted anywhere: ten years.
pub const MAX: Duration = Duration::from_secs(3650 * 86_400);

/// Why a duration did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DurationError {
    /// Not a number with a known unit.
    #[error("bad duration {value:?}: expected a number with a unit such as 30s, 10m, 1h or 7d")]
    Syntax {
        /// The text that was given.
        value: String,
    },
    /// Longer than [`MAX`].
    #[error("duration {value:?} is too long: at most 3650d (ten years)")]
    TooLong {
        /// The text that was given.
        value: String,
    },
}

impl DurationError {
    /// The text that was given.
    pub fn value(&self) -> &str {
        match self {
            DurationError::Syntax { value } | DurationError::TooLong { value } => value,
        }
    }
}

/// Parses `30s`, `10m`, `1h`, `7d`, `2w`, `500ms` or `45` (seconds), at
/// most [`MAX`].
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let d = parse_unbounded(text)?;
    if d > MAX {
        return Err(DurationError::TooLong {
            value: text.to_owned(),
        });
    }
    Ok(d)
}

fn parse_unbounded(text: &str) -> Result<Duration, DurationError> {
    let too_long = || DurationError::TooLong {
        value: text.to_owned(),
    };
    let err = || DurationError::Syntax {
        value: text.to_owned(),
    };
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(err());
    }
    // All digits: the only way this fails is a number beyond u64.
    let n: u64 = num.parse().map_err(|_| too_long())?;
    let secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(err()),
    };
    n.checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(too_long)
}

/// Formats a duration in the largest unit that divides it exactly, so
/// `config show` prints what an operator would have written.
pub struct Display(pub Duration);

impl fmt::Display for Display {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_nanos() != 0 {
            return write!(f, "{}ms", d.as_millis());
        }
        let s = d.as_secs();
        for (unit, size) in [("w", 604_800), ("d", 86_400), ("h", 3600), ("m", 60)] {
            if s != 0 && s.is_multiple_of(size) {
                return write!(f, "{}{unit}", s / size);
            }
        }
        write!(f, "{s}s")
    }
}

/// Serde adapter: a `Duration` field written as `"6s"`.
pub mod serde_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&super::Display(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_operator_units() {
        for (text, secs) in [
            ("30s", 30),
            ("10m", 600),
            ("1h", 3600),
            ("7d", 604_800),
            ("2w", 1_209_600),
            ("45", 45),
        ] {
            assert_eq!(parse(text), Ok(Duration::from_secs(secs)), "{text}");
        }
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
    }

    #[test]
    fn rejects_garbage_naming_it() {
        for bad in ["", "s", "10x", "-1s", "1.5h", "1 h", "ms"] {
            let e = parse(bad).unwrap_err();
            assert!(matches!(e, DurationError::Syntax { .. }), "{bad}: {e}");
            assert_eq!(e.value(), bad);
            assert!(e.to_string().contains(&format!("{bad:?}")));
        }
    }

    #[test]
    fn refuses_more_than_ten_years_saying_the_bound() {
        for bad in [
            "18446744073709551615s",
            "18446744073709551616s",
            "99999999999999999999d",
            "3651d",
            "522w",
            "315360000001",
            "315360000001000ms",
            "18446744073709551615ms",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(matches!(e, DurationError::TooLong { .. }), "{bad}: {e}");
            assert_eq!(e.value(), bad);
            let msg = e.to_string();
            assert!(msg.contains(&format!("{bad:?}")), "{msg}");
            assert!(msg.contains("at most 3650d"), "{msg}");
        }
        assert_eq!(parse("3650d"), Ok(MAX));
        assert_eq!(parse("315360000s"), Ok(MAX));
    }

    #[test]
    fn displays_in_largest_exact_unit() {
        for text in ["6s", "90s", "10m", "1h", "1d", "30d", "2w", "250ms"] {
            let d = parse(text).unwrap();
            assert_eq!(Display(d).to_string(), text);
        }
    }
}
