//! A parallel, deterministic batch loader.
//!
//! Worker threads read, decode and augment the images of upcoming batches
//! while the caller trains on the current one. They run at most
//! [`PREFETCH_BATCHES`] batches ahead of the consumer, so memory stays
//! bounded, and batches come out in the order given. Each image's
//! augmentation RNG is seeded from (seed, epoch, batch number, position in
//! batch) only, so the tensors do not depend on thread timing or the number
//! of workers.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;

use anyhow::{Context, Result, anyhow, bail};
use handid_model::{DecodeLimits, decode};
use image::RgbImage;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;
use tch::{Kind, Tensor};

use super::augment::Augment;

/// How many batches the workers may prepare ahead of the one being consumed.
pub const PREFETCH_BATCHES: usize = 3;

/// One training or evaluation image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    /// Image file.
    pub path: PathBuf,
    /// Class index (0..classes).
    pub label: i64,
}

/// A batch of images ready for the model.
#[derive(Debug)]
pub struct Batch {
    /// `[B, 3, H, W]` f32 on the CPU.
    pub images: Tensor,
    /// `[B]` i64 class indices.
    pub labels: Tensor,
    /// Dataset indices of the images, in batch order.
    pub indices: Vec<usize>,
}

/// Loads batches of [`Item`]s through an [`Augment`].
#[derive(Debug)]
pub struct Loader {
    shared: Arc<Shared>,
    workers: usize,
    seed: u64,
}

/// What the workers need, shared with them.
#[derive(Debug)]
struct Shared {
    items: Arc<Vec<Item>>,
    augment: Arc<Augment>,
    /// Resized images by item index, when caching.
    cache: Option<Vec<OnceLock<Arc<RgbImage>>>>,
}

impl Loader {
    /// `workers` decoding threads (0 = decode on the caller's thread).
    /// `cache_decoded`: keep decoded+resized images in memory across epochs (small datasets).
    pub fn new(
        items: Arc<Vec<Item>>,
        augment: Arc<Augment>,
        workers: usize,
        cache_decoded: bool,
        seed: u64,
    ) -> Self {
        let cache = cache_decoded.then(|| (0..items.len()).map(|_| OnceLock::new()).collect());
        Self {
            shared: Arc::new(Shared {
                items,
                augment,
                cache,
            }),
            workers,
            seed,
        }
    }

    /// The augmentation RNG of image `position` of batch `batch` (numbered
    /// from 0 in the list given to [`Loader::batches`]): the ChaCha8 key is
    /// the four numbers, little-endian, so it depends on nothing else.
    pub fn image_rng(seed: u64, epoch: u64, batch: usize, position: usize) -> ChaCha8Rng {
        let mut key = [0u8; 32];
        for (chunk, value) in key
            .chunks_exact_mut(8)
            .zip([seed, epoch, batch as u64, position as u64])
        {
            chunk.copy_from_slice(&value.to_le_bytes());
        }
        ChaCha8Rng::from_seed(key)
    }

    /// The items this loader reads.
    pub fn items(&self) -> &Arc<Vec<Item>> {
        &self.shared.items
    }

    /// Batches in the given order, decoded/augmented in parallel with the
    /// consumer (bounded prefetch), order preserved. `train` picks the
    /// training or evaluation view. After an error the iterator ends.
    pub fn batches(
        &self,
        batches: Vec<Vec<usize>>,
        epoch: u64,
        train: bool,
    ) -> impl Iterator<Item = Result<Batch>> + '_ {
        let job = Arc::new(Job {
            batches,
            epoch,
            seed: self.seed,
            train,
        });
        Batches::start(Arc::clone(&self.shared), job, self.workers)
    }
}

/// One call of [`Loader::batches`].
#[derive(Debug)]
struct Job {
    batches: Vec<Vec<usize>>,
    epoch: u64,
    seed: u64,
    train: bool,
}

impl Job {
    fn rng(&self, batch: usize, position: usize) -> ChaCha8Rng {
        Loader::image_rng(self.seed, self.epoch, batch, position)
    }
}

