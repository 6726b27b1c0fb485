//! A port of `ftfy.fix_text` (ftfy 6.3.1: `__init__.py`, `fixes.py`,
//! `chardata.py`, `badness.py`, `bad_codecs/`) with the default
//! `TextFixerConfig`, the first step of open_clip's `basic_clean`.
//!
//! ftfy's data (its character classes, the single-byte codecs it tries, the
//! width map, its upper-case HTML entities) is generated from the library by
//! `scripts/fixtures/make_ftfy_tables.py` into `ftfy_tables.tsv`. Python's
//! `re` has look-around and `$`-before-a-final-newline, which the `regex`
//! crate lacks; those spots are written out by hand and say so.
//!
//! Two things do not carry over: a Rust string holds no lone surrogates, so
//! `fix_surrogates` has nothing to do; and NFC comes from
//! `unicode-normalization`, whose Unicode is newer than Python 3.11's 14.0,
//! which matters only for characters assigned since.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::OnceLock;

use regex::bytes::Regex as BytesRegex;
use regex::{Captures, Regex, RegexBuilder};
use unicode_normalization::{IsNormalized, UnicodeNormalization, is_nfc_quick};

use super::{html_tables, html_unescape};

/// `max_decode_length`: the longest segment fixed at once, in code points.
const MAX_DECODE_LENGTH: usize = 1_000_000;

/// `ftfy.fix_text(text)` with the default configuration.
///
/// Like ftfy, it fixes the text line by line (a segment ends after each
/// `\n`), so mojibake on one line does not steer the fixes of another.
pub fn fix_text(text: &str) -> Cow<'_, str> {
    if text.bytes().all(is_inert_ascii) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    // unescape_html="auto": once a segment holds '<' the input is taken for
    // HTML, and entities are left alone in it and every later segment.
    let mut unescape_html = true;
    for line in text.split_inclusive('\n') {
        for segment in pieces(line, MAX_DECODE_LENGTH) {
            unescape_html &= !segment.contains('<');
            out.push_str(&fix_segment(segment, unescape_html));
        }
    }
    Cow::Owned(out)
}

/// ASCII that no fixer touches: not an entity's `&`, a `\r`, an escape or a
/// control character ftfy removes. Text made only of these is returned as is.
fn is_inert_ascii(b: u8) -> bool {
    matches!(b, b'\t' | b'\n' | 0x0C | b' '..=b'~') && b != b'&'
}

/// `line` cut every `max` code points.
fn pieces(line: &str, max: usize) -> impl Iterator<Item = &str> {
    let mut rest = line;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = rest.char_indices().nth(max).map_or(rest.len(), |(i, _)| i);
        let (head, tail) = rest.split_at(end);
        rest = tail;
        Some(head)
    })
}

/// `fix_and_explain` on one segment: the fixers in ftfy's order, repeated
/// until a pass changes nothing.
fn fix_segment(segment: &str, unescape_html: bool) -> String {
    let mut text = segment.to_owned();
    loop {
        let before = text.clone();
        if unescape_html {
            text = unescape_entities(text);
        }
        text = fix_encoding(text);
        text = fix_c1_controls(text);
        text = fix_latin_ligatures(text);
        text = fix_character_width(text);
        text = uncurl_quotes(text);
        text = fix_line_breaks(text);
        // fix_surrogates: a Rust string holds none.
        text = remove_terminal_escapes(text);
        text = remove_control_chars(text);
        text = normalize_nfc(text);
        if text == before {
            return text;
        }
    }
}

/// `fixes.unescape_html`: entities that end in `;` (html5's, plus upper-case
/// forms of some), and numeric references that `html.unescape` decodes whole.
fn unescape_entities(text: String) -> String {
    if !text.contains('&') {
        return text;
    }
    let t = tables();
    t.html_entity
        .replace_all(&text, |caps: &Captures| {
            let entity = &caps[0];
            let name = &entity[1..];
            if let Some(value) = t.upper_entities.get(name) {
                return value.clone();
            }
            if let Some(value) = html_tables().named.get(name) {
                return value.clone();
            }
            if entity.starts_with("&#") {
                let decoded = html_unescape(entity);
                // A partial decode ("&#65a;" -> "Aa;") is not taken.
                if !decoded.contains(';') {
                    return decoded;
                }
            }
            entity.to_owned()
        })
        .into_owned()
}

/// `ftfy.fix_encoding`: one step of mojibake repair at a time, until a step
/// changes nothing.
fn fix_encoding(mut text: String) -> String {
    while let Some(fixed) = fix_encoding_step(&text) {
        if fixed == text {
            break;
        }
        text = fixed;
    }
    text
}

