//! `docs/api.md` is generated from the proto's comments by
//! `scripts/gen_api_docs.py`. These tests fail when the page is out of step
//! with `proto/handid/v1/handid.proto` (someone edited one and not the
//! other), and, independently of the generator, when a service, rpc,
//! message, field, enum or enum value of the proto is missing from the page
//! or shows up without the comment written above it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn read(relative: &str) -> String {
    let path = workspace().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

#[test]
fn api_md_is_what_the_generator_makes_of_the_proto() {
    let out = Command::new("python3")
        .arg(workspace().join("scripts/gen_api_docs.py"))
        .args(["--out", "-"])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "gen_api_docs.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generated = String::from_utf8(out.stdout).expect("UTF-8");
    let committed = read("docs/api.md");
    if generated != committed {
        let line = generated
            .lines()
            .zip(committed.lines())
            .position(|(a, b)| a != b)
            .map_or_else(|| "at the end".to_owned(), |i| format!("from line {}", i + 1));
        panic!("docs/api.md is out of step with the proto ({line}): run python3 scripts/gen_api_docs.py");
    }
}

/// One declaration of the proto with the comment lines right above it.
#[derive(Debug)]
struct Declaration {
    kind: &'static str,
    name: String,
    comment: String,
}

/// A deliberately simple reading of the proto, separate from the
/// generator's: each `service`, `rpc`, `message`, `enum`, field and enum
/// value line, with the comment block directly above it.
fn declarations(proto: &str) -> Vec<Declaration> {
    let mut out = Vec::new();
    let mut comment: Vec<&str> = Vec::new();
    let mut blocks: Vec<&'static str> = Vec::new();
    for line in proto.lines() {
        let line = line.trim();
        if let Some(text) = line.strip_prefix("//") {
            comment.push(text.trim());
            continue;
        }
        let text = comment.join(" ");
        comment.clear();
        let words: Vec<&str> = line
            .split(|c: char| c.is_whitespace() || "(){};=<>,".contains(c))
            .filter(|w| !w.is_empty())
            .collect();
        let (kind, name) = match words.as_slice() {
            [] => continue,
            ["}", ..] => {
                blocks.pop();
                continue;
            }
            [k @ ("service" | "message" | "enum" | "oneof"), name, ..] => {
                let kind: &'static str = match *k {
                    "service" => "service",
                    "message" => "message",
                    "enum" => "enum",
                    _ => "oneof",
                };
                if !line.ends_with('}') {
                    blocks.push(kind);
                }
                (kind, *name)
            }
            ["rpc", name, ..] => ("rpc", *name),
            // Retired field numbers and names: nothing to document.
            ["reserved", ..] => continue,
            _ => match blocks.last() {
                Some(&"enum") => ("value", words[0]),
                Some(&("message" | "oneof")) => {
                    // `[repeated] type name = N;` or `map<K, V> name = N;`
                    let before_eq = line.split('=').next().unwrap_or_default();
                    match before_eq.split_whitespace().last() {
                        Some(name) => ("field", name),
                        None => continue,
                    }
                }
                _ => continue,
            },
        };
        if kind == "oneof" {
            continue;
        }
        out.push(Declaration {
            kind,
            name: name.to_owned(),
            comment: text,
        });
    }
    out
}

#[test]
fn every_declaration_is_documented_with_its_comment() {
    let proto = read("proto/handid/v1/handid.proto");
    let page = read("docs/api.md");
    // The page joins comment lines with single spaces in tables, and keeps
    // line breaks in paragraphs: compare with all whitespace collapsed.
    let flat = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let flat_page = flat(&page);
    let found = declarations(&proto);
    for kind in ["service", "rpc", "message", "enum", "field", "value"] {
        assert!(
            found.iter().any(|d| d.kind == kind),
            "no {kind} read from the proto"
        );
    }
    for d in &found {
        let named = match d.kind {
            "service" | "message" | "enum" => page.contains(&format!("### {}\n", d.name)),
            "rpc" => page.contains(&format!("`rpc {}(", d.name)),
            _ => page.contains(&format!("| `{}` |", d.name)),
        };
        assert!(named, "docs/api.md does not document {} {}", d.kind, d.name);
        assert!(
            flat_page.contains(&flat(&d.comment.replace('|', "\\|"))),
            "docs/api.md lacks the comment of {} {}: {:?}",
            d.kind,
            d.name,
            d.comment
        );
    }
}
