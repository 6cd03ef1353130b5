//! A strict reader of the `OpenMetrics` text format, for scraping the
//! daemon's `/metrics` in tests and benchmarks, and a minimal HTTP GET.
//!
//! Strict where a scraper would be: every sample belongs to the family
//! whose `# TYPE` precedes it and carries a suffix its type allows,
//! families are declared once and their samples are contiguous, label
//! values are quoted and escaped, histogram buckets are cumulative with a
//! `+Inf` bucket equal to `_count`, and the text ends with `# EOF`.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The sample's full name (`screener_blocks_total`).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// One metric family.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Family {
    /// `counter`, `gauge`, `histogram`, ...
    pub kind: String,
    /// Its `# HELP` text.
    pub help: String,
    /// Its samples, in order.
    pub samples: Vec<Sample>,
}

/// A parsed exposition.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Exposition {
    /// Families by name.
    pub families: BTreeMap<String, Family>,
}

impl Exposition {
    /// The value of the sample `name` whose labels include `labels`; the
    /// sum when several match; `None` when none does.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for f in self.families.values() {
            for s in f.samples.iter().filter(|s| s.name == name) {
                if labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
                {
                    *found.get_or_insert(0.0) += s.value;
                }
            }
        }
        found
    }

    /// Like [`Exposition::get`], panicking when nothing matches.
    #[track_caller]
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in the exposition"))
    }

    /// Like [`Exposition::value`], for a count: panics unless the value
    /// is a whole number a `u64` holds exactly.
    #[track_caller]
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let v = self.value(name, labels);
        assert!(
            (0.0..9.0e15).contains(&v) && v.fract() == 0.0,
            "{name}{labels:?} = {v} is not a count"
        );
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "checked whole and in range just above"
        )]
        let n = v as u64;
        n
    }

    /// Every sample name served.
    pub fn sample_names(&self) -> std::collections::BTreeSet<String> {
        self.families
            .values()
            .flat_map(|f| f.samples.iter().map(|s| s.name.clone()))
            .collect()
    }
}

fn valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Reads `{k="v",...}` at the start of `s`; returns the labels and the rest.
fn labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut out = BTreeMap::new();
    let Some(mut rest) = s.strip_prefix('{') else {
        return Ok((out, s));
    };
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((out, r));
        }
        let eq = rest.find('=').ok_or("label without =")?;
        let key = &rest[..eq];
        if !valid_name(key) {
            return Err(format!("bad label name {key:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next().ok_or("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                    'n' => value.push('\n'),
                    c @ ('\\' | '"') => value.push(c),
                    c => return Err(format!("bad escape \\{c}")),
                },
                (_, c) => value.push(c),
            }
        };
        if out.insert(key.to_owned(), value).is_some() {
            return Err(format!("label {key} twice"));
        }
        rest = &rest[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

fn number(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        _ => s.parse().map_err(|_| format!("bad number {s:?}")),
    }
}

/// Parses an exposition, refusing anything a strict scraper would.
pub fn parse(text: &str) -> Result<Exposition, String> {
    let body = text.strip_suffix("# EOF\n").ok_or("no # EOF at the end")?;
    let mut out = Exposition::default();
    let mut current: Option<String> = None;
    for (n, line) in body.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kw, name, arg) = (
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
            );
            if !valid_name(name) {
                return Err(at(format!("bad family name {name:?}")));
            }
            if current.as_deref() != Some(name) {
                if out.families.contains_key(name) {
                    return Err(at(format!("family {name} declared twice")));
                }
                out.families.insert(name.to_owned(), Family::default());
                current = Some(name.to_owned());
            }
            let f = out.families.get_mut(name).expect("just inserted");
            if !f.samples.is_empty() {
                return Err(at("metadata after samples".into()));
            }
            match kw {
                "HELP" => arg.clone_into(&mut f.help),
                "TYPE" => arg.clone_into(&mut f.kind),
                "UNIT" => {
                    if !name.ends_with(&format!("_{arg}")) {
                        return Err(at(format!("unit {arg} not in the name")));
                    }
                }
                _ => return Err(at(format!("unknown keyword {kw}"))),
            }
            continue;
        }
        let family = current
            .clone()
            .ok_or_else(|| at("sample before any family".into()))?;
        let f = out.families.get_mut(&family).expect("current family");
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        let suffix = name
            .strip_prefix(family.as_str())
            .ok_or_else(|| at(format!("{name} outside family {family}")))?;
        let allowed: &[&str] = match f.kind.as_str() {
            "counter" => &["_total", "_created"],
            "gauge" | "unknown" => &[""],
            "histogram" => &["_bucket", "_sum", "_count", "_created"],
            "info" => &["_info"],
            k => return Err(at(format!("unsupported type {k:?}"))),
        };
        if !allowed.contains(&suffix) {
            return Err(at(format!("{name} not allowed in {} {family}", f.kind)));
        }
        let (labels, rest) = labels(&line[name_end..]).map_err(at)?;
        let value = rest
            .strip_prefix(' ')
            .ok_or_else(|| at("no space before the value".into()))?;
        // No timestamps or exemplars are expected from the daemon.
        let value = number(value).map_err(at)?;
        if f.kind == "counter" && value < 0.0 {
            return Err(at("negative counter".into()));
        }
        f.samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    for (name, f) in &out.families {
        if f.kind.is_empty() {
            return Err(format!("family {name} has no TYPE"));
        }
        if f.kind == "histogram" {
            check_histogram(name, f)?;
        }
    }
    Ok(out)
}

