//! Following the other replicas' writes: several servers on one database.
//!
//! Every committed enrolment and deletion leaves numbered rows in the
//! `changes` table and a NOTIFY on [`CHANNEL`] (triggers of the migration
//! `20261127000001_replication_and_reloads.sql`, in the writing transaction,
//! so both appear exactly at commit). [`follow`] LISTENs on a dedicated
//! connection and, on each notification, has the engine apply every change
//! past the last one it applied ([`Engine::apply_changes`]): the payload only
//! says *that* something changed, the table says *what*, in order.
//!
//! Notifications are not durable: one sent while the listener connection is
//! down (dropped, database restarting) is lost. Nothing depends on it: the
//! follower also reads the table after every reconnection and every
//! `poll_interval_ms`, so a lost notification delays a change by at most
//! that long.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::watch;

use crate::engine::Engine;
use crate::settings::ReplicationSettings;
use crate::telemetry::metrics;

/// The NOTIFY channel of the change feed.
pub const CHANNEL: &str = "handid_changes";

/// How long a follower that died waits before it starts again.
const RESTART_PAUSE: Duration = Duration::from_millis(500);

/// Runs [`follow`] until `stopped` turns true, starting it again whenever
/// it dies (a panic: a bug, or a fault injected by a test), so this replica
/// never silently stops seeing the others' writes. Each restart is logged
/// and counted (`handid.replication.follower_restarts`); the lag it caused
/// shows in the replication metrics and in health.
pub async fn supervise(
    engine: Arc<Engine>,
    settings: ReplicationSettings,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let task = tokio::spawn(follow(Arc::clone(&engine), settings.clone(), stopped.clone()));
        match task.await {
            Err(e) if e.is_panic() => {
                metrics().follower_restarted();
                tracing::error!("the change-feed follower died; starting it again");
                tokio::select! {
                    _ = stopped.changed() => return,
                    _ = tokio::time::sleep(RESTART_PAUSE) => {}
                }
            }
            // Stopped, or cancelled with the server.
            _ => return,
        }
    }
}

/// Applies the change feed to `engine` until `stopped` turns true.
pub async fn follow(engine: Arc<Engine>, settings: ReplicationSettings, mut stopped: watch::Receiver<bool>) {
    let poll = Duration::from_millis(settings.poll_interval_ms);
    let mut listener: Option<PgListener> = None;
    loop {
        if *stopped.borrow() {
            return;
        }
        if crate::faults::follower_dies() {
            panic!("injected follower death");
        }
        if listener.is_none() {
            listener = connect(&engine).await;
            // Whatever was announced while no one listened.
            catch_up_all(&engine).await;
        }
        let event = match listener.as_mut() {
            Some(l) => tokio::select! {
                _ = stopped.changed() => return,
                received = tokio::time::timeout(poll, l.try_recv()) => Some(received),
            },
            None => {
                // No listener (database unreachable): poll, retry later.
                tokio::select! {
                    _ = stopped.changed() => return,
                    _ = tokio::time::sleep(poll) => None,
                }
            }
        };
        match event {
            Some(Ok(Ok(Some(notification)))) if notification.payload() == MODELS => {
                tracing::debug!("model roles changed");
                follow_roles(&engine).await;
            }
            Some(Ok(Ok(Some(notification)))) => {
                tracing::debug!(payload = notification.payload(), "change announced");
                catch_up(&engine).await;
            }
            Some(Ok(Ok(None))) => {
                // The connection dropped; the next `try_recv` reconnects and
                // LISTENs again. Notifications sent meanwhile are lost: read
                // the table now, and the periodic read covers the gap until
                // the listener is back.
                tracing::warn!("change listener connection lost; reconnecting and catching up");
                catch_up_all(&engine).await;
            }
            Some(Ok(Err(e))) => {
                tracing::warn!(error = %e, "change listener failed; reconnecting");
                listener = None;
                sleep_or_stop(poll, &mut stopped).await;
            }
            // Timeout: the periodic read.
            Some(Err(_)) | None => catch_up_all(&engine).await,
        }
    }
}

async fn connect(engine: &Engine) -> Option<PgListener> {
    let listener = async {
        let mut listener = PgListener::connect_with(engine.store().pool()).await?;
        listener.listen(CHANNEL).await?;
        Ok::<_, sqlx::Error>(listener)
    };
    match listener.await {
        Ok(listener) => {
            tracing::info!(channel = CHANNEL, "following the change feed");
            Some(listener)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for changes; polling until the database answers");
            None
        }
    }
}

/// A change of the recorded models (the payload of their NOTIFY).
const MODELS: &str = "models";

async fn follow_roles(engine: &Engine) {
    if let Err(e) = engine.follow_roles().await {
        tracing::warn!(error = %e, "following the model roles failed; retrying at the next poll");
    }
}

/// Applies the template changes, then follows the model roles: the
/// periodic read and the catch-up after a reconnection cover both.
async fn catch_up_all(engine: &Engine) {
    catch_up(engine).await;
    follow_roles(engine).await;
}

async fn catch_up(engine: &Engine) {
    match engine.apply_changes().await {
        Ok(0) => {}
        Ok(applied) => tracing::debug!(applied, last = engine.applied_change(), "changes applied"),
        Err(e) => tracing::warn!(error = %e, "applying changes failed; retrying at the next poll"),
    }
}

async fn sleep_or_stop(pause: Duration, stopped: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = stopped.changed() => {}
        _ = tokio::time::sleep(pause) => {}
    }
}
