//! In-memory gallery index: exact cosine search over one gallery's templates
//! of one model.
//!
//! Where the rows live follows the model's device. On the CPU they are
//! plain host memory searched by this crate's own kernel ([`kernel`]):
//! AVX-512 tiles that read the rows once per search, on every core
//! ([`SearchOptions::threads`]), keeping per probe only the rows that can
//! still reach its top k. On a GPU they are tensors on the device: one
//! matrix product per chunk, a per-subject maximum (`index_reduce` "amax")
//! and a top-k, all on the device.
//!
//! Concurrent Identify calls on one gallery share one pass over memory
//! ([`Gallery::search`]): while one search runs, the calls that arrive
//! queue their probes, and the next of them to get the gallery searches all
//! the queued probes together, a matrix of probes against each tile of
//! rows. Scores do not depend on the company a probe keeps (see
//! [`kernel`]), so a batched answer is the answer a lone call would get.
//!
//! With [`SearchOptions::half_precision`] the host keeps a half-precision
//! copy of every row and scans that (half the memory traffic). The top k it
//! returns is still exactly the f32 one: each half-precision score is within
//! a proven bound `e` of the f32 score of the same row (rounding of the
//! halves, 2^-11 relative, and of both sums, `dim * 2^-24` relative, by
//! Cauchy-Schwarz over the largest row norm held), so every subject whose
//! half-precision best lies within `2e` of the k-th best is rescored in f32
//! from its rows, and only those f32 scores rank and are returned.
//!
//! Why chunks: an append copies only the new rows into the free tail of the
//! last chunk (or fresh chunks); nothing is ever re-allocated and copied
//! whole, which at tens of millions of rows would need twice the memory.
//! Chunks grow geometrically, from [`FIRST_CHUNK_ROWS`] doubling up to
//! [`MAX_CHUNK_ROWS`], so memory follows the templates held: a gallery of one
//! template costs one small chunk, not 64 Ki rows.
//!
//! A delete moves the last row into the hole (swap-remove), so the rows stay
//! dense without a rebuild, and every chunk but the last stays full; the row
//! order therefore is not the enrolment order, and ties are broken by each
//! subject's first enrolment `seq`, kept on the host.
//!
//! An append plans and allocates first, and changes the index only once
//! nothing can fail any more: an allocation that fails (host or device
//! memory) leaves the index as it was.

mod kernel;

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kernel::Aligned;
pub use kernel::Kernel;
use tch::{Device, Kind, Tensor};

/// Rows of a gallery's first chunk (16 KiB of 512-d f32).
pub const FIRST_CHUNK_ROWS: usize = 8;
/// Rows of the largest chunk in production: 64 Ki rows of 512 f32 are
/// 128 MiB.
pub const MAX_CHUNK_ROWS: usize = 65_536;
/// Rows scored into one buffer before they are sifted.
const BLOCK_ROWS: usize = 8192;
/// A search spreads over more threads only with at least this many rows
/// for each: below it, starting a thread costs more than it saves.
const MIN_ROWS_PER_THREAD: usize = 32_768;

/// How galleries are held and searched (setting `search`).
#[derive(Debug, Clone)]
pub struct SearchOptions {
    /// Keep a half-precision copy of each row and scan it; results stay
    /// exactly the f32 ones (host memory only).
    pub half_precision: bool,
    /// Threads one search uses at most (host memory only).
    pub threads: usize,
    /// Rows of the largest chunk.
    pub max_chunk_rows: usize,
}

impl Default for SearchOptions {
    fn default() -> Self {
        Self {
            half_precision: false,
            threads: std::thread::available_parallelism().map_or(1, usize::from),
            max_chunk_rows: MAX_CHUNK_ROWS,
        }
    }
}

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
    /// Host memory for new rows could not be had.
    #[error("no memory for {rows} more rows of the gallery index")]
    OutOfMemory {
        /// Rows asked for.
        rows: usize,
    },
    /// The search this call's probe was batched into failed.
    #[error("the batched search failed: {0}")]
    Batch(String),
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

/// A chunk's place among the gallery's rows.
#[derive(Debug, Clone, Copy)]
struct Extent {
    /// Its first global row.
    start: usize,
    capacity: usize,
    fill: usize,
}

/// Rows in host memory, `stride` values each (zero padded).
#[derive(Debug)]
struct HostChunk {
    extent: Extent,
    vectors: Aligned<f32>,
    /// Half-precision copies (bits), when kept; empty otherwise.
    halves: Aligned<u16>,
}

/// Rows on a device.
#[derive(Debug)]
struct DeviceChunk {
    extent: Extent,
    /// `[capacity, dim]` f32; rows `fill..` are unused.
    vectors: Tensor,
    /// `[capacity]` i64: the subject slot of each row.
    slots: Tensor,
}

#[derive(Debug)]
enum Chunks {
    Host(Vec<HostChunk>),
    Device(Vec<DeviceChunk>),
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
    /// Values per host row: `dim` padded for the kernel.
    stride: usize,
    device: Device,
    options: SearchOptions,
    kernel: Kernel,
    /// Every chunk but the last is full.
    chunks: Chunks,
    /// Global row -> subject slot.
    row_slot: Vec<usize>,
    /// Subject slots; `None` once the subject is deleted, until compaction.
    slots: Vec<Option<Slot>>,
    by_subject: HashMap<String, usize>,
    /// The largest L2 norm of any row held since the index was created
    /// (the half-precision error bound scales with it).
    max_norm: f64,
    /// Whether every row held has a half-precision copy (a value beyond
    /// the half range clears it: then the f32 rows are scanned).
    halves_ok: bool,
}

/// One probe of a (batched) search.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    /// The L2-normalised embedding.
    pub probe: &'a [f32],
    /// How many subjects to return.
    pub k: usize,
}

