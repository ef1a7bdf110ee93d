//! Redis's glob patterns (KEYS, SCAN MATCH, CONFIG GET): `*` any run of bytes, `?` one byte,
//! `[abc]` a set, `[^a]` / `[!a]` its complement, `[a-z]` a range (either order), `\x` the byte
//! `x` literally (also inside a set). Matching is on bytes and case-sensitive, as Redis's
//! `stringmatchlen`; an unclosed `[` runs to the end of the pattern, as there.

/// Whether `text` matches `pattern`.
pub fn matches(pattern: &[u8], text: &[u8]) -> bool {
    // Greedy matching with one backtrack point: the last `*` seen and the text position it
    // was tried at. A later `*` supersedes an earlier one, so this is linear in practice and
    // never exponential (Redis bounds its recursion instead).
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    while p < pattern.len() && pattern[p] == b'*' {
                        p += 1;
                    }
                    if p == pattern.len() {
                        return true;
                    }
                    star = Some((p, t));
                    continue;
                }
                b'?' => {
                    p += 1;
                    t += 1;
                    continue;
                }
                b'[' => {
                    let (hit, next) = class(pattern, p + 1, text[t]);
                    if hit {
                        p = next;
                        t += 1;
                        continue;
                    }
                }
                b'\\' if p + 1 < pattern.len() => {
                    if pattern[p + 1] == text[t] {
                        p += 2;
                        t += 1;
                        continue;
                    }
                }
                c => {
                    if c == text[t] {
                        p += 1;
                        t += 1;
                        continue;
                    }
                }
            }
        }
        // A mismatch: let the last `*` take one more byte, or fail.
        match star {
            Some((sp, st)) => {
                p = sp;
                t = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Matches `byte` against the set starting at `pattern[at]` (just after `[`); returns whether
/// it matched and where the pattern continues after the closing `]`.
fn class(pattern: &[u8], mut at: usize, byte: u8) -> (bool, usize) {
    let negate = matches!(pattern.get(at), Some(b'^') | Some(b'!'));
    if negate {
        at += 1;
    }
    let mut hit = false;
    while at < pattern.len() && pattern[at] != b']' {
        if pattern[at] == b'\\' && at + 1 < pattern.len() {
            hit |= pattern[at + 1] == byte;
            at += 2;
        } else if at + 2 < pattern.len() && pattern[at + 1] == b'-' && pattern[at + 2] != b']' {
            let (a, b) = (pattern[at], pattern[at + 2]);
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            hit |= (lo..=hi).contains(&byte);
            at += 3;
        } else {
            hit |= pattern[at] == byte;
            at += 1;
        }
    }
    // Past the `]` (or the end of an unclosed set).
    (hit != negate, (at + 1).min(pattern.len()))
}

#[cfg(test)]
mod tests {
    use super::matches;

    fn m(p: &str, t: &str) -> bool {
        matches(p.as_bytes(), t.as_bytes())
    }

    #[test]
    fn wildcards() {
        assert!(m("*", ""));
        assert!(m("*", "anything"));
        assert!(m("h?llo", "hello"));
        assert!(m("h?llo", "hallo"));
        assert!(!m("h?llo", "hllo"));
        assert!(m("h*llo", "hllo"));
        assert!(m("h*llo", "heeeello"));
        assert!(m("user:*:name", "user:42:name"));
        assert!(!m("user:*:name", "user:42:names"));
        assert!(m("*a*b*c*", "xxaxxbxxcxx"));
        assert!(!m("*a*b*c*", "xxaxxcxxbxx"));
        assert!(m("a**b", "ab"));
        assert!(!m("abc", "abcd"));
        assert!(!m("abcd", "abc"));
        assert!(m("", ""));
        assert!(!m("", "a"));
    }

    #[test]
    fn sets_ranges_and_negation() {
        assert!(m("h[ae]llo", "hello"));
        assert!(m("h[ae]llo", "hallo"));
        assert!(!m("h[ae]llo", "hillo"));
        assert!(m("h[^e]llo", "hallo"));
        assert!(!m("h[^e]llo", "hello"));
        assert!(m("h[!e]llo", "hallo"));
        assert!(m("h[a-b]llo", "hbllo"));
        assert!(!m("h[a-b]llo", "hcllo"));
        assert!(m("h[z-a]llo", "hmllo"), "a reversed range is the same range");
        assert!(m("key[0-9]", "key7"));
        assert!(!m("key[0-9]", "keyx"));
        assert!(!m("[]", "]"), "an empty set matches nothing, as in Redis");
        assert!(!m("[]", ""));
        assert!(m("a[b", "ab"), "an unclosed set runs to the end");
        assert!(m("x[a\\]]y", "x]y"), "an escaped ] inside a set");
        assert!(m("*[0-9]", "abc9"));
    }

    #[test]
    fn escapes_are_literal() {
        assert!(m("a\\*b", "a*b"));
        assert!(!m("a\\*b", "axb"));
        assert!(m("a\\?", "a?"));
        assert!(!m("a\\?", "ab"));
        assert!(m("\\[x]", "[x]"));
        assert!(m("end\\", "end\\"), "a trailing backslash is literal");
    }

    #[test]
    fn binary_keys_and_no_blowup() {
        assert!(matches(b"\x00*\xff", b"\x00abc\xff"));
        let text = vec![b'a'; 5000];
        let pattern = b"*a*a*a*a*a*a*a*a*a*a*b";
        assert!(!matches(pattern, &text));
    }
}
