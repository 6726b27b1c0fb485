//! `handid-trainer replay`: the offline evaluation, run through a live
//! handid server over gRPC.
//!
//! For each query/gallery split of a manifest (PROTOCOL.md §2) it creates a
//! fresh gallery (`replay-<uuid>-split<i>`), enrols every gallery image,
//! identifies every query with `top_k` = gallery size, turns the returned
//! scores into the query x gallery similarity matrix and scores it with the
//! code of `eval` ([`report_scored`]), then deletes the gallery, also when a
//! call fails or on ctrl-c.
//!
//! Why one subject per gallery **image**: the protocol ranks gallery images,
//! while Identify ranks subjects by the best score over their templates.
//! With one template per subject the two coincide, so every Identify score is
//! exactly one cell of the matrix `eval` would build; the person of each
//! subject is kept here, on the client. Ties are broken by gallery order in
//! [`report_scored`], not by the server's enrolment order, so the concurrent
//! enrolment order does not matter.
//!
//! Calls carry the API key as `authorization: Bearer <key>` metadata; calls
//! refused with UNAVAILABLE or RESOURCE_EXHAUSTED are retried with
//! exponential backoff and jitter, and enrolments carry an idempotency key so
//! a retried Enroll never adds a second template.
//!
//! With `--upgrade-to B` it rehearses a model upgrade instead ([`upgrade`]):
//! M(A,A) with the serving model, the switch to B, M(B,A) (or M(B,T(A))
//! after the templates are transformed) and M(B,B), all through the service.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use handid_eval::data::manifest::{Entry, Manifest};
use handid_eval::report::Report;
use handid_proto::v1::admin_client::AdminClient;
use handid_proto::v1::decision_rule::Rule;
use handid_proto::v1::hand_id_client::HandIdClient;
use handid_proto::v1::{
    DecisionRule, DeleteGalleryRequest, EnrollRequest, IdentifyRequest, IdentifyResponse, Image,
};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use super::eval::{
    Ap, ScoredSplit, bar, dataset_root, eval_options, person_ids, query_gallery_pairs, report_scored,
};

mod upgrade;

pub use upgrade::{Rehearsal, ServedModel, collect_rehearsal, rehearse, report_rehearsal};

/// Arguments of `replay`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The server, e.g. `http://127.0.0.1:50051`.
    #[arg(long)]
    pub server: String,
    /// Split manifest (from `splits`) naming the query/gallery images.
    #[arg(long)]
    pub manifest: PathBuf,
    /// Dataset root (default: the manifest's `root`).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// API key, sent as `authorization: Bearer <key>`; needs the `enroll`
    /// and `identify` scopes (and `admin` with `--upgrade-to`).
    #[arg(long, env = "HANDID_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Enroll / Identify calls in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Use `gallery_all{i}` (other aspects as distractors) as the galleries.
    #[arg(long)]
    pub gallery_all: bool,
    /// Folder for report.md, report.json, report.csv and the plots.
    #[arg(long, visible_alias = "out")]
    pub report: PathBuf,
    /// AP definition of the headline mAP.
    #[arg(long, value_enum, default_value = "non-interpolated")]
    pub ap: Ap,
    /// Retries of a call refused with UNAVAILABLE or RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 6)]
    pub retries: u32,
    /// Deadline of one call, in seconds (with `--upgrade-to`, also how long
    /// the server may take to search the upgraded templates once B serves).
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
    /// Rehearse an upgrade to this checkpoint folder (B, a path on the
    /// server's file system): replay with the serving model A, switch the
    /// server to B, replay B's queries against A's templates, then B alone,
    /// and report M(A,A), M(B,A) and M(B,B). The server is left serving B:
    /// run it on a staging server.
    #[arg(long)]
    pub upgrade_to: Option<PathBuf>,
    /// With `--upgrade-to`, for a B of another embedding space: stage B, map
    /// the stored templates into its space with this transform (from
    /// `fit-transform`) by `handid-server upgrade-templates`, promote B.
    #[arg(long, requires_all = ["upgrade_to", "server_config"])]
    pub transform: Option<PathBuf>,
    /// The server's settings file, which `upgrade-templates` reads (the
    /// database); with `--transform`.
    #[arg(long, requires = "transform")]
    pub server_config: Option<PathBuf>,
    /// The `handid-server` binary that runs `upgrade-templates` (default:
    /// the one next to this executable, else on PATH).
    #[arg(long, requires = "transform")]
    pub server_bin: Option<PathBuf>,
}

