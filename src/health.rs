//! Whether the database takes durable writes, as the daemon itself last saw
//! it. A background task writes a probe row every few seconds (and pings the
//! systemd watchdog while that works); webhook commits count as evidence
//! too. `/healthz` answers from this state, so a request never causes a
//! write: an unauthenticated client cannot make the daemon write, and a
//! load balancer's polling costs nothing.
//!
//! Owns no SQL: the probe write is [`Store::probe_write`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// How often the probe writes when systemd asks for no faster watchdog pings.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// What the latest evidence said.
#[derive(Debug, Clone)]
struct Evidence {
    /// When a write last committed (probe or webhook); `None` before the first.
    last_ok: Option<Instant>,
    /// Why the latest attempt failed, if it did (cleared by a success).
    error: Option<String>,
}

/// The shared health state; cheap to clone.
#[derive(Clone)]
pub struct Health {
    seen: Arc<Mutex<Evidence>>,
    /// A success older than this no longer counts (a wedged writer never
    /// reports a failure: it just stops answering).
    stale_after: Duration,
}

/// A health answer for `/healthz`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub healthy: bool,
    /// Seconds since a write last committed.
    pub last_write_ok_secs_ago: Option<f64>,
    /// The latest failure (database errors only; no secret is ever in one).
    pub error: Option<String>,
}

impl Health {
    /// A state that reports unhealthy until the first write succeeds.
    pub fn new(interval: Duration, busy_timeout: Duration) -> Health {
        Health {
            seen: Arc::new(Mutex::new(Evidence {
                last_ok: None,
                error: None,
            })),
            stale_after: interval * 3 + busy_timeout,
        }
    }

    /// Records a committed write.
    pub fn ok(&self) {
        if let Ok(mut s) = self.seen.lock() {
            s.last_ok = Some(Instant::now());
            s.error = None;
        }
    }

    /// Records a write the database refused.
    pub fn failed(&self, why: String) {
        if let Ok(mut s) = self.seen.lock() {
            s.error = Some(why);
        }
    }

    /// The answer for `/healthz`: healthy when the latest attempt committed
    /// and that was recent.
    pub fn report(&self) -> Report {
        let seen = match self.seen.lock() {
            Ok(s) => s.clone(),
            Err(_) => {
                return Report {
                    healthy: false,
                    last_write_ok_secs_ago: None,
                    error: Some("health state unavailable".into()),
                };
            }
        };
        let age = seen.last_ok.map(|t| t.elapsed());
        let fresh = age.is_some_and(|a| a <= self.stale_after);
        let error = seen.error.or_else(|| match (age, fresh) {
            (None, _) => Some("no write has committed yet".into()),
            (Some(a), false) => Some(format!(
                "no write has committed for {}s (database writer stuck?)",
                a.as_secs()
            )),
            _ => None,
        });
        Report {
            healthy: fresh && error.is_none(),
            last_write_ok_secs_ago: age.map(|a| a.as_secs_f64()),
            error,
        }
    }

    /// One probe write now; records its outcome and returns whether it committed.
    pub async fn probe(&self, store: &Store) -> bool {
        // A writer that never answers counts as a failure, not as silence.
        let limit = self.stale_after;
        match tokio::time::timeout(limit, store.probe_write(crate::model::now_ts())).await {
            Ok(Ok(())) => {
                self.ok();
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "health probe: database not writable");
                self.failed(e.to_string());
                false
            }
            Err(_) => {
                tracing::warn!(
                    after_secs = limit.as_secs(),
                    "health probe: database write did not finish"
                );
                self.failed("database write did not finish".into());
                false
            }
        }
    }

    /// Probes every `interval` until `shutdown`; while the probe commits,
    /// pings the systemd watchdog when `watchdog` (it asked for pings).
    pub async fn run(
        self,
        store: Store,
        interval: Duration,
        watchdog: bool,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            // A wedged writer stops the pings, and systemd restarts us.
            if self.probe(&store).await && watchdog {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        }
    }
}
