//! In-memory gallery index: exact cosine search over one gallery's templates
//! of one model.
//!
//! The normalised embeddings live in chunks of one `[rows, dim]` tensor
//! each, on the model's device. Identify is one matrix-vector product per
//! chunk, then a per-subject maximum (`index_reduce` "amax" over the row ->
//! subject-slot map, also on the device) and a top-k.
//!
//! Why chunks: an append copies only the new rows into the free tail of the
//! last chunk (or fresh chunks); nothing is ever re-allocated and copied
//! whole, which at tens of millions of rows would need twice the GPU memory.
//! Chunks grow geometrically, from [`FIRST_CHUNK_ROWS`] doubling up to
//! [`MAX_CHUNK_ROWS`], so memory follows the templates held: a gallery of one
//! template costs one small chunk, not 64 Ki rows.
//!
//! A delete moves the last row into the hole (swap-remove), so the rows stay
//! dense without a rebuild, and every chunk but the last stays full; the row
//! order therefore is not the enrolment order, and ties are broken by each
//! subject's first enrolment `seq`, kept on the host.
//!
//! An append plans on the host and allocates on the device first, and
//! changes the index only once nothing can fail any more: an allocation
//! that fails (device memory) leaves the index as it was.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tch::{Device, Kind, Tensor};

/// Rows of a gallery's first chunk (16 KiB of 512-d f32).
pub const FIRST_CHUNK_ROWS: usize = 8;
/// Rows of the largest chunk in production: 64 Ki rows of 512 f32 are
/// 128 MiB.
pub const MAX_CHUNK_ROWS: usize = 65_536;

/// Errors of the index; all are server faults, never the client's.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// A vector of the wrong length.
    #[error("embedding has {got} values, the index holds {expected}-d vectors")]
    Dimension {
        /// Length given.
        got: usize,
        /// The index's dimension.
        expected: usize,
    },
    /// A vector with a NaN or an infinity: never stored, never compared.
    #[error("embedding value {index} is {value}, not a finite number")]
    NotFinite {
        /// Its position in the vector.
        index: usize,
        /// The value.
        value: f32,
    },
    /// The index's own bookkeeping disagrees with itself (a bug): the call
    /// fails rather than reading out of bounds.
    #[error("gallery index inconsistent: {0}")]
    Inconsistent(&'static str),
    /// libtorch failed.
    #[error("tensor operation failed: {0}")]
    Torch(#[from] tch::TchError),
}

/// One template to add.
#[derive(Debug, Clone)]
pub struct NewRow<'a> {
    /// The subject it belongs to.
    pub subject_id: &'a str,
    /// Its enrolment sequence number (`templates.seq`).
    pub seq: i64,
    /// The L2-normalised embedding.
    pub embedding: &'a [f32],
}

/// One ranked subject.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// The subject.
    pub subject_id: String,
    /// Best cosine similarity over its templates.
    pub score: f32,
}

#[derive(Debug)]
struct Chunk {
    /// `[capacity, dim]` f32; rows `fill..` are unused.
    vectors: Tensor,
    /// `[capacity]` i64: the subject slot of each row.
    slots: Tensor,
    /// Its first global row.
    start: usize,
    capacity: usize,
    fill: usize,
}

#[derive(Debug)]
struct Slot {
    subject_id: String,
    /// Enrolment order of the subject: the smallest `seq` of its rows.
    first_seq: i64,
    /// Global row numbers of its templates.
    rows: Vec<usize>,
}

/// The templates of one gallery for one model.
#[derive(Debug)]
pub struct GalleryIndex {
    dim: usize,
    device: Device,
    max_chunk_rows: usize,
    /// Every chunk but the last is full.
    chunks: Vec<Chunk>,
    /// Global row -> subject slot.
    row_slot: Vec<usize>,
    /// Subject slots; `None` once the subject is deleted, until compaction.
    slots: Vec<Option<Slot>>,
    by_subject: HashMap<String, usize>,
}

impl GalleryIndex {
    /// An empty index of `dim`-d vectors on `device`, whose chunks grow
    /// from [`FIRST_CHUNK_ROWS`] up to `max_chunk_rows` rows.
    pub fn new(dim: usize, device: Device, max_chunk_rows: usize) -> Self {
        Self {
            dim,
            device,
            max_chunk_rows: max_chunk_rows.max(1),
            chunks: Vec::new(),
            row_slot: Vec::new(),
            slots: Vec::new(),
            by_subject: HashMap::new(),
        }
    }