/// `_fix_encoding_one_step_and_explain`; `None` leaves the text as it is.
fn fix_encoding_step(text: &str) -> Option<String> {
    if text.is_ascii() || !is_bad(text) {
        return None;
    }
    let t = tables();
    // Text that was UTF-8 decoded as a single-byte encoding: encode it back
    // and decode it as UTF-8. The first encoding that works wins.
    let mut latin1_possible = false;
    for codec in &t.charmap_codecs {
        let Some(mut bytes) = codec.encode(text) else {
            continue;
        };
        latin1_possible |= codec.name == "latin-1";
        // In MacRoman a space after an en dash would match: too many false positives.
        if codec.name != "macroman" && t.altered_utf8.is_match(&bytes) {
            bytes = restore_byte_a0(&bytes);
        }
        if codec.name.starts_with("sloppy") {
            bytes = replace_lossy_sequences(&bytes);
        }
        let decoded = if bytes.contains(&0xED) || bytes.contains(&0xC0) {
            decode_utf8_variants(&bytes)
        } else {
            String::from_utf8(bytes).ok()
        };
        if decoded.is_some() {
            return decoded;
        }
    }
    // Mojibake embedded in otherwise fine text: fix the pieces alone.
    if utf8_detector_matches(text).next().is_some() {
        let fixed = decode_inconsistent_utf8(text);
        if fixed != text {
            return Some(fixed);
        }
    }
    // Latin-1 meant as Windows-1252. ftfy first returns early when
    // "windows-1252" is among the possible encodings, but its list names
    // "sloppy-windows-1252", so that never happens and this always runs.
    if latin1_possible {
        let fixed: Option<String> = text
            .chars()
            .map(|c| t.windows_1252.decode_byte(u8::try_from(u32::from(c)).ok()?))
            .collect();
        if let Some(fixed) = fixed.filter(|fixed| fixed != text) {
            return Some(fixed);
        }
    }
    text.chars().any(is_c1).then(|| fix_c1_controls(text.to_owned()))
}

/// `fixes.restore_byte_a0`: puts back the byte 0xA0 that some program turned
/// into a space inside a UTF-8 sequence.
fn restore_byte_a0(bytes: &[u8]) -> Vec<u8> {
    // A_GRAVE_WORD_RE, b"\xc3 (?! |quele|quela|quilo|s )" -> b"\xc3\xa0 ":
    // "Ã " is usually "à" followed by a space, except before the Portuguese
    // "às", "àquele", ... The look-ahead is written out.
    let keeps_space = |rest: &[u8]| {
        [&b" "[..], b"quele", b"quela", b"quilo", b"s "]
            .iter()
            .any(|word| rest.starts_with(word))
    };
    let mut graves = Vec::with_capacity(bytes.len() + 4);
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == 0xC3 && bytes.get(i + 1) == Some(&b' ') && !keeps_space(&bytes[i + 2..]) {
            graves.extend_from_slice(b"\xc3\xa0 ");
            i += 2;
        } else {
            graves.push(bytes[i]);
            i += 1;
        }
    }
    tables()
        .altered_utf8
        .replace_all(&graves, |caps: &regex::bytes::Captures| {
            caps[0]
                .iter()
                .map(|&b| if b == b' ' { 0xA0 } else { b })
                .collect::<Vec<u8>>()
        })
        .into_owned()
}

/// `fixes.replace_lossy_sequences`: a UTF-8 sequence with a byte lost to
/// U+FFFD (which the sloppy codecs encode as 0x1A), or to '?', becomes U+FFFD.
fn replace_lossy_sequences(bytes: &[u8]) -> Vec<u8> {
    tables()
        .lossy_utf8
        .replace_all(bytes, "\u{FFFD}".as_bytes())
        .into_owned()
}

