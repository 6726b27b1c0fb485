//! `handid-trainer eval`: scores query/gallery splits and writes the report
//! (Markdown, JSON, CSV, PNG plots). Two sources of vectors share one
//! scoring and report path ([`score_and_report`]):
//! - `--embeddings FILE`: precomputed vectors (format: `handid_eval::embeddings`);
//! - `--model DIR --manifest FILE`: a serving checkpoint embeds every image the
//!   manifest's query/gallery splits name, once per image;
//! - `--query-model B --gallery-model A --manifest FILE`: across models, as
//!   after an upgrade that kept the old templates: B embeds the queries, A
//!   the galleries; the report adds M(A,A) and M(B,B) (each also written
//!   whole under `old-old/` and `new-new/`) and the compatibility criterion
//!   of backward-compatible training.
//!
//! `replay` (the same evaluation through the live gRPC service) reads the
//! manifest with [`query_gallery_pairs`] and [`person_ids`] and reports with
//! [`report_scored`] (an upgrade's rehearsal with [`report_across`]), so
//! both commands rank and score in one way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use handid_eval::data::manifest::{Entry, Manifest};
use handid_eval::embeddings::{self, SplitEmbeddings, Vectors};
use handid_eval::metrics::Similarity;
use handid_eval::metrics::rank::ApKind;
use handid_eval::metrics::summary::{EvalOptions, SplitEvaluation};
use handid_eval::report::{Compatibility, Report};
use handid_model::{DecodeLimits, Embedder, TemplateTransform};
use indicatif::{ProgressBar, ProgressStyle};
use tch::Tensor;

/// AP definitions on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Ap {
    /// torchreid / CLIP-FH.
    NonInterpolated,
    /// Market-1501 original / MBA-Net.
    Trapezoid,
}

/// Arguments of `eval`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["embeddings", "model", "query_model"])))]
pub struct Args {
    /// Safetensors file with `query{i}`, `gallery{i}` (F32 [n, dim]) and
    /// `query{i}_ids`, `gallery{i}_ids` (I64 [n]) for each split i.
    #[arg(long)]
    pub embeddings: Option<PathBuf>,
    /// Serving checkpoint folder to embed the images with.
    #[arg(long, requires = "manifest")]
    pub model: Option<PathBuf>,
    /// Across models: the (new) checkpoint that embeds the queries.
    #[arg(long, requires_all = ["gallery_model", "manifest"])]
    pub query_model: Option<PathBuf>,
    /// Across models: the (old) checkpoint whose embeddings the galleries
    /// hold.
    #[arg(long, requires = "query_model")]
    pub gallery_model: Option<PathBuf>,
    /// Across models: the gallery's old embeddings are first mapped into
    /// the query model's space by this transform (`fit-transform`).
    #[arg(long, requires = "gallery_model")]
    pub transform: Option<PathBuf>,
    /// Across models, with a transform fitted with side-information: the
    /// side-information model (a serving checkpoint) whose features of the
    /// gallery images the transform takes beside the old embeddings.
    #[arg(long, requires = "transform")]
    pub side_info: Option<PathBuf>,
    /// Split manifest (from `splits`) naming the query/gallery images.
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// Dataset root (default: the manifest's `root`).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Use `gallery_all{i}` (other aspects as distractors) as the galleries.
    #[arg(long)]
    pub gallery_all: bool,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Also save the computed embeddings (reusable with `--embeddings`);
    /// across models, those of M(B,A): B's queries, A's galleries (mapped
    /// by the transform when there is one).
    #[arg(long)]
    pub save_embeddings: Option<PathBuf>,
    /// Folder for report.md, report.json, report.csv and the plots.
    #[arg(long)]
    pub out: PathBuf,
    /// AP definition of the headline mAP.
    #[arg(long, value_enum, default_value = "non-interpolated")]
    pub ap: Ap,
}

pub(crate) fn bar(len: usize, what: &str) -> anyhow::Result<ProgressBar> {
    let style =
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}").context("progress style")?;
    Ok(ProgressBar::new(len as u64)
        .with_style(style)
        .with_message(what.to_string()))
}

/// One split ready for scoring: its query x gallery similarity matrix
/// (row-major) and the person id of every row and column.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredSplit {
    /// Split name (its index).
    pub name: String,
    /// `[n_query * n_gallery]` similarities, row `q` at `q * n_gallery`.
    pub sim: Vec<f64>,
    /// Person of each query.
    pub query_ids: Vec<i64>,
    /// Person of each gallery item.
    pub gallery_ids: Vec<i64>,
}

