//! CLIP's byte-level BPE tokenizer, a port of `SimpleTokenizer` in
//! open_clip `tokenizer.py` (itself OpenAI CLIP `simple_tokenizer.py`).
//!
//! Cleaning is open_clip's default `lower`: `basic_clean` (`ftfy.fix_text`,
//! ported in [`ftfy`], then html unescape twice, strip), whitespace collapse,
//! lower case. The golden test checks the ids against open_clip's on over a
//! thousand strings, mojibake and other text ftfy changes among them.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::Path;
use std::sync::OnceLock;

use regex::{Captures, Regex};
use tch::Tensor;

use crate::error::{Error, Result};

pub mod ftfy;

/// Number of BPE merges CLIP uses from the vocabulary file (`49152 - 256 - 2`).
const MERGES: usize = 49152 - 256 - 2;
/// The start-of-text special token.
pub const START_OF_TEXT: &str = "<start_of_text>";
/// The end-of-text special token.
pub const END_OF_TEXT: &str = "<end_of_text>";
/// File name of CLIP's BPE vocabulary.
pub const VOCAB_FILE: &str = "bpe_simple_vocab_16e6.txt.gz";
/// CLIP's context length.
pub const CONTEXT_LENGTH: usize = 77;

/// CLIP's BPE tokenizer.
#[derive(Debug)]
pub struct Tokenizer {
    encoder: HashMap<String, i64>,
    /// Merge ranks keyed by `"first second"` (merge halves never hold a space).
    bpe_ranks: HashMap<String, usize>,
    byte_encoder: [char; 256],
    pattern: Regex,
    sot: i64,
    eot: i64,
}

impl Tokenizer {
    /// Reads the vocabulary named by `HANDID_BPE_VOCAB`, else
    /// `$HANDID_CACHE/bpe_simple_vocab_16e6.txt.gz` (`~/.cache/handid` by default).
    pub fn from_env() -> Result<Self> {
        if let Some(path) = std::env::var_os("HANDID_BPE_VOCAB") {
            return Self::from_file(Path::new(&path));
        }
        // Where scripts/setup.sh puts it: $HANDID_CACHE, by default ~/.cache/handid.
        let cache = std::env::var_os("HANDID_CACHE")
            .map(std::path::PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache/handid")));
        match cache.map(|dir| dir.join(VOCAB_FILE)) {
            Some(path) if path.is_file() => Self::from_file(&path),
            _ => Err(Error::InvalidInput(format!(
                "HANDID_BPE_VOCAB is not set and $HANDID_CACHE/{VOCAB_FILE} (default ~/.cache/handid) \
                 does not exist: point HANDID_BPE_VOCAB at CLIP's {VOCAB_FILE} (scripts/setup.sh downloads it)"
            ))),
        }
    }

    /// Reads CLIP's gzipped merges file (`bpe_simple_vocab_16e6.txt.gz`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let mut text = String::new();
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .map_err(io)?;
        Self::from_merges(&text)
            .map_err(|reason| Error::InvalidInput(format!("{}: {reason}", path.display())))
    }