impl GalleryIndex {
    /// An empty index of `dim`-d vectors on `device` (host memory for the
    /// CPU), whose chunks grow from [`FIRST_CHUNK_ROWS`] up to
    /// `options.max_chunk_rows` rows.
    pub fn new(dim: usize, device: Device, options: SearchOptions) -> Self {
        let options = SearchOptions {
            max_chunk_rows: options.max_chunk_rows.max(1),
            threads: options.threads.max(1),
            ..options
        };
        let chunks = if device == Device::Cpu {
            Chunks::Host(Vec::new())
        } else {
            Chunks::Device(Vec::new())
        };
        Self {
            dim,
            stride: kernel::stride_for(dim),
            device,
            options,
            kernel: Kernel::detect(),
            chunks,
            row_slot: Vec::new(),
            slots: Vec::new(),
            by_subject: HashMap::new(),
            max_norm: 0.0,
            halves_ok: true,
        }
    }

    /// The same, searched with `kernel` (tests compare kernels).
    pub fn with_kernel(mut self, kernel: Kernel) -> Self {
        self.kernel = kernel;
        self
    }

    /// Subjects with at least one template.
    pub fn subject_count(&self) -> usize {
        self.by_subject.len()
    }

    /// Templates held.
    pub fn template_count(&self) -> usize {
        self.row_slot.len()
    }

    /// Rows allocated (held or free).
    pub fn capacity(&self) -> usize {
        self.extents().map(|e| e.capacity).sum()
    }

    /// Whether `subject_id` has templates here.
    pub fn contains(&self, subject_id: &str) -> bool {
        self.by_subject.contains_key(subject_id)
    }