impl Shared {
    fn resized(&self, index: usize) -> Result<Arc<RgbImage>> {
        let item = self
            .items
            .get(index)
            .ok_or_else(|| anyhow!("item index {index} is out of range ({} items)", self.items.len()))?;
        if let Some(hit) = self.cache.as_ref().and_then(|c| c[index].get()) {
            return Ok(Arc::clone(hit));
        }
        let resized = Arc::new(load_resized(&item.path, &self.augment)?);
        if let Some(cache) = &self.cache {
            // Another thread may have filled it meanwhile: both values are equal.
            let _ = cache[index].set(Arc::clone(&resized));
        }
        Ok(resized)
    }

    /// Image `position` of batch `batch` of `job`.
    fn image(&self, job: &Job, batch: usize, position: usize) -> Result<Tensor> {
        let index = job.batches[batch][position];
        let resized = self.resized(index)?;
        let augment = &self.augment;
        let view = if job.train {
            augment.train_resized(&resized, &mut job.rng(batch, position))
        } else {
            augment.eval_resized(&resized)
        };
        view.with_context(|| format!("preparing {}", self.items[index].path.display()))
    }

    fn labels(&self, indices: &[usize]) -> Result<Tensor> {
        let labels = indices
            .iter()
            .map(|&i| self.items.get(i).map(|item| item.label))
            .collect::<Option<Vec<i64>>>()
            .ok_or_else(|| {
                anyhow!(
                    "a batch names an item index beyond the {} items",
                    self.items.len()
                )
            })?;
        Ok(Tensor::from_slice(&labels).to_kind(Kind::Int64))
    }
}

/// Reads, decodes and resizes one image; errors name the path, never the bytes.
fn load_resized(path: &Path, augment: &Augment) -> Result<RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("reading image {}", path.display()))?;
    let img = decode(&bytes, &DecodeLimits::default())
        .with_context(|| format!("decoding image {}", path.display()))?;
    augment
        .resize(&img)
        .with_context(|| format!("resizing image {}", path.display()))
}

/// Progress shared between the consumer and the workers.
#[derive(Debug)]
struct Progress {
    /// Next task (flat index over all images of all batches) to hand out.
    next: usize,
    /// Workers may start tasks of batches below this.
    limit: usize,
    /// The consumer is gone or failed: workers stop.
    stop: bool,
}

/// Worker result: (batch, position, image).
type Done = (usize, usize, Result<Tensor>);

/// The iterator behind [`Loader::batches`].
#[derive(Debug)]
struct Batches {
    shared: Arc<Shared>,
    job: Arc<Job>,
    next_batch: usize,
    finished: bool,
    /// Parallel mode only.
    pool: Option<Pool>,
}