    fn from_merges(text: &str) -> std::result::Result<Self, String> {
        // Line 0 is a version header; the next MERGES lines are the merges.
        let merges: Vec<(&str, &str)> = text
            .split('\n')
            .skip(1)
            .take(MERGES)
            .map(|line| {
                let mut parts = line.split_whitespace();
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) => Ok((a, b)),
                    _ => Err(format!("malformed merge line {line:?}")),
                }
            })
            .collect::<std::result::Result<_, _>>()?;
        if merges.len() != MERGES {
            return Err(format!("{} merges, expected {MERGES}", merges.len()));
        }
        let bytes = bytes_to_unicode();
        let mut vocab: Vec<String> = bytes.iter().map(|(_, c)| c.to_string()).collect();
        vocab.extend(bytes.iter().map(|(_, c)| format!("{c}</w>")));
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.push(START_OF_TEXT.to_owned());
        vocab.push(END_OF_TEXT.to_owned());
        // Later duplicates win, as in Python's dict(zip(vocab, range(...))).
        let encoder: HashMap<String, i64> = vocab.into_iter().zip(0..).collect();
        let bpe_ranks = merges
            .iter()
            .enumerate()
            .map(|(rank, (a, b))| (format!("{a} {b}"), rank))
            .collect();
        let mut byte_encoder = ['\0'; 256];
        for (b, c) in bytes {
            byte_encoder[usize::from(b)] = c;
        }
        let pattern = Regex::new(
            r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        )
        .map_err(|e| e.to_string())?;
        let sot = encoder.get(START_OF_TEXT).copied().ok_or("no start token")?;
        let eot = encoder.get(END_OF_TEXT).copied().ok_or("no end token")?;
        Ok(Self {
            encoder,
            bpe_ranks,
            byte_encoder,
            pattern,
            sot,
            eot,
        })
    }

    /// The id of `<start_of_text>` (49406).
    pub fn sot_id(&self) -> i64 {
        self.sot
    }

    /// The id of `<end_of_text>` (49407).
    pub fn eot_id(&self) -> i64 {
        self.eot
    }

    /// The vocabulary size (49408).
    pub fn vocab_size(&self) -> usize {
        self.encoder.len()
    }

    /// BPE ids of `text` after cleaning, without start or end tokens.
    pub fn encode(&self, text: &str) -> Vec<i64> {
        let cleaned = clean(text);
        let mut ids = Vec::new();
        for piece in self.pattern.find_iter(&cleaned) {
            let token: String = piece
                .as_str()
                .bytes()
                .map(|b| self.byte_encoder[usize::from(b)])
                .collect();
            // Every BPE symbol is a byte character, one with `</w>`, or a
            // merge result: all are in the vocabulary by construction.
            ids.extend(
                self.bpe(&token)
                    .iter()
                    .filter_map(|s| self.encoder.get(s).copied()),
            );
        }
        ids
    }

    /// `<start_of_text>`, the ids of `text`, `<end_of_text>`, zero-padded to
    /// `context_length`; longer texts are cut and end with `<end_of_text>`.
    pub fn tokenize(&self, text: &str, context_length: usize) -> Vec<i64> {
        let mut ids = Vec::with_capacity(context_length);
        ids.push(self.sot);
        ids.extend(self.encode(text));
        ids.push(self.eot);
        if ids.len() > context_length {
            ids.truncate(context_length);
            if let Some(last) = ids.last_mut() {
                *last = self.eot;
            }
        }
        ids.resize(context_length, 0);
        ids
    }

    /// [`Tokenizer::tokenize`] for a batch: `[texts, context_length]` i64.
    pub fn tokenize_batch(&self, texts: &[&str], context_length: usize) -> Tensor {
        let ids: Vec<i64> = texts
            .iter()
            .flat_map(|text| self.tokenize(text, context_length))
            .collect();
        Tensor::from_slice(&ids).view([texts.len() as i64, context_length as i64])
    }

    /// `SimpleTokenizer.bpe`: repeatedly merges the adjacent pair of lowest rank.
    fn bpe(&self, token: &str) -> Vec<String> {
        if token == START_OF_TEXT || token == END_OF_TEXT {
            return vec![token.to_owned()];
        }
        let chars: Vec<char> = token.chars().collect();
        let Some((last, init)) = chars.split_last() else {
            return Vec::new();
        };
        let mut word: Vec<String> = init.iter().map(char::to_string).collect();
        word.push(format!("{last}</w>"));
        while word.len() > 1 {
            let best = word
                .windows(2)
                .filter_map(|pair| {
                    self.bpe_ranks
                        .get(&format!("{} {}", pair[0], pair[1]))
                        .map(|&r| (r, pair))
                })
                .min_by_key(|(rank, _)| *rank);
            let Some((_, pair)) = best else { break };
            let (first, second) = (pair[0].clone(), pair[1].clone());
            let mut merged = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == first && word[i + 1] == second {
                    merged.push(format!("{first}{second}"));
                    i += 2;
                } else {
                    merged.push(word[i].clone());
                    i += 1;
                }
            }
            word = merged;
        }
        word
    }
}

/// `bytes_to_unicode` of `simple_tokenizer.py`: printable bytes map to
/// themselves, the others to code points from 256 up, in the reference's order.
fn bytes_to_unicode() -> Vec<(u8, char)> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut pairs: Vec<(u8, char)> = (0..=255u8)
        .filter(|&b| printable(b))
        .map(|b| (b, char::from(b)))
        .collect();
    // At most 256 bytes map past 255, to U+0100..U+01FF: all valid chars.
    for (code, b) in (256u32..).zip((0..=255u8).filter(|&b| !printable(b))) {
        pairs.push((b, char::from_u32(code).unwrap_or('\u{FFFD}')));
    }
    pairs
}