    /// Subjects with at least one template.
    pub fn subject_count(&self) -> usize {
        self.by_subject.len()
    }

    /// Templates held.
    pub fn template_count(&self) -> usize {
        self.row_slot.len()
    }

    /// Rows allocated (held or free), on the device.
    pub fn capacity(&self) -> usize {
        self.chunks.iter().map(|c| c.capacity).sum()
    }

    /// Whether `subject_id` has templates here.
    pub fn contains(&self, subject_id: &str) -> bool {
        self.by_subject.contains_key(subject_id)
    }

    /// The capacity of chunk number `k`: doubling from the first, capped.
    fn chunk_capacity(&self, k: usize) -> usize {
        let doubled = u32::try_from(k)
            .ok()
            .and_then(|k| FIRST_CHUNK_ROWS.checked_shl(k))
            .unwrap_or(usize::MAX);
        doubled.min(self.max_chunk_rows)
    }

    /// Appends templates, filling the last chunk before opening new ones.
    /// All or nothing: on an error the index is unchanged.
    pub fn append(&mut self, rows: &[NewRow<'_>]) -> Result<(), IndexError> {
        if let Some(bad) = rows.iter().find(|r| r.embedding.len() != self.dim) {
            return Err(IndexError::Dimension {
                got: bad.embedding.len(),
                expected: self.dim,
            });
        }
        for row in rows {
            if let Some((index, &value)) = row.embedding.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(IndexError::NotFinite { index, value });
            }
        }
        if rows.is_empty() {
            return Ok(());
        }
        // 1. The plan, on the host: each row's subject slot, new subjects
        //    numbered after the existing ones.
        let mut new_subjects: Vec<(&str, i64)> = Vec::new();
        let mut planned: HashMap<&str, usize> = HashMap::new();
        let mut slot_ids = Vec::with_capacity(rows.len());
        for row in rows {
            let slot = match self.by_subject.get(row.subject_id) {
                Some(&slot) => slot,
                None => *planned.entry(row.subject_id).or_insert_with(|| {
                    new_subjects.push((row.subject_id, row.seq));
                    self.slots.len() + new_subjects.len() - 1
                }),
            };
            slot_ids.push(slot);
        }
        // 2. Allocations: the rows and their slots on the device, and the
        //    chunks they need beyond the last chunk's free tail.
        let n = rows.len();
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.embedding.iter().copied()).collect();
        let vectors = Tensor::f_from_slice(&flat)?
            .f_view([n as i64, self.dim as i64])?
            .f_to_device(self.device)?;
        let slot_tensor = Tensor::f_from_slice(&slot_ids.iter().map(|&s| s as i64).collect::<Vec<_>>())?
            .f_to_device(self.device)?;
        let tail = self.chunks.last().map_or(0, |c| c.capacity - c.fill);
        let mut fresh: Vec<Chunk> = Vec::new();
        let mut start = self.row_slot.len() + tail;
        let mut needed = n.saturating_sub(tail);
        while needed > 0 {
            let capacity = self.chunk_capacity(self.chunks.len() + fresh.len());
            fresh.push(Chunk {
                vectors: Tensor::f_zeros([capacity as i64, self.dim as i64], (Kind::Float, self.device))?,
                slots: Tensor::f_zeros([capacity as i64], (Kind::Int64, self.device))?,
                start,
                capacity,
                fill: 0,
            });
            start += capacity;
            needed = needed.saturating_sub(capacity);
        }
        // 3. Copies into rows no search reads yet (past every fill): a
        //    failure here still leaves the index as it was.
        let mut done = 0;
        let mut fills = Vec::with_capacity(fresh.len() + 1);
        for chunk in self.chunks.last_mut().into_iter().chain(fresh.iter_mut()) {
            let take = (chunk.capacity - chunk.fill).min(n - done);
            if take > 0 {
                let (at, count, from) = (chunk.fill as i64, take as i64, done as i64);
                chunk
                    .vectors
                    .f_narrow(0, at, count)?
                    .f_copy_(&vectors.f_narrow(0, from, count)?)?;
                chunk
                    .slots
                    .f_narrow(0, at, count)?
                    .f_copy_(&slot_tensor.f_narrow(0, from, count)?)?;
            }
            fills.push(take);
            done += take;
        }
        // 4. Bookkeeping, which cannot fail.
        let had_last = !self.chunks.is_empty();
        let mut fills = fills.into_iter();
        if had_last && let (Some(last), Some(take)) = (self.chunks.last_mut(), fills.next()) {
            last.fill += take;
        }
        for (mut chunk, take) in fresh.into_iter().zip(fills) {
            chunk.fill = take;
            self.chunks.push(chunk);
        }
        for (subject_id, seq) in new_subjects {
            self.by_subject.insert(subject_id.to_owned(), self.slots.len());
            self.slots.push(Some(Slot {
                subject_id: subject_id.to_owned(),
                first_seq: seq,
                rows: Vec::new(),
            }));
        }
        let first_row = self.row_slot.len();
        for (i, (row, &slot)) in rows.iter().zip(&slot_ids).enumerate() {
            if let Some(Some(s)) = self.slots.get_mut(slot) {
                s.first_seq = s.first_seq.min(row.seq);
                s.rows.push(first_row + i);
            }
        }
        self.row_slot.extend(slot_ids);
        Ok(())
    }

    /// Removes every template of `subject_id`; returns how many there were.
    pub fn remove_subject(&mut self, subject_id: &str) -> Result<usize, IndexError> {
        let Some(slot) = self.by_subject.remove(subject_id) else {
            return Ok(0);
        };
        let Some(mut info) = self.slots.get_mut(slot).and_then(Option::take) else {
            return Ok(0);
        };
        // Highest rows first: the row moved into a hole is then never one of
        // this subject's (those above it are already gone).
        info.rows.sort_unstable_by(|a, b| b.cmp(a));
        for &row in &info.rows {
            self.swap_remove(row)?;
        }
        if self.slots.len() > 2 * self.by_subject.len() + 64 {
            self.compact_slots()?;
        }
        Ok(info.rows.len())
    }

    /// Empties the index (the gallery was deleted) and frees its memory.
    pub fn clear(&mut self) {
        self.chunks.clear();
        self.row_slot.clear();
        self.slots.clear();
        self.by_subject.clear();
    }

    /// The `k` best subjects for `probe`, by descending score, ties by
    /// enrolment order. Exact: every template is scored.
    pub fn search(&self, probe: &[f32], k: usize) -> Result<Vec<Hit>, IndexError> {
        let k = k.min(self.by_subject.len());
        if k == 0 {
            return Ok(Vec::new());
        }
        let probe = self.probe_tensor(probe)?;
        let mut scores = Vec::with_capacity(self.chunks.len());
        let mut slots = Vec::with_capacity(self.chunks.len());
        for chunk in &self.chunks {
            let fill = chunk.fill as i64;
            // [fill, dim] @ [dim] -> [fill]
            scores.push(chunk.vectors.f_narrow(0, 0, fill)?.f_mv(&probe)?);
            slots.push(chunk.slots.f_narrow(0, 0, fill)?);
        }
        let scores = Tensor::f_cat(&scores, 0)?;
        let slots = Tensor::f_cat(&slots, 0)?;
        // [n_slots]: best score per subject; freed slots stay at -inf.
        let per_subject = Tensor::f_full(
            [self.slots.len() as i64],
            f64::NEG_INFINITY,
            (Kind::Float, self.device),
        )?
        .f_index_reduce(0, &slots, &scores, "amax", true)?;
        let (top, _) = per_subject.f_topk(k as i64, 0, true, true)?;
        // Everything tied with the k-th score comes back, so the host can
        // break ties by enrolment order rather than by libtorch's whim.
        let kth = top.f_double_value(&[k as i64 - 1])?;
        let chosen = per_subject.f_ge(kth)?.f_nonzero()?.f_view([-1])?;
        let chosen_scores: Vec<f32> = Vec::try_from(&per_subject.f_index_select(0, &chosen)?)?;
        let chosen: Vec<i64> = Vec::try_from(&chosen)?;
        let mut hits: Vec<(f32, i64, &str)> = chosen
            .iter()
            .zip(chosen_scores)
            .filter_map(|(&slot, score)| {
                let s = self.slots.get(usize::try_from(slot).ok()?)?.as_ref()?;
                Some((score, s.first_seq, s.subject_id.as_str()))
            })
            .collect();
        hits.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        hits.truncate(k);
        Ok(hits
            .into_iter()
            .map(|(score, _, subject_id)| Hit {
                subject_id: subject_id.to_owned(),
                score,
            })
            .collect())
    }

    /// Best score of `probe` over the templates of `subject_id`, or `None`
    /// when the subject has none here.
    pub fn verify(&self, subject_id: &str, probe: &[f32]) -> Result<Option<f32>, IndexError> {
        let Some(slot) = self
            .by_subject
            .get(subject_id)
            .and_then(|&s| self.slots.get(s))
            .and_then(Option::as_ref)
        else {
            return Ok(None);
        };
        let probe = self.probe_tensor(probe)?;
        let mut best = f32::NEG_INFINITY;
        for &row in &slot.rows {
            let (chunk, offset) = self.locate(row)?;
            let score = chunk.vectors.f_get(offset)?.f_dot(&probe)?.f_double_value(&[])?;
            best = best.max(score as f32);
        }
        Ok(Some(best))
    }

    fn probe_tensor(&self, probe: &[f32]) -> Result<Tensor, IndexError> {
        if probe.len() != self.dim {
            return Err(IndexError::Dimension {
                got: probe.len(),
                expected: self.dim,
            });
        }
        Ok(Tensor::f_from_slice(probe)?.f_to_device(self.device)?)
    }

    /// The chunk holding global row `row`, and the row's offset in it.
    fn locate(&self, row: usize) -> Result<(&Chunk, i64), IndexError> {
        let at = self.chunks.partition_point(|c| c.start <= row);
        let chunk = at
            .checked_sub(1)
            .and_then(|i| self.chunks.get(i))
            .filter(|c| row - c.start < c.fill)
            .ok_or(IndexError::Inconsistent("a row outside every chunk"))?;
        Ok((chunk, (row - chunk.start) as i64))
    }

    /// Moves the last row into `row` and shrinks by one.
    fn swap_remove(&mut self, row: usize) -> Result<(), IndexError> {
        let last = self
            .row_slot
            .len()
            .checked_sub(1)
            .ok_or(IndexError::Inconsistent("a removal from an empty index"))?;
        if row != last {
            let (vector, slot_value) = {
                let (src, offset) = self.locate(last)?;
                (src.vectors.f_get(offset)?, src.slots.f_get(offset)?)
            };
            let (dst, offset) = self.locate(row)?;
            dst.vectors.f_get(offset)?.f_copy_(&vector)?;
            dst.slots.f_get(offset)?.f_copy_(&slot_value)?;
            let moved_slot = *self
                .row_slot
                .get(last)
                .ok_or(IndexError::Inconsistent("the last row has no slot"))?;
            if let Some(place) = self.row_slot.get_mut(row) {
                *place = moved_slot;
            }
            if let Some(Some(s)) = self.slots.get_mut(moved_slot)
                && let Some(r) = s.rows.iter_mut().find(|r| **r == last)
            {
                *r = row;
            }
        }
        self.row_slot.pop();
        if let Some(chunk) = self.chunks.last_mut() {
            chunk.fill = chunk.fill.saturating_sub(1);
            if chunk.fill == 0 {
                self.chunks.pop();
            }
        }
        Ok(())
    }

    /// Renumbers the live subjects 0..n so the per-subject score vector does
    /// not grow with every deletion ever made.
    fn compact_slots(&mut self) -> Result<(), IndexError> {
        let mut renumber = vec![usize::MAX; self.slots.len()];
        let mut live = Vec::with_capacity(self.by_subject.len());
        for (old, slot) in std::mem::take(&mut self.slots).into_iter().enumerate() {
            if let Some(slot) = slot {
                if let Some(new) = renumber.get_mut(old) {
                    *new = live.len();
                }
                self.by_subject.insert(slot.subject_id.clone(), live.len());
                live.push(Some(slot));
            }
        }
        self.slots = live;
        for slot in &mut self.row_slot {
            *slot = renumber
                .get(*slot)
                .copied()
                .ok_or(IndexError::Inconsistent("a row of a slot that never was"))?;
        }
        for chunk in &mut self.chunks {
            let ids: Vec<i64> = self
                .row_slot
                .get(chunk.start..chunk.start + chunk.fill)
                .ok_or(IndexError::Inconsistent("a chunk past the last row"))?
                .iter()
                .map(|&s| s as i64)
                .collect();
            let ids = Tensor::f_from_slice(&ids)?.f_to_device(self.device)?;
            chunk.slots.f_narrow(0, 0, chunk.fill as i64)?.f_copy_(&ids)?;
        }
        Ok(())
    }
}

