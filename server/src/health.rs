//! What the gRPC health service reports: SERVING only while this replica
//! can answer truthfully. Three conditions, probed every
//! `server.health_check_interval_ms`:
//!
//! - the database answers (the pool reconnects by itself; recovery needs
//!   nothing but the next successful probe);
//! - every loaded model can run (a batch that failed and whose self-test
//!   failed too, e.g. a device fault, makes it NOT_SERVING until a
//!   self-test passes: `batcher.rs`);
//! - with replication on, this replica is not further behind the change
//!   feed than `replication.max_lag_ms` (a replica that has not applied
//!   another's deletion would still match the deleted subject).
//!
//! The lag is also exported as metrics (`handid.replication.lag`,
//! `handid.replication.pending_changes`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::engine::Engine;
use crate::telemetry::metrics;

/// The gRPC service names whose health is reported ("" is the whole server).
pub const SERVICES: [&str; 3] = ["", "handid.v1.HandId", "handid.v1.Admin"];

/// How the health is judged.
#[derive(Debug, Clone, Copy)]
pub struct HealthRules {
    /// How often the conditions are probed.
    pub interval: Duration,
    /// The largest replication lag still SERVING; `None` when replication
    /// is off (a replica alone applies its writes itself).
    pub max_lag: Option<Duration>,
}

/// Sets every service's status.
pub async fn set(health: &HealthReporter, status: ServingStatus) {
    for service in SERVICES {
        health.set_service_status(service, status).await;
    }
}

/// Probes the conditions until `stopped` turns true, and reports each
/// change of the verdict (with its reasons in the log).
pub async fn watch(
    engine: Arc<Engine>,
    health: HealthReporter,
    rules: HealthRules,
    mut stopped: watch::Receiver<bool>,
) {
    let mut reported: Option<Vec<String>> = None;
    loop {
        if *stopped.borrow() {
            return;
        }
        let problems = problems(&engine, rules).await;
        // A shutdown that began during the probe has already said NOT_SERVING.
        if *stopped.borrow() {
            return;
        }
        if reported.as_ref() != Some(&problems) {
            if problems.is_empty() {
                tracing::info!("SERVING");
                set(&health, ServingStatus::Serving).await;
            } else {
                tracing::warn!(reasons = %problems.join("; "), "NOT_SERVING");
                set(&health, ServingStatus::NotServing).await;
            }
            reported = Some(problems);
        }
        tokio::select! {
            _ = tokio::time::sleep(rules.interval) => {}
            _ = stopped.changed() => {}
        }
    }
}

/// Why this replica should not serve now (empty: it should).
async fn problems(engine: &Engine, rules: HealthRules) -> Vec<String> {
    let mut problems = Vec::new();
    let probe_timeout = rules.interval.max(Duration::from_millis(500));
    let database = matches!(
        tokio::time::timeout(probe_timeout, engine.store().ping()).await,
        Ok(Ok(()))
    );
    if !database {
        problems.push("the database does not answer".to_owned());
    }
    if !engine.models_can_run() {
        problems.push("a loaded model cannot run (its self-test fails)".to_owned());
    }
    if let Some(reason) = engine.unfollowed() {
        problems.push(reason);
    }
    if let (Some(max_lag), true) = (rules.max_lag, database) {
        match tokio::time::timeout(probe_timeout, engine.store().lag(engine.applied_change())).await {
            Ok(Ok(lag)) => {
                metrics().replication(lag.oldest.as_secs_f64(), lag.pending);
                if lag.oldest > max_lag {
                    problems.push(format!(
                        "replication lags {:.1} s behind ({} changes), over replication.max_lag_ms",
                        lag.oldest.as_secs_f64(),
                        lag.pending
                    ));
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "reading the replication lag"),
            Err(_) => tracing::warn!("reading the replication lag timed out"),
        }
    }
    problems
}
