//! handid-server binary.
//!
//! # Layout
//! - `main.rs`: the command line: `serve` (the gRPC service until SIGTERM or
//!   ctrl-c, then a graceful drain; SIGHUP hot-reloads the model's
//!   checkpoint folder) and `migrate` (apply migrations, exit).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use handid_server::Settings;
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
    },
    /// Ask a running server's gRPC health service; exit 0 when it is
    /// SERVING, 1 otherwise (the container image's HEALTHCHECK).
    Health {
        /// The server's address.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        addr: String,
    },
    /// Apply the database migrations and exit.
    Migrate {
        /// PostgreSQL URL.
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match Cli::parse().command {
        Command::Serve { config } => {
            let settings = Settings::load(config.as_deref()).context("reading the settings")?;
            let listener = tokio::net::TcpListener::bind(settings.server.listen)
                .await
                .with_context(|| format!("binding {}", settings.server.listen))?;
            handid_server::run_with_reloads(listener, settings, shutdown_signal(), reload_signal()?)
                .await
                .context("serving")?;
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

/// One message per SIGHUP: reload the model's checkpoint folder.
fn reload_signal() -> anyhow::Result<tokio::sync::mpsc::Receiver<()>> {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("listening for SIGHUP")?;
    let (reload, reloads) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            tracing::info!("SIGHUP received: reloading the model");
            // A reload already queued covers this signal too.
            let _ = reload.try_send(());
        }
    });
    Ok(reloads)
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
