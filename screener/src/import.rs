//! Shared block lists: Spamhaus DROP-style files (`CIDR ; SBLnnn`) and
//! plain CIDR lists.
//!
//! Comments (`;` and `#`) and blank lines are ignored. A line that is not a
//! CIDR is reported with its number and skipped; the rest still imports.

use std::io::BufRead;

use ipnet::IpNet;

/// Skipped lines named one by one; the rest are only counted, so a file of
/// garbage costs no more memory than a good one.
pub const ERRORS_KEPT: usize = 100;

/// The file's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `192.0.2.0/24 ; SBL123456`, `;` comments.
    Drop,
    /// One CIDR or address per line, `#` or `;` comments.
    Cidr,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "drop" => Ok(Format::Drop),
            "cidr" => Ok(Format::Cidr),
            other => Err(format!("unknown format {other:?}: drop or cidr")),
        }
    }
}

/// What a file held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    /// The networks, in file order.
    pub nets: Vec<IpNet>,
    /// `(line number, message)` of the first [`ERRORS_KEPT`] skipped lines.
    pub errors: Vec<(usize, String)>,
    /// How many lines were skipped in all.
    pub bad: usize,
}

/// Parses a list held in memory. Lines are numbered from 1.
pub fn parse(text: &str, format: Format) -> Parsed {
    parse_reader(text.as_bytes(), format).expect("reading memory does not fail")
}

/// Parses a list line by line from `r`, never holding the whole file.
pub fn parse_reader(mut r: impl BufRead, format: Format) -> std::io::Result<Parsed> {
    let mut out = Parsed::default();
    let mut raw = Vec::new();
    let mut i = 0;
    loop {
        raw.clear();
        if r.read_until(b'\n', &mut raw)? == 0 {
            break;
        }
        i += 1;
        // A line that is not UTF-8 is not a CIDR either; its error names it.
        let line = String::from_utf8_lossy(&raw);
        let line = line.trim_end_matches(['\n', '\r']);
        let error = parse_line(line, format, &mut out.nets);
        if let Some(e) = error {
            out.bad += 1;
            if out.errors.len() < ERRORS_KEPT {
                out.errors.push((i, e));
            }
        }
    }
    Ok(out)
}

/// Parses one line into `nets`; the reason it is skipped, if it is.
fn parse_line(line: &str, format: Format, nets: &mut Vec<IpNet>) -> Option<String> {
    let body = match format {
        Format::Drop => line.split(';').next().unwrap_or(""),
        Format::Cidr => line.split(['#', ';']).next().unwrap_or(""),
    }
    .trim();
    if body.is_empty() {
        return None;
    }
    let word = body.split_whitespace().next().unwrap_or(body);
    match crate::config::parse_net(word) {
        Ok(net) if body.split_whitespace().count() == 1 => {
            nets.push(net);
            None
        }
        Ok(_) => Some(format!("unexpected text after the CIDR: {body:?}")),
        Err(e) => Some(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_lines_with_comments_and_bad_lines() {
        let text = "; Spamhaus DROP List 2026/11/21\n; Expires: ...\n\n\
                    192.0.2.0/24 ; SBL000001\n198.51.100.0/25 ; SBL000002\n\
                    not-a-cidr ; SBL3\n2001:db8::/32 ; SBL4\n";
        let p = parse(text, Format::Drop);
        assert_eq!(
            p.nets,
            vec![
                "192.0.2.0/24".parse::<IpNet>().unwrap(),
                "198.51.100.0/25".parse().unwrap(),
                "2001:db8::/32".parse().unwrap()
            ]
        );
        assert_eq!(p.errors.len(), 1);
        assert_eq!(p.errors[0].0, 6);
        assert!(p.errors[0].1.contains("not-a-cidr"));
    }

    #[test]
    fn cidr_lists_take_hosts_and_hash_comments() {
        let p = parse(
            "# list\n203.0.113.5\n203.0.113.0/28 # tail\n10.0.0.0/33\n",
            Format::Cidr,
        );
        assert_eq!(p.nets.len(), 2);
        assert_eq!(p.nets[0].to_string(), "203.0.113.5/32");
        assert_eq!(
            p.errors,
            vec![(4, "\"10.0.0.0/33\" is not an address or CIDR".into())]
        );
    }

    #[test]
    fn skipped_lines_are_counted_past_the_named_ones() {
        let text = "junk\n".repeat(ERRORS_KEPT + 5) + "192.0.2.1\r\n";
        let p = parse(&text, Format::Cidr);
        assert_eq!(p.bad, ERRORS_KEPT + 5);
        assert_eq!(p.errors.len(), ERRORS_KEPT);
        assert_eq!(p.nets, vec!["192.0.2.1/32".parse::<IpNet>().unwrap()]);
    }
}