/// Decodes with ftfy's `utf-8-variants` codec: UTF-8, plus CESU-8 surrogate
/// pairs and Java's `C0 80` for U+0000. `None` where Python raises.
///
/// The codec finds its special sequences with a regex in which `$` also
/// matches before a final `\n`; `at_end` keeps that quirk.
fn decode_utf8_variants(bytes: &[u8]) -> Option<String> {
    let n = bytes.len();
    let at_end = |i: usize| i == n || (i + 1 == n && bytes[i] == b'\n');
    let byte_in = |i: usize, lo: u8, hi: u8| bytes.get(i).is_some_and(|b| (lo..=hi).contains(b));
    // The bytes after a lead byte, each also allowed to be the (zero-width) end.
    let tail_at = |mut i: usize, tail: &[(u8, u8)]| {
        tail.iter().all(|&(lo, hi)| {
            if byte_in(i, lo, hi) {
                i += 1;
                true
            } else {
                at_end(i)
            }
        })
    };
    // CESU8_EXPR: ED [A0-AF] [80-BF] ED [B0-BF] [80-BF]
    let cesu8_at = |s: usize| {
        bytes[s] == 0xED
            && tail_at(
                s + 1,
                &[
                    (0xA0, 0xAF),
                    (0x80, 0xBF),
                    (0xED, 0xED),
                    (0xB0, 0xBF),
                    (0x80, 0xBF),
                ],
            )
    };
    // NULL_EXPR | CESU8_EXPR | SURROGATE_EXPR
    let special_at = |s: usize| match bytes[s] {
        0xC0 => tail_at(s + 1, &[(0x80, 0x80)]),
        0xED => cesu8_at(s) || tail_at(s + 1, &[(0xA0, 0xBF), (0x80, 0xBF)]),
        _ => false,
    };
    let mut out = String::with_capacity(n);
    let mut pos = 0;
    while pos < n {
        let Some(start) = (pos..n).find(|&s| special_at(s)) else {
            out.push_str(std::str::from_utf8(&bytes[pos..]).ok()?);
            break;
        };
        out.push_str(std::str::from_utf8(&bytes[pos..start]).ok()?);
        let rest = &bytes[start..];
        if rest[0] == 0xC0 {
            // Java's two-byte NUL (or C0 and a final newline, as the codec reads it).
            if rest.len() < 2 {
                return None;
            }
            out.push('\0');
            pos = start + 2;
        } else if rest.len() < 6 {
            out.push_str(std::str::from_utf8(rest).ok()?);
            break;
        } else if cesu8_at(start) {
            let code = (u32::from(rest[1] & 0x0F) << 16)
                + (u32::from(rest[2] & 0x3F) << 10)
                + (u32::from(rest[4] & 0x0F) << 6)
                + u32::from(rest[5] & 0x3F)
                + 0x10000;
            out.push(char::from_u32(code)?);
            pos = start + 6;
        } else {
            out.push_str(std::str::from_utf8(&rest[..3]).ok()?);
            pos = start + 3;
        }
    }
    Some(out)
}

/// Matches of `UTF8_DETECTOR_RE` in `text`: runs of what look like UTF-8
/// sequences decoded as a single-byte encoding. Its look-behind (no match
/// right after a strict continuation character) is checked here.
fn utf8_detector_matches(text: &str) -> impl Iterator<Item = Range<usize>> + '_ {
    let t = tables();
    let mut start = 0;
    std::iter::from_fn(move || {
        while let Some(m) = t.utf8_detector.find_at(text, start) {
            let after_strict = text[..m.start()]
                .chars()
                .next_back()
                .is_some_and(|c| t.continuation_strict.contains(c));
            if !after_strict {
                start = m.end();
                return Some(m.range());
            }
            start = m.start() + text[m.start()..].chars().next().map_or(1, char::len_utf8);
        }
        None
    })
}

/// `fixes.decode_inconsistent_utf8`: fixes each detected piece that is bad
/// on its own.
fn decode_inconsistent_utf8(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for range in utf8_detector_matches(text) {
        out.push_str(&text[last..range.start]);
        let piece = &text[range.clone()];
        // Shorter than the whole, so that this cannot recurse forever.
        if piece.len() < text.len() && is_bad(piece) {
            out.push_str(&fix_encoding(piece.to_owned()));
        } else {
            out.push_str(piece);
        }
        last = range.end;
    }
    out.push_str(&text[last..]);
    out
}

/// `badness.is_bad`: does the text hold an unlikely sequence of characters?
fn is_bad(text: &str) -> bool {
    tables().badness.is_match(text)
}

fn is_c1(c: char) -> bool {
    ('\u{80}'..='\u{9f}').contains(&c)
}

/// `fixes.fix_c1_controls`: C1 controls read as Windows-1252, as browsers do.
fn fix_c1_controls(text: String) -> String {
    if !text.chars().any(is_c1) {
        return text;
    }
    let sloppy_1252 = &tables().sloppy_windows_1252;
    text.chars()
        .map(|c| match u8::try_from(u32::from(c)) {
            Ok(b) if is_c1(c) => sloppy_1252.decode_byte(b).unwrap_or(c),
            _ => c,
        })
        .collect()
}

/// `chardata.LIGATURES`: Latin ligatures and digraphs, and their letters.
const LIGATURES: [(char, &str); 22] = [
    ('Ĳ', "IJ"),
    ('ĳ', "ij"),
    ('ŉ', "ʼn"),
    ('Ǳ', "DZ"),
    ('ǲ', "Dz"),
    ('ǳ', "dz"),
    ('Ǆ', "DŽ"),
    ('ǅ', "Dž"),
    ('ǆ', "dž"),
    ('Ǉ', "LJ"),
    ('ǈ', "Lj"),
    ('ǉ', "lj"),
    ('Ǌ', "NJ"),
    ('ǋ', "Nj"),
    ('ǌ', "nj"),
    ('ﬀ', "ff"),
    ('ﬁ', "fi"),
    ('ﬂ', "fl"),
    ('ﬃ', "ffi"),
    ('ﬄ', "ffl"),
    ('ﬅ', "ſt"),
    ('ﬆ', "st"),
];