/// Runs the command on its own runtime.
pub fn run(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    if args.upgrade_to.is_some() {
        runtime.block_on(rehearse(&args)).map(drop)
    } else {
        runtime.block_on(replay(&args)).map(drop)
    }
}

/// The manifest, read and checked: its splits, person ids and image paths.
struct Plan<'m> {
    pairs: Vec<(Vec<&'m Entry>, Vec<&'m Entry>)>,
    persons: BTreeMap<&'m str, i64>,
    root: PathBuf,
}

impl<'m> Plan<'m> {
    /// Reads the splits of `manifest` as `args` choose them; fails, before
    /// any gallery is created, when one of their images is missing.
    fn new(args: &Args, manifest: &'m Manifest) -> anyhow::Result<Self> {
        let root = dataset_root(args.data.as_deref(), manifest, &args.manifest)?;
        let pairs = query_gallery_pairs(manifest, args.gallery_all, &args.manifest)?;
        let persons = person_ids(&pairs);
        let plan = Self { pairs, persons, root };
        check_images_exist(&plan)?;
        Ok(plan)
    }
}

/// The similarity matrices a replay collected, before scoring.
#[derive(Debug, Clone, PartialEq)]
pub struct Replayed {
    /// One per split, in manifest order.
    pub splits: Vec<ScoredSplit>,
    /// The model that produced every score.
    pub model_id: String,
}

/// Replays the manifest through the server, writes the report and returns it.
pub async fn replay(args: &Args) -> anyhow::Result<Report> {
    let replayed = collect_scores(args).await?;
    let provenance = vec![
        ("server".to_string(), args.server.clone()),
        ("model".to_string(), replayed.model_id),
        ("manifest".to_string(), args.manifest.display().to_string()),
        super::eval::galleries_provenance(args.gallery_all),
    ];
    report_scored(
        "Replay through the gRPC service",
        provenance,
        &replayed.splits,
        eval_options(args.ap),
        &args.report,
    )
}

/// Enrols, identifies and cleans up split after split; returns the query x
/// gallery similarities the server computed.
pub async fn collect_scores(args: &Args) -> anyhow::Result<Replayed> {
    let manifest = Manifest::read(&args.manifest)?;
    let plan = Plan::new(args, &manifest)?;
    let conn = Conn::connect(args).await?;

    let mut splits = Vec::with_capacity(plan.pairs.len());
    let mut model_ids = Vec::new();
    for (i, (query, gallery)) in plan.pairs.iter().enumerate() {
        let gallery_id = format!("replay-{}-split{i}", uuid::Uuid::new_v4().simple());
        let work = replay_split(&conn, &plan, i, &gallery_id, query, gallery);
        // Whatever happens (an error, ctrl-c), the gallery is deleted.
        let outcome = tokio::select! {
            outcome = work => outcome,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        };
        let deleted = conn.delete_gallery(&gallery_id).await;
        let (split, model_id) = outcome.with_context(|| format!("replaying split {i}"))?;
        deleted?;
        model_ids.push(model_id);
        splits.push(split);
    }
    model_ids.dedup();
    if model_ids.len() > 1 {
        bail!(
            "the server's model changed during the replay ({}): the splits are not comparable",
            model_ids.join(", ")
        );
    }
    Ok(Replayed {
        splits,
        model_id: model_ids.concat(),
    })
}

/// Fails, naming a few, when images of the manifest are not on disk: before
/// any gallery is created.
fn check_images_exist(plan: &Plan<'_>) -> anyhow::Result<()> {
    let mut images: Vec<&str> = plan
        .pairs
        .iter()
        .flat_map(|(q, g)| q.iter().chain(g))
        .map(|e| e.image.as_str())
        .collect();
    images.sort_unstable();
    images.dedup();
    let missing: Vec<&str> = images
        .into_iter()
        .filter(|image| !plan.root.join(image).is_file())
        .collect();
    if let Some(first) = missing.first() {
        bail!(
            "{} image(s) of the manifest are missing under {} (first: {first}); pass --data ROOT \
             if the dataset moved",
            missing.len(),
            plan.root.display()
        );
    }
    Ok(())
}

/// Enrols the gallery of split `i`, identifies its queries and returns the
/// similarity matrix with the model id that produced it.
async fn replay_split(
    conn: &Conn,
    plan: &Plan<'_>,
    i: usize,
    gallery_id: &str,
    query: &[&Entry],
    gallery: &[&Entry],
) -> anyhow::Result<(ScoredSplit, String)> {
    let what = format!("split {i}");
    let enrolled = enrol(conn, plan, &what, gallery_id, gallery).await?;
    let (split, answered) = identify(conn, plan, i, &what, gallery_id, query, gallery).await?;
    let mut models: Vec<String> = enrolled.into_iter().chain(answered).collect();
    models.sort_unstable();
    models.dedup();
    let [model_id] = <[String; 1]>::try_from(models)
        .map_err(|m| anyhow::anyhow!("the server's model changed during split {i}: {}", m.join(", ")))?;
    Ok((split, model_id))
}