/// The gallery indexes of the active model, by gallery id.
///
/// Each gallery has its own lock, so a search in one gallery never waits on
/// another. `tch::Tensor` is `Send` but not `Sync`, hence a `Mutex` rather
/// than a `RwLock`.
#[derive(Debug)]
pub struct Indexes {
    dim: usize,
    device: Device,
    max_chunk_rows: usize,
    galleries: Mutex<HashMap<String, Arc<Mutex<GalleryIndex>>>>,
}

impl Indexes {
    /// No galleries yet; each gallery's chunks grow up to `max_chunk_rows`.
    pub fn new(dim: usize, device: Device, max_chunk_rows: usize) -> Self {
        Self {
            dim,
            device,
            max_chunk_rows,
            galleries: Mutex::new(HashMap::new()),
        }
    }

    /// The index of `gallery`, if it holds (or held, until
    /// [`Indexes::forget_if_empty`]) a template.
    pub fn get(&self, gallery: &str) -> Option<Arc<Mutex<GalleryIndex>>> {
        lock(&self.galleries).get(gallery).cloned()
    }

    /// The index of `gallery`, created empty on first use.
    pub fn get_or_create(&self, gallery: &str) -> Arc<Mutex<GalleryIndex>> {
        lock(&self.galleries)
            .entry(gallery.to_owned())
            .or_insert_with(|| {
                Arc::new(Mutex::new(GalleryIndex::new(
                    self.dim,
                    self.device,
                    self.max_chunk_rows,
                )))
            })
            .clone()
    }

