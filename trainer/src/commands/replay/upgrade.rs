//! `replay --upgrade-to B`: a model upgrade (issue #18) rehearsed through
//! the live service, on the manifest's splits:
//! 1. GetModel: the serving model is A;
//! 2. every split's gallery is enrolled with A in a fresh gallery
//!    (`replay-<uuid>-a-split<i>`) and its queries are identified: M(A,A);
//! 3. the server switches to B. Without a transform, ReloadModel swaps it in,
//!    which the server allows only for a B that declares A's embedding space
//!    compatible (what backward-compatible training makes); with one,
//!    ReloadModel stages B, `handid-server upgrade-templates` (a child
//!    process) maps the stored templates of A into B's space, GetModel must
//!    show every replay gallery covered, and PromoteModel makes B active;
//! 4. the same queries, embedded by B now, are identified against the
//!    templates enrolled with A (or their transforms): M(B,A) or M(B,T(A));
//! 5. the galleries are enrolled again with B in fresh galleries
//!    (`replay-<uuid>-b-split<i>`): M(B,B);
//! 6. every gallery it created is deleted, also on an error or ctrl-c;
//! 7. the report is `eval --query-model B --gallery-model A [--transform T]`'s
//!    ([`report_across`]), Compatibility section included.
//!
//! The server is left serving B (RollbackModel returns to A), and
//! `upgrade-templates` maps every template of A in the database, not only
//! the replay's: a rehearsal belongs on a staging server.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use handid_eval::data::manifest::Manifest;
use handid_eval::report::Report;
use handid_model::transform::{TemplateTransform, TransformManifest};
use handid_proto::v1::{
    GetModelRequest, GetModelResponse, ModelInfo, PromoteModelRequest, ReloadMode, ReloadModelRequest,
    ReloadModelResponse,
};
use tonic::Code;

use super::{Args, CallError, Conn, Plan, enrol, identify, read_image};
use crate::commands::eval::{Across, ScoredSplit, eval_options, galleries_provenance, report_across, short};

/// A model as the server reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedModel {
    /// Hash of its weights.
    pub model_id: String,
    /// Its checkpoint folder on the server.
    pub path: String,
}

impl ServedModel {
    /// `info`, which the server must have sent (`what` names it).
    fn from_info(info: Option<&ModelInfo>, what: &str) -> anyhow::Result<Self> {
        let info = info.with_context(|| format!("the server's answer lacks the {what} model"))?;
        Ok(Self {
            model_id: info.model_id.clone(),
            path: info.path.clone(),
        })
    }

    /// `folder (id)`, as reports name a model.
    fn named(&self) -> String {
        format!("{} ({})", self.path, short(&self.model_id))
    }
}

/// The similarity matrices of a rehearsal, before scoring; one per split
/// each, in manifest order.
#[derive(Debug, Clone, PartialEq)]
pub struct Rehearsal {
    /// The model serving before the switch (A).
    pub old: ServedModel,
    /// The model serving after it (B).
    pub new: ServedModel,
    /// A's queries against A's templates.
    pub old_old: Vec<ScoredSplit>,
    /// B's queries against the templates enrolled with A (mapped into B's
    /// space when the switch had a transform).
    pub new_old: Vec<ScoredSplit>,
    /// B's queries against B's templates.
    pub new_new: Vec<ScoredSplit>,
}

/// Rehearses the upgrade `args` describe, writes the report and returns it.
pub async fn rehearse(args: &Args) -> anyhow::Result<Report> {
    let rehearsal = collect_rehearsal(args).await?;
    let report = report_rehearsal(args, &rehearsal)?;
    println!(
        "the server now serves model {} from {} (RollbackModel returns to model {})",
        short(&rehearsal.new.model_id),
        rehearsal.new.path,
        short(&rehearsal.old.model_id)
    );
    Ok(report)
}

