//! handid-server binary.
//!
//! # Layout
//! - `main.rs`: the command line (`migrate` for now; serving arrives with the
//!   server issue).

use anyhow::Context;
use clap::{Parser, Subcommand};

/// Command-line interface of the server.
#[derive(Debug, Parser)]
#[command(name = "handid-server", version, about = "The handid gRPC service")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply the database migrations and exit.
    Migrate {
        /// PostgreSQL URL.
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
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
