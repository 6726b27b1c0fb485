//! `handid`: the command-line client of the handid.v1 API.
//!
//! Commands: `enroll`, `identify`, `verify` (images from files, `-` for
//! stdin; `enroll --from FOLDER|FILE.csv` enrols a whole site, see
//! `bulk`), `subjects list|get|delete`, `gallery delete`, the model
//! lifecycle (`model get|reload|promote|cancel|rollback`), `settings reload` (the
//! API keys) and `health`. Every command takes the server's address, an API key
//! (`--api-key` or `HANDID_API_KEY`, sent as `authorization: Bearer`) and,
//! for a TLS listener, `--tls-ca` (plus `--tls-cert`/`--tls-key` for mutual
//! TLS).
//!
//! Output is a short human summary, or with `--json` one JSON object on
//! stdout for scripts. Exit status: 0 on success; 10 + the gRPC status code
//! when the server refuses (e.g. 17 PERMISSION_DENIED, 19
//! FAILED_PRECONDITION, 24 UNAVAILABLE, also when the server cannot be
//! reached or the connection breaks; for `enroll --from`, the first failed subject's); 1 for a
//! local problem (an unreadable certificate file); 2 for a
//! command line clap refuses; `health` exits 1 when the server is not
//! SERVING.

mod bulk;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use handid_proto::v1 as pb;
use handid_proto::v1::admin_client::AdminClient;
use handid_proto::v1::hand_id_client::HandIdClient;
use serde_json::{Value, json};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Exit status offset of a gRPC status code.
const STATUS_EXIT_BASE: u8 = 10;