/// Writes the report of a rehearsal to `args.report` (M(A,A) under
/// `old-old/`, M(B,B) under `new-new/`) and returns the M(B,A) one, with
/// its Compatibility section.
pub fn report_rehearsal(args: &Args, rehearsal: &Rehearsal) -> anyhow::Result<Report> {
    let switch = match &args.transform {
        Some(t) => format!(
            "staged, templates upgraded by `handid-server upgrade-templates --transform {}`, promoted",
            t.display()
        ),
        None => "swapped in by ReloadModel (a compatible embedding space)".to_owned(),
    };
    let provenance = |what: &str| {
        vec![
            ("server".to_owned(), args.server.clone()),
            ("old model".to_owned(), rehearsal.old.named()),
            ("new model".to_owned(), rehearsal.new.named()),
            ("switch".to_owned(), switch.clone()),
            ("manifest".to_owned(), args.manifest.display().to_string()),
            galleries_provenance(args.gallery_all),
            ("searched".to_owned(), what.to_owned()),
        ]
    };
    report_across(
        &Across {
            old_model: rehearsal.old.named(),
            new_model: rehearsal.new.named(),
            old_old: &rehearsal.old_old,
            new_new: &rehearsal.new_new,
            new_old: &rehearsal.new_old,
            transform: args.transform.as_ref().map(|t| t.display().to_string()),
        },
        &provenance,
        eval_options(args.ap),
        &args.report,
    )
}

/// Runs the rehearsal's steps 1 to 6 and returns the server's scores.
pub async fn collect_rehearsal(args: &Args) -> anyhow::Result<Rehearsal> {
    let upgrade_to = args
        .upgrade_to
        .as_deref()
        .context("pass --upgrade-to B (the new checkpoint's folder on the server)")?;
    let manifest = Manifest::read(&args.manifest)?;
    let plan = Plan::new(args, &manifest)?;
    let switch = Switch::new(args)?;
    let conn = Conn::connect(args).await?;

    let models = conn.get_model().await?;
    let old = ServedModel::from_info(models.active.as_ref(), "active")?;
    // While a model is staged every enrolment is dual: the galleries
    // enrolled "with A" would hold its templates too, and the rehearsal
    // would not measure what it says.
    if let Some(staged) = &models.staged {
        bail!(
            "model {} is staged on the server (a migration under way, enrolments embedded by it \
             too): finish that migration first, or abandon it with CancelMigration (`handid model \
             cancel`; model {} keeps serving)",
            short(&staged.model_id),
            short(&old.model_id)
        );
    }
    if let Switch::Migrate(m) = &switch
        && m.manifest.from_model != old.model_id
    {
        bail!(
            "the transform {} maps the templates of model {}, but the server serves model {} from {}: \
             pass the transform fitted for it (`handid-trainer fit-transform --old` its folder)",
            m.transform.display(),
            short(&m.manifest.from_model),
            short(&old.model_id),
            old.path
        );
    }

    let run = uuid::Uuid::new_v4().simple();
    let galleries = |model: &str| -> Vec<String> {
        (0..plan.pairs.len())
            .map(|i| format!("replay-{run}-{model}-split{i}"))
            .collect()
    };
    let (a_galleries, b_galleries) = (galleries("a"), galleries("b"));
    let story = Story {
        conn: &conn,
        plan: &plan,
        a_galleries: &a_galleries,
        b_galleries: &b_galleries,
        wait: Duration::from_secs(args.timeout_s.max(1)),
    };
    // Whatever happens (an error, ctrl-c), every gallery the rehearsal may
    // have created is deleted (one never created is no error).
    let outcome = tokio::select! {
        outcome = story.run(&switch, upgrade_to, old) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    let mut deleted = Ok(());
    for gallery_id in a_galleries.iter().chain(&b_galleries) {
        let result = conn.delete_gallery(gallery_id).await;
        if deleted.is_ok() {
            deleted = result;
        }
    }
    let rehearsal = outcome.with_context(|| format!("rehearsing the upgrade to {}", upgrade_to.display()))?;
    deleted?;
    Ok(rehearsal)
}

/// How the server moves from A to B.
enum Switch {
    /// ReloadModel swaps B in (a compatible embedding space).
    Swap,
    /// Stage B, transform the templates, promote B.
    Migrate(Box<Migration>),
}

/// A staged migration with a template transform.
struct Migration {
    /// The transform's folder.
    transform: PathBuf,
    /// What it maps.
    manifest: TransformManifest,
    /// The server's settings file.
    config: PathBuf,
    /// The `handid-server` binary.
    binary: PathBuf,
}

impl Switch {
    /// The switch `args` ask for, checked here before any call: the
    /// transform loads, the settings file and the binary exist.
    fn new(args: &Args) -> anyhow::Result<Self> {
        let Some(dir) = &args.transform else {
            return Ok(Self::Swap);
        };
        let config = args
            .server_config
            .clone()
            .context("--transform needs --server-config (the server's settings file, for its database)")?;
        if !config.is_file() {
            bail!("--server-config {}: no such file", config.display());
        }
        let transform = TemplateTransform::load(dir, tch::Device::Cpu)
            .with_context(|| format!("loading the transform {}", dir.display()))?;
        if let Some(side) = transform.side_info() {
            check_side_info(&config, &side.model)
                .with_context(|| format!("the transform {}", dir.display()))?;
        }
        Ok(Self::Migrate(Box::new(Migration {
            transform: dir.clone(),
            manifest: transform.manifest().clone(),
            config,
            binary: server_binary(args.server_bin.as_deref())?,
        })))
    }
}

/// Checks that the server's settings file names side-information model
/// `side_model` (`model.side_info`, a folder as the server sees it):
/// without it the server stores no side-information beside the templates
/// the rehearsal enrols, and the upgrade could not map them.
fn check_side_info(config: &Path, side_model: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let settings: serde_yaml::Value =
        serde_yaml::from_str(&text).with_context(|| format!("parsing {}", config.display()))?;
    let Some(folder) = settings
        .get("model")
        .and_then(|model| model.get("side_info"))
        .and_then(serde_yaml::Value::as_str)
    else {
        bail!(
            "maps through the side-information of model {}, and the server's settings ({}) name no \
             model.side_info: set it to that model's folder and restart the server, so that it stores \
             the side-information beside every template it enrols, or fit the transform without --side-info",
            short(side_model),
            config.display()
        );
    };
    let named = handid_model::checkpoint::Manifest::read(Path::new(folder))
        .with_context(|| format!("reading model.side_info {folder} of {}", config.display()))?;
    if named.model_id != side_model {
        bail!(
            "maps through the side-information of model {}, but the server's model.side_info ({folder}) \
             is model {}",
            short(side_model),
            short(&named.model_id)
        );
    }
    Ok(())
}

/// The `handid-server` binary: `explicit`, else the one next to this
/// executable (an installation puts both in one folder), else the first on
/// PATH.
fn server_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        if !path.is_file() {
            bail!("--server-bin {}: no such file", path.display());
        }
        return Ok(path.to_owned());
    }
    let name = format!("handid-server{}", std::env::consts::EXE_SUFFIX);
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(&name)));
    let on_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|dir| dir.join(&name)).collect())
        .unwrap_or_default();
    beside
        .into_iter()
        .chain(on_path)
        .find(|path| path.is_file())
        .with_context(|| format!("{name} is neither next to this executable nor on PATH: pass --server-bin"))
}

