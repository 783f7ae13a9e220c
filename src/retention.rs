//! Retention: prunes `done`/`ignored` events and old `document_history`
//! rows in small batches (each its own short write, so webhook intake is
//! never held up), once shortly after start and then hourly.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::store::Store;

const BATCH: usize = 500;
const FIRST_RUN_AFTER: Duration = Duration::from_secs(60);
const EVERY: Duration = Duration::from_secs(3600);

/// One pass: prunes until nothing old is left. Returns (events, history rows) deleted.
pub async fn prune_once(
    store: &Store,
    config: &Config,
    shutdown: &CancellationToken,
) -> (usize, usize) {
    let mut events = 0;
    let mut history = 0;
    if config.retention.events_days > 0 {
        let before = Utc::now() - chrono::Duration::days(i64::from(config.retention.events_days));
        while !shutdown.is_cancelled() {
            match store.prune_events(before, BATCH).await {
                Ok(0) => break,
                Ok(n) => events += n,
                Err(e) => {
                    tracing::warn!(error = %e, "retention: pruning events failed; will try again later");
                    break;
                }
            }
            tokio::task::yield_now().await;
        }
    }
    if config.retention.history_days > 0 {
        let before = Utc::now() - chrono::Duration::days(i64::from(config.retention.history_days));
        while !shutdown.is_cancelled() {
            match store.prune_history(before, BATCH).await {
                Ok(0) => break,
                Ok(n) => history += n,
                Err(e) => {
                    tracing::warn!(error = %e, "retention: pruning history failed; will try again later");
                    break;
                }
            }
            tokio::task::yield_now().await;
        }
    }
    if events + history > 0 {
        tracing::info!(events, history_rows = history, "retention: pruned old rows");
    }
    (events, history)
}

/// Runs retention until `shutdown`.
pub async fn run(store: Store, config: Arc<Config>, shutdown: CancellationToken) {
    let mut wait = FIRST_RUN_AFTER;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        prune_once(&store, &config, &shutdown).await;
        wait = EVERY;
    }
}