/// Replaces every character that `map` maps; `None` when none is mapped.
fn translate<'m>(text: &str, map: impl Fn(char) -> Option<&'m str>) -> Option<String> {
    if !text.chars().any(|c| map(c).is_some()) {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match map(c) {
            Some(s) => out.push_str(s),
            None => out.push(c),
        }
    }
    Some(out)
}

/// `fixes.fix_latin_ligatures`.
fn fix_latin_ligatures(text: String) -> String {
    let ligature = |c: char| LIGATURES.iter().find(|(l, _)| *l == c).map(|(_, s)| *s);
    translate(&text, ligature).unwrap_or(text)
}

/// `fixes.fix_character_width`: fullwidth and halfwidth forms (and U+3000)
/// to their usual width.
fn fix_character_width(text: String) -> String {
    let width = &tables().width;
    translate(&text, |c| width.get(&c).map(String::as_str)).unwrap_or(text)
}

/// `fixes.uncurl_quotes`.
fn uncurl_quotes(text: String) -> String {
    let straight = |c: char| match c {
        '\u{2bc}' | '\u{2018}'..='\u{201b}' => Some("'"),
        '\u{201c}'..='\u{201f}' => Some("\""),
        _ => None,
    };
    translate(&text, straight).unwrap_or(text)
}

/// `fixes.fix_line_breaks`: CRLF, CR, U+2028, U+2029 and U+0085 to `\n`.
fn fix_line_breaks(text: String) -> String {
    if !text.contains(['\r', '\u{2028}', '\u{2029}', '\u{85}']) {
        return text;
    }
    text.replace("\r\n", "\n")
        .replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n")
}

/// `fixes.remove_terminal_escapes`: ANSI escapes such as `\x1b[31m`.
fn remove_terminal_escapes(text: String) -> String {
    if !text.contains('\x1b') {
        return text;
    }
    tables().ansi.replace_all(&text, "").into_owned()
}

/// `chardata.CONTROL_CHARS`: controls with no visible effect (not the
/// whitespace ones, C1, joiners, bidi marks or tags).
fn is_removed_control(c: char) -> bool {
    matches!(c,
        '\0'..='\u{8}' | '\u{b}' | '\u{e}'..='\u{1f}' | '\u{7f}'
        | '\u{206a}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffc}')
}

/// `fixes.remove_control_chars`.
fn remove_control_chars(mut text: String) -> String {
    if text.contains(is_removed_control) {
        text.retain(|c| !is_removed_control(c));
    }
    text
}

fn normalize_nfc(text: String) -> String {
    if is_nfc_quick(text.chars()) == IsNormalized::Yes {
        return text;
    }
    text.nfc().collect()
}

/// A set of code points as sorted, disjoint inclusive ranges.
#[derive(Debug, Default)]
struct CharClass(Vec<(u32, u32)>);

impl CharClass {
    /// Parses `a-b c ...` (hex) from ftfy_tables.tsv.
    fn parse(text: &str) -> Self {
        let hex = |h: &str| u32::from_str_radix(h, 16).ok();
        let ranges = text
            .split(' ')
            .filter_map(|item| match item.split_once('-') {
                Some((lo, hi)) => Some((hex(lo)?, hex(hi)?)),
                None => hex(item).map(|cp| (cp, cp)),
            })
            .collect();
        Self(ranges)
    }

    fn contains(&self, c: char) -> bool {
        let cp = u32::from(c);
        let i = self.0.partition_point(|&(_, hi)| hi < cp);
        self.0.get(i).is_some_and(|&(lo, _)| lo <= cp)
    }

    /// The ranges as the inside of a regex class: `\x{80}-\x{9f}...`.
    fn regex_items(&self) -> String {
        self.0
            .iter()
            .map(|&(lo, hi)| {
                if lo == hi {
                    format!("\\x{{{lo:x}}}")
                } else {
                    format!("\\x{{{lo:x}}}-\\x{{{hi:x}}}")
                }
            })
            .collect()
    }
}

/// A single-byte codec: bytes below 0x80 are ASCII, the others (and 0x1A,
/// which the sloppy codecs read as U+FFFD) come from the table.
#[derive(Debug, Clone)]
struct Codec {
    name: String,
    /// What bytes 0x80..=0xFF and then 0x1A decode to; `None`: an error.
    high: Vec<Option<char>>,
    encoder: HashMap<char, u8>,
}