/// The report's provenance line naming which galleries were searched.
pub fn galleries_provenance(gallery_all: bool) -> (String, String) {
    let name = if gallery_all {
        "gallery_all{i}"
    } else {
        "gallery{i}"
    };
    ("galleries".to_owned(), name.to_owned())
}

/// The options of the command line's AP choice.
pub fn eval_options(ap: Ap) -> EvalOptions {
    EvalOptions {
        ap: match ap {
            Ap::NonInterpolated => ApKind::NonInterpolated,
            Ap::Trapezoid => ApKind::Trapezoid,
        },
        ..EvalOptions::default()
    }
}

/// Computes every figure of every split, writes the report to `out`, prints
/// its summary and returns it. The one scoring path of `eval` and `replay`.
pub fn report_scored(
    title: &str,
    provenance: Vec<(String, String)>,
    splits: &[ScoredSplit],
    options: EvalOptions,
    out: &Path,
) -> anyhow::Result<Report> {
    let report = build_report(title, provenance, splits, options)?;
    publish(&report, out)?;
    Ok(report)
}

/// Every figure of every split, as a report (not written).
fn build_report(
    title: &str,
    provenance: Vec<(String, String)>,
    splits: &[ScoredSplit],
    options: EvalOptions,
) -> anyhow::Result<Report> {
    let progress = bar(splits.len(), "scoring splits")?;
    let mut evaluations = Vec::with_capacity(splits.len());
    for split in splits {
        let sim = Similarity::new(&split.sim, split.query_ids.len(), split.gallery_ids.len())?;
        let evaluation =
            SplitEvaluation::new(&split.name, &sim, &split.query_ids, &split.gallery_ids, &options)
                .with_context(|| format!("evaluating split {}", split.name))?;
        evaluations.push(evaluation);
        progress.inc(1);
    }
    progress.finish_and_clear();
    Ok(Report::new(title, provenance, options, evaluations)?)
}