    fn extents(&self) -> Box<dyn Iterator<Item = Extent> + '_> {
        match &self.chunks {
            Chunks::Host(c) => Box::new(c.iter().map(|c| c.extent)),
            Chunks::Device(c) => Box::new(c.iter().map(|c| c.extent)),
        }
    }

    /// The capacity of chunk number `k`: doubling from the first, capped.
    fn chunk_capacity(&self, k: usize) -> usize {
        let doubled = u32::try_from(k)
            .ok()
            .and_then(|k| FIRST_CHUNK_ROWS.checked_shl(k))
            .unwrap_or(usize::MAX);
        doubled.min(self.options.max_chunk_rows)
    }

    /// The extents of the chunks an append of `n` rows opens after the
    /// last chunk's free tail.
    fn plan_chunks(&self, n: usize) -> Vec<Extent> {
        let extents: Vec<Extent> = self.extents().collect();
        let tail = extents.last().map_or(0, |e| e.capacity - e.fill);
        let mut fresh = Vec::new();
        let mut start = self.row_slot.len() + tail;
        let mut needed = n.saturating_sub(tail);
        while needed > 0 {
            let capacity = self.chunk_capacity(extents.len() + fresh.len());
            fresh.push(Extent {
                start,
                capacity,
                fill: 0,
            });
            start += capacity;
            needed = needed.saturating_sub(capacity);
        }
        fresh
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
        // 1. The plan: each row's subject slot, new subjects numbered
        //    after the existing ones.
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
        // 2. The rows written past every fill, into fresh chunks allocated
        //    first: a failure leaves the index as it was.
        let fresh = self.plan_chunks(rows.len());
        let halves_ok = match &mut self.chunks {
            Chunks::Host(chunks) => append_host(
                chunks,
                &fresh,
                rows,
                self.stride,
                self.options.half_precision && self.halves_ok,
            )?,
            Chunks::Device(chunks) => {
                append_device(chunks, &fresh, rows, &slot_ids, self.dim, self.device)?;
                self.halves_ok
            }
        };
        // 3. Bookkeeping, which cannot fail.
        self.halves_ok = halves_ok;
        for row in rows {
            let norm = row
                .embedding
                .iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum::<f64>()
                .sqrt();
            self.max_norm = self.max_norm.max(norm);
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
        match &mut self.chunks {
            Chunks::Host(c) => c.clear(),
            Chunks::Device(c) => c.clear(),
        }
        self.row_slot.clear();
        self.slots.clear();
        self.by_subject.clear();
        self.max_norm = 0.0;
        self.halves_ok = true;
    }

    /// The `k` best subjects for `probe`, by descending score, ties by
    /// enrolment order. Exact: every template is scored.
    pub fn search(&self, probe: &[f32], k: usize) -> Result<Vec<Hit>, IndexError> {
        let mut all = self.search_many(&[Query { probe, k }])?;
        Ok(all.pop().unwrap_or_default())
    }

    /// [`GalleryIndex::search`] for several probes in one pass over the
    /// rows; each answer equals that probe's lone search.
    pub fn search_many(&self, queries: &[Query<'_>]) -> Result<Vec<Vec<Hit>>, IndexError> {
        let subjects = self.by_subject.len();
        if queries.iter().all(|q| q.k.min(subjects) == 0) {
            return Ok(vec![Vec::new(); queries.len()]);
        }
        for query in queries {
            if query.probe.len() != self.dim {
                return Err(IndexError::Dimension {
                    got: query.probe.len(),
                    expected: self.dim,
                });
            }
        }
        match &self.chunks {
            Chunks::Host(chunks) => self.search_host(chunks, queries),
            Chunks::Device(chunks) => self.search_device(chunks, queries),
        }
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
        if probe.len() != self.dim {
            return Err(IndexError::Dimension {
                got: probe.len(),
                expected: self.dim,
            });
        }
        match &self.chunks {
            Chunks::Host(chunks) => {
                let scores = self.rescore(chunks, &slot.rows, &self.padded(probe))?;
                Ok(Some(scores.into_iter().fold(f32::NEG_INFINITY, f32::max)))
            }
            Chunks::Device(chunks) => {
                let probe = Tensor::f_from_slice(probe)?.f_to_device(self.device)?;
                let mut best = f32::NEG_INFINITY;
                for &row in &slot.rows {
                    let (chunk, offset) = locate(chunks, |c| c.extent, row)?;
                    let score = chunk
                        .vectors
                        .f_get(offset as i64)?
                        .f_dot(&probe)?
                        .f_double_value(&[])?;
                    best = best.max(score as f32);
                }
                Ok(Some(best))
            }
        }
    }

    /// `probe` zero padded to the stride.
    fn padded(&self, probe: &[f32]) -> Vec<f32> {
        let mut padded = vec![0.0; self.stride];
        padded[..probe.len()].copy_from_slice(probe);
        padded
    }

    /// f32 scores of `probe` (padded) against global `rows`.
    fn rescore(&self, chunks: &[HostChunk], rows: &[usize], probe: &[f32]) -> Result<Vec<f32>, IndexError> {
        let stride = self.stride;
        let mut gathered = Vec::with_capacity(rows.len() * stride);
        for &row in rows {
            let (chunk, offset) = locate(chunks, |c| c.extent, row)?;
            let values = chunk
                .vectors
                .get(offset * stride..(offset + 1) * stride)
                .ok_or(IndexError::Inconsistent("a row past its chunk's vectors"))?;
            gathered.extend_from_slice(values);
        }
        let mut scores = vec![0.0; rows.len()];
        self.kernel.scores(&gathered, probe, stride, &mut scores);
        Ok(scores)
    }

    fn search_host(&self, chunks: &[HostChunk], queries: &[Query<'_>]) -> Result<Vec<Vec<Hit>>, IndexError> {
        let subjects = self.by_subject.len();
        let stride = self.stride;
        let mut probes = vec![0.0f32; queries.len() * stride];
        for (padded, query) in probes.chunks_exact_mut(stride).zip(queries) {
            padded[..self.dim].copy_from_slice(query.probe);
        }
        let probes = Aligned::copied(&probes);
        let halves = self.options.half_precision && self.halves_ok;
        let slacks: Vec<f64> = queries
            .iter()
            .map(|q| {
                if halves {
                    2.0 * self.half_error_bound(q.probe)
                } else {
                    0.0
                }
            })
            .collect();
        let ks: Vec<usize> = queries.iter().map(|q| q.k.min(subjects)).collect();
        // The rows split evenly over the threads, each sifting its own.
        let rows = self.row_slot.len();
        let threads = self.options.threads.min(rows / MIN_ROWS_PER_THREAD).max(1);
        let bounds: Vec<(usize, usize)> = (0..threads)
            .map(|t| (rows * t / threads, rows * (t + 1) / threads))
            .collect();
        let (kernel, row_slot, probes) = (self.kernel, self.row_slot.as_slice(), &probes[..]);
        let scan = &|(from, to): (usize, usize)| -> Vec<Collector> {
            let mut found: Vec<Collector> = ks
                .iter()
                .zip(&slacks)
                .map(|(&k, &slack)| Collector::new(k, slack))
                .collect();
            let rows = ScanRows {
                kernel,
                chunks,
                row_slot,
                stride,
                halves,
            };
            rows.scan(from, to, probes, &mut found);
            found
        };
        let mut per_thread: Vec<Vec<Collector>> = Vec::with_capacity(threads);
        std::thread::scope(|scope| {
            let others: Vec<_> = bounds[1..]
                .iter()
                .map(|&b| scope.spawn(move || scan(b)))
                .collect();
            per_thread.push(scan(bounds[0]));
            for handle in others {
                per_thread.push(
                    handle
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                );
            }
        });
        let mut answers = Vec::with_capacity(queries.len());
        for (p, &k) in ks.iter().enumerate() {
            let mut found: Vec<(f32, usize)> = Vec::new();
            for collectors in &mut per_thread {
                if let Some(c) = collectors.get_mut(p) {
                    found.append(&mut c.found);
                }
            }
            let mut best = self.best_per_subject(found);
            if halves {
                best = self.rescored(chunks, best, k, slacks[p], &probes[p * stride..(p + 1) * stride])?;
            }
            answers.push(self.ranked(best, k));
        }
        Ok(answers)
    }

    /// The best score of each subject among `found` (global rows), best
    /// first.
    fn best_per_subject(&self, mut found: Vec<(f32, usize)>) -> Vec<(f32, usize)> {
        found.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
        let mut seen = HashSet::new();
        found
            .into_iter()
            .filter_map(|(score, row)| {
                let slot = *self.row_slot.get(row)?;
                seen.insert(slot).then_some((score, slot))
            })
            .collect()
    }

    /// From half-precision bests (best first) to exact ones: every subject
    /// within `slack` of the k-th best rescored in f32 over all its rows.
    fn rescored(
        &self,
        chunks: &[HostChunk],
        best: Vec<(f32, usize)>,
        k: usize,
        slack: f64,
        probe: &[f32],
    ) -> Result<Vec<(f32, usize)>, IndexError> {
        // Fewer subjects than k kept: all of them are rescored.
        let floor = best
            .get(k.saturating_sub(1))
            .map_or(f64::NEG_INFINITY, |&(kth, _)| f64::from(kth) - slack);
        let mut exact = Vec::new();
        for (_, slot) in best
            .into_iter()
            .take_while(|&(score, _)| f64::from(score) >= floor)
        {
            let rows = self
                .slots
                .get(slot)
                .and_then(Option::as_ref)
                .map(|s| s.rows.as_slice())
                .ok_or(IndexError::Inconsistent("a row of a deleted subject"))?;
            let scores = self.rescore(chunks, rows, probe)?;
            exact.push((scores.into_iter().fold(f32::NEG_INFINITY, f32::max), slot));
        }
        Ok(exact)
    }

    /// The top `k` of per-subject bests: by score, ties by first enrolment.
    fn ranked(&self, best: Vec<(f32, usize)>, k: usize) -> Vec<Hit> {
        let mut hits: Vec<(f32, i64, &str)> = best
            .into_iter()
            .filter_map(|(score, slot)| {
                let s = self.slots.get(slot)?.as_ref()?;
                Some((score, s.first_seq, s.subject_id.as_str()))
            })
            .collect();
        hits.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        hits.truncate(k);
        hits.into_iter()
            .map(|(score, _, subject_id)| Hit {
                subject_id: subject_id.to_owned(),
                score,
            })
            .collect()
    }

    /// A bound on |half-precision score - f32 score| of any row held for
    /// `probe`: the halves' rounding (2^-11 relative; 2^-25 absolute below
    /// the normal range) and each sum's rounding (gamma_n = n u / (1 - n u),
    /// u = 2^-24, over the products' absolute values), the products
    /// bounded by Cauchy-Schwarz with the largest row norm held; then 1 %
    /// more for the bound's own arithmetic.
    fn half_error_bound(&self, probe: &[f32]) -> f64 {
        let l2 = probe
            .iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt();
        let l1: f64 = probe.iter().map(|&x| f64::from(x).abs()).sum();
        let (half_rel, half_abs) = (2f64.powi(-11), 2f64.powi(-25));
        let n = self.stride as f64 * 2f64.powi(-24);
        let gamma = n / (1.0 - n);
        let rows = self.max_norm * l2;
        let rounding = half_rel * rows + half_abs * l1;
        let half_sum = gamma * (rows + rounding);
        let f32_sum = gamma * rows;
        (rounding + half_sum + f32_sum) * 1.01
    }

    fn search_device(
        &self,
        chunks: &[DeviceChunk],
        queries: &[Query<'_>],
    ) -> Result<Vec<Vec<Hit>>, IndexError> {
        let flat: Vec<f32> = queries.iter().flat_map(|q| q.probe.iter().copied()).collect();
        let probes = Tensor::f_from_slice(&flat)?
            .f_view([queries.len() as i64, self.dim as i64])?
            .f_to_device(self.device)?;
        let mut scores = Vec::with_capacity(chunks.len());
        let mut slots = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            let fill = chunk.extent.fill as i64;
            // [q, dim] @ [dim, fill] -> [q, fill]
            scores.push(probes.f_mm(&chunk.vectors.f_narrow(0, 0, fill)?.f_tr()?)?);
            slots.push(chunk.slots.f_narrow(0, 0, fill)?);
        }
        let scores = Tensor::f_cat(&scores, 1)?;
        let slots = Tensor::f_cat(&slots, 0)?;
        // [q, n_slots]: best score per subject; freed slots stay at -inf.
        let per_subject = Tensor::f_full(
            [queries.len() as i64, self.slots.len() as i64],
            f64::NEG_INFINITY,
            (Kind::Float, self.device),
        )?
        .f_index_reduce(1, &slots, &scores, "amax", true)?;
        let subjects = self.by_subject.len();
        let mut answers = Vec::with_capacity(queries.len());
        for (p, query) in queries.iter().enumerate() {
            let k = query.k.min(subjects);
            if k == 0 {
                answers.push(Vec::new());
                continue;
            }
            let row = per_subject.f_get(p as i64)?;
            let (top, _) = row.f_topk(k as i64, 0, true, true)?;
            // Everything tied with the k-th score comes back, so the host
            // can break ties by enrolment order rather than by libtorch's
            // whim.
            let kth = top.f_double_value(&[k as i64 - 1])?;
            let chosen = row.f_ge(kth)?.f_nonzero()?.f_view([-1])?;
            let chosen_scores: Vec<f32> = Vec::try_from(&row.f_index_select(0, &chosen)?)?;
            let chosen: Vec<i64> = Vec::try_from(&chosen)?;
            let best = chosen
                .iter()
                .zip(chosen_scores)
                .filter_map(|(&slot, score)| Some((score, usize::try_from(slot).ok()?)))
                .collect();
            answers.push(self.ranked(best, k));
        }
        Ok(answers)
    }

    /// Moves the last row into `row` and shrinks by one.
    fn swap_remove(&mut self, row: usize) -> Result<(), IndexError> {
        let last = self
            .row_slot
            .len()
            .checked_sub(1)
            .ok_or(IndexError::Inconsistent("a removal from an empty index"))?;
        if row != last {
            match &mut self.chunks {
                Chunks::Host(chunks) => move_host_row(chunks, last, row, self.stride)?,
                Chunks::Device(chunks) => {
                    let (vector, slot_value) = {
                        let (src, offset) = locate(chunks, |c| c.extent, last)?;
                        (src.vectors.f_get(offset as i64)?, src.slots.f_get(offset as i64)?)
                    };
                    let (dst, offset) = locate(chunks, |c| c.extent, row)?;
                    dst.vectors.f_get(offset as i64)?.f_copy_(&vector)?;
                    dst.slots.f_get(offset as i64)?.f_copy_(&slot_value)?;
                }
            }
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
        match &mut self.chunks {
            Chunks::Host(chunks) => shrink_last(chunks, |c| &mut c.extent),
            Chunks::Device(chunks) => shrink_last(chunks, |c| &mut c.extent),
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
        if let Chunks::Device(chunks) = &mut self.chunks {
            for chunk in chunks {
                let Extent { start, fill, .. } = chunk.extent;
                let ids: Vec<i64> = self
                    .row_slot
                    .get(start..start + fill)
                    .ok_or(IndexError::Inconsistent("a chunk past the last row"))?
                    .iter()
                    .map(|&s| s as i64)
                    .collect();
                let ids = Tensor::f_from_slice(&ids)?.f_to_device(self.device)?;
                chunk.slots.f_narrow(0, 0, fill as i64)?.f_copy_(&ids)?;
            }
        }
        Ok(())
    }
}

/// One thread's share of a host search: what it reads, all `Sync`.
#[derive(Clone, Copy)]
struct ScanRows<'a> {
    kernel: Kernel,
    chunks: &'a [HostChunk],
    row_slot: &'a [usize],
    stride: usize,
    halves: bool,
}

impl ScanRows<'_> {
    /// Scores rows `from..to` against every probe, block by block, and
    /// keeps in each probe's collector the rows that can still make its
    /// top k.
    fn scan(&self, from: usize, to: usize, probes: &[f32], found: &mut [Collector]) {
        let Self {
            kernel,
            chunks,
            row_slot,
            stride,
            halves,
        } = *self;
        let q = found.len();
        let mut scores = vec![0.0f32; BLOCK_ROWS * q];
        for chunk in chunks {
            let Extent { start, fill, .. } = chunk.extent;
            let (lo, hi) = (from.max(start), to.min(start + fill));
            let mut row = lo;
            while row < hi {
                let n = (hi - row).min(BLOCK_ROWS);
                let (a, b) = ((row - start) * stride, (row - start + n) * stride);
                let out = &mut scores[..n * q];
                match (halves, chunk.vectors.get(a..b), chunk.halves.get(a..b)) {
                    (true, _, Some(rows)) => kernel.scores_half(rows, probes, stride, out),
                    (_, Some(rows), _) => kernel.scores(rows, probes, stride, out),
                    _ => break,
                }
                // Probe by probe, 16 scores at a time: a whole group below
                // the cut (nearly always, once the cut has risen) is one
                // vectorised comparison.
                for (collector, scores) in found.iter_mut().zip(out.chunks_exact(n)) {
                    for (g, group) in scores.chunks(16).enumerate() {
                        let cut = collector.cut;
                        if !group.iter().fold(false, |any, &s| any | (s >= cut)) {
                            continue;
                        }
                        for (i, &score) in group.iter().enumerate() {
                            if score >= collector.cut {
                                collector.push(score, row + g * 16 + i, row_slot);
                            }
                        }
                    }
                }
                row += n;
            }
        }
    }
}

/// Per probe, the rows that can still make its top k: every row scoring at
/// least `cut`, where `cut` (rising) is the k-th best subject's score among
/// the rows kept so far, less `slack` (the half-precision margin).
#[derive(Debug)]
struct Collector {
    k: usize,
    slack: f64,
    cut: f32,
    /// (score, global row).
    found: Vec<(f32, usize)>,
    /// Length that triggers the next pruning.
    limit: usize,
}

impl Collector {
    fn new(k: usize, slack: f64) -> Self {
        Self {
            k,
            slack,
            cut: if k == 0 { f32::INFINITY } else { f32::NEG_INFINITY },
            found: Vec::new(),
            limit: (4 * k).max(256),
        }
    }

    fn push(&mut self, score: f32, row: usize, row_slot: &[usize]) {
        self.found.push((score, row));
        if self.found.len() >= self.limit {
            self.prune(row_slot);
        }
    }

    /// Raises the cut to the k-th best subject's score kept (less the
    /// slack, rounded down) and drops the rows below it.
    fn prune(&mut self, row_slot: &[usize]) {
        self.found.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
        let mut seen = HashSet::with_capacity(self.k);
        let kth = self.found.iter().find(|&&(_, row)| {
            row_slot.get(row).is_some_and(|&slot| seen.insert(slot)) && seen.len() == self.k
        });
        if let Some(&(score, _)) = kth {
            let cut = f64::from(score) - self.slack;
            // The largest f32 not above `cut`: nothing within the margin is lost.
            let mut rounded = cut as f32;
            if f64::from(rounded) > cut {
                rounded = rounded.next_down();
            }
            self.cut = self.cut.max(rounded);
            let cut = self.cut;
            self.found.retain(|&(s, _)| s >= cut);
        }
        self.limit = self.limit.max(2 * self.found.len());
    }
}

/// Writes `rows` past the last chunk's fill and into fresh chunks
/// (allocated first); returns whether every row held has halves.
fn append_host(
    chunks: &mut Vec<HostChunk>,
    fresh: &[Extent],
    rows: &[NewRow<'_>],
    stride: usize,
    halves: bool,
) -> Result<bool, IndexError> {
    let out_of_memory = |_| IndexError::OutOfMemory { rows: rows.len() };
    let mut staged_halves = Vec::new();
    let mut halves_ok = halves;
    if halves {
        for row in rows {
            match kernel::to_halves(row.embedding) {
                Some(h) => staged_halves.push(h),
                None => {
                    halves_ok = false;
                    break;
                }
            }
        }
    }
    let mut new_chunks = Vec::with_capacity(fresh.len());
    for &extent in fresh {
        let values = extent.capacity * stride;
        let vectors = Aligned::try_zeroed(values).map_err(out_of_memory)?;
        let half_rows = if halves_ok {
            Aligned::try_zeroed(values).map_err(out_of_memory)?
        } else {
            Aligned::default()
        };
        new_chunks.push(HostChunk {
            extent,
            vectors,
            halves: half_rows,
        });
    }
    // Nothing below fails.
    if !halves_ok {
        for chunk in chunks.iter_mut() {
            chunk.halves = Aligned::default();
        }
    }
    chunks.extend(new_chunks);
    let first_open = chunks
        .iter()
        .position(|c| c.extent.fill < c.extent.capacity)
        .unwrap_or(chunks.len());
    let mut rows_left = rows.iter().enumerate();
    for chunk in chunks.iter_mut().skip(first_open) {
        while chunk.extent.fill < chunk.extent.capacity {
            let Some((i, row)) = rows_left.next() else {
                return Ok(halves_ok);
            };
            let at = chunk.extent.fill * stride;
            chunk.vectors[at..at + row.embedding.len()].copy_from_slice(row.embedding);
            if let (true, Some(h)) = (halves_ok, staged_halves.get(i)) {
                chunk.halves[at..at + h.len()].copy_from_slice(h);
            }
            chunk.extent.fill += 1;
        }
    }
    Ok(halves_ok)
}

/// The device counterpart of [`append_host`].
fn append_device(
    chunks: &mut Vec<DeviceChunk>,
    fresh: &[Extent],
    rows: &[NewRow<'_>],
    slot_ids: &[usize],
    dim: usize,
    device: Device,
) -> Result<(), IndexError> {
    let n = rows.len();
    let flat: Vec<f32> = rows.iter().flat_map(|r| r.embedding.iter().copied()).collect();
    let vectors = Tensor::f_from_slice(&flat)?
        .f_view([n as i64, dim as i64])?
        .f_to_device(device)?;
    let slot_tensor =
        Tensor::f_from_slice(&slot_ids.iter().map(|&s| s as i64).collect::<Vec<_>>())?.f_to_device(device)?;
    let mut new_chunks = Vec::with_capacity(fresh.len());
    for &extent in fresh {
        new_chunks.push(DeviceChunk {
            extent,
            vectors: Tensor::f_zeros([extent.capacity as i64, dim as i64], (Kind::Float, device))?,
            slots: Tensor::f_zeros([extent.capacity as i64], (Kind::Int64, device))?,
        });
    }
    // Copies into rows no search reads yet (past every fill): a failure
    // here still leaves the index as it was.
    let mut done = 0;
    let mut takes = Vec::with_capacity(new_chunks.len() + 1);
    for chunk in chunks.last_mut().into_iter().chain(new_chunks.iter_mut()) {
        let take = (chunk.extent.capacity - chunk.extent.fill).min(n - done);
        if take > 0 {
            let (at, count, from) = (chunk.extent.fill as i64, take as i64, done as i64);
            chunk
                .vectors
                .f_narrow(0, at, count)?
                .f_copy_(&vectors.f_narrow(0, from, count)?)?;
            chunk
                .slots
                .f_narrow(0, at, count)?
                .f_copy_(&slot_tensor.f_narrow(0, from, count)?)?;
        }
        takes.push(take);
        done += take;
    }
    let mut takes = takes.into_iter();
    if let (Some(last), Some(take)) = (chunks.last_mut(), takes.next()) {
        last.extent.fill += take;
    }
    for (mut chunk, take) in new_chunks.into_iter().zip(takes) {
        chunk.extent.fill = take;
        chunks.push(chunk);
    }
    Ok(())
}

/// Copies host row `from` over row `to`.
fn move_host_row(chunks: &mut [HostChunk], from: usize, to: usize, stride: usize) -> Result<(), IndexError> {
    let missing = IndexError::Inconsistent("a row past its chunk's vectors");
    let (src, offset) = locate(chunks, |c| c.extent, from)?;
    let range = offset * stride..(offset + 1) * stride;
    let vector = src.vectors.get(range.clone()).ok_or(missing)?.to_vec();
    let halves = src.halves.get(range).map(<[u16]>::to_vec);
    let at = chunks.partition_point(|c| c.extent.start <= to).saturating_sub(1);
    let dst = chunks
        .get_mut(at)
        .ok_or(IndexError::Inconsistent("a row outside every chunk"))?;
    let offset = (to - dst.extent.start) * stride;
    dst.vectors
        .get_mut(offset..offset + stride)
        .ok_or(IndexError::Inconsistent("a row past its chunk's vectors"))?
        .copy_from_slice(&vector);
    if let (Some(h), Some(place)) = (halves, dst.halves.get_mut(offset..offset + stride)) {
        place.copy_from_slice(&h);
    }
    Ok(())
}

/// Shrinks the last chunk by one row, dropping it once empty.
fn shrink_last<C>(chunks: &mut Vec<C>, extent: impl Fn(&mut C) -> &mut Extent) {
    if let Some(chunk) = chunks.last_mut() {
        let e = extent(chunk);
        e.fill = e.fill.saturating_sub(1);
        if e.fill == 0 {
            chunks.pop();
        }
    }
}

/// The chunk holding global row `row`, and the row's offset in it.
fn locate<C>(chunks: &[C], extent: impl Fn(&C) -> Extent, row: usize) -> Result<(&C, usize), IndexError> {
    let at = chunks.partition_point(|c| extent(c).start <= row);
    let chunk = at
        .checked_sub(1)
        .and_then(|i| chunks.get(i))
        .filter(|c| row - extent(c).start < extent(c).fill)
        .ok_or(IndexError::Inconsistent("a row outside every chunk"))?;
    Ok((chunk, row - extent(chunk).start))
}

/// One gallery's index and the probes waiting to be searched in it.
///
/// Dereferences to the index's lock for appends, deletes and Verify;
/// Identify goes through [`Gallery::search`], which batches: the first
/// caller leads (searches at once, alone); probes that arrive meanwhile
/// queue, and when the leader is done it hands the lead to the first of
/// them, which searches the whole queue in one pass. Callers whose probe
/// was searched are woken with their answer, without touching the index's
/// lock, so a busy gallery's batches hold every caller waiting.
///
/// Closed-loop callers (each sends its next probe as soon as it has an
/// answer) would otherwise split into alternating cohorts: the first caller
/// back after a batch finds the gallery idle and searches alone, the rest
/// queue behind it, and the two groups take turns. So a leader that starts
/// right after a batch of several probes (within that batch's duration)
/// waits until as many probes as that batch held are queued, at most 1/16
/// of its duration; a lone caller, or the first after a pause, never
/// waits.
#[derive(Debug)]
pub struct Gallery {
    index: Mutex<GalleryIndex>,
    queue: Mutex<Queue>,
    /// Signalled when a probe queues while a leader gathers.
    arrived: Condvar,
}

#[derive(Debug, Default)]
struct Queue {
    waiting: Vec<Waiting>,
    /// A caller is leading (searching or about to).
    leading: bool,
    /// The leader is waiting for more probes ([`Queue::arrived`]).
    gathering: bool,
    /// The last batch: probes, end and duration.
    last: Option<(usize, Instant, Duration)>,
}

/// A queued probe and where its answer goes.
#[derive(Debug)]
struct Waiting {
    probe: Vec<f32>,
    k: usize,
    reply: SyncSender<Reply>,
}

/// What a queued caller is woken with.
#[derive(Debug)]
enum Reply {
    /// Its answer, searched in another caller's batch.
    Answer(Result<Searched, String>),
    /// Lead the next batch (its own probe is in it).
    Lead,
}

/// A search's hits and the subjects the gallery held then.
pub type Searched = (Vec<Hit>, usize);

impl std::ops::Deref for Gallery {
    type Target = Mutex<GalleryIndex>;

    fn deref(&self) -> &Self::Target {
        &self.index
    }
}

impl From<GalleryIndex> for Gallery {
    fn from(index: GalleryIndex) -> Self {
        Self {
            index: Mutex::new(index),
            queue: Mutex::new(Queue::default()),
            arrived: Condvar::new(),
        }
    }
}

impl Gallery {
    /// The `k` best subjects for `probe` and the subjects held, searched
    /// together with the probes queued meanwhile (blocking: call from a
    /// blocking thread); also how many probes the batch that answered it
    /// held (0: another caller's batch). The answer equals
    /// [`GalleryIndex::search`]'s.
    pub fn search(&self, probe: Vec<f32>, k: usize) -> Result<(Searched, usize), IndexError> {
        let (reply, wake) = sync_channel(1);
        let lead = {
            let mut queue = lock(&self.queue);
            queue.waiting.push(Waiting { probe, k, reply });
            if queue.gathering {
                self.arrived.notify_one();
            }
            !std::mem::replace(&mut queue.leading, true)
        };
        if !lead {
            match wake.recv() {
                Ok(Reply::Answer(answer)) => return answer.map(|a| (a, 0)).map_err(IndexError::Batch),
                Ok(Reply::Lead) => {}
                // The leader's search panicked with this probe in its batch.
                Err(_) => return Err(IndexError::Batch("the search of its batch panicked".into())),
            }
        }
        // Leading: the queue holds this caller's probe and all that came
        // while the previous batch ran. The lead passes on however this
        // ends, a panic included, so later callers never wait on nobody.
        let _hand_over = HandOver(self);
        self.gather();
        let batch = std::mem::take(&mut lock(&self.queue).waiting);
        let started = Instant::now();
        let answers = {
            let index = lock(&self.index);
            let queries: Vec<Query<'_>> = batch
                .iter()
                .map(|w| Query {
                    probe: &w.probe,
                    k: w.k,
                })
                .collect();
            let subjects = index.subject_count();
            index
                .search_many(&queries)
                .map(|all| all.into_iter().map(|hits| (hits, subjects)).collect::<Vec<_>>())
        };
        match answers {
            Ok(all) => {
                for (waiting, answer) in batch.iter().zip(all) {
                    let _ = waiting.reply.try_send(Reply::Answer(Ok(answer)));
                }
            }
            Err(error) => {
                let message = error.to_string();
                for waiting in &batch {
                    let _ = waiting.reply.try_send(Reply::Answer(Err(message.clone())));
                }
            }
        }
        lock(&self.queue).last = Some((batch.len(), Instant::now(), started.elapsed()));
        // This caller's own answer came to its own channel like the others'.
        match wake.try_recv() {
            Ok(Reply::Answer(answer)) => answer.map(|a| (a, batch.len())).map_err(IndexError::Batch),
            _ => Err(IndexError::Inconsistent("a leader's probe was not in its batch")),
        }
    }

    /// A new lead in a burst: waits for the callers of the last batch (see
    /// [`Gallery`]).
    fn gather(&self) {
        let mut queue = lock(&self.queue);
        let Some((expected, ended, took)) = queue.last else {
            return;
        };
        if expected <= 1 || ended.elapsed() > took {
            return;
        }
        let deadline = Instant::now() + took / 16;
        queue.gathering = true;
        while queue.waiting.len() < expected {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            queue = self
                .arrived
                .wait_timeout(queue, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        queue.gathering = false;
    }

    /// Probes queued and not yet taken into a batch, and whether a caller
    /// leads.
    #[cfg(test)]
    fn queued(&self) -> (usize, bool) {
        let queue = lock(&self.queue);
        (queue.waiting.len(), queue.leading)
    }

    /// Wakes the first queued caller to lead the next batch, or ends the
    /// lead when nobody waits.
    fn hand_over(&self) {
        let mut queue = lock(&self.queue);
        while let Some(first) = queue.waiting.first() {
            if first.reply.try_send(Reply::Lead).is_ok() {
                return;
            }
            // Its caller is gone (cannot happen: callers block until woken).
            queue.waiting.remove(0);
        }
        queue.leading = false;
    }
}

/// Passes a batch leader's lead on when dropped.
struct HandOver<'a>(&'a Gallery);

impl Drop for HandOver<'_> {
    fn drop(&mut self) {
        self.0.hand_over();
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
    options: SearchOptions,
    galleries: Mutex<HashMap<String, Arc<Gallery>>>,
}

impl Indexes {
    /// No galleries yet.
    pub fn new(dim: usize, device: Device, options: SearchOptions) -> Self {
        Self {
            dim,
            device,
            options,
            galleries: Mutex::new(HashMap::new()),
        }
    }

    /// The index of `gallery`, if it holds (or held, until
    /// [`Indexes::forget_if_empty`]) a template.
    pub fn get(&self, gallery: &str) -> Option<Arc<Gallery>> {
        lock(&self.galleries).get(gallery).cloned()
    }

    /// The index of `gallery`, created empty on first use.
    pub fn get_or_create(&self, gallery: &str) -> Arc<Gallery> {
        lock(&self.galleries)
            .entry(gallery.to_owned())
            .or_insert_with(|| {
                Arc::new(Gallery::from(GalleryIndex::new(
                    self.dim,
                    self.device,
                    self.options.clone(),
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

    fn opts(max_chunk_rows: usize) -> SearchOptions {
        SearchOptions {
            max_chunk_rows,
            ..SearchOptions::default()
        }
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
        let mut index = GalleryIndex::new(dim, test_device(), opts(5));
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
        let mut index = GalleryIndex::new(dim, test_device(), opts(16));
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
        let mut index = GalleryIndex::new(dim, test_device(), opts(64));
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
        let mut big = GalleryIndex::new(dim, test_device(), opts(1 << 20));
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
        let mut index = GalleryIndex::new(2, test_device(), opts(4));
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
        let mut index = GalleryIndex::new(2, test_device(), opts(4));
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
        let mut index = GalleryIndex::new(3, test_device(), opts(4));
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

    /// Hits as (subject, score bits): equal only when bit-identical.
    fn exact(hits: &[Hit]) -> Vec<(String, u32)> {
        hits.iter()
            .map(|h| (h.subject_id.clone(), h.score.to_bits()))
            .collect()
    }

    /// An index of `templates` on the host, searched with `kernel`.
    fn filled(
        options: SearchOptions,
        kernel: Kernel,
        dim: usize,
        templates: &[(String, i64, Vec<f32>)],
    ) -> GalleryIndex {
        let mut index = GalleryIndex::new(dim, Device::Cpu, options).with_kernel(kernel);
        for block in templates.chunks(4096) {
            let rows: Vec<NewRow<'_>> = block
                .iter()
                .map(|(s, q, v)| NewRow {
                    subject_id: s,
                    seq: *q,
                    embedding: v,
                })
                .collect();
            index.append(&rows).expect("append");
        }
        index
    }

    fn kernels() -> Vec<Kernel> {
        let mut kernels = vec![Kernel::portable()];
        if Kernel::detect().name() != Kernel::portable().name() {
            kernels.push(Kernel::detect());
        }
        kernels
    }

    fn half(threads: usize) -> SearchOptions {
        SearchOptions {
            half_precision: true,
            threads,
            max_chunk_rows: 4096,
        }
    }

    fn full(threads: usize) -> SearchOptions {
        SearchOptions {
            half_precision: false,
            ..half(threads)
        }
    }

    #[test]
    fn half_precision_top_k_equals_f32_on_near_ties() {
        // Every template is one direction nudged by less than a half's
        // rounding, so the half-precision scores order them wrongly, and
        // some subjects share a template exactly (a tie the enrolment order
        // breaks).
        let dim = 96;
        let mut rng = Lcg(7);
        let base = rng.unit(dim);
        let mut templates = Vec::new();
        for t in 0..3000 {
            let nudge = rng.unit(dim);
            let mut v: Vec<f32> = base.iter().zip(&nudge).map(|(b, n)| b + 2e-4 * n).collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter_mut().for_each(|x| *x /= norm);
            templates.push((format!("s{}", t % 700), t as i64, v));
        }
        for t in 0..40 {
            let copy = templates[t * 13].2.clone();
            templates.push((format!("twin{t}"), 10_000 + t as i64, copy));
        }
        let probes: Vec<Vec<f32>> = std::iter::once(base.clone())
            .chain((0..6).map(|_| {
                let nudge = rng.unit(dim);
                base.iter().zip(&nudge).map(|(b, n)| b + 1e-3 * n).collect()
            }))
            .collect();
        for kernel in kernels() {
            let want = filled(full(1), kernel, dim, &templates);
            let got = filled(half(1), kernel, dim, &templates);
            for probe in &probes {
                for k in [1, 5, 10, 100, 800] {
                    let f32_hits = want.search(probe, k).expect("f32");
                    assert_eq!(
                        exact(&got.search(probe, k).expect("half")),
                        exact(&f32_hits),
                        "{} k={k}",
                        kernel.name()
                    );
                    // The f32 answer itself is the brute force's.
                    let reference = brute_force(&templates, probe, k);
                    for (hit, (_, score)) in f32_hits.iter().zip(&reference) {
                        assert!((f64::from(hit.score) - score).abs() < 1e-5);
                    }
                }
            }
        }
    }

    #[test]
    fn half_precision_is_exact_on_random_galleries_over_threads_and_kernels() {
        let dim = 40;
        let mut rng = Lcg(11);
        // Enough rows that two threads each get their share.
        let rows = 2 * MIN_ROWS_PER_THREAD + 1234;
        let templates: Vec<(String, i64, Vec<f32>)> = (0..rows)
            .map(|t| (format!("s{}", t % 9000), t as i64, rng.unit(dim)))
            .collect();
        let probes: Vec<Vec<f32>> = (0..4).map(|_| rng.unit(dim)).collect();
        let reference = filled(full(1), Kernel::portable(), dim, &templates);
        for kernel in kernels() {
            for threads in [1, 2] {
                let f32_index = filled(full(threads), kernel, dim, &templates);
                let half_index = filled(half(threads), kernel, dim, &templates);
                for probe in &probes {
                    for k in [1, 10, 50] {
                        let want = exact(&reference.search(probe, k).expect("reference"));
                        assert_eq!(exact(&f32_index.search(probe, k).expect("f32")), want);
                        assert_eq!(exact(&half_index.search(probe, k).expect("half")), want);
                    }
                }
            }
        }
    }

    #[test]
    fn rows_beyond_the_half_range_fall_back_to_f32() {
        let dim = 8;
        let mut rng = Lcg(5);
        let mut templates: Vec<(String, i64, Vec<f32>)> = (0..200)
            .map(|t| (format!("s{t}"), t as i64, rng.unit(dim)))
            .collect();
        // Not a unit vector, and past the largest half (65504): no half copy
        // can stand for it.
        let mut huge = vec![0.0; dim];
        huge[0] = 1e6;
        templates.push(("huge".to_owned(), 500, huge));
        let probe = rng.unit(dim);
        let want = filled(full(1), Kernel::detect(), dim, &templates);
        let got = filled(half(1), Kernel::detect(), dim, &templates);
        for k in [1, 3, 201] {
            assert_eq!(
                exact(&got.search(&probe, k).expect("half")),
                exact(&want.search(&probe, k).expect("f32"))
            );
        }
    }

    #[test]
    fn concurrent_callers_are_searched_in_one_batch_with_their_lone_answers() {
        let dim = 24;
        let mut rng = Lcg(3);
        let templates: Vec<(String, i64, Vec<f32>)> = (0..5000)
            .map(|t| (format!("s{}", t % 800), t as i64, rng.unit(dim)))
            .collect();
        let gallery = Arc::new(Gallery::from(filled(full(1), Kernel::detect(), dim, &templates)));
        let probes: Vec<Vec<f32>> = (0..16).map(|_| rng.unit(dim)).collect();
        let alone: Vec<_> = probes
            .iter()
            .enumerate()
            .map(|(i, p)| exact(&lock(&gallery).search(p, 1 + i % 7).expect("alone")))
            .collect();
        // While the index is held, the first caller leads a batch of its
        // own probe and waits for the index; the other fifteen queue behind
        // it and are searched as one batch of fifteen.
        let held = lock(&gallery);
        let wait_for = |state: (usize, bool)| {
            let start = Instant::now();
            while gallery.queued() != state {
                assert!(start.elapsed().as_secs() < 30, "never reached {state:?}");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let call = |i: usize| {
            let (gallery, probe) = (Arc::clone(&gallery), probes[i].clone());
            std::thread::spawn(move || gallery.search(probe, 1 + i % 7).expect("search"))
        };
        let mut callers = vec![call(0)];
        wait_for((0, true));
        callers.extend((1..16).map(call));
        wait_for((15, true));
        drop(held);
        let mut batches = Vec::new();
        for (i, caller) in callers.into_iter().enumerate() {
            let ((hits, subjects), batch) = caller.join().expect("caller");
            assert_eq!(subjects, 800);
            assert_eq!(exact(&hits), alone[i], "caller {i}");
            batches.push(batch);
        }
        batches.sort_unstable();
        // Leaders report their batch's size, the others 0.
        assert_eq!(batches.iter().sum::<usize>(), 16, "{batches:?}");
        assert_eq!(batches[14..], [1, 15], "{batches:?}");
        // The lead ended with the last batch: a new caller searches at once.
        let ((hits, _), batch) = gallery.search(probes[0].clone(), 1).expect("after");
        assert_eq!((exact(&hits), batch), (alone[0].clone(), 1));
    }
}