/// The rehearsal's calls, on the galleries it names.
struct Story<'a> {
    conn: &'a Conn,
    plan: &'a Plan<'a>,
    /// The galleries enrolled with A, one per split.
    a_galleries: &'a [String],
    /// The galleries enrolled with B, one per split.
    b_galleries: &'a [String],
    /// How long the server may take to search the upgraded templates.
    wait: Duration,
}

impl Story<'_> {
    /// Steps 2 to 5.
    async fn run(&self, switch: &Switch, upgrade_to: &Path, old: ServedModel) -> anyhow::Result<Rehearsal> {
        println!(
            "[1/4] model A ({}) enrols the galleries and identifies the queries: M(A,A)",
            short(&old.model_id)
        );
        self.enrol_all("A", self.a_galleries, &old).await?;
        let old_old = self.identify_all("A/A", self.a_galleries, &old).await?;

        println!("[2/4] switching the server to {}", upgrade_to.display());
        let new = match switch {
            Switch::Swap => self.swap(upgrade_to, &old).await?,
            Switch::Migrate(migration) => self.migrate(migration, upgrade_to).await?,
        };

        println!(
            "[3/4] model B ({}) identifies the queries against the templates enrolled with A: {}",
            short(&new.model_id),
            if matches!(switch, Switch::Swap) {
                "M(B,A)"
            } else {
                "M(B,T(A))"
            }
        );
        self.until_searchable(&new).await?;
        let new_old = self.identify_all("B/A", self.a_galleries, &new).await?;

        println!("[4/4] model B enrols the galleries again and identifies the queries: M(B,B)");
        self.enrol_all("B", self.b_galleries, &new).await?;
        let new_new = self.identify_all("B/B", self.b_galleries, &new).await?;
        Ok(Rehearsal {
            old,
            new,
            old_old,
            new_old,
            new_new,
        })
    }

    /// Enrols every split's gallery into `galleries`, each with `model`.
    async fn enrol_all(&self, what: &str, galleries: &[String], model: &ServedModel) -> anyhow::Result<()> {
        for (i, ((_, gallery), gallery_id)) in self.plan.pairs.iter().zip(galleries).enumerate() {
            let what = format!("{what} split {i}");
            let models = enrol(self.conn, self.plan, &what, gallery_id, gallery).await?;
            expect_model(&models, model, &what)?;
        }
        Ok(())
    }

    /// Identifies every split's queries in `galleries`, each with `model`.
    async fn identify_all(
        &self,
        what: &str,
        galleries: &[String],
        model: &ServedModel,
    ) -> anyhow::Result<Vec<ScoredSplit>> {
        let mut splits = Vec::with_capacity(galleries.len());
        for (i, ((query, gallery), gallery_id)) in self.plan.pairs.iter().zip(galleries).enumerate() {
            let what = format!("{what} split {i}");
            let (split, models) =
                identify(self.conn, self.plan, i, &what, gallery_id, query, gallery).await?;
            expect_model(&models, model, &what)?;
            splits.push(split);
        }
        Ok(splits)
    }

    /// Swaps B in; a refusal (B of another space) says what to do instead.
    async fn swap(&self, upgrade_to: &Path, old: &ServedModel) -> anyhow::Result<ServedModel> {
        let response = self
            .conn
            .reload(upgrade_to, ReloadMode::Unspecified)
            .await
            .map_err(|e| {
                let incompatible = e
                    .downcast_ref::<CallError>()
                    .is_some_and(|c| c.status.code() == Code::FailedPrecondition);
                if incompatible {
                    e.context(format!(
                        "the server refuses to swap {} in for model A ({}): its embeddings cannot be \
                         compared with A's templates. Pass --transform T (from `handid-trainer \
                         fit-transform --old A --new B`) with --server-config to stage it and upgrade \
                         the templates, or upgrade to a model trained for backward compatibility with A \
                         (its manifest lists A's embedding space in compatible_spaces)",
                        upgrade_to.display(),
                        short(&old.model_id)
                    ))
                } else {
                    e.context(format!("swapping {} in", upgrade_to.display()))
                }
            })?;
        let new = ServedModel::from_info(response.loaded.as_ref(), "loaded")?;
        if new.model_id == old.model_id {
            bail!(
                "{} holds model {}, the one the server serves: nothing to upgrade to",
                upgrade_to.display(),
                short(&new.model_id)
            );
        }
        Ok(new)
    }

    /// Stages B, upgrades the templates, checks the replay's galleries are
    /// covered and promotes B. Until the promotion the server serves A.
    async fn migrate(&self, migration: &Migration, upgrade_to: &Path) -> anyhow::Result<ServedModel> {
        let response = self
            .conn
            .reload(upgrade_to, ReloadMode::StageMigration)
            .await
            .with_context(|| format!("staging {}", upgrade_to.display()))?;
        let staged = ServedModel::from_info(response.loaded.as_ref(), "loaded")?;
        if !response.staged {
            bail!(
                "the server swapped {} (model {}) in without a migration: its embedding space is \
                 compatible with A's templates and needs no transform. The server now serves it; \
                 reload model A and rehearse without --transform",
                upgrade_to.display(),
                short(&staged.model_id)
            );
        }
        if staged.model_id != migration.manifest.to_model {
            bail!(
                "the transform {} maps into model {}, but {} holds model {}: it stays staged and the \
                 server serves A; cancel the staging (`handid model cancel`) and pass the transform \
                 fitted for this model",
                migration.transform.display(),
                short(&migration.manifest.to_model),
                upgrade_to.display(),
                short(&staged.model_id)
            );
        }
        migration.upgrade_templates().await?;

        let models = self.conn.get_model().await?;
        let now = ServedModel::from_info(models.staged.as_ref(), "staged")
            .context("model B is no longer staged: did someone else promote or replace it?")?;
        if now.model_id != staged.model_id {
            bail!(
                "model {} is staged now, not model {}: the server's models changed during the rehearsal",
                short(&now.model_id),
                short(&staged.model_id)
            );
        }
        let lacking = lacking_coverage(&models, self.plan, self.a_galleries);
        if !lacking.is_empty() {
            bail!(
                "not promoting model {}: the replay's galleries lack its templates after \
                 upgrade-templates: {}; it stays staged (enrolments are dual until it is promoted, or \
                 cancelled: `handid model cancel`) and the server serves A",
                short(&staged.model_id),
                lacking.join(", ")
            );
        }
        // Not `require_full_coverage`: the database may hold other galleries
        // the rehearsal does not answer for; its own are checked above.
        let promoted = self
            .conn
            .admin_call(
                |mut client, request| async move { client.promote_model(request).await },
                PromoteModelRequest {
                    require_full_coverage: false,
                },
            )
            .await
            .with_context(|| format!("promoting model {}", short(&staged.model_id)))?;
        let active = ServedModel::from_info(promoted.active.as_ref(), "active")?;
        if active.model_id != staged.model_id {
            bail!(
                "PromoteModel made model {} active, not model {}",
                short(&active.model_id),
                short(&staged.model_id)
            );
        }
        Ok(active)
    }

    /// Waits until `model` answers and searches every subject of every A
    /// gallery: a promoted model searches the upgraded templates once this
    /// server has followed the database's change feed.
    async fn until_searchable(&self, model: &ServedModel) -> anyhow::Result<()> {
        let started = Instant::now();
        for ((query, gallery), gallery_id) in self.plan.pairs.iter().zip(self.a_galleries) {
            let probe = read_image(self.plan, query[0])?;
            let top_k = u32::try_from(gallery.len()).context("gallery too large")?;
            loop {
                let response = self.conn.identify(gallery_id, probe.clone(), top_k).await?;
                let searched = usize::try_from(response.gallery_size).unwrap_or(usize::MAX);
                if response.model_id == model.model_id && searched == gallery.len() {
                    break;
                }
                if started.elapsed() > self.wait {
                    bail!(
                        "after {} s the server still answers in {gallery_id} with model {} over {searched} \
                         of its {} subjects (expected model {}): does it follow the change feed \
                         (`replication.enabled`)?",
                        self.wait.as_secs(),
                        short(&response.model_id),
                        gallery.len(),
                        short(&model.model_id)
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }
}

impl Migration {
    /// Runs `handid-server upgrade-templates` and shows what it printed.
    async fn upgrade_templates(&self) -> anyhow::Result<()> {
        println!(
            "      {} upgrade-templates --config {} --transform {}",
            self.binary.display(),
            self.config.display(),
            self.transform.display()
        );
        let output = tokio::process::Command::new(&self.binary)
            .arg("upgrade-templates")
            .arg("--config")
            .arg(&self.config)
            .arg("--transform")
            .arg(&self.transform)
            .stdin(Stdio::null())
            // Interrupted (ctrl-c), the rehearsal stops it: each batch is
            // its own transaction, and a later run resumes.
            .kill_on_drop(true)
            .output()
            .await
            .with_context(|| format!("starting {}", self.binary.display()))?;
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            println!("      {line}");
        }
        if !output.status.success() {
            bail!(
                "`{} upgrade-templates` failed ({}): {}; model B stays staged (enrolments are dual \
                 until it is promoted, or cancelled: `handid model cancel`) and the server serves A",
                self.binary.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }
}

/// The replay's galleries whose subjects do not all have a template of the
/// staged model, with their counts.
fn lacking_coverage(models: &GetModelResponse, plan: &Plan<'_>, galleries: &[String]) -> Vec<String> {
    plan.pairs
        .iter()
        .zip(galleries)
        .filter_map(|((_, gallery), gallery_id)| {
            let covered = models
                .coverage
                .iter()
                .find(|c| c.gallery_id == *gallery_id)
                .map_or(0, |c| c.subjects_with_staged_templates);
            let covered = usize::try_from(covered).unwrap_or(usize::MAX);
            (covered < gallery.len())
                .then(|| format!("{gallery_id} ({covered} of {} subjects)", gallery.len()))
        })
        .collect()
}

/// Fails unless every answer of a step came from `model`.
fn expect_model(models: &[String], model: &ServedModel, what: &str) -> anyhow::Result<()> {
    match models.iter().find(|m| **m != model.model_id) {
        Some(other) => bail!(
            "{what}: the server answered with model {}, not {}: its models changed during the rehearsal",
            short(other),
            short(&model.model_id)
        ),
        None => Ok(()),
    }
}

impl Conn {
    /// The server's models (Admin GetModel).
    async fn get_model(&self) -> anyhow::Result<GetModelResponse> {
        self.admin_call(
            |mut client, request| async move { client.get_model(request).await },
            GetModelRequest {},
        )
        .await
        .context("asking the server for its model (Admin GetModel)")
    }

    /// Loads the checkpoint folder `path` (a path on the server) as `mode` says.
    async fn reload(&self, path: &Path, mode: ReloadMode) -> anyhow::Result<ReloadModelResponse> {
        let path = path
            .to_str()
            .with_context(|| format!("{} is not UTF-8", path.display()))?;
        self.admin_call(
            |mut client, request| async move { client.reload_model(request).await },
            ReloadModelRequest {
                path: path.to_owned(),
                mode: mode.into(),
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use handid_eval::data::manifest::Entry;
    use handid_proto::v1::GalleryCoverage;

    use super::*;

    fn entry(person: &str) -> Entry {
        Entry {
            split: "gallery0".to_owned(),
            person: person.to_owned(),
            image: format!("{person}.png"),
        }
    }

    #[test]
    fn only_the_replay_galleries_short_of_coverage_block_the_promotion() {
        let (a, b, c) = (entry("a"), entry("b"), entry("c"));
        let plan = Plan {
            pairs: vec![(vec![&a], vec![&a, &b]), (vec![&c], vec![&b, &c])],
            persons: BTreeMap::new(),
            root: PathBuf::new(),
        };
        let galleries = ["r-split0".to_owned(), "r-split1".to_owned()];
        let coverage = |gallery: &str, subjects, covered| GalleryCoverage {
            gallery_id: gallery.to_owned(),
            subjects,
            subjects_with_staged_templates: covered,
        };
        let mut models = GetModelResponse {
            coverage: vec![coverage("r-split0", 2, 2), coverage("elsewhere", 9, 0)],
            ..GetModelResponse::default()
        };
        // Another gallery's coverage is not the rehearsal's business; a
        // gallery GetModel does not list has none.
        assert_eq!(
            lacking_coverage(&models, &plan, &galleries),
            ["r-split1 (0 of 2 subjects)"]
        );
        models.coverage.push(coverage("r-split1", 2, 1));
        assert_eq!(
            lacking_coverage(&models, &plan, &galleries),
            ["r-split1 (1 of 2 subjects)"]
        );
        models.coverage[2].subjects_with_staged_templates = 2;
        assert!(lacking_coverage(&models, &plan, &galleries).is_empty());
    }

    #[test]
    fn answers_of_another_model_fail_the_step() {
        let model = ServedModel {
            model_id: "b".repeat(64),
            path: "/models/b".to_owned(),
        };
        assert!(expect_model(&vec![model.model_id.clone(); 3], &model, "B/A split 0").is_ok());
        let err = expect_model(&[model.model_id.clone(), "a".repeat(64)], &model, "B/A split 0")
            .expect_err("another model");
        assert!(err.to_string().contains("B/A split 0"), "{err}");
        assert!(err.to_string().contains(&"a".repeat(12)), "{err}");
    }

    #[test]
    fn the_server_binary_is_the_one_named_or_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("handid-server");
        let err = server_binary(Some(&missing)).expect_err("missing");
        assert!(err.to_string().contains("--server-bin"), "{err}");
        std::fs::write(&missing, "").expect("file");
        assert_eq!(server_binary(Some(&missing)).expect("named"), missing);
    }
}