/// The subject id of gallery image `j`: one subject per image.
fn subject(j: usize) -> String {
    format!("g{j:07}")
}

/// Reads an image of the manifest.
fn read_image(plan: &Plan<'_>, entry: &Entry) -> anyhow::Result<Vec<u8>> {
    let path = plan.root.join(&entry.image);
    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
}

/// Enrols each image of `gallery` as its own subject of `gallery_id` (`what`
/// names the step on the progress bar); returns the model id of every
/// enrolment.
async fn enrol(
    conn: &Conn,
    plan: &Plan<'_>,
    what: &str,
    gallery_id: &str,
    gallery: &[&Entry],
) -> anyhow::Result<Vec<String>> {
    let progress = bar(gallery.len(), &format!("{what}: enrolling"))?;
    // After a failure no new Enroll is sent, but the ones in flight are
    // awaited rather than dropped: a dropped call may still commit on the
    // server after the clean-up deleted the gallery, and re-create it.
    let failed = AtomicBool::new(false);
    let enrolled: Vec<anyhow::Result<Option<String>>> = futures::stream::iter(gallery.iter().enumerate())
        .map(|(j, entry)| {
            let (progress, failed, subject_id) = (&progress, &failed, subject(j));
            async move {
                if failed.load(Ordering::Relaxed) {
                    return Ok(None);
                }
                let request = EnrollRequest {
                    gallery_id: gallery_id.to_owned(),
                    idempotency_key: format!("{gallery_id}/{subject_id}"),
                    subject_id,
                    images: vec![Image {
                        data: read_image(plan, entry)?,
                    }],
                };
                let response = conn
                    .call(
                        |mut client, request| async move { client.enroll(request).await },
                        request,
                    )
                    .await
                    .with_context(|| format!("enrolling {}", entry.image))
                    .inspect_err(|_| failed.store(true, Ordering::Relaxed))?;
                progress.inc(1);
                Ok(Some(response.model_id))
            }
        })
        .buffer_unordered(conn.concurrency)
        .collect()
        .await;
    progress.finish_and_clear();
    Ok(enrolled
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect())
}

/// Identifies every query of split `i` in `gallery_id`, whose subjects are
/// the images of `gallery` enrolled by [`enrol`], with `top_k` = gallery
/// size; returns the similarity matrix and the model id of every answer.
async fn identify(
    conn: &Conn,
    plan: &Plan<'_>,
    i: usize,
    what: &str,
    gallery_id: &str,
    query: &[&Entry],
    gallery: &[&Entry],
) -> anyhow::Result<(ScoredSplit, Vec<String>)> {
    let top_k = u32::try_from(gallery.len()).context("gallery too large")?;
    let columns: HashMap<String, usize> = (0..gallery.len()).map(|j| (subject(j), j)).collect();
    let progress = bar(query.len(), &format!("{what}: identifying"))?;
    let rows: Vec<(usize, Vec<f64>, String)> = futures::stream::iter(query.iter().enumerate())
        .map(|(q, entry)| {
            let (progress, columns) = (&progress, &columns);
            async move {
                let response = conn
                    .identify(gallery_id, read_image(plan, entry)?, top_k)
                    .await
                    .with_context(|| format!("identifying {}", entry.image))?;
                let mut row = vec![f64::NAN; columns.len()];
                for candidate in &response.candidates {
                    let Some(&j) = columns.get(&candidate.subject_id) else {
                        bail!(
                            "Identify returned subject {:?}, which replay did not enrol",
                            candidate.subject_id
                        );
                    };
                    row[j] = f64::from(candidate.score);
                }
                if response.candidates.len() != columns.len() || row.iter().any(|s| s.is_nan()) {
                    bail!(
                        "Identify of {} returned {} of the {} gallery subjects (gallery size {})",
                        entry.image,
                        response.candidates.len(),
                        columns.len(),
                        response.gallery_size
                    );
                }
                progress.inc(1);
                Ok((q, row, response.model_id))
            }
        })
        .buffer_unordered(conn.concurrency)
        .try_collect()
        .await?;
    progress.finish_and_clear();

    let mut sim = vec![0.0; query.len() * gallery.len()];
    let mut models = Vec::with_capacity(rows.len());
    for (q, row, model_id) in rows {
        sim[q * gallery.len()..(q + 1) * gallery.len()].copy_from_slice(&row);
        models.push(model_id);
    }
    let ids = |entries: &[&Entry]| -> Vec<i64> {
        entries.iter().map(|e| plan.persons[e.person.as_str()]).collect()
    };
    Ok((
        ScoredSplit {
            name: i.to_string(),
            sim,
            query_ids: ids(query),
            gallery_ids: ids(gallery),
        },
        models,
    ))
}

