//! Re-identification metrics over similarity matrices (PROTOCOL.md section 3).
//!
//! Everything works on plain slices: a row-major similarity matrix
//! `[n_query, n_gallery]` (higher = closer) and one person id per row and
//! column. Ids may be any comparable type (integers, strings).
//!
//! - [`rank`]: ranking, CMC, Rank-k, AP (non-interpolated and trapezoid), mINP;
//! - [`verification`]: ROC over all query x gallery pairs, TPR at FMR, EER;
//! - [`openset`]: FNIR at FPIR, each person held out of the gallery in turn;
//! - [`summary`]: one evaluation of a split, and mean/std over splits.

pub mod openset;
pub mod rank;
pub mod summary;
pub mod verification;

use crate::{Error, Result};

/// A borrowed, validated similarity matrix `[n_query, n_gallery]`, row-major.
#[derive(Debug, Clone, Copy)]
pub struct Similarity<'a, S> {
    values: &'a [S],
    n_query: usize,
    n_gallery: usize,
}

impl<'a, S: Copy + Into<f64>> Similarity<'a, S> {
    /// Checks the shape and that every score is finite (a NaN would make the
    /// ranking depend on the sort algorithm).
    pub fn new(values: &'a [S], n_query: usize, n_gallery: usize) -> Result<Self> {
        if n_query.checked_mul(n_gallery) != Some(values.len()) {
            return Err(Error::Invalid(format!(
                "similarity matrix has {} values, expected {n_query} x {n_gallery}",
                values.len()
            )));
        }
        if n_gallery == 0 {
            return Err(Error::Invalid("the gallery is empty".into()));
        }
        if let Some(i) = values.iter().position(|&v| !v.into().is_finite()) {
            return Err(Error::Invalid(format!(
                "score at query {}, gallery {} is not finite",
                i / n_gallery,
                i % n_gallery
            )));
        }
        Ok(Self {
            values,
            n_query,
            n_gallery,
        })
    }

    /// Number of queries (rows).
    pub fn n_query(&self) -> usize {
        self.n_query
    }

    /// Number of gallery items (columns).
    pub fn n_gallery(&self) -> usize {
        self.n_gallery
    }

    /// Score of query `q` against gallery item `g`.
    pub fn get(&self, q: usize, g: usize) -> f64 {
        self.values[q * self.n_gallery + g].into()
    }

    /// The scores of query `q` against the whole gallery.
    pub fn row(&self, q: usize) -> impl Iterator<Item = f64> + '_ {
        self.values[q * self.n_gallery..(q + 1) * self.n_gallery]
            .iter()
            .map(|&v| v.into())
    }

    /// Checks that there is one id per query and one per gallery item.
    pub(crate) fn check_ids<P>(&self, query_ids: &[P], gallery_ids: &[P]) -> Result<()> {
        if query_ids.len() != self.n_query || gallery_ids.len() != self.n_gallery {
            return Err(Error::Invalid(format!(
                "{} query ids and {} gallery ids for a {} x {} similarity matrix",
                query_ids.len(),
                gallery_ids.len(),
                self.n_query,
                self.n_gallery
            )));
        }
        Ok(())
    }
}

/// Decision threshold at false-positive rate `rate`: the smallest observed
/// score `t` such that at most `floor(rate * n)` of the `n` negative scores
/// are `>= t` (a score is accepted when it is `>= t`). `negatives` and
/// `positives` need not be sorted; both must be non-empty where used.
pub(crate) fn threshold_at_rate(negatives: &[f64], positives: &[f64], rate: f64) -> f64 {
    let mut desc = negatives.to_vec();
    desc.sort_by(|a, b| b.partial_cmp(a).unwrap_or(std::cmp::Ordering::Equal));
    // The epsilon absorbs products such as 0.001 * 3000 = 2.9999999999999996.
    let allowed = (rate * desc.len() as f64 + 1e-9).floor() as usize;
    let all = negatives.iter().chain(positives).copied();
    match desc.get(allowed) {
        // Every negative may be accepted: accept everything.
        None => all.fold(f64::INFINITY, f64::min),
        // Strictly above the first negative that must be rejected; when no
        // observed score is, the next float above it (accepts nothing seen).
        Some(&limit) => all
            .filter(|&s| s > limit)
            .reduce(f64::min)
            .unwrap_or(limit.next_up()),
    }
}
