//! Pre-tokenization: cut text into chunks with the GPT-4 style split pattern.
//!
//! The GPT-4 pattern family (nanochat's `\p{N}{1,2}` variant included) is matched by a hand-written
//! scanner that is ~10x faster than fancy-regex and gives the same chunks (tested against
//! fancy-regex and Python's `regex`). Any other pattern falls back to fancy-regex.

use fancy_regex::Regex;
use regex_syntax::hir::{Class, HirKind};
use std::sync::OnceLock;

/// GPT-4's split pattern with `\p{N}{1,NUM}` left open; `NUM` is 1, 2 or 3.
const GPT4_TEMPLATE: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,NUM}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// nanochat's split pattern: GPT-4's with numbers cut into runs of at most two digits.
pub fn default_pattern() -> String {
    GPT4_TEMPLATE.replace("NUM", "2")
}

pub enum Splitter {
    /// Hand-written scanner for the GPT-4 pattern with `\p{N}{1,max_digits}`.
    Gpt4 {
        max_digits: usize,
    },
    Regex(Regex),
}

impl Splitter {
    pub fn new(pattern: &str) -> Result<Splitter, String> {
        for n in 1..=3 {
            if pattern == GPT4_TEMPLATE.replace("NUM", &n.to_string()) {
                tables(); // build the class tables once, outside the parallel section
                return Ok(Splitter::Gpt4 { max_digits: n });
            }
        }
        Self::regex(pattern)
    }

    /// Always the fancy-regex path (tests compare it with the scanner).
    pub fn regex(pattern: &str) -> Result<Splitter, String> {
        Regex::new(pattern)
            .map(Splitter::Regex)
            .map_err(|e| format!("invalid split pattern {pattern:?}: {e}"))
    }

    /// Calls `f` on every chunk of `text`, in order.
    #[inline]
    pub fn for_each<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) -> Result<(), String> {
        match self {
            Splitter::Gpt4 { max_digits } => {
                let b = text.as_bytes();
                let mut pos = 0;
                while pos < b.len() {
                    let end = gpt4_chunk_end(b, pos, *max_digits);
                    // SAFETY: chunk boundaries always fall on char boundaries (we step whole chars).
                    f(unsafe { text.get_unchecked(pos..end) });
                    pos = end;
                }
            }
            Splitter::Regex(re) => {
                for m in re.find_iter(text) {
                    f(m.map_err(|e| format!("regex error: {e}"))?.as_str());
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- character classes

const OTHER: u8 = 0; // none of the below
const LETTER: u8 = 1; // \p{L}
const NUMBER: u8 = 2; // \p{N}
const SPACE: u8 = 3; // \s except \r and \n
const NEWLINE: u8 = 4; // \r or \n

struct Tables {
    bmp: Vec<u8>,                // class of every code point below 0x10000
    astral: Vec<(u32, u32, u8)>, // sorted (first, last, class) ranges above 0xFFFF
}

fn unicode_ranges(class: &str) -> Vec<(u32, u32)> {
    // The same Unicode tables fancy-regex uses, straight from regex-syntax.
    let hir = regex_syntax::Parser::new().parse(class).expect("valid class");
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => c.iter().map(|r| (r.start() as u32, r.end() as u32)).collect(),
        _ => unreachable!("{class} is a Unicode class"),
    }
}

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let mut bmp = vec![OTHER; 0x10000];
        let mut astral = Vec::new();
        for (class, id) in [(r"\p{L}", LETTER), (r"\p{N}", NUMBER), (r"\s", SPACE)] {
            for (lo, hi) in unicode_ranges(class) {
                for cp in lo..=hi.min(0xFFFF) {
                    bmp[cp as usize] = id;
                }
                if hi > 0xFFFF {
                    astral.push((lo.max(0x10000), hi, id));
                }
            }
        }
        bmp['\r' as usize] = NEWLINE;
        bmp['\n' as usize] = NEWLINE;
        astral.sort_unstable();
        Tables { bmp, astral }
    })
}

/// (class, byte length, code point) of the char starting at byte `i` of valid UTF-8 `b`.
#[inline(always)]
fn char_at(b: &[u8], i: usize) -> (u8, usize, u32) {
    let b0 = b[i];
    if b0 < 0x80 {
        return (ASCII[b0 as usize], 1, b0 as u32);
    }
    let (cp, len) = if b0 < 0xE0 {
        (((b0 as u32 & 0x1F) << 6) | (b[i + 1] as u32 & 0x3F), 2)
    } else if b0 < 0xF0 {
        let cp = ((b0 as u32 & 0x0F) << 12) | ((b[i + 1] as u32 & 0x3F) << 6) | (b[i + 2] as u32 & 0x3F);
        (cp, 3)
    } else {
        let cp = ((b0 as u32 & 0x07) << 18)
            | ((b[i + 1] as u32 & 0x3F) << 12)
            | ((b[i + 2] as u32 & 0x3F) << 6)
            | (b[i + 3] as u32 & 0x3F);
        (cp, 4)
    };
    (class_of(cp), len, cp)
}

#[inline(always)]
fn class_of(cp: u32) -> u8 {
    let t = tables();
    if cp < 0x10000 {
        return t.bmp[cp as usize];
    }
    let idx = t.astral.partition_point(|&(lo, _, _)| lo <= cp);
    match idx.checked_sub(1).map(|j| t.astral[j]) {
        Some((_, hi, class)) if cp <= hi => class,
        _ => OTHER,
    }
}

