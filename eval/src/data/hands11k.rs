//! The 11k Hands layout: `<root>/Hands/<imageName>` and `<root>/HandInfo.csv`.
//!
//! `HandInfo.csv` columns: `id,age,gender,skinColor,accessories,nailPolish,
//! aspectOfHand,imageName,irregularities`. Ids are quoted 7-digit strings
//! compared as integers; one row of the full file has `"1200000 "` (trailing
//! space), which is person 1200000 (PROTOCOL.md section 1).

use std::fmt;
use std::path::Path;

use super::{Dataset, MissingImages, Sample, keep_readable};
use crate::{Error, Result};

/// Which hand and side a photo shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Aspect {
    /// Back of the right hand (the published protocol's default).
    DorsalRight,
    /// Back of the left hand.
    DorsalLeft,
    /// Palm of the right hand.
    PalmarRight,
    /// Palm of the left hand.
    PalmarLeft,
}

impl Aspect {
    /// All four, in a fixed order.
    pub const ALL: [Aspect; 4] = [
        Self::DorsalRight,
        Self::DorsalLeft,
        Self::PalmarRight,
        Self::PalmarLeft,
    ];

    /// Name as written in `HandInfo.csv` (`dorsal right`).
    pub fn name(self) -> &'static str {
        match self {
            Self::DorsalRight => "dorsal right",
            Self::DorsalLeft => "dorsal left",
            Self::PalmarRight => "palmar right",
            Self::PalmarLeft => "palmar left",
        }
    }

    /// Name without spaces (`dorsal_right`), for file names and id prefixes.
    pub fn slug(self) -> &'static str {
        match self {
            Self::DorsalRight => "dorsal_right",
            Self::DorsalLeft => "dorsal_left",
            Self::PalmarRight => "palmar_right",
            Self::PalmarLeft => "palmar_left",
        }
    }

    /// Parses either form (`dorsal right` or `dorsal_right`).
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|a| text == a.name() || text == a.slug())
    }

    /// Largest id of the training persons (PROTOCOL.md section 2).
    pub fn train_threshold(self) -> u32 {
        match self {
            Self::DorsalRight => 1050,
            Self::DorsalLeft => 1037,
            Self::PalmarRight => 1051,
            Self::PalmarLeft => 1042,
        }
    }

    /// Index in [`Aspect::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Aspect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The fields of a `HandInfo.csv` row that the protocol uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandInfo {
    /// Person id (integer value of the quoted string).
    pub id: u32,
    /// 1 when the hand wears jewellery or similar.
    pub accessories: u8,
    /// Which hand and side.
    pub aspect: Aspect,
    /// File name inside `Hands/`.
    pub image_name: String,
}

impl HandInfo {
    /// The manifest form of the id: 7 digits, zero-padded.
    pub fn person(&self) -> String {
        format!("{:07}", self.id)
    }
}

/// Splits one CSV record into fields: commas separate, double quotes enclose
/// (with `""` for a quote). Records span one line in this file.
fn split_csv(line: &str) -> std::result::Result<Vec<String>, String> {
    let mut fields = vec![String::new()];
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        let field = fields.last_mut().ok_or("no field")?;
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(String::new()),
            _ => field.push(c),
        }
    }
    if quoted {
        Err("unterminated quote".into())
    } else {
        Ok(fields)
    }
}

/// Reads every row of a `HandInfo.csv`; an unusable row is an error naming
/// its line.
pub fn read_hand_info(path: &Path) -> Result<Vec<HandInfo>> {
    let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
    let parse_error = |line: usize, message: String| Error::Parse {
        path: path.to_path_buf(),
        line,
        message,
    };
    // A spreadsheet may have saved it with a byte-order mark.
    let mut lines = text
        .trim_start_matches('\u{feff}')
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim_end_matches('\r')));
    let (_, header) = lines.next().ok_or_else(|| parse_error(1, "empty file".into()))?;
    let header = split_csv(header).map_err(|m| parse_error(1, m))?;
    let column = |name: &str| {
        header
            .iter()
            .position(|h| h.trim() == name)
            .ok_or_else(|| parse_error(1, format!("no column {name:?}")))
    };
    let (c_id, c_acc, c_aspect, c_image) = (
        column("id")?,
        column("accessories")?,
        column("aspectOfHand")?,
        column("imageName")?,
    );
    let mut rows = Vec::new();
    for (line, record) in lines {
        if record.trim().is_empty() {
            continue;
        }
        let fields = split_csv(record).map_err(|m| parse_error(line, m))?;
        if fields.len() != header.len() {
            return Err(parse_error(
                line,
                format!("{} fields, the header has {}", fields.len(), header.len()),
            ));
        }
        // Trimmed: the full file writes one id as "1200000 ".
        let id = fields[c_id].trim();
        let id = id
            .parse()
            .map_err(|_| parse_error(line, format!("id {id:?} is not an integer")))?;
        let acc = fields[c_acc].trim();
        let accessories = acc
            .parse()
            .map_err(|_| parse_error(line, format!("accessories {acc:?} is not an integer")))?;
        let aspect = fields[c_aspect].trim();
        let aspect =
            Aspect::parse(aspect).ok_or_else(|| parse_error(line, format!("unknown aspect {aspect:?}")))?;
        let image_name = fields[c_image].trim().to_string();
        if image_name.is_empty() || image_name.contains(['/', '\\', '\t']) {
            return Err(parse_error(line, format!("bad image name {image_name:?}")));
        }
        rows.push(HandInfo {
            id,
            accessories,
            aspect,
            image_name,
        });
    }
    Ok(rows)
}

