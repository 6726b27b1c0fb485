//! Turning encoded images into embeddings under concurrent load.
//!
//! Two stages, neither on the async runtime:
//! 1. decode + preprocess each image on tokio's blocking pool (CPU work that
//!    would otherwise stall every other call on the worker thread), within
//!    the limits and permits of [`Decoding`] (`decode.rs`);
//! 2. one dedicated forward thread gathers the preprocessed tensors of all
//!    concurrent calls into batches (up to `max_batch_size`) and runs one
//!    forward pass per batch, which is what keeps a GPU busy. Each image
//!    gets its own row back. After the first image of a batch it waits (at
//!    most `max_wait`) only while other images are still being decoded: a
//!    lone call never waits for company that is not coming.
//!
//! A bad image fails in stage 1 and never reaches a batch, so it fails only
//! the call that sent it.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use handid_model::{Embedder, Preprocess};
use tch::Tensor;
use tokio::sync::oneshot;

use crate::decode::Decoding;
use crate::error::ImageProblem;
use crate::faults::ForwardFault;
use crate::reload::SelfTestError;
use crate::settings::BatchSettings;
use crate::telemetry::metrics;
use tracing::Instrument;

/// Why embedding failed.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// One image of the call is unusable.
    #[error("image {index} {problem}")]
    BadImage {
        /// 0-based position in the call.
        index: usize,
        /// Why.
        problem: ImageProblem,
    },
    /// The forward thread has stopped (server shutting down).
    #[error("the embedding thread has stopped")]
    Stopped,
    /// The forward pass of the image's batch failed (a server fault).
    #[error(transparent)]
    Forward(Arc<ForwardError>),
    /// Preprocessing a decoded image failed (a server fault).
    #[error("preprocessing: {0}")]
    Preprocess(#[source] handid_model::Error),
    /// The decoding task died (a server fault).
    #[error("preprocessing task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    /// The call was dropped while its image decoded; nobody reads this.
    #[error("decoding cancelled")]
    Cancelled,
    /// The model cannot run on this replica at present.
    #[error("the model cannot run")]
    Unavailable,
}

/// Why a forward pass failed: every call of its batch fails with it.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// A device fault, injected by a test (`faults.rs`).
    #[error("CUDA error: an illegal memory access was encountered (injected)")]
    Injected,
    /// The batch's tensors could not be stacked.
    #[error("stacking a batch: {0}")]
    Stack(#[source] tch::TchError),
    /// The model's forward pass failed (libtorch, the device).
    #[error(transparent)]
    Model(#[from] handid_model::Error),
    /// The embeddings could not be read back.
    #[error("reading embeddings: {0}")]
    Read(#[source] tch::TchError),
    /// The forward pass panicked (caught: the thread goes on).
    #[error("the forward pass panicked: {0}")]
    Panicked(String),
}

/// Why the forward thread could not give an image its embedding.
#[derive(Debug, Clone)]
enum Forward {
    /// The batch failed (a server fault).
    Failed(Arc<ForwardError>),
    /// This image's embedding has a NaN or an infinity: it never leaves the
    /// forward thread, so it can never become a template or a probe.
    NotFinite,
    /// The model cannot run (its self-test fails since a batch failed).
    Unavailable,
}

/// One preprocessed image waiting for a forward pass.
struct Job {
    /// `[3, H, W]` on the CPU.
    pixels: Tensor,
    /// The span of the call waiting for it; the forward pass is traced as
    /// its child (a batch serves several calls: it follows from the others).
    span: tracing::Span,
    reply: oneshot::Sender<Result<Vec<f32>, Forward>>,
}

/// Counters and state of the forward thread.
#[derive(Debug)]
pub struct BatchStats {
    /// Forward passes run.
    pub forward_passes: AtomicU64,
    /// Images embedded by them.
    pub images: AtomicU64,
    /// Batches that failed (a panic or an error of the model).
    pub failed_batches: AtomicU64,
    /// Times the forward loop itself panicked and was started again.
    pub restarts: AtomicU64,
    /// Whether the model can run: false from a failed batch whose
    /// self-test also failed until a self-test passes again.
    pub runnable: AtomicBool,
    /// Images being decoded (stage 1) that will join the queue: what a
    /// batch is worth waiting for.
    pub preparing: AtomicUsize,
}

impl Default for BatchStats {
    fn default() -> Self {
        Self {
            forward_passes: AtomicU64::new(0),
            images: AtomicU64::new(0),
            failed_batches: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            runnable: AtomicBool::new(true),
            preparing: AtomicUsize::new(0),
        }
    }
}

/// Handle of the embedding pipeline; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Batcher {
    jobs: mpsc::Sender<Job>,
    preprocess: Arc<Preprocess>,
    decoding: Arc<Decoding>,
    stats: Arc<BatchStats>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("pixels", &self.pixels.size())
            .finish()
    }
}

