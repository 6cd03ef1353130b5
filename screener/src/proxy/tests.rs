use std::pin::Pin;
use std::task::{Context, Poll};

use proptest::prelude::*;
use tokio::io::{AsyncWriteExt, ReadBuf};

use super::*;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn v2_with(fam: u8, cmd: u8, body: &[u8]) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x20 | cmd);
    out.push(fam);
    out.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
    out.extend_from_slice(body);
    out
}

#[track_caller]
fn parses_to(bytes: &[u8], want: Option<(SocketAddr, SocketAddr)>) {
    let got = parse(bytes).unwrap_or_else(|e| panic!("{e}: {bytes:?}"));
    assert_eq!(
        got,
        Some((Header { source: want }, bytes.len())),
        "{bytes:?}"
    );
}

#[test]
fn v1_encoding_is_the_documented_text() {
    assert_eq!(
        encode(Version::V1, sa("192.0.2.1:56324"), sa("198.51.100.1:25")),
        b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 25\r\n"
    );
    assert_eq!(
        encode(Version::V1, sa("[2001:db8::1]:1"), sa("[2001:db8::25]:25")),
        b"PROXY TCP6 2001:db8::1 2001:db8::25 1 25\r\n"
    );
    assert_eq!(encode_local(Version::V1), b"PROXY UNKNOWN\r\n");
}

#[test]
fn v2_encoding_is_the_documented_layout() {
    let got = encode(Version::V2, sa("192.0.2.1:56324"), sa("198.51.100.1:25"));
    let mut want = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    want.extend_from_slice(&[192, 0, 2, 1, 198, 51, 100, 1, 0xdc, 0x04, 0, 25]);
    assert_eq!(got, want);

    let got = encode(Version::V2, sa("[2001:db8::1]:1"), sa("[2001:db8::2]:2"));
    assert_eq!(&got[12..16], &[0x21, 0x21, 0x00, 36]);
    assert_eq!(got.len(), 16 + 36);

    assert_eq!(
        encode_local(Version::V2),
        b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00"
    );
}

#[test]
fn round_trips_for_both_versions_and_families() {
    let pairs = [
        (sa("192.0.2.1:56324"), sa("198.51.100.1:25")),
        (sa("[2001:db8::1]:65535"), sa("[2001:db8:ffff::25]:0")),
        (sa("0.0.0.0:0"), sa("255.255.255.255:65535")),
    ];
    for v in [Version::V1, Version::V2] {
        for (c, s) in pairs {
            parses_to(&encode(v, c, s), Some((c, s)));
        }
        parses_to(&encode_local(v), None);
    }
}

