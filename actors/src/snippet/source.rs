//! Checks on snippet source before it is parsed: the parser recurses on nesting, so a source
//! nested past these bounds (brackets, operators in one statement, indentation) is refused
//! before it reaches the parser, in the server process. Also `line_col` for error positions.

/// A refusal: the input offset and why.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceError {
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

/// Most bracket nesting, and most operators in one statement: the parser and compiler recurse
/// on expression depth, so a source past these is refused before it is parsed.
pub const NESTING_MAX: u32 = 100;
pub const STATEMENT_OPERATORS_MAX: u32 = 2_000;
/// Most nested blocks (`if`, `for`, `def`, `class`, ... inside each other).
pub const BLOCKS_MAX: usize = 50;

/// Refuses sources whose blocks nest deeper than `BLOCKS_MAX` (judged by indentation of lines
/// that start in code, not inside a string).
fn check_blocks(src: &str, regs: &Regions) -> Result<(), SourceError> {
    let b = src.as_bytes();
    let mut stack: Vec<usize> = vec![0];
    // Regions are in order and lines only move forward: one cursor finds each line's region.
    let mut ri = 0usize;
    let mut in_code = |at: usize| {
        while ri < regs.len() && regs[ri].2 <= at {
            ri += 1;
        }
        regs.get(ri).is_some_and(|&(t, s, _)| t == Tok::Code && s <= at)
    };
    let mut line = 0usize;
    while line < b.len() {
        let end = b[line..].iter().position(|&c| c == b'\n').map_or(b.len(), |p| line + p);
        let width = b[line..end].iter().take_while(|&&c| c == b' ' || c == b'\t').count();
        let first = line + width;
        if first < end && b[first] != b'#' && b[first] != b'\r' && in_code(line) {
            while width < *stack.last().unwrap_or(&0) {
                stack.pop();
            }
            if width > *stack.last().unwrap_or(&0) {
                stack.push(width);
            }
            if stack.len() > BLOCKS_MAX {
                return Err(SourceError {
                    offset: first,
                    message: format!("blocks nest deeper than {BLOCKS_MAX} levels"),
                });
            }
        }
        line = end + 1;
    }
    Ok(())
}

/// Refuses sources whose expressions are deep enough to exhaust the compiler's stack.
pub fn check_complexity(src: &str) -> Result<(), SourceError> {
    let b = src.as_bytes();
    let (mut depth, mut ops) = (0u32, 0u32);
    let regs = regions(src);
    check_blocks(src, &regs)?;
    for &(tok, s, e) in &regs {
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
                return Err(SourceError {
                    offset: i.min(src.len()),
                    message: format!("brackets nest deeper than {NESTING_MAX} levels"),
                });
            }
            if ops > STATEMENT_OPERATORS_MAX {
                return Err(SourceError {
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

    #[test]
    fn deep_sources_are_refused() {
        let brackets = format!("{}1{}", "(".repeat(200), ")".repeat(200));
        assert!(check_complexity(&brackets).unwrap_err().message.contains("brackets"));
        let mut ifs = String::new();
        for i in 0..600 {
            ifs.push_str(&" ".repeat(i));
            ifs.push_str("if True:\n");
        }
        ifs.push_str(&" ".repeat(600));
        ifs.push_str("pass\n");
        assert!(check_complexity(&ifs).unwrap_err().message.contains("blocks"));
        let ops = vec!["1"; 3000].join("+");
        assert!(check_complexity(&ops).unwrap_err().message.contains("operators"));
        // Indentation inside a string is not a block.
        let s = format!(
            "x = \"\"\"\n{}\"\"\"\n",
            (0..80).map(|i| format!("{}a\n", " ".repeat(i))).collect::<String>()
        );
        check_complexity(&s).unwrap();
        check_complexity("def f(x):\n    if x:\n        return 1\n    return 2\nf(1)").unwrap();
    }
}