/// Turns Identify's "top_k out of range" into the setting to change.
fn explain_top_k(error: anyhow::Error, top_k: u32) -> anyhow::Error {
    let refused = error
        .downcast_ref::<CallError>()
        .is_some_and(|e| e.status.code() == Code::InvalidArgument && e.status.message().contains("top_k"));
    if refused {
        error.context(format!(
            "the server refuses top_k = {top_k} (the gallery size): raise `limits.max_top_k` \
             (HANDID__LIMITS__MAX_TOP_K) in the server settings to at least {top_k}"
        ))
    } else {
        error
    }
}

/// A call that failed for good, with what the caller should do about it.
#[derive(Debug, thiserror::Error)]
#[error("{advice} ({code:?}: {message})", code = .status.code(), message = .status.message())]
struct CallError {
    status: Status,
    advice: String,
}

impl CallError {
    fn new(status: Status, retries: u32) -> Self {
        let advice = match status.code() {
            Code::Unauthenticated => {
                "the server wants an API key: pass --api-key or set HANDID_API_KEY".to_string()
            }
            Code::PermissionDenied => {
                "the API key lacks a scope replay needs (`enroll` and `identify`, and `admin` with \
                 --upgrade-to)"
                    .to_string()
            }
            Code::Unavailable | Code::ResourceExhausted => {
                format!("the server still refused after {retries} retries with backoff")
            }
            Code::DeadlineExceeded | Code::Cancelled => {
                "the call ran past --timeout-s; raise it or lower --concurrency".to_string()
            }
            _ => "the server refused the call".to_string(),
        };
        Self { status, advice }
    }
}

/// A connected client with the API key and the retry policy.
struct Conn {
    client: HandIdClient<Channel>,
    admin: AdminClient<Channel>,
    authorization: Option<MetadataValue<Ascii>>,
    concurrency: usize,
    retries: u32,
}

impl Conn {
    /// Connects, failing clearly when the server cannot be reached.
    async fn connect(args: &Args) -> anyhow::Result<Self> {
        let authorization = args.api_key.as_deref().map(bearer).transpose()?;
        let endpoint = Endpoint::from_shared(args.server.clone())
            .with_context(|| format!("--server {:?} is not a URL (e.g. http://host:50051)", args.server))?
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(args.timeout_s.max(1)));
        let channel = endpoint.connect().await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the handid server at {}: {e} ({}); is it running, and is --server right?",
                args.server,
                std::error::Error::source(&e).map_or_else(String::new, ToString::to_string)
            )
        })?;
        Ok(Self {
            client: HandIdClient::new(channel.clone()),
            admin: AdminClient::new(channel),
            authorization,
            concurrency: args.concurrency.max(1),
            retries: args.retries,
        })
    }

    /// Makes one HandId call with [`Self::retried`].
    async fn call<M, T, F, Fut>(&self, call: F, message: M) -> anyhow::Result<T>
    where
        M: Clone,
        F: Fn(HandIdClient<Channel>, Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.retried(&self.client, call, message).await
    }

    /// Makes one Admin call with [`Self::retried`].
    async fn admin_call<M, T, F, Fut>(&self, call: F, message: M) -> anyhow::Result<T>
    where
        M: Clone,
        F: Fn(AdminClient<Channel>, Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.retried(&self.admin, call, message).await
    }

    /// Makes one call on `client`, retrying UNAVAILABLE and
    /// RESOURCE_EXHAUSTED with exponential backoff (0.2 s doubling, at most
    /// 10 s) and full jitter (AWS Architecture Blog, "Exponential Backoff
    /// And Jitter", 2015), so that concurrent callers shed by the server do
    /// not return in step.
    async fn retried<C, M, T, F, Fut>(&self, client: &C, call: F, message: M) -> anyhow::Result<T>
    where
        C: Clone,
        M: Clone,
        F: Fn(C, Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut attempt = 0;
        loop {
            match call(
                client.clone(),
                authorized(self.authorization.as_ref(), message.clone()),
            )
            .await
            {
                Ok(response) => return Ok(response.into_inner()),
                Err(status)
                    if matches!(status.code(), Code::Unavailable | Code::ResourceExhausted)
                        && attempt < self.retries =>
                {
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
                Err(status) => return Err(CallError::new(status, self.retries).into()),
            }
        }
    }

    /// Identifies `image` in `gallery_id` with `top_k` candidates.
    async fn identify(
        &self,
        gallery_id: &str,
        image: Vec<u8>,
        top_k: u32,
    ) -> anyhow::Result<IdentifyResponse> {
        let request = IdentifyRequest {
            gallery_id: gallery_id.to_owned(),
            image: Some(Image { data: image }),
            top_k,
            // Decisions are not used; an explicit threshold keeps
            // uncalibrated checkpoints usable.
            rule: Some(DecisionRule {
                rule: Some(Rule::Threshold(1.0)),
            }),
        };
        self.call(
            |mut client, request| async move { client.identify(request).await },
            request,
        )
        .await
        .map_err(|e| explain_top_k(e, top_k))
    }

    /// Deletes a replay gallery (a gallery never created is not an error).
    async fn delete_gallery(&self, gallery_id: &str) -> anyhow::Result<()> {
        let request = DeleteGalleryRequest {
            gallery_id: gallery_id.to_owned(),
        };
        match self
            .call(
                |mut client, request| async move { client.delete_gallery(request).await },
                request,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e)
                if e.downcast_ref::<CallError>()
                    .is_some_and(|c| c.status.code() == Code::NotFound) =>
            {
                Ok(())
            }
            Err(e) => Err(e.context(format!(
                "deleting the replay gallery {gallery_id}; delete it by hand"
            ))),
        }
    }
}