/// One histogram series: its `(le, count)` buckets and its `_count`.
type Series = (Vec<(f64, f64)>, Option<f64>);

/// Buckets cumulative per label set, `+Inf` present and equal to `_count`.
fn check_histogram(name: &str, f: &Family) -> Result<(), String> {
    let mut series: BTreeMap<Vec<(String, String)>, Series> = BTreeMap::new();
    for s in &f.samples {
        let mut key: Vec<(String, String)> = s
            .labels
            .iter()
            .filter(|(k, _)| *k != "le")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        key.sort();
        let e = series.entry(key).or_default();
        if s.name.ends_with("_bucket") {
            let le = s
                .labels
                .get("le")
                .ok_or(format!("{name}: bucket without le"))?;
            e.0.push((number(le)?, s.value));
        } else if s.name.ends_with("_count") {
            e.1 = Some(s.value);
        }
    }
    for (labels, (buckets, count)) in series {
        if !buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1)
        {
            return Err(format!("{name}{labels:?}: buckets not cumulative"));
        }
        let inf = buckets.last().filter(|b| b.0.is_infinite()).map(|b| b.1);
        if inf.is_none() || inf != count {
            return Err(format!(
                "{name}{labels:?}: +Inf bucket {inf:?} != count {count:?}"
            ));
        }
    }
    Ok(())
}

/// `GET http://addr/path` with HTTP/1.1: (status line, content type, body).
#[track_caller]
pub fn get(addr: SocketAddr, path: &str) -> (String, String, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connecting to the metrics endpoint {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/openmetrics-text\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.lines().next().unwrap_or_default().to_owned();
    let ctype = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Type: "))
        .unwrap_or_default()
        .to_owned();
    (status, ctype, body.to_owned())
}

/// Scrapes `/metrics` at `addr` and parses it, panicking on any fault.
#[track_caller]
pub fn scrape(addr: SocketAddr) -> Exposition {
    let (status, ctype, body) = get(addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    assert!(
        ctype.starts_with("application/openmetrics-text; version=1.0.0"),
        "{ctype}"
    );
    parse(&body).unwrap_or_else(|e| panic!("{e}\n{body}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_well_formed_exposition_parses() {
        let text = "# HELP a_seconds A.\n# TYPE a_seconds histogram\n# UNIT a_seconds seconds\n\
                    a_seconds_sum{x=\"q\\\"\"} 1.5\na_seconds_count{x=\"q\\\"\"} 2\n\
                    a_seconds_bucket{le=\"1.0\",x=\"q\\\"\"} 1\na_seconds_bucket{le=\"+Inf\",x=\"q\\\"\"} 2\n\
                    # HELP b B.\n# TYPE b counter\nb_total{k=\"v\"} 3\n# EOF\n";
        let e = parse(text).unwrap();
        assert_eq!(e.count("b_total", &[("k", "v")]), 3);
        assert_eq!(e.count("a_seconds_count", &[("x", "q\"")]), 2);
    }

    #[test]
    fn faults_a_scraper_would_refuse_are_refused() {
        for bad in [
            "# TYPE b counter\nb_total 1\n",                // no EOF
            "# TYPE b counter\nb 1\n# EOF\n",               // counter without _total
            "# TYPE b counter\nc_total 1\n# EOF\n",         // outside its family
            "b 1\n# EOF\n",                                 // no family
            "# TYPE b gauge\nb{k=v} 1\n# EOF\n",            // unquoted
            "# TYPE b gauge\nb 1\n# TYPE b gauge\n# EOF\n", // declared twice
            "# TYPE b gauge\nb x\n# EOF\n",                 // not a number
            "# TYPE h histogram\nh_count 2\nh_bucket{le=\"+Inf\"} 1\n# EOF\n", // +Inf != count
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
    }
}
