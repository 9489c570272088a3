//! Fuzzing reply parsing (`smtp::reply::ReplyParser`). The first four
//! input bytes seed the chunking; the rest is a server's byte stream.
//!
//! Invariants: no panic; the sequence of results (each reply's code,
//! enhanced code and text lines, or the error that ends the stream) is the
//! same whether the bytes come whole, in random chunks or one at a time; a
//! parser that failed keeps failing; every code is in 100..=599 and an
//! enhanced code's class is the code's first digit; `*pos` never goes
//! backwards or past the input; and a reply written back (`code-text` CRLF
//! for each line but the last, `code text` CRLF for the last) parses to the
//! same code, enhanced code and lines.

use smtpstorm::smtp::reply::{Reply, ReplyError, ReplyParser, MAX_REPLY_LINE};

use super::Rng;

/// One parse result with the reply's text lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    Reply(Reply, Vec<Vec<u8>>),
    Error(ReplyError),
}

/// Parses `input` fed in chunks of the given sizes (the rest whole).
pub fn parse_all(input: &[u8], sizes: &[usize]) -> Vec<Item> {
    let mut p = ReplyParser::new();
    let mut items = Vec::new();
    let mut at = 0;
    let mut sizes = sizes.iter();
    'feed: while at < input.len() {
        let n = sizes
            .next()
            .copied()
            .unwrap_or(input.len() - at)
            .min(input.len() - at);
        let chunk = &input[at..at + n];
        at += n;
        let mut pos = 0;
        while pos < chunk.len() {
            let before = pos;
            match p.parse(chunk, &mut pos) {
                Ok(Some(r)) => {
                    assert!(
                        pos > before && pos <= chunk.len(),
                        "pos {before} -> {pos} of {}",
                        chunk.len()
                    );
                    assert!((100..=599).contains(&r.code), "code {}", r.code);
                    if let Some(e) = r.enhanced {
                        assert_eq!(
                            u16::from(e.class),
                            r.code / 100,
                            "enhanced class of {}",
                            r.code
                        );
                    }
                    items.push(Item::Reply(r, p.lines().map(<[u8]>::to_vec).collect()));
                }
                Ok(None) => {
                    assert_eq!(pos, chunk.len(), "Ok(None) before the input ran out");
                }
                Err(e) => {
                    assert!(pos >= before && pos <= chunk.len());
                    items.push(Item::Error(e));
                    assert!(p.is_failed());
                    let mut again = 0;
                    assert_eq!(
                        p.parse(b"250 ok\r\n", &mut again),
                        Err(ReplyError::Failed),
                        "a failed parser parsed again"
                    );
                    break 'feed;
                }
            }
        }
    }
    items
}

/// Writes a reply back: `code-line` CRLF ..., `code line` CRLF.
pub fn write_back(code: u16, lines: &[Vec<u8>]) -> Vec<u8> {
    let mut v = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        v.extend_from_slice(code.to_string().as_bytes());
        v.push(if i + 1 == lines.len() { b' ' } else { b'-' });
        v.extend_from_slice(l);
        v.extend_from_slice(b"\r\n");
    }
    v
}

/// One fuzz case (see the module doc).
pub fn check(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    let mut rng = Rng(u64::from(u32::from_le_bytes([
        data[0], data[1], data[2], data[3],
    ])));
    let input = &data[4..];
    let whole = parse_all(input, &[]);
    let max = if rng.below(2) == 0 { 8 } else { 300 };
    let sizes = rng.chunks(input.len(), max);
    assert_eq!(
        parse_all(input, &sizes),
        whole,
        "chunks {sizes:?} changed the result"
    );
    assert_eq!(
        parse_all(input, &vec![1; input.len()]),
        whole,
        "one byte at a time changed the result"
    );
    for item in &whole {
        let Item::Reply(r, lines) = item else {
            continue;
        };
        assert!(!lines.is_empty(), "a reply without lines");
        if lines.iter().any(|l| l.len() + 6 > MAX_REPLY_LINE) {
            continue; // written back with CRLF and a space, it may no longer fit
        }
        let back = write_back(r.code, lines);
        assert_eq!(
            parse_all(&back, &[]),
            vec![item.clone()],
            "written back as {:?}",
            String::from_utf8_lossy(&back)
        );
    }
}

/// Reply lines the stable run builds streams from.
pub const LINES: &[&[u8]] = &[
    b"220 mx.example ESMTP\r\n",
    b"250-mx.example\r\n",
    b"250-PIPELINING\r\n",
    b"250-SIZE 1000\r\n",
    b"250 CHUNKING\r\n",
    b"250 2.1.0 Sender OK\r\n",
    b"354 go\r\n",
    b"421 4.4.2 bye\r\n",
    b"451 4.7.1 later\r\n",
    b"550 5.1.1 no\r\n",
    b"334 VXNlcm5hbWU6\r\n",
    b"235 2.7.0 ok\r\n",
    b"221 bye\r\n",
    b"999 what\r\n",
    b"250\r\n",
    b"250-\r\n",
    b"250 x\n",
    b"25O no\r\n",
    b"250x\r\n",
    b"550-5.7.1 one\r\n",
    b"551 5.7.1 two\r\n",
    b"250 2.0.0\r\n",
    b"250 9.9.9 odd\r\n",
];

/// A stable-run input: seed bytes, then reply lines (mutated), noise, or a
/// line beyond the limits.
pub fn generate(rng: &mut Rng) -> Vec<u8> {
    let mut input: Vec<u8> = (0..4).map(|_| rng.byte()).collect();
    match rng.below(10) {
        0 => input.extend((0..rng.index(600)).map(|_| rng.byte())),
        1 => {
            input.extend_from_slice(b"250-");
            input.extend(std::iter::repeat_n(
                b'x',
                MAX_REPLY_LINE - 16 + rng.index(32),
            ));
            input.extend_from_slice(b"\r\n250 end\r\n");
        }
        _ => {
            for _ in 0..1 + rng.below(30) {
                input.extend_from_slice(LINES[rng.index(LINES.len())]);
            }
            super::mutate(rng, &mut input, LINES, 4);
        }
    }
    input
}
