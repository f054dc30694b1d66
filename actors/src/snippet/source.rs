//! Source rewriting before a snippet is parsed: the few Python forms Starlark lacks or that need a
//! guard, and the wrapping of the whole program into one function so its compiled form can be
//! cached and called again.
//!
//! Rewrites (text level, outside strings and comments, with every output byte mapped back to an
//! input byte so errors report positions in what the user wrote):
//!
//! ```text
//! del a[i], b[j]        →  __del__(a, i); __del__(b, j)     (Starlark has no `del`)
//! x[k] *= n             →  x[k] = __mul__(x[k], (n))        (repetition is size-checked)
//! <program>             →  def snippet_main(key = None, args = None):
//!                           ␠<every line, one space deeper, except lines inside a string>
//!                           ␠return <last statement, if it is an expression>
//! ```
//!
//! The binary `*` itself is replaced by `__mul__` on the parsed tree
//! (`AstModule::replace_binary_operators`), which needs no text surgery.
//!
//! Invariant: the rewrite never changes the text of a string literal or a comment, and never adds
//! or removes a line break (line numbers of the input and output agree, before wrapping adds the
//! one `def` line).

/// Text produced by a rewrite, with the input offset of each of its bytes.
#[derive(Clone, Debug, Default)]
pub struct Mapped {
    pub text: String,
    /// `origin[i]` is the input byte offset that output byte `i` came from (inserted text maps to
    /// the input byte it was inserted before). One extra entry maps the end.
    pub origin: Vec<u32>,
}

impl Mapped {
    fn push_input(&mut self, input: &str, from: usize, to: usize) {
        self.text.push_str(&input[from..to]);
        self.origin.extend((from..to).map(|i| i as u32));
    }

    fn push_new(&mut self, s: &str, at: usize) {
        self.text.push_str(s);
        self.origin.extend(std::iter::repeat_n(at as u32, s.len()));
    }

    fn finish(mut self, input_len: usize) -> Mapped {
        self.origin.push(input_len as u32);
        self
    }

    /// The input offset of output offset `pos` (clamped).
    pub fn input_offset(&self, pos: usize) -> usize {
        self.origin.get(pos).or(self.origin.last()).copied().unwrap_or(0) as usize
    }

    /// Composes two rewrites: `self` maps B→A, `inner` maps A→input.
    pub fn then(&self, inner: &Mapped) -> Vec<u32> {
        self.origin.iter().map(|&a| inner.input_offset(a as usize) as u32).collect()
    }
}

/// A rewrite the source cannot get: the input offset and why.
#[derive(Clone, Debug, PartialEq)]
pub struct RewriteError {
    pub offset: usize,
    pub message: String,
}

/// One lexical region of the input.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Tok {
    /// Code (identifiers, operators, numbers, whitespace) `start..end`.
    Code,
    /// A string literal, including prefix and quotes.
    Str,
    /// A comment up to (not including) the line break.
    Comment,
}

/// Splits `src` into code, string and comment regions. An unterminated string runs to the end
/// (the parser reports it).
fn regions(src: &str) -> Vec<(Tok, usize, usize)> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut code_start = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'#' {
            out.push((Tok::Code, code_start, i));
            let end = src[i..].find('\n').map_or(b.len(), |n| i + n);
            out.push((Tok::Comment, i, end));
            i = end;
            code_start = i;
            continue;
        }
        // A string starts at a quote, possibly after a one- or two-letter prefix (r, b, f, rb, br).
        let prefix_ok =
            |start: usize| start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let mut q = i;
        while q < b.len() && q - i < 2 && matches!(b[q], b'r' | b'R' | b'b' | b'B' | b'f' | b'F') {
            q += 1;
        }
        if q < b.len() && (b[q] == b'\'' || b[q] == b'"') && (q == i || prefix_ok(i)) {
            let quote = b[q];
            let triple = q + 2 < b.len() && b[q + 1] == quote && b[q + 2] == quote;
            let mut j = if triple { q + 3 } else { q + 1 };
            loop {
                if j >= b.len() {
                    break;
                }
                // Even in a raw string a backslash keeps the next quote inside the string.
                if b[j] == b'\\' {
                    // Skip the backslash and the whole (possibly multi-byte) character after it.
                    j += 1 + b.get(j + 1).map_or(0, |&c| utf8_width(c));
                    continue;
                }
                if triple {
                    if j + 2 < b.len() && b[j] == quote && b[j + 1] == quote && b[j + 2] == quote {
                        j += 3;
                        break;
                    }
                } else if b[j] == quote {
                    j += 1;
                    break;
                } else if b[j] == b'\n' {
                    break;
                }
                j += 1;
            }
            let j = j.min(b.len());
            out.push((Tok::Code, code_start, i));
            out.push((Tok::Str, i, j));
            i = j;
            code_start = i;
            continue;
        }
        // Skip a whole identifier so `bar'...'` never reads as a prefixed string.
        if c.is_ascii_alphanumeric() || c == b'_' {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            continue;
        }
        i += 1;
    }
    out.push((Tok::Code, code_start, b.len()));
    out.retain(|(_, s, e)| e > s);
    out
}