#[derive(Debug)]
struct Pool {
    progress: Arc<(Mutex<Progress>, Condvar)>,
    results: Receiver<Done>,
    /// Images received for batches not yet yielded.
    pending: HashMap<usize, Vec<Option<Result<Tensor>>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Batches {
    fn start(shared: Arc<Shared>, job: Arc<Job>, workers: usize) -> Self {
        let pool = (workers > 0).then(|| {
            // Flat task list: (batch, position), batch-major.
            let tasks: Arc<Vec<(usize, usize)>> = Arc::new(
                job.batches
                    .iter()
                    .enumerate()
                    .flat_map(|(b, batch)| (0..batch.len()).map(move |p| (b, p)))
                    .collect(),
            );
            let progress = Arc::new((
                Mutex::new(Progress {
                    next: 0,
                    limit: PREFETCH_BATCHES + 1,
                    stop: false,
                }),
                Condvar::new(),
            ));
            let (sender, results) = channel();
            let threads = (0..workers)
                .map(|_| {
                    let (shared, job, tasks, progress, sender) = (
                        Arc::clone(&shared),
                        Arc::clone(&job),
                        Arc::clone(&tasks),
                        Arc::clone(&progress),
                        sender.clone(),
                    );
                    std::thread::spawn(move || work(&shared, &job, &tasks, &progress, &sender))
                })
                .collect();
            Pool {
                progress,
                results,
                pending: HashMap::new(),
                threads,
            }
        });
        Self {
            shared,
            job,
            next_batch: 0,
            finished: false,
            pool,
        }
    }

    fn assemble(&self, batch: usize, images: Vec<Tensor>) -> Result<Batch> {
        let indices = self.job.batches[batch].clone();
        if images.is_empty() {
            bail!("batch {batch} is empty");
        }
        Ok(Batch {
            images: Tensor::stack(&images, 0),
            labels: self.shared.labels(&indices)?,
            indices,
        })
    }

    fn next_serial(&self, batch: usize) -> Result<Batch> {
        let images = (0..self.job.batches[batch].len())
            .map(|p| self.shared.image(&self.job, batch, p))
            .collect::<Result<Vec<_>>>()?;
        self.assemble(batch, images)
    }

    fn next_parallel(&mut self, batch: usize) -> Result<Batch> {
        let size = self.job.batches[batch].len();
        let Some(pool) = self.pool.as_mut() else {
            bail!("no worker pool");
        };
        loop {
            // Done when every image of this batch is in, or one of them failed.
            // Results of later batches wait their turn, errors included, so
            // an error is reported with the batch it belongs to.
            let slots = pool.pending.get(&batch);
            let failed = slots.is_some_and(|s| s.iter().any(|r| matches!(r, Some(Err(_)))));
            if size == 0 || failed || slots.is_some_and(|s| s.iter().all(Option::is_some)) {
                break;
            }
            let (b, p, image) = pool
                .results
                .recv()
                .map_err(|_| anyhow!("the loader's worker threads stopped unexpectedly"))?;
            pool.pending.entry(b).or_insert_with(|| {
                let n = self.job.batches[b].len();
                (0..n).map(|_| None).collect()
            })[p] = Some(image);
        }
        let images = pool
            .pending
            .remove(&batch)
            .unwrap_or_default()
            .into_iter()
            .flatten()
            .collect::<Result<Vec<Tensor>>>()?;
        {
            // Let the workers move one batch further ahead.
            let (lock, wake) = &*pool.progress;
            let mut progress = lock.lock().map_err(|_| anyhow!("loader state poisoned"))?;
            progress.limit = batch + 2 + PREFETCH_BATCHES;
            wake.notify_all();
        }
        self.assemble(batch, images)
    }
}

/// A worker: takes tasks in order while they are within the prefetch window.
fn work(
    shared: &Shared,
    job: &Job,
    tasks: &[(usize, usize)],
    progress: &(Mutex<Progress>, Condvar),
    results: &Sender<Done>,
) {
    let (lock, wake) = progress;
    loop {
        let (batch, position) = {
            let Ok(mut state) = lock.lock() else { return };
            loop {
                if state.stop || state.next >= tasks.len() {
                    return;
                }
                if tasks[state.next].0 < state.limit {
                    break;
                }
                state = match wake.wait(state) {
                    Ok(state) => state,
                    Err(_) => return,
                };
            }
            state.next += 1;
            tasks[state.next - 1]
        };
        // A panic inside tch becomes this image's error instead of leaving
        // the consumer waiting for a result that never comes.
        let image = std::panic::catch_unwind(AssertUnwindSafe(|| shared.image(job, batch, position)))
            .unwrap_or_else(|_| Err(anyhow!("preparing image {position} of batch {batch} panicked")));
        if results.send((batch, position, image)).is_err() {
            return;
        }
    }
}

impl Iterator for Batches {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.finished || self.next_batch >= self.job.batches.len() {
            return None;
        }
        let batch = self.next_batch;
        self.next_batch += 1;
        let out = if self.pool.is_some() {
            self.next_parallel(batch)
        } else {
            self.next_serial(batch)
        };
        if out.is_err() {
            self.finished = true;
            self.stop_workers();
        }
        Some(out)
    }
}

impl Batches {
    fn stop_workers(&mut self) {
        if let Some(pool) = self.pool.as_mut() {
            let (lock, wake) = &*pool.progress;
            if let Ok(mut state) = lock.lock() {
                state.stop = true;
            }
            wake.notify_all();
            for thread in pool.threads.drain(..) {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for Batches {
    fn drop(&mut self) {
        self.stop_workers();
    }
}