/// open_clip's `_clean_lower`: `whitespace_clean(basic_clean(x)).lower()`.
pub fn clean(text: &str) -> String {
    let fixed = ftfy::fix_text(text);
    let unescaped = html_unescape(&html_unescape(&fixed));
    unescaped
        .split(is_python_space)
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Python's `str.isspace`: Unicode White_Space plus the ASCII separators
/// U+001C..U+001F that `str.split()` also splits on.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// The tables of Python's `html` module, generated by
/// `scripts/fixtures/make_html_entities.py`.
struct HtmlTables {
    named: HashMap<String, String>,
    replaced: HashMap<u32, String>,
    dropped: HashSet<u32>,
    pattern: Regex,
}

fn html_tables() -> &'static HtmlTables {
    static TABLES: OnceLock<HtmlTables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let chars = |hexes: &str| -> String {
            hexes
                .split(' ')
                .filter_map(|h| u32::from_str_radix(h, 16).ok().and_then(char::from_u32))
                .collect()
        };
        let mut tables = HtmlTables {
            named: HashMap::new(),
            replaced: HashMap::new(),
            dropped: HashSet::new(),
            pattern: Regex::new(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)")
                .unwrap_or_else(|e| unreachable!("constant regex: {e}")),
        };
        for line in include_str!("tokenizer/html_unescape.tsv").lines() {
            let fields: Vec<&str> = line.split('\t').collect();
            match fields[..] {
                ["N", name, value] => {
                    tables.named.insert(name.to_owned(), chars(value));
                }
                ["C", num, value] => {
                    if let Ok(num) = num.parse() {
                        tables.replaced.insert(num, chars(value));
                    }
                }
                ["X", num] => {
                    if let Ok(num) = num.parse() {
                        tables.dropped.insert(num);
                    }
                }
                _ => {}
            }
        }
        tables
    })
}

/// A port of Python's `html.unescape` (`html/__init__.py`).
pub fn html_unescape(text: &str) -> String {
    if !text.contains('&') {
        return text.to_owned();
    }
    let tables = html_tables();
    tables
        .pattern
        .replace_all(text, |caps: &Captures| {
            let s = &caps[1];
            if let Some(number) = s.strip_prefix('#') {
                let (digits, radix) = match number.strip_prefix(['x', 'X']) {
                    Some(hex) => (hex, 16),
                    None => (number, 10),
                };
                // An overflowing number is past U+10FFFF either way.
                let num = u32::from_str_radix(digits.trim_end_matches(';'), radix).unwrap_or(u32::MAX);
                if let Some(replacement) = tables.replaced.get(&num) {
                    return replacement.clone();
                }
                if (0xD800..=0xDFFF).contains(&num) || num > 0x10FFFF {
                    return "\u{FFFD}".to_owned();
                }
                if tables.dropped.contains(&num) {
                    return String::new();
                }
                return char::from_u32(num).map(String::from).unwrap_or_default();
            }
            if let Some(value) = tables.named.get(s) {
                return value.clone();
            }
            // The longest known prefix of at least two characters wins.
            let boundaries: Vec<usize> = s.char_indices().map(|(i, _)| i).collect();
            for &end in boundaries.iter().skip(2).rev() {
                if let Some(value) = tables.named.get(&s[..end]) {
                    return format!("{value}{}", &s[end..]);
                }
            }
            format!("&{s}")
        })
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        Tokenizer::from_env().expect("HANDID_BPE_VOCAB (run scripts/setup.sh)")
    }

    #[test]
    fn special_ids_and_vocabulary_size_are_clips() {
        let t = tokenizer();
        assert_eq!((t.sot_id(), t.eot_id(), t.vocab_size()), (49406, 49407, 49408));
    }

    #[test]
    fn a_known_sentence_tokenizes_as_in_clip() {
        // open_clip 3.3.0: tokenize("a photo of a hand")[0][:7]
        let ids = tokenizer().tokenize("a photo of a hand", CONTEXT_LENGTH);
        assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2463, 49407]);
        assert!(ids[7..].iter().all(|&id| id == 0));
        assert_eq!(ids.len(), 77);
    }

    #[test]
    fn long_texts_are_cut_and_end_with_the_end_token() {
        let t = tokenizer();
        let long = "hand ".repeat(200);
        let ids = t.tokenize(&long, CONTEXT_LENGTH);
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[76], t.eot_id());
        assert_eq!(ids[75], ids[1]);
        assert_eq!(t.tokenize_batch(&["a", "b c"], 5).size(), [2, 5]);
    }

    #[test]
    fn html_unescape_follows_python() {
        // Values from Python 3.11 html.unescape.
        for (input, want) in [
            ("&amp;", "&"),
            ("&amp", "&"),
            ("&lt;b&gt;", "<b>"),
            ("&notit;", "¬it;"),
            ("&#65;&#x42;&#X43", "ABC"),
            ("&#128;", "€"),
            ("&#0;", "\u{FFFD}"),
            ("&#1;x", "x"),
            ("&#xD800;", "\u{FFFD}"),
            ("&#99999999999999999999;", "\u{FFFD}"),
            ("&unknown;", "&unknown;"),
            ("fish & chips", "fish & chips"),
        ] {
            assert_eq!(html_unescape(input), want, "{input}");
        }
        assert_eq!(clean("  A&amp;amp;B \t\u{1c} C\u{3000}d  "), "a&b c d");
    }
}
