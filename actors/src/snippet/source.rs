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
//! <program>             →  def snippet_main():
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
        if q < b.len() && (b[q] == b'\'' || b[q] == b'"') && prefix_ok(i) {
            let quote = b[q];
            let triple = q + 2 < b.len() && b[q + 1] == quote && b[q + 2] == quote;
            let mut j = if triple { q + 3 } else { q + 1 };
            loop {
                if j >= b.len() {
                    break;
                }
                // Even in a raw string a backslash keeps the next quote inside the string.
                if b[j] == b'\\' {
                    j += 2;
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

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Finds statements to rewrite by walking code regions with bracket depth.
fn find_statements(src: &str, regs: &[(Tok, usize, usize)]) -> Vec<Stmt> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut depth: i32 = 0;
    // True where a simple statement may begin: the start, after a top-level line break, `;` or `:`.
    let mut at_start = true;
    let mut current: Option<Stmt> = None;
    let mut continued = false;
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
            if c == b'\\' && i + 1 < e && b[i + 1] == b'\n' {
                continued = true;
                i += 2;
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
                b'(' | b'[' | b'{' => depth += 1,
                b')' | b']' | b'}' => depth = (depth - 1).max(0),
                b'\n' | b';' if depth == 0 && !continued => {
                    if let Some(mut st) = current.take() {
                        st.end = i;
                        out.push(st);
                    }
                }
                b'*' if depth == 0
                    && current.is_none()
                    && i + 1 < e
                    && b[i + 1] == b'='
                    && (i == 0 || b[i - 1] != b'*') =>
                {
                    current = Some(Stmt { start: last_start(src, i), end: e, kind: StmtKind::MulAssign(i) });
                }
                _ => {}
            }
            if c == b'\n' || c == b';' || c == b':' {
                at_start = depth == 0 && !(c == b'\n' && continued) || at_start;
            } else if !c.is_ascii_whitespace() {
                at_start = false;
            }
            if c == b'\n' {
                continued = false;
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

/// Start of the simple statement containing `pos`: after the last top-level newline, `;` or `:`
/// before it (strings and brackets between are skipped by scanning code regions again).
fn last_start(src: &str, pos: usize) -> usize {
    let regs = regions(&src[..pos]);
    let b = src.as_bytes();
    let mut depth = 0i32;
    let mut start = 0;
    for (tok, s, e) in regs {
        if tok != Tok::Code {
            continue;
        }
        for (i, &c) in b.iter().enumerate().take(e).skip(s) {
            match c {
                b'(' | b'[' | b'{' => depth += 1,
                b')' | b']' | b'}' => depth = (depth - 1).max(0),
                b'\n' | b';' if depth == 0 => start = i + 1,
                b':' if depth == 0 => start = i + 1,
                _ => {}
            }
        }
    }
    // Skip leading blanks.
    while start < pos && (b[start] == b' ' || b[start] == b'\t') {
        start += 1;
    }
    start
}

/// Splits `s..e` of `src` at top-level commas (outside brackets and strings).
fn split_top(src: &str, s: usize, e: usize, sep: u8) -> Vec<(usize, usize)> {
    let b = src.as_bytes();
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut from = s;
    for (tok, rs, re) in regions(&src[..e]) {
        if tok != Tok::Code || re <= s {
            continue;
        }
        for (i, &c) in b.iter().enumerate().take(re).skip(rs.max(s)) {
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

/// For a target `X[Y]`, the ranges of `X` and `Y`.
fn split_index_target(src: &str, s: usize, e: usize) -> Option<((usize, usize), (usize, usize))> {
    let b = src.as_bytes();
    if e <= s || b[e - 1] != b']' {
        return None;
    }
    // Find the `[` matching the final `]`, scanning code only.
    let mut depth = 0i32;
    let mut open = None;
    for (tok, rs, re) in regions(&src[..e]) {
        if tok != Tok::Code || re <= s {
            continue;
        }
        for (i, &c) in b.iter().enumerate().take(re).skip(rs.max(s)) {
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
    if open == s {
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
        // Trailing comment or blanks stay outside the rewritten text.
        let (s, e) = trim(src, st.start, st.end);
        let e = match regions(&src[..e]).iter().rev().find(|r| r.0 == Tok::Comment && r.1 >= s) {
            Some(r) => trim(src, s, r.1).1,
            None => e,
        };
        out.push_input(src, at, s);
        match st.kind {
            StmtKind::Del => {
                let body = s + 3;
                let targets = split_top(src, body, e, b',');
                for (n, (ts, te)) in targets.into_iter().enumerate() {
                    let (ts, te) = trim(src, ts, te);
                    let Some(((xs, xe), (ys, ye))) = split_index_target(src, ts, te) else {
                        return Err(RewriteError {
                            offset: ts,
                            message: "`del` takes index targets such as `t[k]` or `d['a']`".into(),
                        });
                    };
                    if split_top(src, ys, ye, b':').len() > 1 {
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
                let (ls, le) = trim(src, s, op);
                let (rs, re) = trim(src, op + 2, e);
                out.push_input(src, ls, le);
                out.push_new(" = __mul__(", op);
                out.push_input(src, ls, le);
                out.push_new(", (", rs);
                out.push_input(src, rs, re);
                out.push_new("))", re);
            }
        }
        at = e;
    }
    out.push_input(src, at, src.len());
    Ok(out.finish(src.len()))
}

/// Wraps a program into `def snippet_main():`, one space deeper, with `return ` inserted at
/// `return_at` (the start of the last top-level expression statement, if any).
pub fn wrap(src: &str, return_at: Option<usize>) -> Mapped {
    let regs = regions(src);
    // Offsets of line starts that fall inside a string literal: those lines keep their text.
    let inside_string = |pos: usize| regs.iter().any(|&(t, s, e)| t == Tok::Str && s < pos && pos < e);
    let mut out = Mapped::default();
    out.push_new("def snippet_main():\n", 0);
    let mut line_start = 0;
    for (i, _) in src.match_indices('\n').chain(std::iter::once((src.len(), ""))) {
        let end = if i < src.len() { i + 1 } else { i };
        if line_start >= end && i == src.len() {
            break;
        }
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
    fn wrapping_keeps_strings_and_maps_back() {
        let src = "x = '''a\nb'''\nx";
        let w = wrap(src, Some(src.len() - 1));
        assert_eq!(w.text, "def snippet_main():\n x = '''a\nb'''\n return x\n pass\n");
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
