//! handid-server binary.
//!
//! # Layout
//! - `main.rs`: the command line: `serve` (the gRPC service until SIGTERM or
//!   ctrl-c, then a graceful drain; SIGHUP reloads the settings file's
//!   keys, then hot-reloads the active model's checkpoint folder),
//!   `migrate` (apply migrations, exit),
//!   `health` (probe a running server), `keygen` (a new API key) and
//!   `upgrade-templates` (map stored templates into a staged model's space
//!   with a template transformation; [`handid_server::upgrade`]).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use handid_server::Settings;
use handid_server::settings::Scope;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// Command-line interface of the server.
#[derive(Debug, Parser)]
#[command(name = "handid-server", version, about = "The handid gRPC service")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the handid.v1 API until SIGTERM / ctrl-c.
    Serve {
        /// Settings file (YAML); HANDID__SECTION__KEY variables override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Adopt the model of model.path as the active model even when the
        /// database records another (model.adopt: true).
        #[arg(long)]
        adopt_model: bool,
    },
    /// Ask a running server's gRPC health service; exit 0 when it is
    /// SERVING, 1 otherwise (the container image's HEALTHCHECK).
    Health {
        /// The server's address.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        addr: String,
    },
    /// Print a new random API key (shown once: store it in the client's
    /// secret store) and the settings entry holding its SHA-256.
    Keygen {
        /// The key's name, recorded by the audit log for its calls.
        #[arg(long, value_parser = parse_key_id)]
        id: String,
        /// Comma-separated scopes: identify, embed, enroll, admin.
        #[arg(long, value_delimiter = ',', required = true, value_parser = parse_scope)]
        scopes: Vec<Scope>,
        /// Comma-separated galleries the key is limited to (default: all).
        #[arg(long, value_delimiter = ',')]
        galleries: Vec<String>,
        /// Write the key to this new file (mode 0600) instead of printing
        /// it, and print only the entry for the list under `auth.keys`, to
        /// append to a settings file.
        #[arg(long)]
        key_out: Option<PathBuf>,
    },
    /// Map the stored templates of a transform's old model into its new
    /// model's embedding space (no image needed), in batches, each its own
    /// transaction; resumable: run it again after a stop. Stage the new
    /// model first; promote it (PromoteModel) once coverage is full.
    UpgradeTemplates {
        /// Settings file (YAML) of the service: its database.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The transform's folder (from `handid-trainer fit-transform`).
        #[arg(long)]
        transform: PathBuf,
        /// Templates per transaction.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        batch_size: u32,
        /// Stop after this many templates (spread the work over several
        /// runs); all of them by default.
        #[arg(long)]
        limit: Option<u64>,
        /// Device running the transform: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Apply the database migrations and exit.
    Migrate {
        /// PostgreSQL URL.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
}

/// Key ids land in YAML and in the audit log: keep them plain.
/// The rule the settings apply to every key id ([`handid_server::auth::check_key_id`]).
fn parse_key_id(id: &str) -> Result<String, String> {
    handid_server::auth::check_key_id(id)?;
    Ok(id.to_owned())
}

fn parse_scope(name: &str) -> Result<Scope, String> {
    match name.trim() {
        "identify" => Ok(Scope::Identify),
        "embed" => Ok(Scope::Embed),
        "enroll" => Ok(Scope::Enroll),
        "admin" => Ok(Scope::Admin),
        other => Err(format!(
            "unknown scope {other:?} (identify, embed, enroll, admin)"
        )),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let command = Cli::parse().command;
    let Command::Serve { config, adopt_model } = command else {
        return tools(command).await;
    };
    let mut settings = Settings::load(config.as_deref()).context("reading the settings")?;
    settings.model.adopt |= adopt_model;
    let telemetry =
        handid_server::telemetry::init(&settings.telemetry, "info").context("setting up telemetry")?;
    let listener = tokio::net::TcpListener::bind(settings.server.listen)
        .await
        .with_context(|| format!("binding {}", settings.server.listen))?;
    let served = handid_server::run_with_reloads(listener, settings, shutdown_signal(), reload_signal()?)
        .await
        .context("serving");
    // Export the last spans and metrics before exiting.
    telemetry.shutdown();
    served
}

/// The commands other than `serve`: plain text logs, no telemetry.
async fn tools(command: Command) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    // The settings refuse such an entry (admin acts on every gallery):
    // keygen does not print one.
    if let Command::Keygen {
        scopes, galleries, ..
    } = &command
        && scopes.contains(&Scope::Admin)
        && !galleries.is_empty()
    {
        anyhow::bail!(
            "--scopes admin with --galleries: the admin scope acts on every gallery (model \
             reloads, promotions, rollbacks), so a key holding it cannot be limited to some; make \
             one key for admin and another limited to the galleries"
        );
    }
    match command {
        Command::Serve { .. } => anyhow::bail!("serve is not a tool command"),
        Command::Keygen {
            id,
            scopes,
            galleries,
            key_out: Some(path),
        } => {
            let key = handid_server::auth::generate_key();
            write_secret(&path, &key).with_context(|| format!("writing the key to {}", path.display()))?;
            let snippet = handid_server::auth::settings_snippet(&id, &key, &scopes, &galleries);
            // The list entry alone: the lines after `auth:` and `keys:`.
            for line in snippet.lines().skip(2) {
                println!("{line}");
            }
            eprintln!("the key of {id:?} is in {} (mode 0600)", path.display());
        }
        Command::Keygen {
            id,
            scopes,
            galleries,
            key_out: None,
        } => {
            let key = handid_server::auth::generate_key();
            println!("API key for {id:?} (shown once; give it to the client, it is not stored):\n");
            println!("  {key}\n");
            println!("Add to the server settings (only the hash is kept):\n");
            print!(
                "{}",
                handid_server::auth::settings_snippet(&id, &key, &scopes, &galleries)
            );
            println!("\nClients send it as gRPC metadata  authorization: Bearer <key>");
        }
        Command::Health { addr } => {
            let channel = tonic::transport::Endpoint::from_shared(addr.clone())
                .with_context(|| format!("bad address {addr}"))?
                .connect_timeout(std::time::Duration::from_secs(2))
                .timeout(std::time::Duration::from_secs(2))
                .connect()
                .await
                .with_context(|| format!("connecting to {addr}"))?;
            let status = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .context("health check")?
                .into_inner()
                .status();
            println!("{}", status.as_str_name());
            if status != ServingStatus::Serving {
                std::process::exit(1);
            }
        }
        Command::UpgradeTemplates {
            config,
            transform,
            batch_size,
            limit,
            device,
        } => {
            let options = handid_server::upgrade::UpgradeOptions {
                batch_size: batch_size as usize,
                limit,
            };
            upgrade_templates(config.as_deref(), &transform, &options, &device).await?;
        }
        Command::Migrate { database_url } => {
            let pool = sqlx::PgPool::connect(&database_url)
                .await
                .context("connecting to PostgreSQL")?;
            handid_server::MIGRATOR
                .run(&pool)
                .await
                .context("applying migrations")?;
            println!("migrations applied");
        }
    }
    Ok(())
}

/// `upgrade-templates`: the run with a progress bar, its audit row, the
/// coverage it leaves and the next step. Ctrl-c stops after the batch in
/// flight (exit status 130).
async fn upgrade_templates(
    config: Option<&std::path::Path>,
    transform_dir: &std::path::Path,
    options: &handid_server::upgrade::UpgradeOptions,
    device: &str,
) -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use handid_server::store::{AuditEntry, Store};
    use handid_server::upgrade;

    let mut settings = Settings::load(config).context("reading the settings")?;
    // A tool beside the service: it checks the schema, never migrates it.
    settings.database.migrate_on_start = false;
    let device = handid_model::parse_device(device)?;
    let transform = handid_model::transform::TemplateTransform::load(transform_dir, device)
        .with_context(|| format!("loading the transform in {}", transform_dir.display()))?;
    let store = Store::connect(&settings.database)
        .await
        .context("connecting to the database")?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopper = Arc::clone(&stop);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("ctrl-c: stopping after the batch in flight (run again to resume)");
            stopper.store(true, Ordering::Relaxed);
        }
    });
    let manifest = transform.manifest().clone();
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "upgrading templates [{bar:30}] {pos}/{len} {elapsed} (eta {eta})",
        )
        .context("progress style")?,
    );
    let result = upgrade::upgrade_templates(&store, &transform, options, &stop, |p| {
        bar.set_length(p.total);
        bar.set_position(p.derived);
    })
    .await;
    bar.finish_and_clear();
    let mut detail = serde_json::json!({
        "transform": transform_dir.display().to_string(),
        "from_model": manifest.from_model,
        "to_model": manifest.to_model,
        "batch_size": options.batch_size,
        "limit": options.limit,
    });
    match &result {
        Ok(done) => {
            detail["derived"] = done.derived.into();
            detail["batches"] = done.batches.into();
            detail["remaining"] = done.remaining.into();
            detail["stopped"] = done.stopped.into();
        }
        Err(e) => detail["reason"] = e.to_string().into(),
    }
    let outcome = match &result {
        Ok(_) => "ok",
        Err(upgrade::UpgradeError::Store(_)) => "UNAVAILABLE",
        Err(_) => "FAILED_PRECONDITION",
    };
    store
        .audit(&AuditEntry {
            actor: "upgrade-templates",
            peer: None,
            action: "upgrade_templates",
            gallery_id: None,
            subject_id: None,
            model_id: Some(&manifest.to_model),
            outcome,
            top_score: None,
            detail: Some(&detail),
        })
        .await
        .context("writing the audit row")?;
    let done = result?;
    println!(
        "{} templates of model {} mapped into model {} ({} batch{}); {} left",
        done.derived,
        done.from.model_id,
        done.to.model_id,
        done.batches,
        if done.batches == 1 { "" } else { "es" },
        done.remaining
    );
    for c in store
        .coverage(std::slice::from_ref(&done.to.embedding_space))
        .await
        .context("reading the coverage")?
    {
        println!(
            "  gallery {}: {} of {} subjects have a template of space {}",
            c.gallery_id, c.covered, c.subjects, done.to.embedding_space
        );
    }
    if done.stopped {
        println!("stopped: run the same command again to resume");
        std::process::exit(130);
    }
    if done.remaining > 0 {
        println!("run the same command again to go on");
    } else if done.to.role == "staged" {
        println!(
            "done: promote model {} (PromoteModel with require_full_coverage; `handid model promote \
             --require-full-coverage`)",
            done.to.model_id
        );
    } else {
        println!("done: model {} is the active model", done.to.model_id);
    }
    Ok(())
}

/// Writes `secret` to a new file only its owner may read.
fn write_secret(path: &std::path::Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    writeln!(file, "{secret}")
}

/// Completes on SIGTERM (what orchestrators send) or ctrl-c.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = ctrl_c => tracing::info!("ctrl-c received"),
        _ = terminate => tracing::info!("SIGTERM received"),
    }
}

/// One message per SIGHUP: reload the settings file's keys, then the active
/// model's checkpoint folder.
fn reload_signal() -> anyhow::Result<tokio::sync::mpsc::Receiver<()>> {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("listening for SIGHUP")?;
    let (reload, reloads) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            tracing::info!(
                "SIGHUP received: reloading the settings file's keys, then the active model's folder"
            );
            // A reload already queued covers this signal too.
            let _ = reload.try_send(());
        }
    });
    Ok(reloads)
}
