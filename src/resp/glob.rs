//! Redis' glob patterns (`SCAN ... MATCH`, `KEYS`): `*` any run of bytes, `?` one byte,
//! `[abc]`, `[^abc]`, `[a-z]` one byte of a class, `\x` the byte `x`. Matching is on bytes,
//! case-sensitive, as in Redis' `stringmatchlen`.

/// Whether `s` matches `pattern`.
pub fn matches(pattern: &[u8], s: &[u8]) -> bool {
    // Backtracking on the last `*` only: linear in practice, at worst |p|·|s| (no exponential
    // blow-up on patterns like `a*a*a*a*b`, which Redis itself had to fix).
    let (mut p, mut i) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    star = Some((p, i));
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    i += 1;
                    continue;
                }
                _ => {
                    if let Some((matched, next)) = one(pattern, p, s[i])
                        && matched
                    {
                        p = next;
                        i += 1;
                        continue;
                    }
                }
            }
        }
        match star {
            Some((sp, si)) => {
                p = sp + 1;
                i = si + 1;
                star = Some((sp, si + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Whether byte `c` matches the single-byte element of `pattern` at `p` (a literal, an escape or
/// a class), and where the next element starts.
fn one(pattern: &[u8], p: usize, c: u8) -> Option<(bool, usize)> {
    match pattern[p] {
        b'\\' if p + 1 < pattern.len() => Some((pattern[p + 1] == c, p + 2)),
        b'[' => {
            let mut q = p + 1;
            let negate = pattern.get(q) == Some(&b'^');
            if negate {
                q += 1;
            }
            let mut hit = false;
            while q < pattern.len() && pattern[q] != b']' {
                if pattern[q] == b'\\' && q + 1 < pattern.len() {
                    hit |= pattern[q + 1] == c;
                    q += 2;
                } else if q + 2 < pattern.len() && pattern[q + 1] == b'-' && pattern[q + 2] != b']' {
                    let (a, b) = (pattern[q].min(pattern[q + 2]), pattern[q].max(pattern[q + 2]));
                    hit |= (a..=b).contains(&c);
                    q += 3;
                } else {
                    hit |= pattern[q] == c;
                    q += 1;
                }
            }
            // An unclosed class takes the rest of the pattern, as in Redis.
            Some((hit != negate, (q + 1).min(pattern.len())))
        }
        lit => Some((lit == c, p + 1)),
    }
}

/// The literal prefix every match starts with, and whether the pattern is exactly that prefix
/// followed by `*` (so a prefix scan answers it without filtering).
pub fn literal_prefix(pattern: &[u8]) -> (Vec<u8>, bool) {
    let mut prefix = Vec::new();
    let mut i = 0;
    while i < pattern.len() {
        match pattern[i] {
            b'*' => return (prefix, pattern[i..].iter().all(|&c| c == b'*')),
            b'?' | b'[' => return (prefix, false),
            b'\\' if i + 1 < pattern.len() => {
                prefix.push(pattern[i + 1]);
                i += 2;
            }
            c => {
                prefix.push(c);
                i += 1;
            }
        }
    }
    // No wildcard: matches only itself.
    (prefix, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn redis_examples() {
        for (p, s, want) in [
            ("*", "", true),
            ("*", "anything", true),
            ("h?llo", "hello", true),
            ("h?llo", "hllo", false),
            ("h*llo", "heeeello", true),
            ("h[ae]llo", "hallo", true),
            ("h[ae]llo", "hillo", false),
            ("h[^e]llo", "hallo", true),
            ("h[^e]llo", "hello", false),
            ("h[a-b]llo", "hbllo", true),
            ("h[b-a]llo", "hallo", true),
            ("h\\*llo", "h*llo", true),
            ("h\\*llo", "hello", false),
            ("user:*", "user:1", true),
            ("user:*", "users", false),
            ("a*a*a*a*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", false),
            ("*b", "ab", true),
            ("a*", "", false),
        ] {
            assert_eq!(matches(p.as_bytes(), s.as_bytes()), want, "{p} ~ {s}");
        }
    }

    #[test]
    fn prefixes() {
        assert_eq!(literal_prefix(b"user:*"), (b"user:".to_vec(), true));
        assert_eq!(literal_prefix(b"user:**"), (b"user:".to_vec(), true));
        assert_eq!(literal_prefix(b"user:*x"), (b"user:".to_vec(), false));
        assert_eq!(literal_prefix(b"u?er"), (b"u".to_vec(), false));
        assert_eq!(literal_prefix(b"a\\*b*"), (b"a*b".to_vec(), true));
        assert_eq!(literal_prefix(b"exact"), (b"exact".to_vec(), false));
    }

    /// A naive recursive matcher for patterns of literals, `*` and `?` (the model).
    fn model(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, _) => s.is_empty(),
            (Some(b'*'), _) => model(&p[1..], s) || (!s.is_empty() && model(p, &s[1..])),
            (Some(b'?'), Some(_)) => model(&p[1..], &s[1..]),
            (Some(c), Some(d)) => c == d && model(&p[1..], &s[1..]),
            (Some(_), None) => false,
        }
    }

    proptest! {
        #[test]
        fn agrees_with_the_model(p in "[ab*?]{0,8}", s in "[ab]{0,10}") {
            prop_assert_eq!(matches(p.as_bytes(), s.as_bytes()), model(p.as_bytes(), s.as_bytes()));
        }

        #[test]
        fn prefix_is_a_prefix_of_every_match(p in "[ab*?\\\\]{0,8}", s in "[ab*?]{0,10}") {
            let (prefix, exact) = literal_prefix(p.as_bytes());
            if matches(p.as_bytes(), s.as_bytes()) {
                prop_assert!(s.as_bytes().starts_with(&prefix));
            }
            if exact {
                prop_assert_eq!(matches(p.as_bytes(), s.as_bytes()), s.as_bytes().starts_with(&prefix));
            }
        }
    }
}