impl Batcher {
    /// Starts the forward thread for `embedder`. It stops once the
    /// `Batcher` (and so the job queue) is dropped.
    pub fn start(
        embedder: Arc<Embedder>,
        settings: &BatchSettings,
        decoding: Arc<Decoding>,
    ) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel();
        let preprocess = Arc::new(embedder.manifest().preprocess.clone());
        let max_batch = settings.max_batch_size.max(1);
        let wait = Wait {
            max: Duration::from_millis(settings.max_wait_ms),
            when_idle: settings.wait_when_idle,
        };
        let stats = Arc::new(BatchStats::default());
        let counters = Arc::clone(&stats);
        std::thread::Builder::new()
            .name("handid-forward".to_owned())
            .spawn(move || supervise(&embedder, &queue, max_batch, wait, &counters))?;
        Ok(Self {
            jobs,
            preprocess,
            decoding,
            stats,
        })
    }

    /// Forward passes and images so far.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.stats.forward_passes.load(Ordering::Relaxed),
            self.stats.images.load(Ordering::Relaxed),
        )
    }

    /// Whether the model can run (health reports NOT_SERVING otherwise).
    pub fn runnable(&self) -> bool {
        self.stats.runnable.load(Ordering::SeqCst)
    }

    /// Failed batches and restarts of the forward loop so far.
    pub fn failures(&self) -> (u64, u64) {
        (
            self.stats.failed_batches.load(Ordering::Relaxed),
            self.stats.restarts.load(Ordering::Relaxed),
        )
    }

    /// Embeds the images of one call, in order. Fails with the first
    /// unusable image found (by its position in the call), without
    /// embedding any; the others' decoding stops.
    pub async fn embed(&self, images: Vec<Vec<u8>>) -> Result<Vec<Vec<f32>>, BatchError> {
        // Counted from now until each image is queued (or the call fails or
        // goes away), so the forward thread knows a batch is forming.
        let mut preparing = Preparing::new(&self.stats, images.len());
        let pixels = futures::future::try_join_all(
            images
                .into_iter()
                .enumerate()
                .map(|(index, bytes)| self.decoding.prepare(index, bytes, Arc::clone(&self.preprocess))),
        )
        .await?;
        let waiting = tracing::info_span!("batch_wait", images = pixels.len());
        let mut replies = Vec::with_capacity(pixels.len());
        for pixels in pixels {
            let (reply, answer) = oneshot::channel();
            self.jobs
                .send(Job {
                    pixels,
                    reply,
                    span: waiting.clone(),
                })
                .map_err(|_| BatchError::Stopped)?;
            preparing.queued_one();
            metrics().queued(1);
            replies.push(answer);
        }
        let mut embeddings = Vec::with_capacity(replies.len());
        for (index, answer) in replies.into_iter().enumerate() {
            let embedding = answer
                .instrument(waiting.clone())
                .await
                .map_err(|_| BatchError::Stopped)?;
            embeddings.push(match embedding {
                Ok(values) => values,
                Err(Forward::Failed(error)) => return Err(BatchError::Forward(error)),
                Err(Forward::Unavailable) => return Err(BatchError::Unavailable),
                Err(Forward::NotFinite) => {
                    tracing::warn!(index, "the model gave a non-finite embedding; refused");
                    return Err(BatchError::BadImage {
                        index,
                        problem: ImageProblem::NotEmbeddable,
                    });
                }
            });
        }
        Ok(embeddings)
    }
}