impl Codec {
    fn parse(name: &str, chars: &str) -> Self {
        let high: Vec<Option<char>> = chars
            .split(' ')
            .map(|h| u32::from_str_radix(h, 16).ok().and_then(char::from_u32))
            .collect();
        let bytes = (0x80..=0xFF).chain([0x1A]);
        let encoder = high
            .iter()
            .zip(bytes)
            .filter_map(|(c, b)| Some(((*c)?, b)))
            .collect();
        Self {
            name: name.to_owned(),
            high,
            encoder,
        }
    }

    fn decode_byte(&self, b: u8) -> Option<char> {
        match b {
            0x1A => self.high.get(128).copied().flatten(),
            0x80.. => self.high.get(usize::from(b - 0x80)).copied().flatten(),
            _ => Some(char::from(b)),
        }
    }

    /// `text.encode(codec)`; `None` where a character has no byte, i.e.
    /// where `chardata.possible_encoding` is false.
    fn encode(&self, text: &str) -> Option<Vec<u8>> {
        text.chars()
            .map(|c| match u8::try_from(u32::from(c)) {
                Ok(b) if b < 0x80 && b != 0x1A => Some(b),
                _ => self.encoder.get(&c).copied(),
            })
            .collect()
    }
}

/// ftfy's data and the regexes built from it.
#[derive(Debug)]
struct Tables {
    /// chardata.CHARMAP_ENCODINGS, in the order ftfy tries them.
    charmap_codecs: Vec<Codec>,
    windows_1252: Codec,
    sloppy_windows_1252: Codec,
    width: HashMap<char, String>,
    /// HTML_ENTITIES beyond html5's names that end in ';', keyed without '&'.
    upper_entities: HashMap<String, String>,
    continuation_strict: CharClass,
    badness: Regex,
    utf8_detector: Regex,
    html_entity: Regex,
    ansi: Regex,
    altered_utf8: BytesRegex,
    lossy_utf8: BytesRegex,
}

fn regex(pattern: &str) -> Regex {
    RegexBuilder::new(pattern)
        .size_limit(1 << 26)
        .build()
        .unwrap_or_else(|e| unreachable!("ftfy regex: {e}"))
}

fn bytes_regex(pattern: &str) -> BytesRegex {
    BytesRegex::new(pattern).unwrap_or_else(|e| unreachable!("ftfy regex: {e}"))
}

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let hex_chars = |hexes: &str| -> String {
            hexes
                .split(' ')
                .filter_map(|h| u32::from_str_radix(h, 16).ok().and_then(char::from_u32))
                .collect()
        };
        let mut classes = HashMap::new();
        let mut codecs = Vec::new();
        let mut width = HashMap::new();
        let mut upper_entities = HashMap::new();
        for line in include_str!("ftfy_tables.tsv").lines() {
            match line.split('\t').collect::<Vec<_>>()[..] {
                ["class", name, ranges] => {
                    classes.insert(name, CharClass::parse(ranges));
                }
                ["codec", name, chars] => codecs.push(Codec::parse(name, chars)),
                ["width", from, to] => {
                    if let Some(c) = hex_chars(from).chars().next() {
                        width.insert(c, hex_chars(to));
                    }
                }
                ["entity", name, value] => {
                    upper_entities.insert(name.to_owned(), hex_chars(value));
                }
                _ => {}
            }
        }
        let find_codec = |codecs: &[Codec], name: &str| {
            codecs
                .iter()
                .position(|c| c.name == name)
                .unwrap_or_else(|| unreachable!("ftfy_tables.tsv has codec {name}"))
        };
        // Strict Windows-1252 only decodes; the rest are the encodings ftfy tries.
        let windows_1252 = codecs.remove(find_codec(&codecs, "windows-1252"));
        let sloppy_windows_1252 = codecs[find_codec(&codecs, "sloppy-windows-1252")].clone();
        let class = |names: &[&str], extra: &str| -> String {
            let items: String = names
                .iter()
                .map(|n| {
                    classes
                        .get(n)
                        .unwrap_or_else(|| unreachable!("ftfy_tables.tsv has class {n}"))
                        .regex_items()
                })
                .collect();
            format!("[{items}{extra}]")
        };
        Tables {
            charmap_codecs: codecs,
            windows_1252,
            sloppy_windows_1252,
            width,
            upper_entities,
            badness: regex(&badness_pattern(&class)),
            utf8_detector: regex(&format!(
                "(?:{f2}{c}|{f3}{c}{{2}}|{f4}{c}{{3}})+",
                f2 = class(&["utf8_first_of_2"], ""),
                f3 = class(&["utf8_first_of_3"], ""),
                f4 = class(&["utf8_first_of_4"], ""),
                c = class(&["utf8_continuation"], ""),
            )),
            continuation_strict: classes.remove("utf8_continuation_strict").unwrap_or_default(),
            html_entity: regex("&#?[0-9A-Za-z]{1,24};"),
            ansi: regex(r"\x1b\[(?:\d|;)*[a-zA-Z]"),
            altered_utf8: bytes_regex(concat!(
                r"(?-u)[\xc2\xc3\xc5\xce\xd0\xd9]\x20",
                r"|[\xe2\xe3]\x20[\x80-\x84\x86-\x9f\xa1-\xbf]",
                r"|[\xe0-\xe3][\x80-\x84\x86-\x9f\xa1-\xbf]\x20",
                r"|\xf0\x20[\x80-\xbf][\x80-\xbf]",
                r"|\xf0[\x80-\xbf]\x20[\x80-\xbf]",
                r"|\xf0[\x80-\xbf][\x80-\xbf]\x20",
            )),
            lossy_utf8: bytes_regex(concat!(
                r"(?-u)[\xc2-\xdf]\x1a",
                r"|[\xc2-\xc3]\?",
                r"|\xed[\xa0-\xaf][\x1a?]\xed[\xb0-\xbf][\x1a?\x80-\xbf]",
                r"|\xed[\xa0-\xaf][\x1a?\x80-\xbf]\xed[\xb0-\xbf][\x1a?]",
                r"|[\xe0-\xef][\x1a?][\x1a\x80-\xbf]",
                r"|[\xe0-\xef][\x1a\x80-\xbf][\x1a?]",
                r"|[\xf0-\xf4][\x1a?][\x1a\x80-\xbf][\x1a\x80-\xbf]",
                r"|[\xf0-\xf4][\x1a\x80-\xbf][\x1a?][\x1a\x80-\xbf]",
                r"|[\xf0-\xf4][\x1a\x80-\xbf][\x1a\x80-\xbf][\x1a?]",
                r"|\x1a",
            )),
        }
    })
}