    /// Drops `gallery`'s index once it holds no template, so the map holds
    /// the galleries that have templates, not every name ever used. The
    /// caller serialises changes of the gallery (the engine's writer lock).
    pub fn forget_if_empty(&self, gallery: &str) {
        let mut galleries = lock(&self.galleries);
        if galleries
            .get(gallery)
            .is_some_and(|index| lock(index).template_count() == 0)
        {
            galleries.remove(gallery);
        }
    }

    /// Templates held per gallery, for the metrics.
    pub fn sizes(&self) -> Vec<(String, usize)> {
        lock(&self.galleries)
            .iter()
            .map(|(name, index)| (name.clone(), lock(index).template_count()))
            .collect()
    }

    /// Galleries and templates held, for the start-up log.
    pub fn totals(&self) -> (usize, usize) {
        let galleries = lock(&self.galleries);
        let templates = galleries.values().map(|g| lock(g).template_count()).sum();
        (galleries.len(), templates)
    }
}

/// Locks a mutex, recovering from poisoning: no code holding these locks
/// panics on its own (libtorch errors surface as `Result`s), so poisoning
/// would come from an unrelated bug and refusing all later calls of the
/// gallery would only add an outage to it.
pub fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `HANDID_TEST_DEVICE=cuda` puts the matrices on a GPU (the device
    /// check); unset means the CPU. An unusable device fails.
    fn test_device() -> Device {
        let spec = std::env::var("HANDID_TEST_DEVICE").unwrap_or_else(|_| "cpu".to_owned());
        handid_model::parse_device(&spec).expect("HANDID_TEST_DEVICE")
    }

    /// A deterministic pseudo-random generator (no dependency for 20 lines).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        }
        fn unit(&mut self, dim: usize) -> Vec<f32> {
            let v: Vec<f32> = (0..dim).map(|_| self.next()).collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / norm).collect()
        }
    }

    /// The reference: every (subject, template) scored in f64, max per
    /// subject, sorted by score then first enrolment.
    fn brute_force(templates: &[(String, i64, Vec<f32>)], probe: &[f32], k: usize) -> Vec<(String, f64)> {
        let mut best: HashMap<&str, (f64, i64)> = HashMap::new();
        for (subject, seq, v) in templates {
            let s: f64 = v.iter().zip(probe).map(|(a, b)| *a as f64 * *b as f64).sum();
            let e = best.entry(subject).or_insert((f64::NEG_INFINITY, *seq));
            e.0 = e.0.max(s);
            e.1 = e.1.min(*seq);
        }
        let mut v: Vec<_> = best.into_iter().collect();
        v.sort_by(|a, b| b.1.0.total_cmp(&a.1.0).then(a.1.1.cmp(&b.1.1)));
        v.into_iter()
            .take(k)
            .map(|(s, (score, _))| (s.to_owned(), score))
            .collect()
    }

    fn assert_matches(
        index: &GalleryIndex,
        templates: &[(String, i64, Vec<f32>)],
        rng: &mut Lcg,
        dim: usize,
    ) {
        for k in [1, 3, 1000] {
            let probe = rng.unit(dim);
            let got = index.search(&probe, k).expect("search");
            let want = brute_force(templates, &probe, k);
            assert_eq!(got.len(), want.len(), "k={k}");
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.subject_id, w.0, "k={k}");
                assert!((g.score as f64 - w.1).abs() < 1e-5, "{} vs {}", g.score, w.1);
            }
        }
    }

    fn add(
        index: &mut GalleryIndex,
        templates: &mut Vec<(String, i64, Vec<f32>)>,
        rng: &mut Lcg,
        seq: &mut i64,
        subject: &str,
        n: usize,
        dim: usize,
    ) {
        let new: Vec<(String, i64, Vec<f32>)> = (0..n)
            .map(|_| {
                *seq += 1;
                (subject.to_owned(), *seq, rng.unit(dim))
            })
            .collect();
        let rows: Vec<NewRow<'_>> = new
            .iter()
            .map(|(s, q, v)| NewRow {
                subject_id: s,
                seq: *q,
                embedding: v,
            })
            .collect();
        index.append(&rows).expect("append");
        templates.extend(new);
    }

    #[test]
    fn search_equals_brute_force_through_appends_and_deletes() {
        let dim = 8;
        let mut rng = Lcg(7);
        // Chunks of 5 rows: every operation crosses chunk boundaries.
        let mut index = GalleryIndex::new(dim, test_device(), 5);
        let mut templates = Vec::new();
        let mut seq = 0;
        for i in 0..30 {
            add(
                &mut index,
                &mut templates,
                &mut rng,
                &mut seq,
                &format!("s{}", i % 11),
                1 + i % 3,
                dim,
            );
        }
        assert_eq!(index.subject_count(), 11);
        assert_eq!(index.template_count(), templates.len());
        assert_matches(&index, &templates, &mut rng, dim);

        for gone in ["s3", "s0", "s10", "nobody"] {
            let want = templates.iter().filter(|t| t.0 == gone).count();
            assert_eq!(index.remove_subject(gone).expect("remove"), want);
            templates.retain(|t| t.0 != gone);
            assert_matches(&index, &templates, &mut rng, dim);
        }
        // Re-enrolled after deletion: a new subject, enrolled last.
        add(&mut index, &mut templates, &mut rng, &mut seq, "s3", 2, dim);
        assert_matches(&index, &templates, &mut rng, dim);
        for t in &templates {
            let probe = rng.unit(dim);
            let best = templates
                .iter()
                .filter(|u| u.0 == t.0)
                .map(|u| u.2.iter().zip(&probe).map(|(a, b)| a * b).sum::<f32>())
                .fold(f32::NEG_INFINITY, f32::max);
            let got = index.verify(&t.0, &probe).expect("verify").expect("present");
            assert!((got - best).abs() < 1e-5);
        }
        assert_eq!(index.verify("s0", &rng.unit(dim)).expect("verify"), None);
    }

    #[test]
    fn slots_are_compacted_after_many_deletions() {
        let dim = 4;
        let mut rng = Lcg(3);
        let mut index = GalleryIndex::new(dim, test_device(), 16);
        let mut templates = Vec::new();
        let mut seq = 0;
        for i in 0..200 {
            add(
                &mut index,
                &mut templates,
                &mut rng,
                &mut seq,
                &format!("p{i}"),
                2,
                dim,
            );
        }
        for i in (0..200).filter(|i| i % 5 != 0) {
            index.remove_subject(&format!("p{i}")).expect("remove");
            templates.retain(|t| t.0 != format!("p{i}"));
        }
        assert!(
            index.slots.len() < 200,
            "slots were never compacted: {}",
            index.slots.len()
        );
        assert_eq!(index.subject_count(), 40);
        assert_matches(&index, &templates, &mut rng, dim);
    }

    #[test]
    fn chunks_grow_geometrically_and_memory_follows_the_templates() {
        let dim = 4;
        let mut rng = Lcg(11);
        let mut index = GalleryIndex::new(dim, test_device(), 64);
        let mut templates = Vec::new();
        let mut seq = 0;
        add(&mut index, &mut templates, &mut rng, &mut seq, "one", 1, dim);
        assert_eq!(
            index.capacity(),
            FIRST_CHUNK_ROWS,
            "one template, one small chunk"
        );
        // 8 + 16 + 32 + 64 + 64: doubling, then capped at 64.
        for i in 0..150 {
            add(
                &mut index,
                &mut templates,
                &mut rng,
                &mut seq,
                &format!("s{i}"),
                1,
                dim,
            );
        }
        assert_eq!(index.capacity(), 8 + 16 + 32 + 64 + 64);
        assert_matches(&index, &templates, &mut rng, dim);
        // One append spanning several fresh chunks.
        let mut big = GalleryIndex::new(dim, test_device(), 1 << 20);
        let mut big_templates = Vec::new();
        add(&mut big, &mut big_templates, &mut rng, &mut seq, "bulk", 100, dim);
        assert_eq!(big.capacity(), 8 + 16 + 32 + 64);
        assert_matches(&big, &big_templates, &mut rng, dim);
        // Deleting down to nothing frees every chunk.
        for i in 0..150 {
            index.remove_subject(&format!("s{i}")).expect("remove");
        }
        templates.retain(|t| t.0 == "one");
        assert_eq!(index.capacity(), FIRST_CHUNK_ROWS);
        assert_matches(&index, &templates, &mut rng, dim);
        index.remove_subject("one").expect("remove");
        assert_eq!((index.capacity(), index.template_count()), (0, 0));
    }

    #[test]
    fn a_refused_append_changes_nothing() {
        let mut index = GalleryIndex::new(2, test_device(), 4);
        let good = [1.0f32, 0.0];
        index
            .append(&[NewRow {
                subject_id: "a",
                seq: 1,
                embedding: &good,
            }])
            .expect("append");
        let mixed = [
            NewRow {
                subject_id: "b",
                seq: 2,
                embedding: &good,
            },
            NewRow {
                subject_id: "c",
                seq: 3,
                embedding: &[f32::NAN, 0.0],
            },
        ];
        assert!(index.append(&mixed).is_err());
        assert_eq!((index.template_count(), index.subject_count()), (1, 1));
        assert!(!index.contains("b"));
        let hits = index.search(&good, 10).expect("search");
        assert_eq!(hits.len(), 1);
    }

    #[test]
    fn ties_go_to_the_earlier_enrolment() {
        let mut index = GalleryIndex::new(2, test_device(), 4);
        let same = [1.0f32, 0.0];
        let rows = [
            NewRow {
                subject_id: "late",
                seq: 9,
                embedding: &same,
            },
            NewRow {
                subject_id: "early",
                seq: 2,
                embedding: &same,
            },
            NewRow {
                subject_id: "other",
                seq: 1,
                embedding: &[0.0, 1.0],
            },
        ];
        index.append(&rows).expect("append");
        let hits = index.search(&[1.0, 0.0], 2).expect("search");
        let order: Vec<&str> = hits.iter().map(|h| h.subject_id.as_str()).collect();
        assert_eq!(order, ["early", "late"]);
        assert_eq!(hits[0].score, 1.0);
    }

    #[test]
    fn wrong_dimensions_and_non_finite_values_are_refused() {
        let mut index = GalleryIndex::new(3, test_device(), 4);
        let bad = [NewRow {
            subject_id: "a",
            seq: 1,
            embedding: &[1.0, 0.0],
        }];
        assert!(matches!(
            index.append(&bad),
            Err(IndexError::Dimension { got: 2, expected: 3 })
        ));
        for value in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let poisoned = [NewRow {
                subject_id: "a",
                seq: 1,
                embedding: &[1.0, value, 0.0],
            }];
            assert!(matches!(
                index.append(&poisoned),
                Err(IndexError::NotFinite { index: 1, .. })
            ));
        }
        assert!(
            index.search(&[1.0], 1).is_ok(),
            "an empty index answers nothing, whatever the probe"
        );
        assert_eq!(index.template_count(), 0);
    }
}
