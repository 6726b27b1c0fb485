//! The fuzz targets' committed inputs, replayed on stable through the same
//! harnesses the targets run (`handid_server::fuzzing`): the seeds and the
//! minimised corpus (`fuzz/corpus/<target>/`) and every input that once
//! broke an invariant (`fuzz/regressions/<target>/`, each named after its
//! finding). No database, no model: a few seconds.
//!
//! An image seed named `ok-*` must be accepted and one named `refuse-*`
//! refused; `scripts/fuzz.sh` runs the targets themselves.

use std::path::{Path, PathBuf};

use handid_server::fuzzing::{self, ImageVerdict};

/// The files of `fuzz/<kind>/<target>/`, sorted (none when the folder does
/// not exist: a target with no finding has no regressions folder).
fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz")
        .join(kind)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn name(path: &Path) -> &str {
    path.file_name().and_then(|n| n.to_str()).expect("file name")
}

#[test]
fn image_corpus_replays_with_the_expected_verdicts() {
    tch::set_num_threads(1);
    let corpus = inputs("corpus", "image");
    assert!(corpus.len() >= 40, "{} files in fuzz/corpus/image", corpus.len());
    let (mut accepted, mut refused) = (0, 0);
    for path in corpus.iter().chain(&inputs("regressions", "image")) {
        let bytes = std::fs::read(path).expect("read input");
        // A panic names no file: say which one first.
        let verdict = std::panic::catch_unwind(|| fuzzing::image(&bytes))
            .unwrap_or_else(|_| panic!("{} broke an invariant", path.display()));
        let file = name(path);
        match &verdict {
            ImageVerdict::Accepted { .. } => accepted += 1,
            ImageVerdict::Refused(_) => refused += 1,
        }
        if file.starts_with("ok-") {
            assert!(
                matches!(verdict, ImageVerdict::Accepted { .. }),
                "{file}: {verdict:?}"
            );
        } else if file.starts_with("refuse-") {
            assert!(matches!(verdict, ImageVerdict::Refused(_)), "{file}: {verdict:?}");
        }
    }
    assert!(
        accepted >= 20 && refused >= 20,
        "{accepted} accepted, {refused} refused"
    );
}

/// Binary (P5) and ASCII (P2) greyscale PGM inputs, built here rather than
/// committed as image files: both are accepted, and a truncated one refused.
#[test]
fn pgm_inputs_built_in_memory_get_the_expected_verdicts() {
    tch::set_num_threads(1);
    let pixels: Vec<u8> = (0..64u32 * 64)
        .map(|i| u8::try_from((i % 64) * (i / 64) % 256).expect("byte"))
        .collect();
    let mut binary = b"P5\n64 64\n255\n".to_vec();
    binary.extend_from_slice(&pixels);
    let ascii = format!(
        "P2\n# ascii grey\n64 64\n255\n{}\n",
        pixels.iter().map(u8::to_string).collect::<Vec<_>>().join(" ")
    );
    for (what, bytes) in [("binary", binary.as_slice()), ("ascii", ascii.as_bytes())] {
        let verdict = fuzzing::image(bytes);
        assert!(
            matches!(verdict, ImageVerdict::Accepted { .. }),
            "{what} PGM: {verdict:?}"
        );
    }
    let truncated = &binary[..binary.len() / 2];
    assert!(
        matches!(fuzzing::image(truncated), ImageVerdict::Refused(_)),
        "a truncated PGM was accepted"
    );
}

#[test]
fn request_corpus_replays() {
    let corpus = inputs("corpus", "requests");
    assert!(
        corpus.len() >= 20,
        "{} files in fuzz/corpus/requests",
        corpus.len()
    );
    let mut accepted = 0;
    for path in corpus.iter().chain(&inputs("regressions", "requests")) {
        let bytes = std::fs::read(path).expect("read input");
        accepted += std::panic::catch_unwind(|| fuzzing::requests(&bytes))
            .unwrap_or_else(|_| panic!("{} broke an invariant", path.display()));
    }
    // The harness is not vacuous: the seeds hold valid calls of every kind.
    assert!(accepted >= 20, "{accepted} validations accepted");
}