#[derive(Debug, Parser)]
#[command(name = "handid", version, about = "Command-line client of a handid server")]
struct Cli {
    #[command(flatten)]
    connection: Connection,
    /// Print one JSON object instead of a human summary.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

/// Where the server is and how to reach it.
#[derive(Debug, Args)]
struct Connection {
    /// The server's address (`https://` for a TLS listener).
    #[arg(
        long,
        env = "HANDID_ADDR",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    addr: String,
    /// The API key, sent as `authorization: Bearer <key>`.
    #[arg(long, env = "HANDID_API_KEY", hide_env_values = true, global = true)]
    api_key: Option<String>,
    /// PEM file of the CA that signed the server's certificate.
    #[arg(long, global = true)]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a mutual-TLS listener (with --tls-key).
    #[arg(long, global = true, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM key of --tls-cert.
    #[arg(long, global = true, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Give up on a call after this many seconds (reloads load a checkpoint
    /// and every gallery: allow minutes).
    #[arg(long, global = true, default_value_t = 600)]
    timeout_s: u64,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enrol a subject: its templates from these images (scope `enroll`).
    Enroll {
        /// The gallery (created by the first enrolment).
        #[arg(long)]
        gallery: String,
        /// The subject.
        #[arg(long, required_unless_present = "from", conflicts_with = "from")]
        subject: Option<String>,
        /// A retry with the same key replays the first result instead of
        /// enrolling twice.
        #[arg(long, conflicts_with = "from")]
        idempotency_key: Option<String>,
        /// Image files (JPEG, PNG, BMP, PGM); `-` reads one from stdin.
        #[arg(required_unless_present = "from", conflicts_with = "from")]
        images: Vec<PathBuf>,
        /// Enrol many subjects: a folder with one subfolder of images per
        /// subject, or a CSV file of `subject,image` lines (paths relative
        /// to it). Keys derived from the images make a rerun resume.
        #[arg(long)]
        from: Option<PathBuf>,
        /// Subjects enrolled at once with --from.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
    },
    /// Who is on this photo: the gallery's best candidates (scope `identify`).
    Identify {
        /// The gallery.
        #[arg(long)]
        gallery: String,
        /// Candidates to return.
        #[arg(long, default_value_t = 5)]
        top_k: u32,
        #[command(flatten)]
        rule: Rule,
        /// The probe image; `-` reads it from stdin.
        image: PathBuf,
    },
    /// Is this photo of that subject (scope `identify`).
    Verify {
        /// The gallery.
        #[arg(long)]
        gallery: String,
        /// The subject claimed.
        #[arg(long)]
        subject: String,
        #[command(flatten)]
        rule: Rule,
        /// The probe image; `-` reads it from stdin.
        image: PathBuf,
    },
    /// The L2-normalised embeddings of images, stored nowhere (scope `embed`).
    Embed {
        /// Write them as a float32 NumPy array `[images, dimension]` here
        /// instead of printing them.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Image files; `-` reads one from stdin.
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// A gallery's subjects.
    #[command(subcommand)]
    Subjects(SubjectsCommand),
    /// Galleries.
    #[command(subcommand)]
    Gallery(GalleryCommand),
    /// The serving model and its lifecycle (Admin service, scope `admin`).
    #[command(subcommand)]
    Model(ModelCommand),
    /// The server's settings.
    #[command(subcommand)]
    Settings(SettingsCommand),
    /// Ask the gRPC health service; exit 0 when SERVING, 1 otherwise.
    Health,
}

#[derive(Debug, Subcommand)]
enum ModelCommand {
    /// The active model, the staged one and its coverage, the rollback target.
    Get,
    /// Load a checkpoint folder on the server and swap it in (or stage it).
    Reload {
        /// A checkpoint folder on the server's file system; without it, the
        /// active model's folder is loaded again.
        #[arg(long)]
        path: Option<String>,
        /// Stage a model of another embedding space as a migration.
        #[arg(long)]
        stage: bool,
    },
    /// Make the staged model the active one.
    Promote {
        /// Refuse while a subject lacks a template of the staged model.
        #[arg(long)]
        require_full_coverage: bool,
    },
    /// Abandon the staged migration: the active model keeps serving, the
    /// staged model's templates are deleted (but those still needed).
    Cancel,
    /// Make the previous model active again.
    Rollback {
        /// Only while this model (an id, as `handid model get` shows it) is
        /// the active one: run again after a call whose answer was lost, it
        /// changes nothing instead of rolling forward again.
        #[arg(long, value_name = "MODEL_ID")]
        from: Option<String>,
    },
}

/// How a score becomes a decision: the model's default operating point
/// (FMR 1e-3) unless one of these is given.
#[derive(Debug, Args)]
struct Rule {
    /// An explicit cosine-similarity threshold.
    #[arg(long, conflicts_with = "fmr")]
    threshold: Option<f32>,
    /// The model's threshold calibrated at this false-match rate.
    #[arg(long)]
    fmr: Option<f64>,
}

impl Rule {
    fn proto(&self) -> Option<pb::DecisionRule> {
        use pb::decision_rule::Rule as R;
        let rule = match (self.threshold, self.fmr) {
            (Some(t), _) => R::Threshold(t),
            (None, Some(f)) => R::TargetFmr(f),
            (None, None) => return None,
        };
        Some(pb::DecisionRule { rule: Some(rule) })
    }
}

#[derive(Debug, Subcommand)]
enum SubjectsCommand {
    /// The subjects of a gallery, every page (scope `identify`).
    List {
        /// The gallery.
        #[arg(long)]
        gallery: String,
    },
    /// One subject and its templates' metadata (scope `identify`).
    Get {
        /// The gallery.
        #[arg(long)]
        gallery: String,
        /// The subject.
        #[arg(long)]
        subject: String,
    },
    /// Erase a subject and its templates (scope `enroll`).
    Delete {
        /// The gallery.
        #[arg(long)]
        gallery: String,
        /// The subject.
        #[arg(long)]
        subject: String,
    },
}

#[derive(Debug, Subcommand)]
enum GalleryCommand {
    /// Erase a gallery with every subject and template (scope `enroll`).
    Delete {
        /// The gallery.
        #[arg(long)]
        gallery: String,
    },
}

#[derive(Debug, Subcommand)]
enum SettingsCommand {
    /// Read the settings file again and apply its API keys and grants.
    Reload,
}

/// Why a command failed, and the exit status that says so.
#[derive(Debug)]
enum Failure {
    Refused(tonic::Status),
    Local(anyhow::Error),
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        Failure::Refused(status)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure::Local(error)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli).await {
        Ok(code) => code,
        Err(Failure::Refused(status)) => {
            let status = connection_failure(status, &cli.connection.addr);
            eprintln!("handid: {}: {}", code_name(status.code()), status.message());
            ExitCode::from(STATUS_EXIT_BASE + status.code() as u8)
        }
        Err(Failure::Local(error)) => {
            eprintln!("handid: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: &Cli) -> Result<ExitCode, Failure> {
    let channel = connect(&cli.connection).await?;
    let key = cli.connection.api_key.as_deref();
    let mut admin = AdminClient::new(channel.clone());
    let mut handid = HandIdClient::new(channel.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let out = match &cli.command {
        Command::Enroll {
            gallery,
            from: Some(from),
            concurrency,
            ..
        } => {
            let people = bulk::people(from)?;
            let (value, text, failure) = bulk::enroll_all(handid, key, gallery, people, *concurrency).await;
            print(cli.json, &value, &text);
            return failure.map_or(Ok(ExitCode::SUCCESS), Err);
        }
        Command::Enroll {
            gallery,
            subject,
            idempotency_key,
            images,
            ..
        } => {
            let subject = subject.as_ref().context("--subject is needed")?;
            let images = images.iter().map(image).collect::<Result<Vec<_>, _>>()?;
            let r = handid
                .enroll(request(
                    key,
                    pb::EnrollRequest {
                        gallery_id: gallery.clone(),
                        subject_id: subject.clone(),
                        images,
                        idempotency_key: idempotency_key.clone().unwrap_or_default(),
                    },
                )?)
                .await?
                .into_inner();
            let text = format!(
                "{}/{}: {} template(s) stored{}, {} in all (model {})",
                r.gallery_id,
                r.subject_id,
                r.template_ids.len(),
                if r.replayed { " earlier (replayed)" } else { "" },
                r.template_count,
                r.model_id
            );
            (
                json!({
                    "gallery_id": r.gallery_id,
                    "subject_id": r.subject_id,
                    "template_ids": r.template_ids,
                    "template_count": r.template_count,
                    "replayed": r.replayed,
                    "model_id": r.model_id,
                }),
                text,
            )
        }
        Command::Identify {
            gallery,
            top_k,
            rule,
            image: path,
        } => {
            let r = handid
                .identify(request(
                    key,
                    pb::IdentifyRequest {
                        gallery_id: gallery.clone(),
                        image: Some(image(path)?),
                        top_k: *top_k,
                        rule: rule.proto(),
                    },
                )?)
                .await?
                .into_inner();
            let decision = decision(r.decision.as_ref());
            let mut text = match r.matched_subject_id.as_str() {
                "" => format!("no match among {} subjects", r.gallery_size),
                matched => format!("match: {matched}"),
            };
            text.push_str(&format!(" ({})", decision_text(&decision)));
            for c in &r.candidates {
                text.push_str(&format!("\n{:>3}  {:.4}  {}", c.rank, c.score, c.subject_id));
            }
            let candidates: Vec<Value> = r
                .candidates
                .iter()
                .map(|c| json!({ "rank": c.rank, "subject_id": c.subject_id, "score": float(c.score) }))
                .collect();
            (
                json!({
                    "matched_subject_id": r.matched_subject_id,
                    "candidates": candidates,
                    "decision": decision,
                    "gallery_size": r.gallery_size,
                    "model_id": r.model_id,
                }),
                text,
            )
        }
        Command::Verify {
            gallery,
            subject,
            rule,
            image: path,
        } => {
            let r = handid
                .verify(request(
                    key,
                    pb::VerifyRequest {
                        gallery_id: gallery.clone(),
                        subject_id: subject.clone(),
                        image: Some(image(path)?),
                        rule: rule.proto(),
                    },
                )?)
                .await?
                .into_inner();
            let decision = decision(r.decision.as_ref());
            let text = format!(
                "{}: score {:.4} ({})",
                if decision["is_match"] == true {
                    "match"
                } else {
                    "no match"
                },
                r.score,
                decision_text(&decision)
            );
            (
                json!({ "score": float(r.score), "decision": decision, "model_id": r.model_id }),
                text,
            )
        }
        Command::Embed { out, images } => {
            let images = images.iter().map(image).collect::<Result<Vec<_>, _>>()?;
            let r = handid
                .embed(request(key, pb::EmbedRequest { images })?)
                .await?
                .into_inner();
            let rows: Vec<&[f32]> = r.embeddings.iter().map(|e| e.values.as_slice()).collect();
            match out {
                Some(path) => {
                    std::fs::write(path, npy(&rows, r.dimension as usize))
                        .with_context(|| format!("writing {}", path.display()))?;
                    (
                        json!({ "out": path.display().to_string(), "images": rows.len(),
                                "dimension": r.dimension, "model_id": r.model_id }),
                        format!(
                            "{} embedding(s) of {} values (model {}) written to {}",
                            rows.len(),
                            r.dimension,
                            r.model_id,
                            path.display()
                        ),
                    )
                }
                None => {
                    let text = rows
                        .iter()
                        .map(|row| row.iter().map(f32::to_string).collect::<Vec<_>>().join(" "))
                        .collect::<Vec<_>>()
                        .join("\n");
                    (
                        json!({ "embeddings": rows, "dimension": r.dimension, "model_id": r.model_id }),
                        text,
                    )
                }
            }
        }
        Command::Subjects(SubjectsCommand::List { gallery }) => {
            let mut subjects = Vec::new();
            let mut token = String::new();
            loop {
                let page = handid
                    .list_subjects(request(
                        key,
                        pb::ListSubjectsRequest {
                            gallery_id: gallery.clone(),
                            page_size: 1000,
                            page_token: token,
                        },
                    )?)
                    .await?
                    .into_inner();
                subjects.extend(page.subjects);
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            let text = subjects
                .iter()
                .map(|s| format!("{}  {} template(s)", s.subject_id, s.templates.len()))
                .collect::<Vec<_>>()
                .join("\n");
            (
                json!({ "gallery_id": gallery, "subjects": subjects.iter().map(subject).collect::<Vec<_>>() }),
                if text.is_empty() {
                    format!("{gallery}: no subjects")
                } else {
                    text
                },
            )
        }
        Command::Subjects(SubjectsCommand::Get { gallery, subject: id }) => {
            let r = handid
                .get_subject(request(
                    key,
                    pb::GetSubjectRequest {
                        gallery_id: gallery.clone(),
                        subject_id: id.clone(),
                    },
                )?)
                .await?
                .into_inner();
            let record = r.subject.as_ref().map_or(Value::Null, subject);
            let mut text = format!("{gallery}/{id}");
            if let Some(s) = &r.subject {
                for t in &s.templates {
                    text.push_str(&format!(
                        "\n  {}  model {}  {}",
                        t.template_id,
                        t.model_id,
                        timestamp(t.created_at.as_ref()).as_str().unwrap_or_default()
                    ));
                }
            }
            (record, text)
        }
        Command::Subjects(SubjectsCommand::Delete { gallery, subject }) => {
            let r = handid
                .delete_subject(request(
                    key,
                    pb::DeleteSubjectRequest {
                        gallery_id: gallery.clone(),
                        subject_id: subject.clone(),
                    },
                )?)
                .await?
                .into_inner();
            (
                json!({ "templates_deleted": r.templates_deleted }),
                format!("{gallery}/{subject} erased: {} template(s)", r.templates_deleted),
            )
        }
        Command::Gallery(GalleryCommand::Delete { gallery }) => {
            let r = handid
                .delete_gallery(request(
                    key,
                    pb::DeleteGalleryRequest {
                        gallery_id: gallery.clone(),
                    },
                )?)
                .await?
                .into_inner();
            (
                json!({ "subjects_deleted": r.subjects_deleted, "templates_deleted": r.templates_deleted }),
                format!(
                    "{gallery} erased: {} subject(s), {} template(s)",
                    r.subjects_deleted, r.templates_deleted
                ),
            )
        }
        Command::Health => {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let status = health
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await?
                .into_inner()
                .status();
            let serving = status == tonic_health::pb::health_check_response::ServingStatus::Serving;
            print(
                cli.json,
                &json!({ "status": status.as_str_name() }),
                status.as_str_name(),
            );
            return Ok(if serving {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        Command::Model(ModelCommand::Get) => {
            let r = admin
                .get_model(request(key, pb::GetModelRequest {})?)
                .await?
                .into_inner();
            report(&r)
        }
        Command::Model(ModelCommand::Reload { path, stage }) => {
            let mode = if *stage {
                pb::ReloadMode::StageMigration
            } else {
                pb::ReloadMode::Unspecified
            };
            let r = admin
                .reload_model(request(
                    key,
                    pb::ReloadModelRequest {
                        path: path.clone().unwrap_or_default(),
                        mode: mode as i32,
                    },
                )?)
                .await?
                .into_inner();
            let loaded = model(r.loaded.as_ref());
            let text = format!(
                "{} {} from {}",
                if r.staged { "staged" } else { "active:" },
                loaded["model_id"].as_str().unwrap_or_default(),
                loaded["path"].as_str().unwrap_or_default()
            );
            (
                json!({ "previous": model(r.previous.as_ref()), "loaded": loaded, "staged": r.staged }),
                text,
            )
        }
        Command::Model(ModelCommand::Promote {
            require_full_coverage,
        }) => {
            let r = admin
                .promote_model(request(
                    key,
                    pb::PromoteModelRequest {
                        require_full_coverage: *require_full_coverage,
                    },
                )?)
                .await?
                .into_inner();
            swapped(r.active.as_ref(), r.previous.as_ref())
        }
        Command::Model(ModelCommand::Cancel) => {
            let r = admin
                .cancel_migration(request(key, pb::CancelMigrationRequest {})?)
                .await?
                .into_inner();
            cancelled(&r)
        }
        Command::Model(ModelCommand::Rollback { from }) => {
            let r = admin
                .rollback_model(request(
                    key,
                    pb::RollbackModelRequest {
                        expected_active: from.clone().unwrap_or_default(),
                    },
                )?)
                .await?
                .into_inner();
            swapped(r.active.as_ref(), r.previous.as_ref())
        }
        Command::Settings(SettingsCommand::Reload) => {
            let r = admin
                .reload_settings(request(key, pb::ReloadSettingsRequest {})?)
                .await?
                .into_inner();
            let mut text = format!(
                "{}: {} keys, {} certificate grants in force",
                r.path, r.keys, r.certificate_grants
            );
            for (label, ids) in [
                ("added", &r.added),
                ("removed", &r.removed),
                ("changed", &r.changed),
                ("apply at restart", &r.restart_required),
            ] {
                if !ids.is_empty() {
                    text.push_str(&format!("\n{label}: {}", ids.join(", ")));
                }
            }
            (
                json!({
                    "path": r.path,
                    "keys": r.keys,
                    "certificate_grants": r.certificate_grants,
                    "added": r.added,
                    "removed": r.removed,
                    "changed": r.changed,
                    "restart_required": r.restart_required,
                }),
                text,
            )
        }
    };
    print(cli.json, &out.0, &out.1);
    Ok(ExitCode::SUCCESS)
}

/// A 32-bit score or threshold as JSON, written as its shortest decimal
/// (`0.9`, not the widened `0.8999999761581421`).
fn float(value: f32) -> Value {
    value.to_string().parse::<f64>().map_or(Value::Null, Value::from)
}

/// A channel to the server: plain, TLS, or mutual TLS.
async fn connect(c: &Connection) -> Result<Channel, Failure> {
    if (c.tls_ca.is_some() || c.tls_cert.is_some()) && !c.addr.starts_with("https://") {
        // tonic would speak plain text to an http:// address whatever
        // the TLS options say.
        return Err(Failure::Local(anyhow::anyhow!(
            "--tls-ca / --tls-cert need an https:// address, not {:?}",
            c.addr
        )));
    }
    let mut endpoint = Endpoint::from_shared(c.addr.clone())
        .with_context(|| format!("the address {:?} is not a URL", c.addr))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(c.timeout_s));
    if c.tls_ca.is_some() || c.tls_cert.is_some() || c.addr.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_enabled_roots();
        if let Some(ca) = &c.tls_ca {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&c.tls_cert, &c.tls_key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint = endpoint.tls_config(tls).context("setting up TLS")?;
    }
    endpoint.connect().await.map_err(|e| {
        Failure::Refused(tonic::Status::unavailable(format!(
            "cannot reach {}: {}{}",
            c.addr,
            causes(&e),
            hint(&c.addr)
        )))
    })
}

/// A status the client made from a broken connection (tonic keeps the
/// transport error as its source; a server's status has none) becomes
/// UNAVAILABLE, saying what broke and what to check: a plain-text client
/// talking to a TLS listener or to something other than a gRPC server
/// otherwise reads as UNKNOWN or CANCELLED, as if the server had refused.
fn connection_failure(status: tonic::Status, addr: &str) -> tonic::Status {
    match std::error::Error::source(&status) {
        Some(source) => tonic::Status::unavailable(format!(
            "the connection to {addr} failed: {}{}",
            causes(source),
            hint(addr)
        )),
        None => status,
    }
}

/// An error and its causes, `: `-separated, each said once (a TLS
/// failure's reason, e.g. an unknown certificate issuer, is a cause deep
/// in the chain).
fn causes(error: &dyn std::error::Error) -> String {
    let mut said: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        let text = e.to_string();
        if !said.iter().any(|s| s.contains(&text)) {
            said.push(text);
        }
        next = e.source();
    }
    said.join(": ")
}

/// What to check when the connection to `addr` fails.
fn hint(addr: &str) -> &'static str {
    if addr.starts_with("https://") {
        " (is a handid server listening there, and is its certificate signed by --tls-ca?)"
    } else {
        " (is a handid server listening there? a TLS listener needs an https:// address and --tls-ca)"
    }
}

/// An image from a file, or from stdin for `-`.
fn image(path: &PathBuf) -> Result<pb::Image, Failure> {
    let data = if path.as_os_str() == "-" {
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut data)
            .context("reading the image from stdin")?;
        data
    } else {
        read(path)?
    };
    Ok(pb::Image { data })
}

/// `rows` as a NumPy `.npy` file (format 1.0): little-endian float32,
/// C order, shape `[rows, dim]`.
fn npy(rows: &[&[f32]], dim: usize) -> Vec<u8> {
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {dim}), }}",
        rows.len()
    );
    // Magic, version, header length, then the header padded with spaces
    // and a newline to a multiple of 64 bytes.
    let unpadded = 6 + 2 + 2 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + rows.len() * dim * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&u16::try_from(header.len()).unwrap_or(u16::MAX).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for value in rows.iter().flat_map(|row| row.iter()) {
        out.extend_from_slice(&value.to_le_bytes());
    }
    out
}

fn decision(d: Option<&pb::Decision>) -> Value {
    d.map_or(
        Value::Null,
        |d| json!({ "is_match": d.is_match, "threshold": float(d.threshold), "fmr": d.fmr }),
    )
}

fn decision_text(d: &Value) -> String {
    let threshold = d["threshold"].as_f64().unwrap_or_default();
    match d["fmr"].as_f64() {
        Some(fmr) if fmr > 0.0 => format!("threshold {threshold:.4} at FMR {fmr:e}"),
        _ => format!("threshold {threshold:.4}"),
    }
}

fn subject(s: &pb::Subject) -> Value {
    let templates: Vec<Value> = s
        .templates
        .iter()
        .map(|t| {
            json!({
                "template_id": t.template_id,
                "model_id": t.model_id,
                "created_at": timestamp(t.created_at.as_ref()),
            })
        })
        .collect();
    json!({
        "gallery_id": s.gallery_id,
        "subject_id": s.subject_id,
        "created_at": timestamp(s.created_at.as_ref()),
        "templates": templates,
    })
}

fn read(path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// `message` with the API key, when one is given.
fn request<T>(key: Option<&str>, message: T) -> Result<tonic::Request<T>, Failure> {
    let mut request = tonic::Request::new(message);
    if let Some(key) = key {
        let value = format!("Bearer {key}")
            .parse()
            .map_err(|_| anyhow::anyhow!("the API key holds characters a header cannot carry"))?;
        request.metadata_mut().insert("authorization", value);
    }
    Ok(request)
}

/// Writes the result to stdout. A reader that stopped reading (`| head`,
/// `| grep -q`) is not an error: the call itself succeeded.
fn print(as_json: bool, value: &Value, text: &str) {
    use std::io::Write;
    let out = if as_json {
        value.to_string()
    } else {
        text.to_owned()
    };
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{out}").and_then(|()| stdout.flush())
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("handid: writing the result: {e}");
    }
}

fn timestamp(t: Option<&handid_proto::Timestamp>) -> Value {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .map_or(Value::Null, |t| t.to_rfc3339().into())
}

fn model(m: Option<&pb::ModelInfo>) -> Value {
    let Some(m) = m else {
        return Value::Null;
    };
    json!({
        "model_id": m.model_id,
        "embedding_space": m.embedding_space,
        "compatible_spaces": m.compatible_spaces,
        "architecture": m.architecture,
        "embedding_dim": m.embedding_dim,
        "path": m.path,
        "device": m.device,
        "loaded_at": timestamp(m.loaded_at.as_ref()),
        "calibrated": m.calibrated,
        "operating_points": m.operating_points.iter()
            .map(|p| json!({ "fmr": p.fmr, "threshold": float(p.threshold) }))
            .collect::<Vec<_>>(),
    })
}

fn swapped(active: Option<&pb::ModelInfo>, previous: Option<&pb::ModelInfo>) -> (Value, String) {
    let (active, previous) = (model(active), model(previous));
    let text = format!(
        "active: {} from {} (was {})",
        active["model_id"].as_str().unwrap_or_default(),
        active["path"].as_str().unwrap_or_default(),
        previous["model_id"].as_str().unwrap_or_default()
    );
    (json!({ "active": active, "previous": previous }), text)
}

fn cancelled(r: &pb::CancelMigrationResponse) -> (Value, String) {
    let (active, cancelled) = (model(r.active.as_ref()), model(r.cancelled.as_ref()));
    let mut text = format!(
        "active: {} from {} (cancelled {}: {} templates deleted, {} kept)",
        active["model_id"].as_str().unwrap_or_default(),
        active["path"].as_str().unwrap_or_default(),
        cancelled["model_id"].as_str().unwrap_or_default(),
        r.templates_deleted,
        r.templates_kept
    );
    if r.rollback_target {
        text.push_str("\nthe cancelled model is the rollback target: its templates are kept for it");
    }
    if r.subjects_without_active_templates > 0 {
        text.push_str(&format!(
            "\n{} subjects have no template of the active model and keep theirs: re-enrol or delete them",
            r.subjects_without_active_templates
        ));
    }
    (
        json!({
            "active": active,
            "cancelled": cancelled,
            "templates_deleted": r.templates_deleted,
            "templates_kept": r.templates_kept,
            "subjects_without_active_templates": r.subjects_without_active_templates,
            "rollback_target": r.rollback_target,
        }),
        text,
    )
}

fn report(r: &pb::GetModelResponse) -> (Value, String) {
    let line = |label: &str, m: &Value| {
        format!(
            "{label:<9} {} {} {} from {}{}",
            m["model_id"].as_str().unwrap_or_default(),
            m["architecture"].as_str().unwrap_or_default(),
            m["device"].as_str().unwrap_or_default(),
            m["path"].as_str().unwrap_or_default(),
            if m["calibrated"] == true {
                ""
            } else {
                " (no calibrated thresholds)"
            }
        )
    };
    let (active, staged) = (model(r.active.as_ref()), model(r.staged.as_ref()));
    let mut text = line("active", &active);
    if !staged.is_null() {
        text.push('\n');
        text.push_str(&line("staged", &staged));
        for c in &r.coverage {
            text.push_str(&format!(
                "\n  {}: {} of {} subjects have a template of the staged model",
                c.gallery_id, c.subjects_with_staged_templates, c.subjects
            ));
        }
    }
    let rollback = r.rollback_target.as_ref().map_or(Value::Null, |t| {
        json!({
            "model_id": t.model_id,
            "embedding_space": t.embedding_space,
            "path": t.path,
            "active_until": timestamp(t.active_until.as_ref()),
        })
    });
    if let Some(t) = &r.rollback_target {
        text.push_str(&format!("\nrollback  {} from {}", t.model_id, t.path));
    }
    // Never decides a match: no calibration note.
    let side_info = model(r.side_info.as_ref());
    if !side_info.is_null() {
        text.push_str(&format!(
            "\nside-info {} {} from {}",
            side_info["model_id"].as_str().unwrap_or_default(),
            side_info["device"].as_str().unwrap_or_default(),
            side_info["path"].as_str().unwrap_or_default(),
        ));
    }
    let coverage: Vec<Value> = r
        .coverage
        .iter()
        .map(|c| {
            json!({
                "gallery_id": c.gallery_id,
                "subjects": c.subjects,
                "subjects_with_staged_templates": c.subjects_with_staged_templates,
            })
        })
        .collect();
    (
        json!({
            "active": active,
            "staged": staged,
            "coverage": coverage,
            "rollback_target": rollback,
            "side_info": side_info,
        }),
        text,
    )
}

/// The canonical name of a gRPC status code (`FAILED_PRECONDITION`).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