#[test]
fn mapped_and_mixed_families() {
    for v in [Version::V1, Version::V2] {
        // Dual-stack listener view of an IPv4 connection: written as IPv4.
        parses_to(
            &encode(
                v,
                sa("[::ffff:192.0.2.1]:5"),
                sa("[::ffff:198.51.100.1]:25"),
            ),
            Some((sa("192.0.2.1:5"), sa("198.51.100.1:25"))),
        );
        // Mixed: one family for both, IPv4 v4-mapped.
        parses_to(
            &encode(v, sa("192.0.2.1:5"), sa("[2001:db8::25]:25")),
            Some((sa("[::ffff:192.0.2.1]:5"), sa("[2001:db8::25]:25"))),
        );
        parses_to(
            &encode(v, sa("[2001:db8::1]:5"), sa("198.51.100.1:25")),
            Some((sa("[2001:db8::1]:5"), sa("[::ffff:198.51.100.1]:25"))),
        );
    }
    assert!(
        encode(Version::V1, sa("192.0.2.1:5"), sa("[2001:db8::25]:25"))
            .starts_with(b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::25 ")
    );
}

#[test]
fn consumed_stops_at_the_header_end() {
    for v in [Version::V1, Version::V2] {
        let h = encode(v, sa("192.0.2.1:5"), sa("198.51.100.1:25"));
        let mut with_smtp = h.clone();
        with_smtp.extend_from_slice(b"EHLO x\r\n");
        let (_, used) = parse(&with_smtp).unwrap().unwrap();
        assert_eq!(used, h.len());
    }
}

#[test]
fn v1_unknown_ignores_the_rest_of_the_line() {
    parses_to(b"PROXY UNKNOWN\r\n", None);
    parses_to(
        b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
        None,
    );
}

#[test]
fn v1_longest_line_fits_and_one_more_byte_does_not() {
    let c = sa("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535");
    let longest = encode(Version::V1, c, c);
    assert_eq!(longest.len(), 104);
    parses_to(&longest, Some((c, c)));
    // UNKNOWN lines may carry anything: pad one to the limit and past it.
    let mut line = b"PROXY UNKNOWN ".to_vec();
    line.resize(V1_MAX - 2, b'x');
    line.extend_from_slice(b"\r\n");
    parses_to(&line, None);
    let mut too_long = b"PROXY UNKNOWN ".to_vec();
    too_long.resize(V1_MAX - 1, b'x');
    too_long.extend_from_slice(b"\r\n");
    assert_eq!(parse(&too_long), Err(ProxyError::V1TooLong));
    assert_eq!(parse(&too_long[..V1_MAX]), Err(ProxyError::V1TooLong));
}

#[test]
fn v2_tlvs_are_skipped_when_they_fit() {
    let mut body = vec![192, 0, 2, 1, 198, 51, 100, 1, 0, 5, 0, 25];
    body.extend_from_slice(&[0x04, 0x00, 0x00]); // PP2_TYPE_NOOP, empty
    body.extend_from_slice(&[0x02, 0x00, 0x03, b'a', b'b', b'c']); // authority
    let h = v2_with(V2_TCP4, V2_CMD_PROXY, &body);
    parses_to(&h, Some((sa("192.0.2.1:5"), sa("198.51.100.1:25"))));
    for n in 0..h.len() {
        assert_eq!(parse(&h[..n]), Ok(None), "prefix of {n} bytes");
    }

    let mut short = body.clone();
    short.extend_from_slice(&[0x02, 0x00, 0x05, b'a']);
    assert_eq!(
        parse(&v2_with(V2_TCP4, V2_CMD_PROXY, &short)),
        Err(ProxyError::V2BadTlv)
    );
    let mut stub = body;
    stub.extend_from_slice(&[0x02, 0x00]);
    assert_eq!(
        parse(&v2_with(V2_TCP4, V2_CMD_PROXY, &stub)),
        Err(ProxyError::V2BadTlv)
    );
}

#[test]
fn v2_local_and_unspec_carry_no_addresses() {
    // LOCAL ignores whatever follows, even an address block.
    parses_to(&v2_with(V2_TCP4, V2_CMD_LOCAL, &[1; 12]), None);
    parses_to(&v2_with(0x31, V2_CMD_LOCAL, &[]), None);
    parses_to(&v2_with(0x00, V2_CMD_PROXY, &[]), None);
    parses_to(&v2_with(0x00, V2_CMD_PROXY, &[9; 7]), None);
}

#[test]
fn every_truncation_of_a_valid_header_needs_more() {
    let mut headers = vec![encode_local(Version::V1), encode_local(Version::V2)];
    for v in [Version::V1, Version::V2] {
        headers.push(encode(v, sa("192.0.2.1:5"), sa("198.51.100.1:25")));
        headers.push(encode(v, sa("[2001:db8::1]:5"), sa("[2001:db8::2]:25")));
    }
    headers.push(b"PROXY UNKNOWN 1 2 3 4\r\n".to_vec());
    for h in &headers {
        for n in 0..h.len() {
            assert_eq!(parse(&h[..n]), Ok(None), "{:?}", &h[..n]);
        }
    }
}

#[test]
fn garbage_is_refused_with_a_reason() {
    use ProxyError as E;
    let cases: &[(&[u8], ProxyError)] = &[
        (b"EHLO example.com\r\n", E::NotProxy),
        (b"\x16\x03\x01", E::NotProxy),
        (b"POST / HTTP/1.1\r\n", E::NotProxy),
        (b"proxy TCP4", E::NotProxy),
        (
            b"PROXY TCP5 192.0.2.1 192.0.2.2 1 2\r\n",
            E::V1Malformed("protocol is not TCP4, TCP6 or UNKNOWN"),
        ),
        (
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n",
            E::V1Malformed("line ends in a bare LF"),
        ),
        (
            b"PROXY TCP4 192.0.2.1  192.0.2.2 1 2\r\n",
            E::V1Malformed("want four fields after the protocol, separated by single spaces"),
        ),
        (
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n",
            E::V1Malformed("want four fields after the protocol, separated by single spaces"),
        ),
        (
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 \r\n",
            E::V1Malformed("want four fields after the protocol, separated by single spaces"),
        ),
        (
            b"PROXY TCP4 2001:db8::1 192.0.2.2 1 2\r\n",
            E::V1Malformed("bad TCP4 address"),
        ),
        (
            b"PROXY TCP4 192.0.2.01 192.0.2.2 1 2\r\n",
            E::V1Malformed("bad TCP4 address"),
        ),
        (
            b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n",
            E::V1Malformed("bad TCP6 address"),
        ),
        (
            b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 2\r\n",
            E::V1Malformed("bad port"),
        ),
        (
            b"PROXY TCP4 192.0.2.1 192.0.2.2 025 2\r\n",
            E::V1Malformed("bad port"),
        ),
        (
            b"PROXY TCP4 192.0.2.1 192.0.2.2 +25 2\r\n",
            E::V1Malformed("bad port"),
        ),
        (
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 \r\n",
            E::V1Malformed("bad port"),
        ),
        (
            b"PROXY TCP4 192.0.2.1\x00",
            E::V1Malformed("control or non-ASCII byte"),
        ),
        (
            b"PROXY TCP4 192.0.2.1\r192",
            E::V1Malformed("control or non-ASCII byte"),
        ),
        (
            b"PROXY UNKNOWN \xc3\xa9\r\n",
            E::V1Malformed("control or non-ASCII byte"),
        ),
        (b"\r\n\r\n\0\r\nQUIX\n", E::V2BadSignature),
        (b"\r\r", E::V2BadSignature),
        (b"\r\n\r\n\0\r\nQUIT\n\x11", E::V2Version(1)),
        (b"\r\n\r\n\0\r\nQUIT\n\x22", E::V2Command(2)),
        (
            b"\r\n\r\n\0\r\nQUIT\n\x21\x12\x00\x0c",
            E::V2Unsupported(0x12),
        ),
        (
            b"\r\n\r\n\0\r\nQUIT\n\x21\x31\x00\xd8",
            E::V2Unsupported(0x31),
        ),
        (
            b"\r\n\r\n\0\r\nQUIT\n\x21\x41\x00\x00",
            E::V2Unsupported(0x41),
        ),
        (
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0b",
            E::V2TooShort { len: 11, need: 12 },
        ),
        (
            b"\r\n\r\n\0\r\nQUIT\n\x21\x21\x00\x0c",
            E::V2TooShort { len: 12, need: 36 },
        ),
    ];
    for (bytes, want) in cases {
        assert_eq!(parse(bytes).as_ref(), Err(want), "{bytes:?}");
    }
    assert_eq!(ProxyError::V2BadSignature.to_string(), "bad v2 signature");
    assert_eq!(
        ProxyError::V1TooLong.to_string(),
        "PROXY v1 header too long"
    );
}

/// Hands out at most one byte per read, like a peer trickling its header.
struct Trickle<'a>(&'a [u8]);