/// Images of one call counted in [`BatchStats::preparing`] until queued.
struct Preparing<'a> {
    stats: &'a BatchStats,
    left: usize,
}

impl<'a> Preparing<'a> {
    fn new(stats: &'a BatchStats, images: usize) -> Self {
        stats.preparing.fetch_add(images, Ordering::SeqCst);
        Self { stats, left: images }
    }

    /// One image is in the queue now.
    fn queued_one(&mut self) {
        if self.left > 0 {
            self.left -= 1;
            self.stats.preparing.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Preparing<'_> {
    fn drop(&mut self) {
        self.stats.preparing.fetch_sub(self.left, Ordering::SeqCst);
    }
}

/// How long the first image of a batch may wait for others.
#[derive(Debug, Clone, Copy)]
struct Wait {
    /// At most this long.
    max: Duration,
    /// Also when no other image is being decoded.
    when_idle: bool,
}

/// How long the forward thread sleeps at a time while waiting for images
/// still being decoded.
const WAIT_SLICE: Duration = Duration::from_micros(500);

/// How often a model that cannot run is tried again (its self-test).
const RETRY_SELF_TEST: Duration = Duration::from_secs(1);

/// Stage 2: the forward thread, supervised: the loop runs until every
/// sender is gone, and is started again should it panic outside a batch
/// (a panic inside one fails that batch only, below).
fn supervise(
    embedder: &Embedder,
    queue: &mpsc::Receiver<Job>,
    max_batch: usize,
    wait: Wait,
    stats: &BatchStats,
) {
    loop {
        let ran = catch_unwind(AssertUnwindSafe(|| {
            forward_loop(embedder, queue, max_batch, wait, stats)
        }));
        match ran {
            Ok(()) => return,
            Err(panic) => {
                stats.restarts.fetch_add(1, Ordering::Relaxed);
                metrics().forward_failed("restart");
                tracing::error!(panic = %panic_message(&*panic), "the forward thread panicked; restarted");
            }
        }
    }
}

fn forward_loop(
    embedder: &Embedder,
    queue: &mpsc::Receiver<Job>,
    max_batch: usize,
    wait: Wait,
    stats: &BatchStats,
) {
    loop {
        // While the model cannot run, wake up to try it again even when
        // no call comes, so health recovers by itself.
        let first = if stats.runnable.load(Ordering::SeqCst) {
            match queue.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        } else {
            match queue.recv_timeout(RETRY_SELF_TEST) {
                Ok(job) => job,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    check_model(embedder, stats);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        };
        let deadline = Instant::now() + wait.max;
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match queue.try_recv() {
                Ok(job) => {
                    batch.push(job);
                    continue;
                }
                Err(mpsc::TryRecvError::Disconnected) => break,
                Err(mpsc::TryRecvError::Empty) => {}
            }
            // Nothing queued: wait only while images are being decoded
            // (they join within a decode's time), never for calls that may
            // not come.
            let left = deadline.saturating_duration_since(Instant::now());
            if (stats.preparing.load(Ordering::SeqCst) == 0 && !wait.when_idle) || left.is_zero() {
                break;
            }
            match queue.recv_timeout(left.min(WAIT_SLICE)) {
                Ok(job) => batch.push(job),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        metrics().queued(-(batch.len() as i64));
        // A caller that went away (cancelled, timed out) needs no forward pass.
        batch.retain(|job| !job.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        if !stats.runnable.load(Ordering::SeqCst) {
            // Answer at once rather than fail every call on a broken device;
            // the caller may retry on another replica.
            for job in batch {
                let _ = job.reply.send(Err(Forward::Unavailable));
            }
            continue;
        }
        tracing::debug!(batch_size = batch.len(), "forward pass");
        metrics().batch(batch.len());
        let span = tracing::info_span!(parent: &batch[0].span, "forward", batch_size = batch.len());
        for job in &batch[1..] {
            span.follows_from(&job.span);
        }
        let _in_forward = span.enter();
        stats.forward_passes.fetch_add(1, Ordering::Relaxed);
        stats.images.fetch_add(batch.len() as u64, Ordering::Relaxed);
        // A panic here (libtorch, a bug) fails this batch only.
        let ran = catch_unwind(AssertUnwindSafe(|| run_batch(embedder, &batch)))
            .unwrap_or_else(|panic| Err(ForwardError::Panicked(panic_message(&*panic))));
        match ran {
            Ok(rows) => {
                for (job, row) in batch.into_iter().zip(rows) {
                    let answer = if row.iter().all(|v| v.is_finite()) {
                        Ok(row)
                    } else {
                        Err(Forward::NotFinite)
                    };
                    // The caller may have gone meanwhile; nothing to do then.
                    let _ = job.reply.send(answer);
                }
            }
            Err(error) => {
                stats.failed_batches.fetch_add(1, Ordering::Relaxed);
                metrics().forward_failed("batch");
                tracing::error!(%error, batch_size = batch.len(), "a forward pass failed; its calls fail");
                let error = Arc::new(error);
                for job in batch {
                    let _ = job.reply.send(Err(Forward::Failed(Arc::clone(&error))));
                }
                // A device fault may have taken the model with it: find out
                // before the next batch.
                check_model(embedder, stats);
            }
        }
    }
}

/// Runs the model's self-test and records whether it can run; logs each
/// change.
fn check_model(embedder: &Embedder, stats: &BatchStats) {
    let test = catch_unwind(AssertUnwindSafe(|| crate::reload::self_test(embedder)))
        .unwrap_or_else(|panic| Err(SelfTestError::Panicked(panic_message(&*panic))));
    let runnable = test.is_ok();
    let was = stats.runnable.swap(runnable, Ordering::SeqCst);
    match (was, test) {
        (true, Err(reason)) => {
            tracing::error!(%reason, "the model cannot run: NOT_SERVING until its self-test passes");
        }
        (false, Ok(())) => tracing::info!("the model runs again"),
        _ => {}
    }
}

/// The text of a panic payload (`panic!` gives a `&str` or a `String`).
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

fn run_batch(embedder: &Embedder, batch: &[Job]) -> Result<Vec<Vec<f32>>, ForwardError> {
    let fault = crate::faults::forward();
    match fault {
        Some(ForwardFault::Panic) => panic!("injected forward-pass panic"),
        Some(ForwardFault::DeviceError) => return Err(ForwardError::Injected),
        Some(ForwardFault::NonFinite) | None => {}
    }
    let pixels: Vec<&Tensor> = batch.iter().map(|job| &job.pixels).collect();
    // [N, 3, H, W]
    let stacked = Tensor::f_stack(&pixels, 0).map_err(ForwardError::Stack)?;
    // [N, D], L2-normalised, on the CPU
    let embeddings = embedder.embed_batch(&stacked)?;
    let mut rows = Vec::<Vec<f32>>::try_from(&embeddings).map_err(ForwardError::Read)?;
    if fault == Some(ForwardFault::NonFinite) {
        rows.iter_mut().for_each(|row| row.fill(f32::NAN));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use handid_model::{ClipVisionConfig, DecodeLimits, Device, create_random_checkpoint};

    /// `HANDID_TEST_DEVICE=cuda` runs the forward passes on a GPU (the
    /// device check); unset means the CPU. An unusable device fails.
    fn test_device() -> Device {
        let spec = std::env::var("HANDID_TEST_DEVICE").unwrap_or_else(|_| "cpu".to_owned());
        handid_model::parse_device(&spec).expect("HANDID_TEST_DEVICE")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_share_a_batch_and_a_bad_image_fails_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        create_random_checkpoint(dir.path(), &ClipVisionConfig::tiny_vit(), 5).expect("checkpoint");
        let reference = Embedder::load(dir.path(), Device::Cpu).expect("cpu embedder");
        let embedder = Arc::new(Embedder::load(dir.path(), test_device()).expect("embedder"));
        let settings = BatchSettings {
            max_batch_size: 8,
            max_wait_ms: 200,
            wait_when_idle: false,
        };
        let decoding = Arc::new(Decoding::new(DecodeLimits::default(), 0, 0));
        let batcher = Arc::new(Batcher::start(embedder, &settings, decoding).expect("start"));
        let jpeg = sample_jpeg();
        let calls: Vec<_> = (0..6)
            .map(|i| {
                let batcher = Arc::clone(&batcher);
                let images = if i == 2 {
                    vec![jpeg.clone(), jpeg[..jpeg.len() / 2].to_vec()]
                } else {
                    vec![jpeg.clone()]
                };
                tokio::spawn(async move { batcher.embed(images).await })
            })
            .collect();
        let image = handid_model::decode(&jpeg, &DecodeLimits::default()).expect("decode");
        let pixels = reference.manifest().preprocess.apply(&image).expect("preprocess");
        let want: Vec<f32> =
            Vec::try_from(&reference.embed_batch(&pixels.unsqueeze(0)).expect("embed").get(0)).expect("vec");
        for (i, call) in calls.into_iter().enumerate() {
            let result = call.await.expect("task");
            if i == 2 {
                assert!(
                    matches!(result, Err(BatchError::BadImage { index: 1, .. })),
                    "{result:?}"
                );
                continue;
            }
            let got = result.expect("embed").remove(0);
            let diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(diff < 1e-4, "call {i}: {diff}");
        }
        let (passes, images) = batcher.stats();
        assert_eq!(images, 5, "the bad call's good image was never embedded");
        assert!(passes < images, "{images} images took {passes} forward passes");
    }

    /// A real baseline JPEG with an entropy-coded scan of a few KB.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_call_does_not_wait_for_company() {
        let dir = tempfile::tempdir().expect("tempdir");
        create_random_checkpoint(dir.path(), &ClipVisionConfig::tiny_vit(), 6).expect("checkpoint");
        let embedder = Arc::new(Embedder::load(dir.path(), test_device()).expect("embedder"));
        // A batch window far longer than any forward pass of the tiny model.
        let settings = BatchSettings {
            max_batch_size: 8,
            max_wait_ms: 10_000,
            wait_when_idle: false,
        };
        let decoding = Arc::new(Decoding::new(DecodeLimits::default(), 0, 0));
        let batcher = Batcher::start(embedder, &settings, decoding).expect("start");
        let jpeg = sample_jpeg();
        for _ in 0..3 {
            let started = Instant::now();
            batcher.embed(vec![jpeg.clone()]).await.expect("embed");
            let took = started.elapsed();
            assert!(
                took < Duration::from_secs(5),
                "a lone call waited {took:?} for calls that never came"
            );
        }
        assert_eq!(batcher.stats(), (3, 3));
        assert_eq!(batcher.stats.preparing.load(Ordering::SeqCst), 0);

        // batch.wait_when_idle: the lone call sits out the window.
        let embedder = Arc::new(Embedder::load(dir.path(), test_device()).expect("embedder"));
        let settings = BatchSettings {
            max_batch_size: 8,
            max_wait_ms: 300,
            wait_when_idle: true,
        };
        let decoding = Arc::new(Decoding::new(DecodeLimits::default(), 0, 0));
        let waiting = Batcher::start(embedder, &settings, decoding).expect("start");
        let started = Instant::now();
        waiting.embed(vec![jpeg]).await.expect("embed");
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
    }

    fn sample_jpeg() -> Vec<u8> {
        let image = image::RgbImage::from_fn(64, 48, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 5) as u8, ((x * y) % 256) as u8])
        });
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
            .encode_image(&image)
            .expect("encode jpeg");
        jpeg
    }
}
