//! DNSBL site specifications: `domain[=filter][*weight]`.
//!
//! The filter is an IPv4 pattern matched against the list's A answers, one
//! field per octet; a field is a number or a bracketed list of numbers and
//! ranges, `127.0.0.[2;4..11]`. The weight is added to the client's score
//! once when the site lists it; a negative weight makes the site an
//! allowlist. Everything is checked when the configuration is read, so a
//! typo stops the daemon at start-up instead of silently scoring nobody.

use std::fmt;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::str::FromStr;

/// A bad `dnsbl_sites` entry; the message names the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad DNSBL site \"{spec}\": {reason}")]
pub struct SiteSpecError {
    /// The entry as written in the configuration.
    pub spec: String,
    /// What is wrong with it.
    pub reason: String,
}

/// One `dnsbl_sites` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteSpec {
    /// The list's query domain, lower case, without a trailing dot.
    pub domain: String,
    /// Which answers count as a listing; `None`: any answer that is not an
    /// error code.
    pub filter: Option<Filter>,
    /// Added to the score when the site lists the client (default 1).
    pub weight: i32,
}

/// An IPv4 answer pattern: four fields, each a set of octet ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// One set of ranges per octet, most significant first.
    fields: [Vec<RangeInclusive<u8>>; 4],
}

impl Filter {
    /// Whether `addr` matches every field of the pattern.
    pub fn matches(&self, addr: Ipv4Addr) -> bool {
        self.fields
            .iter()
            .zip(addr.octets())
            .all(|(ranges, octet)| ranges.iter().any(|r| r.contains(&octet)))
    }
}

impl FromStr for Filter {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let parts = split_fields(s);
        if parts.len() != 4 {
            return Err(format!(
                "filter \"{s}\" must have four dot-separated fields, not {}",
                parts.len()
            ));
        }
        let mut fields: [Vec<RangeInclusive<u8>>; 4] = Default::default();
        for (field, part) in fields.iter_mut().zip(parts) {
            *field = parse_field(part).map_err(|e| format!("filter \"{s}\": {e}"))?;
        }
        Ok(Filter { fields })
    }
}

/// Splits at the dots between fields, not at the `..` inside brackets.
fn split_fields(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0u32, 0);
    for (i, b) in s.bytes().enumerate() {
        match b {
            b'[' => depth += 1,
            b']' => depth = depth.saturating_sub(1),
            b'.' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// One filter field: `n` or `[item;item;…]` with items `n` or `n..m`.
fn parse_field(field: &str) -> Result<Vec<RangeInclusive<u8>>, String> {
    let Some(inner) = field.strip_prefix('[') else {
        let n = parse_octet(field)?;
        return Ok(vec![n..=n]);
    };
    let inner = inner
        .strip_suffix(']')
        .ok_or_else(|| format!("field \"{field}\" lacks its closing ']'"))?;
    inner
        .split(';')
        .map(|item| match item.split_once("..") {
            None => parse_octet(item).map(|n| n..=n),
            Some((lo, hi)) => {
                let (lo, hi) = (parse_octet(lo)?, parse_octet(hi)?);
                if lo > hi {
                    return Err(format!("range \"{item}\" runs backwards"));
                }
                Ok(lo..=hi)
            }
        })
        .collect()
}

fn parse_octet(s: &str) -> Result<u8, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("\"{s}\" is not a number from 0 to 255"));
    }
    s.parse()
        .map_err(|_| format!("\"{s}\" is not a number from 0 to 255"))
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, ranges) in self.fields.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            match ranges.as_slice() {
                [r] if r.start() == r.end() => write!(f, "{}", r.start())?,
                _ => {
                    f.write_str("[")?;
                    for (j, r) in ranges.iter().enumerate() {
                        if j > 0 {
                            f.write_str(";")?;
                        }
                        if r.start() == r.end() {
                            write!(f, "{}", r.start())?;
                        } else {
                            write!(f, "{}..{}", r.start(), r.end())?;
                        }
                    }
                    f.write_str("]")?;
                }
            }
        }
        Ok(())
    }
}

impl FromStr for SiteSpec {
    type Err = SiteSpecError;