const fn ascii_table() -> [u8; 128] {
    let mut t = [OTHER; 128];
    let mut c = 0;
    while c < 128 {
        let ch = c as u8;
        t[c] = if ch.is_ascii_alphabetic() {
            LETTER
        } else if ch.is_ascii_digit() {
            NUMBER
        } else if ch == b'\r' || ch == b'\n' {
            NEWLINE
        } else if ch == b' ' || ch == b'\t' || ch == 0x0B || ch == 0x0C {
            SPACE
        } else {
            OTHER
        };
        c += 1;
    }
    t
}
static ASCII: [u8; 128] = ascii_table();

// ---------------------------------------------------------------- the scanner

/// End of the chunk starting at `pos`, following the GPT-4 pattern's leftmost-first alternation:
/// `'(?i:[sdmt]|ll|ve|re)` | `[^\r\n\p{L}\p{N}]?+\p{L}+` | `\p{N}{1,n}` |
/// ` ?[^\s\p{L}\p{N}]++[\r\n]*` | `\s*[\r\n]` | `\s+(?!\S)` | `\s+`.
#[inline]
fn gpt4_chunk_end(b: &[u8], pos: usize, max_digits: usize) -> usize {
    let n = b.len();
    let (k0, l0, c0) = char_at(b, pos);
    let p1 = pos + l0;
    if c0 == '\'' as u32 {
        if let Some(len) = contraction_len(b, p1) {
            return p1 + len;
        }
    }
    match k0 {
        LETTER => run_end(b, p1, LETTER),
        NUMBER => {
            let mut end = p1;
            for _ in 1..max_digits {
                if end >= n {
                    break;
                }
                let (k, l, _) = char_at(b, end);
                if k != NUMBER {
                    break;
                }
                end += l;
            }
            end
        }
        NEWLINE => whitespace_end(b, pos),
        _ => {
            // SPACE or OTHER: may prefix a letter run; else punctuation run; else whitespace.
            if p1 < n {
                let (k1, l1, _) = char_at(b, p1);
                if k1 == LETTER {
                    return run_end(b, p1 + l1, LETTER);
                }
                if k0 == OTHER {
                    return newlines_end(b, run_end(b, p1, OTHER));
                }
                if c0 == ' ' as u32 && k1 == OTHER {
                    return newlines_end(b, run_end(b, p1 + l1, OTHER));
                }
            } else if k0 == OTHER {
                return p1;
            }
            whitespace_end(b, pos)
        }
    }
}

/// Length of `(?i:[sdmt]|ll|ve|re)` at `i`, if it matches.
#[inline]
fn contraction_len(b: &[u8], i: usize) -> Option<usize> {
    let at = |j: usize| b.get(j).map(|c| c.to_ascii_lowercase());
    match at(i)? {
        b's' | b'd' | b'm' | b't' => Some(1),
        0xC5 if b.get(i + 1) == Some(&0xBF) => Some(2), // U+017F LATIN SMALL LETTER LONG S folds to s
        b'l' if at(i + 1) == Some(b'l') => Some(2),
        b'v' | b'r' if at(i + 1) == Some(b'e') => Some(2),
        _ => None,
    }
}

#[inline(always)]
fn run_end(b: &[u8], mut i: usize, class: u8) -> usize {
    while i < b.len() {
        let (k, l, _) = char_at(b, i);
        if k != class {
            break;
        }
        i += l;
    }
    i
}

#[inline(always)]
fn newlines_end(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && (b[i] == b'\r' || b[i] == b'\n') {
        i += 1;
    }
    i
}

/// `\s*[\r\n]` | `\s+(?!\S)` | `\s+` at `pos`, where the char at `pos` is whitespace.
#[inline]
fn whitespace_end(b: &[u8], pos: usize) -> usize {
    let mut end = pos;
    let mut last_start = pos;
    let mut after_newline = None;
    while end < b.len() {
        let (k, l, _) = char_at(b, end);
        if k == NEWLINE {
            after_newline = Some(end + l);
        } else if k != SPACE {
            break;
        }
        last_start = end;
        end += l;
    }
    if let Some(e) = after_newline {
        return e; // \s*[\r\n]: up to the last newline of the run
    }
    if end == b.len() || last_start == pos {
        return end; // \s+(?!\S) at the end of text, or a single \s before a non-space
    }
    last_start // \s+(?!\S): leave the last space to prefix the next word
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(s: &Splitter, text: &str) -> Vec<String> {
        let mut v = Vec::new();
        s.for_each(text, |c| v.push(c.to_string())).unwrap();
        v
    }

    #[test]
    fn scanner_matches_fancy_regex() {
        let pat = default_pattern();
        let fast = Splitter::new(&pat).unwrap();
        let slow = Splitter::regex(&pat).unwrap();
        assert!(matches!(fast, Splitter::Gpt4 { .. }));
        for text in [
            "Hello world! It's  a test's 'LL 'Ve\n\n  \r\n x",
            "1234567 abc123 ١٢٣ 三四 日本語のテキスト 😀😀 a😀b",
            "   \t\n\t  x  ",
            "'ſ '",
            "  !!\n\n  ?? x",
            "",
            " ",
            "\n",
            "a",
            "'",
            "' ",
            "\u{3000}x\u{a0}y",
            "e\u{301}te\u{301} (foo) ((bar)) [1,2] -- x--y",
        ] {
            assert_eq!(chunks(&fast, text), chunks(&slow, text), "text {text:?}");
        }
    }
}