/// The metadata value of `key`: `Bearer <key>`.
fn bearer(key: &str) -> anyhow::Result<MetadataValue<Ascii>> {
    format!("Bearer {key}")
        .parse::<MetadataValue<Ascii>>()
        .context("the API key holds characters not allowed in gRPC metadata")
}

/// `message` as a request carrying the API key, if any, as
/// `authorization: Bearer <key>`.
fn authorized<T>(authorization: Option<&MetadataValue<Ascii>>, message: T) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(value) = authorization {
        request.metadata_mut().insert("authorization", value.clone());
    }
    request
}

/// The wait before retry `attempt` (0-based): uniform in [0, min(10 s, 0.2 s * 2^attempt)].
fn backoff(attempt: u32) -> Duration {
    let cap = Duration::from_millis(200)
        .saturating_mul(1 << attempt.min(16))
        .min(Duration::from_secs(10));
    // A fresh RandomState is randomly keyed: a jitter source without a
    // random-number crate.
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u32(attempt);
    cap.mul_f64((hasher.finish() >> 11) as f64 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 0..30 {
            let cap = (0.2 * 2f64.powi(attempt as i32)).min(10.0);
            for _ in 0..20 {
                let wait = backoff(attempt).as_secs_f64();
                assert!((0.0..=cap).contains(&wait), "attempt {attempt}: {wait} s");
            }
        }
        // Jitter: twenty draws are not all equal.
        let draws: Vec<Duration> = (0..20).map(|_| backoff(5)).collect();
        assert!(draws.iter().any(|d| *d != draws[0]));
    }

    #[test]
    fn the_api_key_travels_as_a_bearer_token() {
        let key = bearer("k3y-abc").expect("ascii key");
        let request = authorized(Some(&key), ());
        let sent = request.metadata().get("authorization").map(|v| v.to_str().ok());
        assert_eq!(sent, Some(Some("Bearer k3y-abc")));
        assert!(authorized(None, ()).metadata().get("authorization").is_none());
        assert!(bearer("line\nbreak").is_err());
    }

    #[test]
    fn call_errors_say_what_to_do() {
        let e = CallError::new(Status::unauthenticated("no key"), 3);
        assert!(e.to_string().contains("HANDID_API_KEY"), "{e}");
        let e = CallError::new(Status::unavailable("db down"), 3);
        assert!(e.to_string().contains("after 3 retries"), "{e}");
        let e = explain_top_k(
            CallError::new(Status::invalid_argument("top_k must be 1..=10, got 12"), 3).into(),
            12,
        );
        assert!(format!("{e:#}").contains("limits.max_top_k"), "{e:#}");
        let e = explain_top_k(
            CallError::new(Status::invalid_argument("not an image"), 3).into(),
            12,
        );
        assert!(!format!("{e:#}").contains("max_top_k"), "{e:#}");
    }
}
