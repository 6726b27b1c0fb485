//! Reports from an embeddings file: the path `handid-trainer eval --embeddings` takes.

use handid_eval::embeddings::{self, SplitEmbeddings, Vectors};
use handid_eval::metrics::Similarity;
use handid_eval::metrics::summary::{EvalOptions, SplitEvaluation};
use handid_eval::report::Report;

/// Person `p` is the unit vector along axis `p` plus a little per-image noise.
fn vectors(persons: &[i64], salt: u64) -> Vectors {
    let dim = 8;
    let mut values = Vec::new();
    for (i, &p) in persons.iter().enumerate() {
        for d in 0..dim {
            let noise = ((i as u64 * 31 + d as u64 * 7 + salt) % 11) as f32 / 40.0;
            values.push(if d as i64 == p { 1.0 } else { 0.0 } + noise);
        }
    }
    Vectors::new(values, dim, persons.to_vec()).expect("vectors")
}

#[test]
fn report_from_embeddings_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("emb.safetensors");
    let splits: Vec<SplitEmbeddings> = (0..3)
        .map(|i| SplitEmbeddings {
            name: i.to_string(),
            // Person 7 has no gallery image: its query is a miss.
            query: vectors(&[0, 0, 1, 2, 3, 3, 4, 5, 6, 7], i),
            gallery: vectors(&[0, 1, 2, 3, 4, 5, 6], i + 100),
        })
        .collect();
    embeddings::write(&file, &splits).expect("write");

    let options = EvalOptions::default();
    let evaluations: Vec<SplitEvaluation> = embeddings::read(&file)
        .expect("read")
        .iter()
        .map(|s| {
            let sim = embeddings::cosine_similarity(&s.query, &s.gallery).expect("cosine");
            let sim = Similarity::new(&sim, s.query.len(), s.gallery.len()).expect("matrix");
            SplitEvaluation::new(&s.name, &sim, &s.query.ids, &s.gallery.ids, &options).expect("evaluate")
        })
        .collect();
    assert!(
        evaluations
            .iter()
            .all(|e| e.n_without_match == 1 && e.rank_k[0].1 == 0.9)
    );

    let report = Report::new(
        "test",
        vec![("embeddings".into(), "emb.safetensors".into())],
        options,
        evaluations,
    )
    .expect("report");
    let written = report.write(&dir.path().join("out")).expect("write report");
    assert_eq!(written.len(), 6);
    for png in written
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
    {
        let img = image::open(png).expect("PNG decodes");
        assert_eq!((img.width(), img.height()), (800, 600));
    }
    let md = std::fs::read_to_string(dir.path().join("out/report.md")).expect("md");
    assert!(md.contains("| rank1 | 90.00 | 0.00 |"), "{md}");
    let csv = std::fs::read_to_string(dir.path().join("out/report.csv")).expect("csv");
    assert_eq!(csv.lines().count(), 1 + 3 + 2);
    assert!(csv.lines().nth(4).is_some_and(|l| l.starts_with("mean,")));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/report.json")).expect("json"))
            .expect("parse");
    assert_eq!(json["splits"].as_array().map(Vec::len), Some(3));
}