/// The simple statements of `src` that need rewriting: byte ranges of `del` statements and of
/// statements with a top-level `*=`.
#[derive(Debug)]
struct Stmt {
    start: usize,
    end: usize,
    kind: StmtKind,
}

#[derive(Debug)]
enum StmtKind {
    Del,
    /// Offset of the `*=`.
    MulAssign(usize),
}

/// Bytes of the UTF-8 character whose first byte is `lead`.
fn utf8_width(lead: u8) -> usize {
    match lead {
        0..0xc0 => 1,
        0xc0..0xe0 => 2,
        0xe0..0xf0 => 3,
        _ => 4,
    }
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

type Regions = [(Tok, usize, usize)];

/// The code regions overlapping `s..e`, clipped to it (regions are sorted and disjoint).
fn code_in(regs: &Regions, s: usize, e: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
    let first = regs.partition_point(|r| r.2 <= s);
    regs[first..]
        .iter()
        .take_while(move |r| r.1 < e)
        .filter(|r| r.0 == Tok::Code)
        .map(move |r| (r.1.max(s), r.2.min(e)))
}

/// Finds statements to rewrite by walking code regions with bracket depth. A backslash before a
/// line break joins the lines, as in Python.
fn find_statements(src: &str, regs: &Regions) -> Vec<Stmt> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut depth: i32 = 0;
    // True where a simple statement may begin: the start, after a top-level line break, `;` or `:`.
    let mut at_start = true;
    let mut stmt_start = 0;
    let mut current: Option<Stmt> = None;
    for &(tok, s, e) in regs {
        if tok == Tok::Str {
            at_start = false;
        }
        if tok != Tok::Code {
            continue;
        }
        let mut i = s;
        while i < e {
            let c = b[i];
            if c == b'\\' && b.get(i + 1) == Some(&b'\n') {
                i += 2;
                continue;
            }
            if c == b'\\' && b.get(i + 1) == Some(&b'\r') && b.get(i + 2) == Some(&b'\n') {
                i += 3;
                continue;
            }
            if is_ident(c) {
                let w0 = i;
                while i < e && is_ident(b[i]) {
                    i += 1;
                }
                if at_start && current.is_none() && &src[w0..i] == "del" {
                    current = Some(Stmt { start: w0, end: e, kind: StmtKind::Del });
                }
                at_start = false;
                continue;
            }
            match c {
                b'(' | b'[' | b'{' => {
                    depth += 1;
                    at_start = false;
                }
                b')' | b']' | b'}' => depth = (depth - 1).max(0),
                b'\n' | b';' | b':' if depth == 0 => {
                    if c != b':'
                        && let Some(mut st) = current.take()
                    {
                        st.end = i;
                        out.push(st);
                    }
                    if current.is_none() {
                        at_start = true;
                        stmt_start = i + 1;
                    }
                }
                b'*' if depth == 0
                    && current.is_none()
                    && b.get(i + 1) == Some(&b'=')
                    && (i == 0 || b[i - 1] != b'*') =>
                {
                    current = Some(Stmt { start: stmt_start, end: e, kind: StmtKind::MulAssign(i) });
                }
                c if c.is_ascii_whitespace() => {}
                _ => at_start = false,
            }
            i += 1;
        }
    }
    if let Some(mut st) = current.take() {
        st.end = b.len();
        out.push(st);
    }
    out
}