impl AsyncRead for Trickle<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some((first, rest)) = self.0.split_first() {
            if buf.remaining() > 0 {
                buf.put_slice(&[*first]);
                self.0 = rest;
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn read_header_leaves_the_session_bytes_unread() {
    let c = sa("192.0.2.1:5");
    let s = sa("198.51.100.1:25");
    let mut headers = vec![
        encode(Version::V1, c, s),
        encode(Version::V2, c, s),
        encode_local(Version::V1),
        encode_local(Version::V2),
        v2_with(V2_TCP4, V2_CMD_PROXY, &{
            let mut b = encode(Version::V2, c, s)[16..].to_vec();
            b.extend_from_slice(&[0xee, 0x00, 0x02, 1, 2]);
            b
        }),
    ];
    headers.push(encode(
        Version::V1,
        sa("[2001:db8::1]:5"),
        sa("[2001:db8::2]:25"),
    ));
    for h in headers {
        let want = parse(&h).unwrap().unwrap().0;
        let mut input = h.clone();
        input.extend_from_slice(b"\r\n\r\nEHLO x\r\n");

        // A slice reader hands out as much as asked for: any over-read shows.
        let mut r: &[u8] = &input;
        assert_eq!(read_header(&mut r, Duration::from_secs(5)).await, Ok(want));
        assert_eq!(r, b"\r\n\r\nEHLO x\r\n", "after {h:?}");

        let mut r = Trickle(&input);
        assert_eq!(read_header(&mut r, Duration::from_secs(5)).await, Ok(want));
        assert_eq!(r.0, b"\r\n\r\nEHLO x\r\n");
    }
}

#[tokio::test(start_paused = true)]
async fn read_header_times_out_on_a_stalled_peer() {
    let (mut peer, mut ours) = tokio::io::duplex(256);
    peer.write_all(b"PROXY TCP4 192.0.2.1 ").await.unwrap();
    let started = tokio::time::Instant::now();
    let got = read_header(&mut ours, Duration::from_secs(3)).await;
    assert_eq!(got, Err(ProxyError::Timeout));
    assert_eq!(started.elapsed(), Duration::from_secs(3));
    drop(peer);
}

#[tokio::test(start_paused = true)]
async fn read_header_refuses_garbage_without_waiting() {
    let (mut peer, mut ours) = tokio::io::duplex(256);
    peer.write_all(b"EHLO x\r\n").await.unwrap();
    let started = tokio::time::Instant::now();
    let got = read_header(&mut ours, Duration::from_secs(3)).await;
    assert_eq!(got, Err(ProxyError::NotProxy));
    assert_eq!(started.elapsed(), Duration::ZERO);
    drop(peer);
}

#[tokio::test]
async fn read_header_reports_a_close_mid_header() {
    let (mut peer, mut ours) = tokio::io::duplex(256);
    peer.write_all(&encode(Version::V2, sa("192.0.2.1:5"), sa("198.51.100.1:25"))[..20])
        .await
        .unwrap();
    drop(peer);
    let got = read_header(&mut ours, Duration::from_secs(3)).await;
    assert_eq!(got, Err(ProxyError::Closed));
}

fn any_socket_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::new(IpAddr::from(a), p)),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::new(IpAddr::from(a), p)),
    ]
}

