//! Ranking metrics against the reference implementations.
//!
//! `fixtures/rank_metrics.json` comes from `scripts/fixtures/make_metric_fixtures.py`,
//! which runs verbatim transcriptions of torchreid/FastReID `eval_market1501`
//! and MBA-Net `compute_CMC_mAP` on generated similarity matrices. mAP and
//! mINP are float64 there and must agree to 1e-9. Both references return the
//! CMC curve in float32 (torchreid casts it, MBA-Net sums an IntTensor and
//! calls `.float()`), so CMC values are compared after rounding ours to f32.

use handid_eval::metrics::Similarity;
use handid_eval::metrics::rank::{ApKind, QueryScope, Ranking};
use serde_json::Value;

fn cases() -> Vec<Value> {
    let text = include_str!("fixtures/rank_metrics.json");
    let root: Value = serde_json::from_str(text).expect("fixture is JSON");
    root["cases"].as_array().expect("cases").clone()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_i64().expect("integer"))
        .collect()
}

fn ranking(case: &Value) -> Ranking {
    let sim = f64s(&case["similarity"]);
    let n_query = case["n_query"].as_u64().expect("n_query") as usize;
    let n_gallery = case["n_gallery"].as_u64().expect("n_gallery") as usize;
    let sim = Similarity::new(&sim, n_query, n_gallery).expect("valid matrix");
    Ranking::new(&sim, &ids(&case["query_ids"]), &ids(&case["gallery_ids"])).expect("ranking")
}

fn assert_cmc_f32(name: &str, ours: &[f64], theirs: &[f64]) {
    assert_eq!(ours.len(), theirs.len(), "{name}: CMC length");
    for (k, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert_eq!(*a as f32, *b as f32, "{name}: CMC at rank {}", k + 1);
    }
}

#[test]
fn fixtures_cover_the_hard_cases() {
    let cases = cases();
    let rankings: Vec<Ranking> = cases.iter().map(ranking).collect();
    assert!(
        rankings.iter().any(|r| r.n_without_match() > 0),
        "a case with no-match queries"
    );
    assert!(
        rankings
            .iter()
            .any(|r| r.queries.iter().any(|q| q.match_positions.len() > 1)),
        "multi-match"
    );
    assert!(
        rankings
            .iter()
            .any(|r| r.queries.iter().all(|q| q.match_positions.len() == 1)),
        "single-match"
    );
    let distinct = |c: &Value| {
        let mut s = f64s(&c["similarity"]);
        s.sort_by(f64::total_cmp);
        s.dedup();
        s.len()
    };
    assert!(
        cases
            .iter()
            .any(|c| distinct(c) < f64s(&c["similarity"]).len() / 2),
        "a case with ties"
    );
}

#[test]
fn torchreid_eval_market1501_non_interpolated() {
    for case in cases() {
        let name = case["name"].as_str().expect("name");
        let r = ranking(&case);
        let reference = &case["torchreid"];
        let map = r.mean_ap(ApKind::NonInterpolated, QueryScope::Matched);
        assert!(
            (map - reference["map"].as_f64().expect("map")).abs() < 1e-9,
            "{name}: mAP {map}"
        );
        let minp = r.minp(QueryScope::Matched);
        assert!(
            (minp - reference["minp"].as_f64().expect("minp")).abs() < 1e-9,
            "{name}: mINP {minp}"
        );
        let max_rank = reference["max_rank"].as_u64().expect("max_rank") as usize;
        assert_cmc_f32(
            name,
            &r.cmc(QueryScope::Matched)[..max_rank],
            &f64s(&reference["cmc"]),
        );
    }
}

#[test]
fn mbanet_trapezoid() {
    for case in cases() {
        let name = case["name"].as_str().expect("name");
        let r = ranking(&case);
        let reference = &case["mbanet"];
        // MBA-Net averages over every query: no-match queries add AP 0 and no hit.
        let map = r.mean_ap(ApKind::Trapezoid, QueryScope::All);
        assert!(
            (map - reference["map"].as_f64().expect("map")).abs() < 1e-9,
            "{name}: mAP {map}"
        );
        assert_cmc_f32(name, &r.cmc(QueryScope::All), &f64s(&reference["cmc"]));
    }
}