/// Splits `s..e` of `src` at top-level `sep` (outside brackets and strings).
fn split_top(src: &str, regs: &Regions, s: usize, e: usize, sep: u8) -> Vec<(usize, usize)> {
    let b = src.as_bytes();
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut from = s;
    for (rs, re) in code_in(regs, s, e) {
        for (i, &c) in b.iter().enumerate().take(re).skip(rs) {
            match c {
                b'(' | b'[' | b'{' => depth += 1,
                b')' | b']' | b'}' => depth -= 1,
                c if c == sep && depth == 0 => {
                    parts.push((from, i));
                    from = i + 1;
                }
                _ => {}
            }
        }
    }
    parts.push((from, e));
    parts
}

fn trim(src: &str, mut s: usize, mut e: usize) -> (usize, usize) {
    let b = src.as_bytes();
    while s < e && b[s].is_ascii_whitespace() {
        s += 1;
    }
    while e > s && b[e - 1].is_ascii_whitespace() {
        e -= 1;
    }
    (s, e)
}

/// Where a trailing comment of the statement `s..e` starts (a comment at bracket depth 0), or `e`.
fn before_trailing_comment(regs: &Regions, src: &str, s: usize, e: usize) -> usize {
    let b = src.as_bytes();
    let mut depth = 0i32;
    let first = regs.partition_point(|r| r.2 <= s);
    for &(tok, rs, re) in regs[first..].iter().take_while(|r| r.1 < e) {
        match tok {
            Tok::Comment if depth <= 0 => return rs.max(s),
            Tok::Code => {
                for &c in &b[rs.max(s)..re.min(e)] {
                    match c {
                        b'(' | b'[' | b'{' => depth += 1,
                        b')' | b']' | b'}' => depth -= 1,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    e
}

/// For a target `X[Y]`, the ranges of `X` and `Y`.
type Target = ((usize, usize), (usize, usize));

fn split_index_target(src: &str, regs: &Regions, s: usize, e: usize) -> Option<Target> {
    let b = src.as_bytes();
    if e <= s || b[e - 1] != b']' {
        return None;
    }
    // The `[` that the final `]` closes: the last top-level `[`.
    let mut depth = 0i32;
    let mut open = None;
    for (rs, re) in code_in(regs, s, e) {
        for (i, &c) in b.iter().enumerate().take(re).skip(rs) {
            match c {
                b'(' | b'[' | b'{' => {
                    if depth == 0 && c == b'[' {
                        open = Some(i);
                    }
                    depth += 1;
                }
                b')' | b']' | b'}' => depth -= 1,
                _ => {}
            }
        }
    }
    let open = open?;
    if open <= s || open + 1 > e - 1 {
        return None;
    }
    Some(((s, open), (open + 1, e - 1)))
}

/// Rewrites `del` and `*=` statements. Keeps line breaks; maps every output byte to the input.
pub fn rewrite_statements(src: &str) -> Result<Mapped, RewriteError> {
    let regs = regions(src);
    let stmts = find_statements(src, &regs);
    let mut out = Mapped::default();
    let mut at = 0;
    for st in stmts {
        // A trailing comment and blanks stay outside the rewritten text.
        let (s, e) = trim(src, st.start, st.end);
        let e = trim(src, s, before_trailing_comment(&regs, src, s, e)).1;
        if s < at || s > e {
            return Err(RewriteError { offset: s, message: "statement cannot be rewritten".into() });
        }
        out.push_input(src, at, s);
        match st.kind {
            StmtKind::Del => {
                let body = (s + 3).min(e);
                let targets = split_top(src, &regs, body, e, b',');
                for (n, (ts, te)) in targets.into_iter().enumerate() {
                    let (ts, te) = trim(src, ts, te);
                    let Some(((xs, xe), (ys, ye))) = split_index_target(src, &regs, ts, te) else {
                        return Err(RewriteError {
                            offset: ts,
                            message: "`del` takes index targets such as `t[k]` or `d['a']`".into(),
                        });
                    };
                    if split_top(src, &regs, ys, ye, b':').len() > 1 {
                        return Err(RewriteError {
                            offset: ys,
                            message: "`del` of a slice is not supported; use a loop of pops".into(),
                        });
                    }
                    if n > 0 {
                        out.push_new("; ", ts);
                    }
                    out.push_new("__del__(", ts);
                    out.push_input(src, xs, xe);
                    out.push_new(", ", ys);
                    out.push_input(src, ys, ye);
                    out.push_new(")", te);
                }
            }
            StmtKind::MulAssign(op) => {
                if op < s || op + 2 > e {
                    return Err(RewriteError {
                        offset: op,
                        message: "`*=` needs a target and a value".into(),
                    });
                }
                let (ls, le) = trim(src, s, op);
                let (rs, re) = trim(src, op + 2, e);
                // The target and what follows it up to `*=` (blanks, a continued line) stay as is.
                out.push_input(src, ls, op);
                out.push_new(if op > le { "= __mul__(" } else { " = __mul__(" }, op);
                push_on_one_line(&mut out, src, &regs, ls, le)?;
                out.push_new(", (", rs);
                out.push_input(src, rs, re);
                out.push_new("))", re);
            }
        }
        at = e;
    }
    out.push_input(src, at, src.len());
    // Line numbers must survive the rewrite (errors point at the client's lines): a statement
    // that would lose a line break (a `del` continued over lines) is refused instead.
    if out.text.matches('\n').count() != src.matches('\n').count() {
        return Err(RewriteError { offset: 0, message: "write each `del` statement on one line".into() });
    }
    Ok(out.finish(src.len()))
}

/// Pushes `s..e` again (a duplicated `*=` target) without its line breaks and comments, so the
/// rewrite adds no line.
fn push_on_one_line(
    out: &mut Mapped,
    src: &str,
    regs: &Regions,
    s: usize,
    e: usize,
) -> Result<(), RewriteError> {
    let b = src.as_bytes();
    let first = regs.partition_point(|r| r.2 <= s);
    for &(tok, rs, re) in regs[first..].iter().take_while(|r| r.1 < e) {
        let (rs, re) = (rs.max(s), re.min(e));
        match tok {
            Tok::Comment => {}
            Tok::Str if src[rs..re].contains('\n') => {
                return Err(RewriteError {
                    offset: rs,
                    message: "a `*=` target with a multi-line string; write `x = x * n`".into(),
                });
            }
            Tok::Str => out.push_input(src, rs, re),
            Tok::Code => {
                for i in rs..re {
                    if matches!(b[i], b'\n' | b'\r')
                        || (b[i] == b'\\' && matches!(b.get(i + 1), Some(b'\n' | b'\r')))
                    {
                        out.push_new(" ", i);
                    } else if b[i] < 0x80 {
                        out.push_input(src, i, i + 1);
                    } else if src.is_char_boundary(i) {
                        let w = utf8_width(b[i]).min(re - i);
                        out.push_input(src, i, i + w);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Wraps a program into `def snippet_main(key = None, args = None):`, one space deeper, with
/// `return ` inserted at `return_at` (the start of the last top-level expression statement).
pub fn wrap(src: &str, return_at: Option<usize>) -> Mapped {
    let return_at = return_at.map(|r| floor_char_boundary(src, r.min(src.len())));
    let regs = regions(src);
    // String regions in order: a line starting strictly inside one keeps its text.
    let strings: Vec<(usize, usize)> = regs.iter().filter(|r| r.0 == Tok::Str).map(|r| (r.1, r.2)).collect();
    let inside_string = |pos: usize| {
        let i = strings.partition_point(|&(_, e)| e <= pos);
        strings.get(i).is_some_and(|&(s, e)| s < pos && pos < e)
    };
    let mut out = Mapped::default();
    out.push_new("def snippet_main(key = None, args = None):\n", 0);
    let mut line_start = 0;
    while line_start < src.len() {
        let end = src[line_start..].find('\n').map_or(src.len(), |n| line_start + n + 1);
        if !inside_string(line_start) {
            out.push_new(" ", line_start);
        }
        match return_at {
            Some(r) if r >= line_start && r < end => {
                out.push_input(src, line_start, r);
                out.push_new("return ", r);
                out.push_input(src, r, end);
            }
            _ => out.push_input(src, line_start, end),
        }
        line_start = end;
    }
    if !src.ends_with('\n') {
        out.push_new("\n", src.len());
    }
    // A body of only comments or blank lines still needs a statement.
    out.push_new(" pass\n", src.len());
    out.finish(src.len())
}

/// Most bracket nesting, and most operators in one statement: the parser and compiler recurse
/// on expression depth, so a source past these is refused before it is parsed.
pub const NESTING_MAX: u32 = 100;
pub const STATEMENT_OPERATORS_MAX: u32 = 2_000;

/// Refuses sources whose expressions are deep enough to exhaust the compiler's stack.
pub fn check_complexity(src: &str) -> Result<(), RewriteError> {
    let b = src.as_bytes();
    let (mut depth, mut ops) = (0u32, 0u32);
    for (tok, s, e) in regions(src) {
        if tok != Tok::Code {
            continue;
        }
        let mut i = s;
        while i < e {
            let c = b[i];
            if is_ident(c) {
                let w0 = i;
                while i < e && is_ident(b[i]) {
                    i += 1;
                }
                if matches!(&src[w0..i], "and" | "or" | "not" | "if" | "else" | "lambda" | "for" | "in") {
                    ops += 1;
                }
            } else {
                match c {
                    b'(' | b'[' | b'{' => {
                        depth += 1;
                        ops += 1;
                    }
                    b')' | b']' | b'}' => depth = depth.saturating_sub(1),
                    b'\n' | b';' if depth == 0 => ops = 0,
                    b'+' | b'-' | b'*' | b'/' | b'%' | b'<' | b'>' | b'=' | b'!' | b'&' | b'|' | b'^'
                    | b'~' | b'.' | b',' => ops += 1,
                    _ => {}
                }
                i += 1;
            }
            if depth > NESTING_MAX {
                return Err(RewriteError {
                    offset: i.min(src.len()),
                    message: format!("brackets nest deeper than {NESTING_MAX} levels"),
                });
            }
            if ops > STATEMENT_OPERATORS_MAX {
                return Err(RewriteError {
                    offset: i.min(src.len()),
                    message: format!(
                        "a statement has more than {STATEMENT_OPERATORS_MAX} operators; split it"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Every identifier in the code of `src` (not in strings or comments).
pub fn identifiers(src: &str) -> std::collections::BTreeSet<String> {
    identifiers_where(src, |_| true)
}

/// Identifiers used like a collection: followed by `[` or `.` (`users[k]`, `users.get(k)`).
pub fn subscripted_identifiers(src: &str) -> std::collections::BTreeSet<String> {
    identifiers_where(src, |rest| {
        matches!(rest.trim_start_matches([' ', '\t']).as_bytes().first(), Some(b'[' | b'.'))
    })
}

fn identifiers_where(src: &str, keep: impl Fn(&str) -> bool) -> std::collections::BTreeSet<String> {
    let b = src.as_bytes();
    let mut out = std::collections::BTreeSet::new();
    for (tok, s, e) in regions(src) {
        if tok != Tok::Code {
            continue;
        }
        let mut i = s;
        while i < e {
            if is_ident(b[i]) && !b[i].is_ascii_digit() {
                let w0 = i;
                while i < e && is_ident(b[i]) {
                    i += 1;
                }
                let before_dot = w0 > 0 && b[w0 - 1] == b'.';
                if !before_dot && keep(&src[i..]) {
                    out.insert(src[w0..i].to_string());
                }
            } else if b[i].is_ascii_digit() {
                while i < e && is_ident(b[i]) {
                    i += 1;
                }
            } else {
                i += 1;
            }
        }
    }
    out
}

/// 1-based line and column (in characters) of byte `offset` in `src`.
pub fn line_col(src: &str, offset: usize) -> (u32, u32) {
    let offset = offset.min(src.len());
    let before = &src[..floor_char_boundary(src, offset)];
    let line = before.matches('\n').count() as u32 + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) as u32 + 1;
    (line, col)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(s: &str) -> String {
        rewrite_statements(s).unwrap().text
    }

    #[test]
    fn del_statements() {
        assert_eq!(rw("del users['bob']"), "__del__(users, 'bob')");
        assert_eq!(rw("del a[1], b[f(x)]\nx = 1"), "__del__(a, 1); __del__(b, f(x))\nx = 1");
        assert_eq!(rw("if k in d: del d[k]  # gone"), "if k in d: __del__(d, k)  # gone");
        assert_eq!(rw("x = 'del a[1]'\n"), "x = 'del a[1]'\n");
        assert_eq!(rw("delta[1] = 2"), "delta[1] = 2");
        assert_eq!(rw("del t[k][\"x\"]"), "__del__(t[k], \"x\")");
        assert!(rewrite_statements("del x").is_err());
        assert!(rewrite_statements("del l[1:2]").is_err());
    }

    #[test]
    fn mul_assign() {
        assert_eq!(rw("x *= 3"), "x = __mul__(x, (3))");
        assert_eq!(
            rw("for i in r:\n    s[i] *= n + 1\n"),
            "for i in r:\n    s[i] = __mul__(s[i], (n + 1))\n"
        );
        assert_eq!(rw("x **= 2"), "x **= 2");
        assert_eq!(rw("f(a='*=')"), "f(a='*=')");
    }

    #[test]
    fn odd_input_never_panics() {
        for src in [
            "a[0 #\n] *= 2",
            "d[\n  'k'  # key\n] *= 2",
            "x *= f(1,  # c\n 2)",
            "x = 1 + \\\n2\ndel d['a']",
            "x *= 1 + \\\n2\ny = 5",
            "*=",
            "del",
            "del []",
            "del [1]",
            "x *=",
            "'unterminated",
            "\"\"\"open",
            "é *= 2 # ü",
            "x = 1 if c else'''a\nb'''",
            "\\",
            "del a[1],",
            "a;del b[1];c *= 2\r\n",
        ] {
            if let Ok(m) = rewrite_statements(src) {
                let _ = wrap(&m.text, Some(0));
                let _ = wrap(&m.text, Some(m.text.len()));
            }
            let _ = line_col(src, src.len() + 5);
        }
        assert_eq!(rw("x = 1 + \\\n2\ndel d['a']"), "x = 1 + \\\n2\n__del__(d, 'a')");
        assert_eq!(rw("x *= 1 + \\\n2\ny = 5"), "x = __mul__(x, (1 + \\\n2))\ny = 5");
        assert_eq!(rw("x *= f(1,  # c\n 2)"), "x = __mul__(x, (f(1,  # c\n 2)))");
        assert_eq!(rw("a[0 #\n] *= 2"), "a[0 #\n] = __mul__(a[0  ], (2))");
        let w = wrap("x = 1 if c else'''a\nb'''", None);
        assert!(w.text.contains("'''a\nb'''"), "{}", w.text);
    }

    proptest::proptest! {
        /// Any mix of the tricky pieces is rewritten or refused, never a panic, and a rewrite keeps
        /// every line break.
        #[test]
        fn rewriting_never_panics(parts in proptest::collection::vec(proptest::sample::select(vec![
            "del ", "*=", "#", "'", "\"", "'''", "\\", "\n", "\r\n", "[", "]", "(", ")", ":", ";", ",",
            " ", "a", "é", "x[1]", "d['k']", "*", "=", "1",
        ]), 0..40)) {
            let src: String = parts.concat();
            if let Ok(m) = rewrite_statements(&src) {
                proptest::prop_assert_eq!(m.text.matches('\n').count(), src.matches('\n').count());
                proptest::prop_assert_eq!(m.origin.len(), m.text.len() + 1);
                let w = wrap(&m.text, Some(m.text.len() / 2));
                proptest::prop_assert_eq!(w.origin.len(), w.text.len() + 1);
            }
            let _ = line_col(&src, src.len() / 2);
        }
    }

    #[test]
    fn wrapping_keeps_strings_and_maps_back() {
        let src = "x = '''a\nb'''\nx";
        let w = wrap(src, Some(src.len() - 1));
        assert_eq!(w.text, "def snippet_main(key = None, args = None):\n x = '''a\nb'''\n return x\n pass\n");
        // The `x` of `return x` maps back to the last byte of the input.
        let p = w.text.find("return x").unwrap() + 7;
        assert_eq!(w.input_offset(p), src.len() - 1);
        assert_eq!(line_col(src, src.len() - 1), (3, 1));
    }

    #[test]
    fn offsets_map_through_both_rewrites() {
        let src = "a = 1\ndel t['k']\nzz";
        let r = rewrite_statements(src).unwrap();
        let at = r.text.rfind("zz").unwrap();
        let w = wrap(&r.text, Some(at));
        let composed = w.then(&r);
        let p = w.text.rfind("zz").unwrap();
        assert_eq!(composed[p] as usize, src.rfind("zz").unwrap());
    }
}