fn any_version() -> impl Strategy<Value = Version> {
    prop_oneof![Just(Version::V1), Just(Version::V2)]
}

/// A valid header of either version, sometimes with TLVs or no addresses.
fn any_valid_header() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (any_version(), any_socket_addr(), any_socket_addr()).prop_map(|(v, c, s)| encode(v, c, s)),
        any_version().prop_map(encode_local),
        (
            any_socket_addr(),
            any_socket_addr(),
            prop::collection::vec(
                (any::<u8>(), prop::collection::vec(any::<u8>(), 0..20)),
                0..4
            )
        )
            .prop_map(|(c, s, tlvs)| {
                let h = encode(Version::V2, c, s);
                let mut body = h[16..].to_vec();
                for (t, v) in tlvs {
                    body.push(t);
                    body.extend_from_slice(&u16::try_from(v.len()).unwrap().to_be_bytes());
                    body.extend_from_slice(&v);
                }
                v2_with(h[13], V2_CMD_PROXY, &body)
            }),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn any_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, x)| Mutation::Flip(i, x)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Remove),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(mut h: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        let n = h.len().max(1);
        match *m {
            Mutation::Flip(i, x) if !h.is_empty() => h[i % n] ^= x,
            Mutation::Insert(i, b) => h.insert(i % (h.len() + 1), b),
            Mutation::Remove(i) if !h.is_empty() => {
                h.remove(i % n);
            }
            Mutation::Truncate(i) => h.truncate(i % (h.len() + 1)),
            _ => {}
        }
    }
    h
}

/// What `parse` promises for any input.
fn check_contract(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(Some((_, used))) = parse(bytes) {
        prop_assert!(used > 0 && used <= bytes.len());
        // The header alone parses the same way.
        prop_assert_eq!(parse(&bytes[..used]), parse(bytes));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn bad_input_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        check_contract(&bytes)?;
    }

    #[test]
    fn lookalike_input_never_panics(
        start in prop_oneof![Just(&b"PROXY "[..]), Just(&V2_SIGNATURE[..])],
        tail in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut bytes = start.to_vec();
        bytes.extend_from_slice(&tail);
        check_contract(&bytes)?;
    }

    #[test]
    fn mutated_headers_never_panic(
        h in any_valid_header(),
        muts in prop::collection::vec(any_mutation(), 1..4),
    ) {
        check_contract(&apply(h, &muts))?;
    }

    #[test]
    fn encode_parse_round_trip(v in any_version(), c in any_socket_addr(), s in any_socket_addr()) {
        let h = encode(v, c, s);
        let (got, used) = parse(&h).unwrap().unwrap();
        prop_assert_eq!(used, h.len());
        let (gc, gs) = got.source.unwrap();
        prop_assert_eq!((gc.port(), gs.port()), (c.port(), s.port()));
        prop_assert_eq!(gc.ip().to_canonical(), c.ip().to_canonical());
        prop_assert_eq!(gs.ip().to_canonical(), s.ip().to_canonical());
        for n in 0..h.len() {
            prop_assert_eq!(parse(&h[..n]), Ok(None));
        }
    }
}