/// Writes `report` to `out` and prints its summary.
fn publish(report: &Report, out: &Path) -> anyhow::Result<()> {
    let written = report
        .write(out)
        .with_context(|| format!("writing the report to {}", out.display()))?;
    print!(
        "{}",
        report
            .markdown()
            .split("\n## Per split")
            .next()
            .unwrap_or_default()
    );
    for path in written {
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Scores every split by the cosine similarity of its vectors, writes the
/// report and prints its summary.
fn score_and_report(
    title: &str,
    provenance: Vec<(String, String)>,
    splits: &[SplitEmbeddings],
    options: EvalOptions,
    out: &Path,
) -> anyhow::Result<Report> {
    report_scored(title, provenance, &scored(splits)?, options, out)
}

/// Each split's cosine similarities.
fn scored(splits: &[SplitEmbeddings]) -> anyhow::Result<Vec<ScoredSplit>> {
    splits
        .iter()
        .map(|split| {
            Ok(ScoredSplit {
                name: split.name.clone(),
                sim: embeddings::cosine_similarity(&split.query, &split.gallery)?,
                query_ids: split.query.ids.clone(),
                gallery_ids: split.gallery.ids.clone(),
            })
        })
        .collect()
}

/// The dataset root: `data` when given, else the manifest's `root`.
pub fn dataset_root(
    data: Option<&Path>,
    manifest: &Manifest,
    manifest_path: &Path,
) -> anyhow::Result<PathBuf> {
    match (data, manifest.meta("root")) {
        (Some(data), _) => Ok(data.to_owned()),
        (None, Some(root)) => Ok(PathBuf::from(root)),
        (None, None) => bail!("{} records no root: pass --data", manifest_path.display()),
    }
}

/// The (query{i}, gallery{i}) pairs of the manifest for i = 0, 1, ... while
/// `query{i}` exists; `gallery_all{i}` instead of `gallery{i}` when asked.
pub fn query_gallery_pairs<'m>(
    manifest: &'m Manifest,
    gallery_all: bool,
    manifest_path: &Path,
) -> anyhow::Result<Vec<(Vec<&'m Entry>, Vec<&'m Entry>)>> {
    let gallery_prefix = if gallery_all { "gallery_all" } else { "gallery" };
    let mut pairs = Vec::new();
    while !manifest.split(&format!("query{}", pairs.len())).is_empty() {
        let i = pairs.len();
        let gallery = manifest.split(&format!("{gallery_prefix}{i}"));
        if gallery.is_empty() {
            bail!(
                "{} has query{i} but no {gallery_prefix}{i}",
                manifest_path.display()
            );
        }
        pairs.push((manifest.split(&format!("query{i}")), gallery));
    }
    if pairs.is_empty() {
        bail!("{} has no query0 split", manifest_path.display());
    }
    Ok(pairs)
}

/// Person names as integer ids: sorted, so stable across runs and equal in
/// `eval` and `replay`.
pub fn person_ids<'m>(pairs: &[(Vec<&'m Entry>, Vec<&'m Entry>)]) -> BTreeMap<&'m str, i64> {
    let mut names: Vec<&str> = pairs
        .iter()
        .flat_map(|(q, g)| q.iter().chain(g))
        .map(|e| e.person.as_str())
        .collect();
    names.sort_unstable();
    names.dedup();
    names.into_iter().zip(0..).collect()
}

/// Embeds the manifest's query/gallery images with the checkpoint, each
/// image once, and returns one [`SplitEmbeddings`] per split and the
/// checkpoint's model id.
fn embed_manifest(
    args: &Args,
    model: &Path,
    manifest_path: &Path,
) -> anyhow::Result<(Vec<SplitEmbeddings>, String)> {
    let manifest = Manifest::read(manifest_path)?;
    let root = dataset_root(args.data.as_deref(), &manifest, manifest_path)?;
    let pairs = query_gallery_pairs(&manifest, args.gallery_all, manifest_path)?;
    let persons = person_ids(&pairs);
    let mut cache: BTreeMap<&str, Vec<f32>> = pairs
        .iter()
        .flat_map(|(q, g)| q.iter().chain(g))
        .map(|e| (e.image.as_str(), Vec::new()))
        .collect();

    let device = handid_model::parse_device(&args.device).context("choosing the device")?;
    let embedder = Embedder::load(model, device).with_context(|| format!("loading {}", model.display()))?;
    let images: Vec<&str> = cache.keys().copied().collect();
    for (image, vector) in embed_files(&embedder, &root, &images, args.batch_size)? {
        cache.insert(image, vector);
    }

    let vectors = |entries: &[&Entry]| -> anyhow::Result<Vectors> {
        let values = entries
            .iter()
            .flat_map(|e| cache[e.image.as_str()].iter().copied())
            .collect();
        let ids = entries.iter().map(|e| persons[e.person.as_str()]).collect();
        Ok(Vectors::new(values, embedder.dim(), ids)?)
    };
    let splits = pairs
        .iter()
        .enumerate()
        .map(|(i, (q, g))| {
            Ok(SplitEmbeddings {
                name: i.to_string(),
                query: vectors(q)?,
                gallery: vectors(g)?,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok((splits, embedder.model_id().to_owned()))
}

/// Embeds each of `images` (paths under `root`) with `embedder`, `batch`
/// at a time, behind a progress bar: (image, embedding) in order.
pub(crate) fn embed_files<'i>(
    embedder: &Embedder,
    root: &Path,
    images: &[&'i str],
    batch: usize,
) -> anyhow::Result<Vec<(&'i str, Vec<f32>)>> {
    let progress = bar(images.len(), "embedding images")?;
    let mut out = Vec::with_capacity(images.len());
    for chunk in images.chunks(batch.max(1)) {
        let decoded = chunk
            .iter()
            .map(|image| {
                let path = root.join(image);
                let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                handid_model::decode(&bytes, &DecodeLimits::default())
                    .with_context(|| format!("decoding {}", path.display()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let features = embedder.embed_images(&decoded).context("embedding a batch")?;
        let flat: Vec<f32> = Vec::<f32>::try_from(features.flatten(0, -1)).context("reading embeddings")?;
        out.extend(
            chunk
                .iter()
                .copied()
                .zip(flat.chunks(embedder.dim()).map(<[f32]>::to_vec)),
        );
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    Ok(out)
}

/// Evaluates new queries (`query_model`, B) against old galleries
/// (`gallery_model`, A), with M(A,A) and M(B,B) beside it.
fn across_models(
    args: &Args,
    query_model: &Path,
    gallery_model: &Path,
    manifest: &Path,
) -> anyhow::Result<Report> {
    let options = eval_options(args.ap);
    // The transform and its side-information are checked before anything
    // is embedded; the models it maps, once their ids are known.
    let transform = match &args.transform {
        Some(dir) => {
            let device = handid_model::parse_device(&args.device).context("choosing the device")?;
            Some(
                TemplateTransform::load(dir, device)
                    .with_context(|| format!("loading the transform {}", dir.display()))?,
            )
        }
        None => None,
    };
    let side_model = match (transform.as_ref().and_then(|t| t.side_info()), &args.side_info) {
        (None, None) => None,
        (None, Some(_)) => bail!(
            "the transform {} was fitted without side-information: drop --side-info",
            args.transform
                .as_deref()
                .map(Path::display)
                .map(|d| d.to_string())
                .unwrap_or_default()
        ),
        (Some(info), None) => bail!(
            "the transform was fitted with the side-information of model {}: pass that model as --side-info",
            short(&info.model)
        ),
        (Some(info), Some(dir)) => Some((info, dir)),
    };
    let (old, old_id) = embed_manifest(args, gallery_model, manifest)?;
    let (new, new_id) = embed_manifest(args, query_model, manifest)?;
    if let (Some(t), Some(dir)) = (&transform, &args.transform) {
        let t = t.manifest();
        if t.from_model != old_id || t.to_model != new_id {
            bail!(
                "the transform {} maps model {} to {}, not the gallery model {} to the query model {}",
                dir.display(),
                short(&t.from_model),
                short(&t.to_model),
                short(&old_id),
                short(&new_id)
            );
        }
    }
    // The gallery images' side-information, when the transform takes it.
    let side = match side_model {
        Some((info, dir)) => {
            let (side, side_id) = embed_manifest(args, dir, manifest)?;
            if side_id != info.model {
                bail!(
                    "--side-info {} is model {}, the transform was fitted with the side-information of model {}",
                    dir.display(),
                    short(&side_id),
                    short(&info.model)
                );
            }
            Some(side)
        }
        None => None,
    };
    let (old_dim, new_dim) = (
        transform
            .as_ref()
            .map_or(old[0].gallery.dim, |t| t.manifest().to_dim),
        new[0].query.dim,
    );
    if old_dim != new_dim {
        bail!(
            "the query model embeds in {new_dim} dimensions, the gallery model in {old_dim}: their \
             vectors cannot be compared (a template transform maps one space into the other)"
        );
    }
    let provenance = |what: &str| {
        vec![
            (
                "query model".to_string(),
                format!("{} ({})", query_model.display(), short(&new_id)),
            ),
            (
                "gallery model".to_string(),
                format!("{} ({})", gallery_model.display(), short(&old_id)),
            ),
            ("manifest".to_string(), manifest.display().to_string()),
            galleries_provenance(args.gallery_all),
            ("searched".to_string(), what.to_string()),
        ]
    };
    let crossed: Vec<SplitEmbeddings> = new
        .iter()
        .zip(&old)
        .enumerate()
        .map(|(i, (n, o))| {
            let gallery = match &transform {
                Some(t) => transformed(t, &o.gallery, side.as_ref().map(|s| &s[i].gallery))?,
                None => o.gallery.clone(),
            };
            Ok(SplitEmbeddings {
                name: n.name.clone(),
                query: n.query.clone(),
                gallery,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    if let Some(path) = &args.save_embeddings {
        embeddings::write(path, &crossed).with_context(|| format!("saving {}", path.display()))?;
    }
    report_across(
        &Across {
            old_model: format!("{} ({})", gallery_model.display(), short(&old_id)),
            new_model: format!("{} ({})", query_model.display(), short(&new_id)),
            old_old: &scored(&old)?,
            new_new: &scored(&new)?,
            new_old: &scored(&crossed)?,
            transform: args.transform.as_ref().map(|d| d.display().to_string()),
        },
        &provenance,
        options,
        &args.out,
    )
}

/// The three searches of a model upgrade, scored: old model alone, new
/// model alone, new queries against the old galleries (mapped by a
/// transform when there is one).
#[derive(Debug, Clone)]
pub struct Across<'a> {
    /// The old model (A), as the report names it.
    pub old_model: String,
    /// The new model (B), as the report names it.
    pub new_model: String,
    /// M(A,A): A's queries against A's galleries.
    pub old_old: &'a [ScoredSplit],
    /// M(B,B): B's queries against B's galleries.
    pub new_new: &'a [ScoredSplit],
    /// M(B,A) or M(B,T(A)): B's queries against A's galleries.
    pub new_old: &'a [ScoredSplit],
    /// The transform applied to A's galleries, if any.
    pub transform: Option<String>,
}

/// Reports an upgrade's three searches, the one report of `eval
/// --query-model --gallery-model` and `replay --upgrade-to`: M(A,A) and
/// M(B,B) written whole under `out/old-old/` and `out/new-new/`, M(B,A)
/// (or M(B,T(A))) under `out/` with the [`Compatibility`] section.
/// `provenance` gives the report's provenance lines for what was searched.
pub fn report_across(
    across: &Across<'_>,
    provenance: &dyn Fn(&str) -> Vec<(String, String)>,
    options: EvalOptions,
    out: &Path,
) -> anyhow::Result<Report> {
    let old_old = report_scored(
        "Old model alone: M(A,A)",
        provenance("old queries, old galleries"),
        across.old_old,
        options.clone(),
        &out.join("old-old"),
    )?;
    let new_new = report_scored(
        "New model alone: M(B,B)",
        provenance("new queries, new galleries"),
        across.new_new,
        options.clone(),
        &out.join("new-new"),
    )?;
    let (title, searched) = match &across.transform {
        Some(t) => (
            "Across models: new queries, transformed old galleries, M(B,T(A))".to_owned(),
            format!("new queries, old galleries mapped by the transform {t}"),
        ),
        None => (
            "Across models: new queries, old galleries, M(B,A)".to_owned(),
            "new queries, old galleries".to_owned(),
        ),
    };
    let mut report = build_report(&title, provenance(&searched), across.new_old, options)?;
    let figures = |r: &Report| {
        (
            r.mean("mAP").unwrap_or(f64::NAN),
            r.mean("rank1").unwrap_or(f64::NAN),
        )
    };
    report.compatibility = Some(Compatibility {
        old_model: across.old_model.clone(),
        new_model: across.new_model.clone(),
        old_old: figures(&old_old),
        new_new: figures(&new_new),
        new_old: figures(&report),
        transform: across.transform.clone(),
    });
    publish(&report, out)?;
    Ok(report)
}

/// Old gallery vectors mapped into the new space by `transform`, with the
/// same images' side-information when the transform takes it.
fn transformed(
    transform: &TemplateTransform,
    old: &Vectors,
    side: Option<&Vectors>,
) -> anyhow::Result<Vectors> {
    let rows = |v: &Vectors| Tensor::from_slice(&v.values).view([v.ids.len() as i64, v.dim as i64]);
    let side = side.map(rows);
    let mapped = transform.apply(&rows(old), side.as_ref())?;
    let values = Vec::<f32>::try_from(mapped.to_device(tch::Device::Cpu).flatten(0, -1))?;
    Ok(Vectors::new(
        values,
        transform.manifest().to_dim,
        old.ids.clone(),
    )?)
}

/// A model id's first 12 hex digits, as logs show it.
pub(crate) fn short(model_id: &str) -> &str {
    model_id.get(..12).unwrap_or(model_id)
}

/// Runs the command.
pub fn run(args: Args) -> anyhow::Result<()> {
    evaluate(&args).map(drop)
}

/// Evaluates as `args` say, writes the report and returns it.
pub fn evaluate(args: &Args) -> anyhow::Result<Report> {
    let options = eval_options(args.ap);
    if let (Some(query_model), Some(gallery_model), Some(manifest)) =
        (&args.query_model, &args.gallery_model, &args.manifest)
    {
        return across_models(args, query_model, gallery_model, manifest);
    }
    match (&args.embeddings, &args.model, &args.manifest) {
        (Some(file), _, _) => {
            let splits = embeddings::read(file).context("reading the embeddings")?;
            let provenance = vec![("embeddings".to_string(), file.display().to_string())];
            score_and_report(
                "Evaluation of precomputed embeddings",
                provenance,
                &splits,
                options,
                &args.out,
            )
        }
        (None, Some(model), Some(manifest)) => {
            let (splits, _) = embed_manifest(args, model, manifest)?;
            if let Some(path) = &args.save_embeddings {
                embeddings::write(path, &splits).with_context(|| format!("saving {}", path.display()))?;
            }
            let provenance = vec![
                ("model".to_string(), model.display().to_string()),
                ("manifest".to_string(), manifest.display().to_string()),
                galleries_provenance(args.gallery_all),
            ];
            score_and_report(
                "Evaluation of a checkpoint",
                provenance,
                &splits,
                options,
                &args.out,
            )
        }
        _ => bail!(
            "pass --embeddings FILE, --model DIR with --manifest FILE, or --query-model B \
             --gallery-model A with --manifest FILE"
        ),
    }
}