/// Which rows to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Filter {
    /// Keep only this aspect (`None`: all four).
    pub aspect: Option<Aspect>,
    /// Keep only rows without accessories (the protocol does).
    pub without_accessories: bool,
}

/// Loads `<root>/HandInfo.csv`, filters it and checks that each kept image
/// in `<root>/Hands/` is readable. Returns the rows alongside the dataset.
pub fn load(root: &Path, filter: Filter, missing: MissingImages) -> Result<(Vec<HandInfo>, Dataset)> {
    let rows: Vec<HandInfo> = read_hand_info(&root.join("HandInfo.csv"))?
        .into_iter()
        .filter(|r| filter.aspect.is_none_or(|a| a == r.aspect))
        .filter(|r| !filter.without_accessories || r.accessories == 0)
        .collect();
    let samples = rows
        .iter()
        .map(|r| Sample {
            person: r.person(),
            image: format!("Hands/{}", r.image_name),
        })
        .collect();
    let dataset = keep_readable(root, samples, missing)?;
    let kept: std::collections::BTreeSet<&str> = dataset.samples.iter().map(|s| s.image.as_str()).collect();
    let rows = rows
        .into_iter()
        .filter(|r| kept.contains(format!("Hands/{}", r.image_name).as_str()))
        .collect();
    Ok((rows, dataset))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_and_quotes() {
        assert_eq!(
            split_csv(r#""0000004",27,"dorsal right","a""b""#).unwrap(),
            ["0000004", "27", "dorsal right", "a\"b"]
        );
        assert!(split_csv(r#""open,1"#).is_err());
    }

    fn write_csv(dir: &Path, body: &str) -> std::path::PathBuf {
        let path = dir.join("HandInfo.csv");
        let header = "id,age,gender,skinColor,accessories,nailPolish,aspectOfHand,imageName,irregularities\n";
        std::fs::write(&path, format!("{header}{body}")).unwrap();
        path
    }

    #[test]
    fn trailing_space_id_is_the_same_person() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_csv(
            dir.path(),
            "\"1200000 \",20,\"male\",\"fair\",0,0,\"dorsal right\",\"Hand_1.jpg\",0\n\
             \"1200000\",20,\"male\",\"fair\",1,0,\"palmar left\",\"Hand_2.jpg\",0\n",
        );
        let rows = read_hand_info(&path).unwrap();
        assert_eq!(rows[0].id, 1_200_000);
        assert_eq!(rows[0].person(), rows[1].person());
        // Saved with a byte-order mark, the header still parses.
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("\u{feff}{text}")).unwrap();
        assert_eq!(read_hand_info(&path).unwrap(), rows);
        assert_eq!((rows[1].accessories, rows[1].aspect), (1, Aspect::PalmarLeft));
    }

    #[test]
    fn bad_rows_name_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let good = "\"0000001\",20,\"male\",\"fair\",0,0,\"dorsal right\",\"Hand_1.jpg\",0\n";
        for (bad, message) in [
            (
                "\"00x1\",20,\"male\",\"fair\",0,0,\"dorsal right\",\"Hand_2.jpg\",0\n",
                "not an integer",
            ),
            (
                "\"0000002\",20,\"male\",\"fair\",0,0,\"sideways\",\"Hand_2.jpg\",0\n",
                "unknown aspect",
            ),
            ("\"0000002\",20,\"male\"\n", "3 fields"),
        ] {
            let path = write_csv(dir.path(), &format!("{good}{bad}"));
            let err = read_hand_info(&path).unwrap_err().to_string();
            assert!(err.contains("HandInfo.csv:3:") && err.contains(message), "{err}");
        }
    }
}