    fn from_str(spec: &str) -> Result<Self, SiteSpecError> {
        let fail = |reason: String| SiteSpecError {
            spec: spec.to_owned(),
            reason,
        };
        let (rest, weight) = match spec.rsplit_once('*') {
            None => (spec, 1),
            Some((rest, w)) => {
                let weight = w
                    .parse::<i32>()
                    .map_err(|_| fail(format!("weight \"{w}\" is not an integer")))?;
                (rest, weight)
            }
        };
        let (domain, filter) = match rest.split_once('=') {
            None => (rest, None),
            Some((domain, filter)) => (domain, Some(filter.parse::<Filter>().map_err(fail)?)),
        };
        let domain = normalize_domain(domain).map_err(fail)?;
        Ok(SiteSpec {
            domain,
            filter,
            weight,
        })
    }
}

impl fmt::Display for SiteSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.domain)?;
        if let Some(filter) = &self.filter {
            write!(f, "={filter}")?;
        }
        if self.weight != 1 {
            write!(f, "*{}", self.weight)?;
        }
        Ok(())
    }
}

/// Lower-cases a list domain and drops a trailing dot, after checking that
/// it is a host name a query can be built under (letters, digits, `-`, `_`,
/// non-empty labels of at most 63 bytes).
pub(crate) fn normalize_domain(domain: &str) -> Result<String, String> {
    let trimmed = domain.strip_suffix('.').unwrap_or(domain);
    if trimmed.is_empty() {
        return Err("the domain is empty".to_owned());
    }
    // Room for the longest IPv4 query prefix ("255.255.255.255.") in a
    // 253-byte name; an IPv6 query that does not fit fails at lookup time.
    if trimmed.len() > 253 - 16 {
        return Err(format!("domain \"{domain}\" is too long"));
    }
    for label in trimmed.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!(
                "domain \"{domain}\" has an empty or over-long label"
            ));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!("domain \"{domain}\" is not a valid DNS name"));
        }
    }
    Ok(trimmed.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn spec(s: &str) -> SiteSpec {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn plain_domain_has_weight_one_and_no_filter() {
        let s = spec("zen.example");
        assert_eq!(s.domain, "zen.example");
        assert_eq!(s.weight, 1);
        assert!(s.filter.is_none());
    }

    #[test]
    fn domain_is_normalized() {
        assert_eq!(spec("ZEN.Example.").domain, "zen.example");
    }

    #[test]
    fn filter_and_weight() {
        let s = spec("zen.example=127.0.0.[2..11]*3");
        assert_eq!(s.weight, 3);
        let f = s.filter.unwrap();
        assert!(f.matches(Ipv4Addr::new(127, 0, 0, 2)));
        assert!(f.matches(Ipv4Addr::new(127, 0, 0, 11)));
        assert!(!f.matches(Ipv4Addr::LOCALHOST));
        assert!(!f.matches(Ipv4Addr::new(127, 0, 0, 12)));
        assert!(!f.matches(Ipv4Addr::new(127, 0, 1, 2)));
    }

    #[test]
    fn negative_weight_and_lists_in_several_fields() {
        let s = spec("wl.example=127.0.[0..255].[1..3;7]*-2");
        assert_eq!(s.weight, -2);
        let f = s.filter.unwrap();
        assert!(f.matches(Ipv4Addr::new(127, 0, 15, 3)));
        assert!(f.matches(Ipv4Addr::new(127, 0, 200, 7)));
        assert!(!f.matches(Ipv4Addr::new(127, 0, 15, 4)));
        assert!(!f.matches(Ipv4Addr::new(127, 0, 15, 255)));
    }

    #[test]
    fn weight_without_filter() {
        let s = spec("bl.example*-5");
        assert_eq!((s.weight, s.filter), (-5, None));
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "zen.example",
            "zen.example=127.0.0.[2..11]*3",
            "wl.example=127.0.[0..255].[1;3..4]*-2",
            "bl.example*0",
        ] {
            assert_eq!(spec(text).to_string(), text);
        }
    }

    #[test]
    fn bad_specs_are_errors_naming_the_spec() {
        for bad in [
            "",
            "=127.0.0.2",
            "zen.example=127.0.0",
            "zen.example=127.0.0.256",
            "zen.example=127.0.0.[2..1]",
            "zen.example=127.0.0.[2..11",
            "zen.example=127.0.0.[]",
            "zen.example=127.0.0.-1",
            "zen.example=127.0.0.2*",
            "zen.example*three",
            "zen..example",
            "zen example",
            "zen.example*99999999999",
        ] {
            let err = bad.parse::<SiteSpec>().expect_err(bad);
            assert_eq!(err.spec, bad);
            assert!(err.to_string().contains(&format!("\"{bad}\"")), "{err}");
        }
    }
}