/// `badness.BADNESS_RE`, alternative by alternative; `class` builds a
/// character class from ftfy's named categories plus literal members.
/// Python's `\s` and `\w` are spelled as the classes they match there.
fn badness_pattern(class: &dyn Fn(&[&str], &str) -> String) -> String {
    let c = |names: &str| class(&names.split(' ').collect::<Vec<_>>(), "");
    let space = c("py_space");
    let word = c("py_word");
    let arabic = class(
        &["common", "currency", "bad", "numeric", "start_punctuation"],
        "ŸŠ®°µ»",
    );
    [
        c("c1"),
        format!(
            "{}{}",
            c("bad lower_accented upper_accented box start_punctuation end_punctuation currency numeric law"),
            c("bad")
        ),
        format!("[a-zA-Z]{}{}", c("lower_common upper_common"), c("bad")),
        format!(
            "{}{}",
            c("bad"),
            c("lower_accented upper_accented box start_punctuation end_punctuation currency numeric law")
        ),
        format!(
            "{}{}",
            c("lower_accented lower_common box end_punctuation currency numeric"),
            c("upper_accented")
        ),
        format!(
            "{}{}",
            c("box end_punctuation currency numeric"),
            c("lower_accented")
        ),
        format!("{}{}", c("lower_accented box end_punctuation"), c("currency")),
        format!("{space}{}{}", c("upper_accented"), c("currency")),
        format!("{}{}", c("upper_accented box"), c("numeric law")),
        format!(
            "{}{}{}",
            c("lower_accented upper_accented box currency end_punctuation"),
            c("start_punctuation"),
            c("numeric")
        ),
        format!(
            "{}{}{}",
            c("lower_accented upper_accented currency numeric box law"),
            c("end_punctuation"),
            c("start_punctuation")
        ),
        format!("{}{}", c("currency numeric box"), c("start_punctuation")),
        format!("[a-z]{}{}", c("upper_accented"), c("start_punctuation currency")),
        format!("{}{}", c("box"), c("kaomoji")),
        format!(
            "{}{}",
            c("lower_accented upper_accented currency numeric start_punctuation end_punctuation law"),
            c("box")
        ),
        format!("{}{}", c("box"), c("end_punctuation")),
        format!(
            "{}{}{word}",
            c("lower_accented upper_accented"),
            c("start_punctuation end_punctuation")
        ),
        // The ligature œ when not followed by an unaccented Latin letter
        "[Œœ][^A-Za-z]".to_owned(),
        // Degree signs after capital letters
        format!("{}°", c("upper_accented")),
        // Common Windows-1252 2-character mojibake not covered above
        format!(
            "[ÂÃÎÐ]{}",
            class(
                &["start_punctuation", "end_punctuation"],
                r"€œŠš¢£Ÿž\xa0\xad®©°·»–—´"
            )
        ),
        "×[²³]".to_owned(),
        // Windows-1252 mojibake of Arabic words: four characters
        format!("[ØÙ]{arabic}[ØÙ]{arabic}"),
        // Windows-1252 starts of 3-character sequences of South Asian scripts
        "à[²µ¹¼½¾]".to_owned(),
        // MacRoman mojibake not covered above
        "√[±∂†≠®™´≤≥¥µø]".to_owned(),
        "≈[°¢]".to_owned(),
        "‚Ä[ìîïòôúùû†°¢π]".to_owned(),
        "‚[âó][àä°ê]".to_owned(),
        // Windows-1251 mojibake of characters in the U+2000 range
        "вЂ".to_owned(),
        // Windows-1251 mojibake of Latin-1 and/or Cyrillic: three characters
        format!(
            "[ВГРС]{}[ВГРС]",
            class(
                &["c1", "bad", "start_punctuation", "end_punctuation", "currency"],
                "°µ"
            )
        ),
        // Windows-1251 on top of Latin-1 mojibake of Windows-1252, near a Latin letter
        "ГўВЂВ.[A-Za-z\\x20]".to_owned(),
        // Windows-1252 encodings of 'à' and 'á', and of U+00A0 itself
        r"Ã[\xa0¡]".to_owned(),
        format!("[a-z]{space}?[ÃÂ]\\x20"),
        r"^[ÃÂ]\x20".to_owned(),
        // Â encoding the very same, common enough, character
        format!(
            "{}Â{}",
            class(&["end_punctuation"], r"a-z\.,\?!"),
            class(&["start_punctuation", "end_punctuation"], r"\x20")
        ),
        // Windows-1253 mojibake of characters in the U+2000 range
        r"β€[™\xa0Ά\xad®°]".to_owned(),
        // Windows-1253 mojibake of Latin-1 and/or Greek
        format!(
            "[ΒΓΞΟ]{}[ΒΓΞΟ]",
            class(
                &["c1", "bad", "start_punctuation", "end_punctuation", "currency"],
                "°"
            )
        ),
        // Windows-1257 mojibake of characters in the U+2000 range
        "ā€".to_owned(),
    ]
    .join("|")
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values from ftfy 6.3.1 on Python 3.11 (the fixture venv):
    // the fixer of the same name in `ftfy.fixes`, `ftfy.badness.is_bad`,
    // `bytes.decode("utf-8-variants")`, `ftfy.fix_encoding`, `ftfy.fix_text`.

    #[test]
    fn plain_ascii_is_returned_as_is() {
        assert!(matches!(fix_text("a photo of a hand, 100%!"), Cow::Borrowed(_)));
        assert!(matches!(fix_text("fish & chips"), Cow::Owned(_)));
        assert_eq!(fix_text("tab\tnew\nline\x0c"), "tab\tnew\nline\x0c");
    }

    #[test]
    fn unescape_html_decodes_entities_that_end_in_semicolons() {
        for (input, want) in [
            ("&lt;tag&gt;", "<tag>"),
            ("&Jscr;ohn", "𝒥ohn"),
            ("P&EACUTE;REZ", "PÉREZ"),
            ("BUNDESSTRA&SZLIG;E", "BUNDESSTRASSE"),
            ("&ntilde; &Ntilde; &NTILDE; &nTILDE;", "ñ Ñ Ñ &nTILDE;"),
            ("&amp", "&amp"),
            ("this&not that", "this&not that"),
            ("&#65;&#x42;&#128;&#0;&#1;", "AB€\u{FFFD}"),
            ("&#65a;", "&#65a;"),
            ("&#xD800;", "\u{FFFD}"),
            ("&bogus;", "&bogus;"),
        ] {
            assert_eq!(unescape_entities(input.to_owned()), want, "{input:?}");
        }
    }

    #[test]
    fn character_fixers_follow_ftfy() {
        type Fixer = fn(String) -> String;
        let cases: [(Fixer, &str, &str); 13] = [
            (remove_terminal_escapes, "\x1b[36;44mblue\x1b[0m", "blue"),
            (remove_terminal_escapes, "\x1b[m", ""),
            (remove_terminal_escapes, "\x1b[1;2", "\x1b[1;2"),
            (remove_terminal_escapes, "\x1b]0;title", "\x1b]0;title"),
            (
                uncurl_quotes,
                "\u{201c}here\u{2019}s\u{201d} \u{2bc}\u{201b}\u{201f}",
                "\"here's\" ''\"",
            ),
            (fix_latin_ligatures, "ﬂuﬃeﬆ Ĳ ǅ ŉ æ", "fluffiest IJ Dž ʼn æ"),
            (fix_character_width, "ＬＯＵＤ\u{3000}ＮＯＩＳＥＳ", "LOUD NOISES"),
            (fix_character_width, "Ｕﾀｰﾝ", "Uターン"),
            (fix_character_width, "￦￠", "₩¢"),
            (
                fix_line_breaks,
                "a\r\nb\rc\u{2028}d\u{2029}e\u{85}f",
                "a\nb\nc\nd\ne\nf",
            ),
            (
                remove_control_chars,
                "\0a\x08\t\n\x0b\x0c\r\x0e\x1f\x7f\u{80}\u{200d}\u{206a}\u{feff}\u{fff9}\u{fffc}\u{fffd}",
                "a\t\n\x0c\r\u{80}\u{200d}\u{fffd}",
            ),
            (fix_c1_controls, "\u{80}\u{81}\u{8d}\u{9f} x", "€\u{81}\u{8d}Ÿ x"),
            (normalize_nfc, "e\u{301} \u{1100}\u{1161}\u{11a8}", "é 각"),
        ];
        for (fixer, input, want) in cases {
            assert_eq!(fixer(input.to_owned()), want, "{input:?}");
        }
    }

    #[test]
    fn byte_fixers_follow_ftfy() {
        for (input, want) in [
            (&b"\xc3 la"[..], &b"\xc3\xa0 la"[..]),
            (b"\xc3 s vezes", b"\xc3\xa0s vezes"),
            (b"\xc3 quele", b"\xc3\xa0quele"),
            (b"\xc3  x", b"\xc3\xa0 x"),
            (b"\xe2\x80 x", b"\xe2\x80\xa0x"),
            (b"\xf0\x9f \x80", b"\xf0\x9f\xa0\x80"),
            (b"\xce \xc3 ", b"\xce\xa0\xc3\xa0 "),
        ] {
            assert_eq!(restore_byte_a0(input), want, "{input:?}");
        }
        for input in [
            &b"\xe2\x80\x1a"[..],
            b"\xc3?",
            b"\xe2\x1a\x9d",
            b"\x1a",
            b"\xf0\x9f\x98?",
        ] {
            assert_eq!(replace_lossy_sequences(input), "\u{FFFD}".as_bytes(), "{input:?}");
        }
    }

    #[test]
    fn utf8_variants_decodes_cesu8_and_java_nulls() {
        for (input, want) in [
            (&b"a\xc0\x80b"[..], Some("a\0b")),
            (b"\xed\xa0\xbd\xed\xb8\x80", Some("😀")),
            // The codec's `$` matches before a final newline, which it eats.
            (b"\xed\xa0\xbd\xed\xb8\n", Some("😊")),
            (b"\xc3\xa9\xc0\n", Some("é\0")),
            (b"\xed\x9f\xbf", Some("\u{d7ff}")),
            (b"\xed\xa0\x80", None),
            (b"\xc0", None),
            (b"\xed\xb0\x80AAA", None),
        ] {
            assert_eq!(decode_utf8_variants(input).as_deref(), want, "{input:?}");
        }
    }

    #[test]
    fn badness_flags_mojibake_only() {
        for (input, want) in [
            ("cafÃ©", true),
            ("café", false),
            ("Â¯\\_", true),
            ("×²", true),
            ("naïve", false),
            ("ÃÂ", false),
            ("Ã ", true),
            ("a Ã ", true),
            ("ГўВЂВ\u{9d}x", true),
        ] {
            assert_eq!(is_bad(input), want, "{input:?}");
        }
    }

    #[test]
    fn fix_encoding_undoes_each_kind_of_mojibake() {
        for (input, want) in [
            ("sÃ³", "só"),
            ("voilÃ le travail", "voilà le travail"),
            ("Ã s vezes", "às vezes"),
            ("â€œ like this â€\u{fffd}", "“ like this \u{fffd}"),
            ("\u{80}abc", "€abc"),
            ("\u{81}abc", "\u{81}abc"),
            ("caf√©", "café"),
            ("caf├⌐", "café"),
            ("Ã¢â‚¬â„¢", "’"),
        ] {
            assert_eq!(fix_encoding(input.to_owned()), want, "{input:?}");
        }
        for (input, want) in [
            ("mixed cafÃ© and café", "mixed café and café"),
            ("l’Ã©tÃ©", "l’été"),
        ] {
            assert_eq!(decode_inconsistent_utf8(input), want, "{input:?}");
        }
    }

    #[test]
    fn fix_text_works_line_by_line() {
        for (input, want) in [
            ("a &lt; b\nc &eacute;", "a < b\nc é"),
            // After a line with '<' the text is HTML: entities stay.
            ("<b>\n&eacute;", "<b>\n&eacute;"),
            ("&eacute;\n<b>\n&eacute;", "é\n<b>\n&eacute;"),
            ("Ã©À\n", "é"),
            ("cafÃ©\r\ncafÃ©", "café\ncafé"),
            ("e\u{301}", "é"),
            ("\u{feff}BOM", "BOM"),
        ] {
            assert_eq!(fix_text(input), want, "{input:?}");
        }
        let lines: Vec<&str> = pieces("abcdefg", 3).collect();
        assert_eq!(lines, ["abc", "def", "g"]);
    }
}
