//! Reading RESP commands and writing RESP replies.
//!
//! A command is either a multibulk array of bulk strings (what every client library,
//! `redis-cli` and `redis-benchmark` send):
//!
//! ```text
//! *<n>\r\n  then n times  $<len>\r\n<len bytes>\r\n
//! ```
//!
//! or an inline command (a line of words separated by spaces, what a person types into
//! `telnet`), ended by `\n` (a `\r` before it is dropped). Limits, as Redis has them: at most
//! `ARGS_MAX` arguments, a bulk of at most the caller's `bulk_max` bytes, an inline line or a
//! length line of at most `LINE_BYTES_MAX`. A violation is a `ProtocolError`, after which the
//! connection answers `-ERR Protocol error: ...` and closes (the stream cannot be resynchronised).
//!
//! Parsing is zero-copy: a command is a list of byte ranges into the input buffer.
//!
//! Replies (`Reply`) are written straight into the output buffer; where RESP2 and RESP3 differ
//! (null, maps, sets, doubles, booleans, verbatim text) the connection's protocol version
//! (`HELLO 2|3`) picks the form.

use std::ops::Range;

/// Most arguments in one command (Redis' multibulk limit).
pub const ARGS_MAX: usize = 1024 * 1024;
/// Longest inline command, or `*<n>` / `$<len>` line.
pub const LINE_BYTES_MAX: usize = 64 * 1024;

/// Why a command could not be read. The connection ends after it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Protocol error: {0}")]
pub struct ProtocolError(pub String);

fn bad<T>(why: impl Into<String>) -> Result<T, ProtocolError> {
    Err(ProtocolError(why.into()))
}

/// What `parse` found at the start of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A command of this many bytes (its arguments are in `args`; none for an empty inline line
    /// or `*0`, which is skipped).
    Command(usize),
    /// Incomplete: parsing again is pointless before the buffer holds at least this many bytes
    /// (the end of the bulk string being received, or one more byte). So a large value
    /// arriving in many reads is scanned once, not once per read.
    Need(usize),
}

/// What a connection accepts in one command: at most `args_max` arguments (at most
/// `ARGS_MAX`), each at most `bulk_max` bytes.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub args_max: usize,
    pub bulk_max: usize,
}

/// Reads one command at the start of `buf` into `args` (ranges into `buf`, cleared first).
pub fn parse(buf: &[u8], limits: Limits, args: &mut Vec<Range<usize>>) -> Result<Parsed, ProtocolError> {
    args.clear();
    let more = Parsed::Need(buf.len() + 1);
    let Some(&first) = buf.first() else { return Ok(more) };
    if first != b'*' {
        return parse_inline(buf, args);
    }
    let Some((n, mut at)) = line_number(buf, 1)? else { return Ok(more) };
    if n > limits.args_max.min(ARGS_MAX) as i64 {
        return bad("invalid multibulk length");
    }
    if n <= 0 {
        return Ok(Parsed::Command(at));
    }
    for _ in 0..n {
        match buf.get(at) {
            None => return Ok(more),
            Some(b'$') => {}
            Some(&c) => return bad(format!("expected '$', got '{}'", char::from(c).escape_default())),
        }
        let Some((len, data)) = line_number(buf, at + 1)? else { return Ok(more) };
        if len < 0 || len as u64 > limits.bulk_max as u64 {
            return bad("invalid bulk length");
        }
        // `len` is at most `bulk_max`, a buffer-sized number: no overflow.
        let end = data + len as usize;
        if buf.len() < end + 2 {
            return Ok(Parsed::Need(end + 2));
        }
        if &buf[end..end + 2] != b"\r\n" {
            return bad("bulk string not ended by CRLF");
        }
        args.push(data..end);
        at = end + 2;
    }
    Ok(Parsed::Command(at))
}

/// The decimal number on the line starting at `from` (after its type byte), and where the next
/// line starts; `None` if the line is incomplete.
fn line_number(buf: &[u8], from: usize) -> Result<Option<(i64, usize)>, ProtocolError> {
    let rest = buf.get(from..).unwrap_or_default();
    let Some(nl) = rest.iter().take(LINE_BYTES_MAX + 2).position(|&b| b == b'\n') else {
        return if rest.len() > LINE_BYTES_MAX { bad("too big count string") } else { Ok(None) };
    };
    let line = rest[..nl]
        .strip_suffix(b"\r")
        .ok_or_else(|| ProtocolError("length line not ended by CRLF".into()))?;
    let n = int(line).ok_or_else(|| ProtocolError("invalid length".into()))?;
    Ok(Some((n, from + nl + 1)))
}

fn parse_inline(buf: &[u8], args: &mut Vec<Range<usize>>) -> Result<Parsed, ProtocolError> {
    let Some(nl) = buf.iter().take(LINE_BYTES_MAX + 1).position(|&b| b == b'\n') else {
        return if buf.len() > LINE_BYTES_MAX {
            bad("too big inline request")
        } else {
            Ok(Parsed::Need(buf.len() + 1))
        };
    };
    let line = &buf[..nl];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut i = 0;
    while i < line.len() {
        if line[i].is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        while i < line.len() && !line[i].is_ascii_whitespace() {
            i += 1;
        }
        args.push(start..i);
    }
    Ok(Parsed::Command(nl + 1))
}

