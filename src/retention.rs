//! Retention: prunes `done`/`ignored` events, old `document_history` rows
//! and `fetch_covered` rows no recorded event needs, in small batches (each
//! its own short write, so webhook intake is never held up), once shortly
//! after start and then hourly. This file owns the schedule and the
//! batching loop; the statements are in `store::retention`.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::store::Aged;
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
    let days = &config.retention;
    let events = prune_older_than(store, Aged::Events, days.events_days, shutdown).await;
    let history = prune_older_than(store, Aged::History, days.history_days, shutdown).await;
    // Bookkeeping of the inbox, whatever the retention settings: only needed
    // while older recorded events wait to be queued.
    while !shutdown.is_cancelled() {
        match store.prune_fetch_covered(BATCH).await {
            Ok(n) if n == BATCH => tokio::task::yield_now().await,
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(error = %e, "retention: pruning fetch_covered failed; will try again later");
                break;
            }
        }
    }
    if events + history > 0 {
        tracing::info!(events, history_rows = history, "retention: pruned old rows");
    }
    (events, history)
}

/// Deletes batch after batch of `what` older than `days` (0: keep forever)
/// until a batch deletes nothing, a write fails or `shutdown`. Returns how
/// many rows went.
async fn prune_older_than(
    store: &Store,
    what: Aged,
    days: u32,
    shutdown: &CancellationToken,
) -> usize {
    let mut deleted = 0;
    if days == 0 {
        return deleted;
    }
    let before = Utc::now() - chrono::Duration::days(i64::from(days));
    while !shutdown.is_cancelled() {
        match store.prune_aged(what, before, BATCH).await {
            Ok(0) => break,
            Ok(n) => deleted += n,
            Err(e) => {
                let what = what.as_str();
                tracing::warn!(error = %e, "retention: pruning {what} failed; will try again later");
                break;
            }
        }
        tokio::task::yield_now().await;
    }
    deleted
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