/// A signed decimal in Redis' strict form (what `string2ll` takes): an optional `-`, no `+`, no
/// leading zeros (but `0`), no spaces, within `i64`.
pub fn int(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, s),
    };
    match digits {
        [] => return None,
        [b'0'] if !neg => return Some(0),
        [b'0', ..] => return None,
        _ => {}
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        let d = i64::from(d - b'0');
        n = n.checked_mul(10)?;
        n = if neg { n.checked_sub(d)? } else { n.checked_add(d)? };
    }
    Some(n)
}

/// Writes replies into a connection's output buffer in its protocol version.
pub struct Reply<'a> {
    pub out: &'a mut Vec<u8>,
    /// `HELLO 3` was sent: RESP3 forms.
    pub resp3: bool,
}

impl Reply<'_> {
    fn head(&mut self, tag: u8, n: i64) {
        self.out.push(tag);
        self.out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    /// `+OK` and the like (no CR or LF inside).
    pub fn simple(&mut self, s: &str) {
        self.out.push(b'+');
        self.out.extend(s.bytes().map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }));
        self.out.extend_from_slice(b"\r\n");
    }

    pub fn ok(&mut self) {
        self.out.extend_from_slice(b"+OK\r\n");
    }

    /// An error reply: `code` is its first word (`ERR`, `WRONGTYPE`, `NOAUTH`, ...). Line
    /// breaks in the message become spaces (a RESP error is one line).
    pub fn error(&mut self, code: &str, msg: &str) {
        self.out.push(b'-');
        self.out.extend_from_slice(code.as_bytes());
        self.out.push(b' ');
        self.out.extend(msg.bytes().map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }));
        self.out.extend_from_slice(b"\r\n");
    }

    pub fn int(&mut self, n: i64) {
        self.head(b':', n);
    }

    pub fn bulk(&mut self, b: &[u8]) {
        self.head(b'$', b.len() as i64);
        self.out.extend_from_slice(b);
        self.out.extend_from_slice(b"\r\n");
    }

    /// A missing value (RESP2's null bulk string).
    pub fn nil(&mut self) {
        self.out.extend_from_slice(if self.resp3 { b"_\r\n" } else { b"$-1\r\n" });
    }

    /// A missing array (RESP2's null array: `BLPOP` timing out).
    pub fn nil_array(&mut self) {
        self.out.extend_from_slice(if self.resp3 { b"_\r\n" } else { b"*-1\r\n" });
    }

    pub fn array(&mut self, n: usize) {
        self.head(b'*', n as i64);
    }

    /// A map of `n` pairs (RESP2: an array of 2n items).
    pub fn map(&mut self, n: usize) {
        if self.resp3 { self.head(b'%', n as i64) } else { self.head(b'*', 2 * n as i64) }
    }

    /// A double (RESP2: its text as a bulk string).
    pub fn double(&mut self, f: f64) {
        let text = if f.is_nan() {
            "nan".to_string()
        } else if f.is_infinite() {
            if f > 0.0 { "inf".into() } else { "-inf".into() }
        } else {
            format!("{f}")
        };
        if self.resp3 {
            self.out.push(b',');
            self.out.extend_from_slice(text.as_bytes());
            self.out.extend_from_slice(b"\r\n");
        } else {
            self.bulk(text.as_bytes());
        }
    }

    /// A boolean (RESP2: the integer 1 or 0).
    pub fn boolean(&mut self, b: bool) {
        if self.resp3 {
            self.out.extend_from_slice(if b { b"#t\r\n" } else { b"#f\r\n" });
        } else {
            self.int(i64::from(b));
        }
    }

    /// Text meant for people (`INFO`): RESP3's verbatim string, RESP2's bulk string.
    pub fn text(&mut self, s: &str) {
        if self.resp3 {
            self.head(b'=', s.len() as i64 + 4);
            self.out.extend_from_slice(b"txt:");
            self.out.extend_from_slice(s.as_bytes());
            self.out.extend_from_slice(b"\r\n");
        } else {
            self.bulk(s.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A command's words and its length in bytes, if one is complete.
    type Words = Option<(Vec<Vec<u8>>, usize)>;

    fn parsed(buf: &[u8]) -> Result<Words, ProtocolError> {
        let mut args = Vec::new();
        let limits = Limits { args_max: ARGS_MAX, bulk_max: 1 << 20 };
        Ok(match parse(buf, limits, &mut args)? {
            Parsed::Command(n) => Some((args.iter().map(|r| buf[r.clone()].to_vec()).collect(), n)),
            Parsed::Need(need) => {
                assert!(need > buf.len(), "{need} bytes asked of {}", buf.len());
                None
            }
        })
    }

    fn multibulk(args: &[Vec<u8>]) -> Vec<u8> {
        let mut b = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            b.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            b.extend_from_slice(a);
            b.extend_from_slice(b"\r\n");
        }
        b
    }

    #[test]
    fn reads_multibulk_and_inline() {
        let (args, n) = parsed(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nrest").unwrap().unwrap();
        assert_eq!((args, n), (vec![b"GET".to_vec(), b"k".to_vec()], 20));
        let (args, n) = parsed(b"  PING   hello \r\nx").unwrap().unwrap();
        assert_eq!((args, n), (vec![b"PING".to_vec(), b"hello".to_vec()], 17));
        assert_eq!(parsed(b"\r\n").unwrap().unwrap(), (vec![], 2));
        assert_eq!(parsed(b"*0\r\n").unwrap().unwrap(), (vec![], 4));
        assert_eq!(parsed(b"*-1\r\n").unwrap().unwrap(), (vec![], 5));
        assert_eq!(parsed(b"*1\r\n$0\r\n\r\n").unwrap().unwrap(), (vec![vec![]], 10));
    }

    #[test]
    fn waits_for_more() {
        for partial in [&b"*2\r\n$3\r\nGET\r\n$1\r\nk\r"[..], b"*2", b"*2\r\n$3\r\nGE", b"*1\r\n", b"PING"] {
            assert_eq!(parsed(partial).unwrap(), None, "{partial:?}");
        }
    }

    #[test]
    fn refuses_what_redis_refuses() {
        for (input, why) in [
            (&b"*2\r\n+GET\r\n"[..], "expected '$', got '+'"),
            (b"*x\r\n", "invalid length"),
            (b"*01\r\n", "invalid length"),
            (b"*2000000\r\n", "invalid multibulk length"),
            (b"*1\r\n$-1\r\n", "invalid bulk length"),
            (b"*1\r\n$2000000\r\n", "invalid bulk length"),
            (b"*1\r\n$1\r\nab\r\n", "bulk string not ended by CRLF"),
            (b"*1\n", "length line not ended by CRLF"),
        ] {
            assert_eq!(parsed(input), Err(ProtocolError(why.into())), "{input:?}");
        }
        let long = vec![b'a'; LINE_BYTES_MAX + 1];
        assert_eq!(parsed(&long), Err(ProtocolError("too big inline request".into())));
        let mut long = b"*".to_vec();
        long.extend(vec![b'1'; LINE_BYTES_MAX + 1]);
        assert_eq!(parsed(&long), Err(ProtocolError("too big count string".into())));
    }

    #[test]
    fn a_large_value_is_waited_for_by_its_length() {
        let mut args = Vec::new();
        let limits = Limits { args_max: 10, bulk_max: 100 };
        assert_eq!(parse(b"*2\r\n$3\r\nSET\r\n$50\r\nab", limits, &mut args), Ok(Parsed::Need(70)));
        assert_eq!(
            parse(b"*11\r\n", limits, &mut args),
            Err(ProtocolError("invalid multibulk length".into()))
        );
        assert_eq!(
            parse(b"*1\r\n$101\r\n", limits, &mut args),
            Err(ProtocolError("invalid bulk length".into()))
        );
    }

    #[test]
    fn ints_are_strict() {
        assert_eq!(int(b"0"), Some(0));
        assert_eq!(int(b"-12"), Some(-12));
        assert_eq!(int(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(int(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [&b""[..], b"-", b"-0", b"01", b"+1", b" 1", b"1 ", b"9223372036854775808", b"1.5", b"abc"]
        {
            assert_eq!(int(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn replies_in_both_versions() {
        let mut out = Vec::new();
        let mut r = Reply { out: &mut out, resp3: false };
        r.nil();
        r.map(2);
        r.double(1.5);
        r.boolean(true);
        r.error("ERR", "two\r\nlines");
        r.text("a:1");
        assert_eq!(out, b"$-1\r\n*4\r\n$3\r\n1.5\r\n:1\r\n-ERR two  lines\r\n$3\r\na:1\r\n");
        let mut out = Vec::new();
        let mut r = Reply { out: &mut out, resp3: true };
        r.nil();
        r.map(2);
        r.double(1.5);
        r.boolean(true);
        r.text("a:1");
        assert_eq!(out, b"_\r\n%2\r\n,1.5\r\n#t\r\n=7\r\ntxt:a:1\r\n");
    }

    proptest! {
        /// Any command written as multibulk reads back as itself, whatever the split of the
        /// stream: a prefix is incomplete, the whole is exact.
        #[test]
        fn multibulk_round_trips(args in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 1..8), cut in any::<prop::sample::Index>()) {
            let bytes = multibulk(&args);
            let (got, n) = parsed(&bytes).unwrap().unwrap();
            prop_assert_eq!(got, args);
            prop_assert_eq!(n, bytes.len());
            let cut = cut.index(bytes.len());
            prop_assert_eq!(parsed(&bytes[..cut]).unwrap(), None);
        }

        /// Random bytes never panic, and a command read never claims more than was given.
        #[test]
        fn random_bytes_are_safe(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(Some((_, n))) = parsed(&bytes) {
                prop_assert!(n <= bytes.len());
            }
        }

        #[test]
        fn ints_match_std(n in any::<i64>()) {
            prop_assert_eq!(int(n.to_string().as_bytes()), Some(n));
        }
    }
}
