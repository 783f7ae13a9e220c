//! The request budget of each tenant: every upstream call of a tenant
//! (single-document GETs, listing pages, control GETs, and audits when they
//! come) takes a permit from that tenant's budget first, so one process
//! never sends a tenant's upstream more than it allows.
//!
//! Per tenant, one token bucket:
//! - **Configured** (`[[tenant]] max_requests_per_sec`): the bucket fills at
//!   that rate and holds a small burst ([`burst`]: 5% of a second's worth,
//!   at least one request), so any 1 s window holds at most rate + burst
//!   requests.
//! - **Adaptive** (a 429, with or without a configured rate): the rate drops
//!   to [`DECREASE`] times what the upstream accepted in the last second
//!   (never more than the rate in force), and the tenant sends nothing until
//!   the `Retry-After` has passed. Only a 429 to a request sent *after* the
//!   last decrease lowers the rate again, so one burst of refusals is one
//!   decrease (as TCP counts one loss per window). The rate then recovers
//!   additively: quickly back to just under the limit that was seen
//!   ([`FAST_INCREASE`]), slowly past it ([`SLOW_INCREASE`]), where the
//!   next refusal is likely; 10% past it the old limit is forgotten.
//!   Never above the configured rate.
//! - **No rate configured and no 429 yet**: a slow start from
//!   [`SLOW_START_RATE`], doubling every [`SLOW_START_STEP`], unlimited once
//!   past [`UNLIMITED_ABOVE`]. A fast upstream loses well under a second;
//!   a throttling one sees the first refusal while a request or two is in
//!   flight, not `fetch.concurrency` of them.
//!
//! Priority: a waiting [`Priority::Foreground`] request (a webhook's fetch)
//! takes the next permit before any [`Priority::Background`] one (listing
//! pages, fetches queued by a reconciliation, audits).
//!
//! The budget is per process: a `skillsync reconcile` beside `serve` has a
//! budget of its own, so the two together may send up to twice the rate (the
//! README says so). A 429 caused by the other process still lowers each
//! one's rate.
//!
//! The state machine ([`Limiter`]) takes the time as an argument, so it is
//! unit-tested without sleeping; [`Budgets`] wraps it for async callers.
//! This module knows nothing of HTTP or the database: callers report how
//! each request ended.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

/// The bucket holds this many seconds' worth of requests (at least one):
/// small, so a budget of 20/s never shows 30 requests in one second.
const BURST_SECS: f64 = 0.05;

/// On a 429 the rate becomes this fraction of what the upstream accepted.
pub const DECREASE: f64 = 0.9;

/// Rate recovery below 95% of the last limit seen, in requests/s per second
/// spent at the full rate.
pub const FAST_INCREASE: f64 = 2.0;

/// Rate recovery from 95% to 110% of the last limit seen.
pub const SLOW_INCREASE: f64 = 0.05;

/// The adaptive rate never falls below this (one request every 10 s).
pub const MIN_RATE: f64 = 0.1;

/// Where a tenant with no configured rate starts.
pub const SLOW_START_RATE: f64 = 100.0;

/// How often the slow start doubles the rate.
pub const SLOW_START_STEP: Duration = Duration::from_millis(250);

/// Past this rate the slow start ends: no limit at all.
pub const UNLIMITED_ABOVE: f64 = 5000.0;

/// The longest a `Retry-After` pauses a tenant.
pub const MAX_PAUSE: Duration = Duration::from_secs(3600);

/// The pause after a 429 without a `Retry-After`.
const DEFAULT_PAUSE: Duration = Duration::from_secs(1);

/// How often a tenant's throttling is handed out for recording.
const NOTE_EVERY: Duration = Duration::from_secs(10);

/// Which waiting request goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// A webhook's fetch: someone is waiting for that document.
    Foreground,
    /// Work for completeness: listing pages, a reconciliation's fetches, audits.
    Background,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Foreground => "foreground",
            Priority::Background => "background",
        }
    }
}

/// How a request that held a permit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Any answer but 429: the upstream took the request.
    Accepted,
    /// 429, with its `Retry-After` if any.
    Throttled(Option<Duration>),
    /// No answer (timeout, reset): says nothing about the rate.
    NoAnswer,
}

/// A tenant's throttling, for `status` (written to the database by the caller).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThrottleNote {
    /// When the latest 429 came.
    pub at: Instant,
    /// The rate in force after it, requests/s.
    pub allowed_rate: f64,
    /// 429s since the previous note.
    pub refusals: u64,
}

/// The budget of one tenant as a state machine; times are passed in.
#[derive(Debug)]
pub struct Limiter {
    /// `max_requests_per_sec`, if configured.
    ceiling: Option<f64>,
    /// The rate in force; `None`: no limit.
    rate: Option<f64>,
    /// Doubling until the first 429 or [`UNLIMITED_ABOVE`].
    slow_start: bool,
    doubled_at: Instant,
    tokens: f64,
    refilled: Instant,
    /// No request before this (a `Retry-After`).
    paused_until: Option<Instant>,
    /// Requests sent before this do not lower the rate again.
    decreased_at: Option<Instant>,
    /// What the upstream accepted when it last refused.
    known_limit: Option<f64>,
    /// When requests were accepted, over the last second.
    accepted: VecDeque<Instant>,
    /// Foreground requests waiting for a permit.
    foreground_waiting: usize,
    /// Throttling not yet handed out by [`Limiter::take_note`].
    unnoted: Option<(Instant, u64)>,
    noted_at: Option<Instant>,
}

/// The burst a bucket of `rate` holds.
pub fn burst(rate: f64) -> f64 {
    (rate * BURST_SECS).max(1.0)
}

impl Limiter {
    /// A budget of `ceiling` requests/s, or adaptive from a slow start.
    pub fn new(ceiling: Option<f64>, now: Instant) -> Limiter {
        Limiter {
            ceiling,
            rate: Some(ceiling.unwrap_or(SLOW_START_RATE)),
            slow_start: ceiling.is_none(),
            doubled_at: now,
            tokens: 1.0,
            refilled: now,
            paused_until: None,
            decreased_at: None,
            known_limit: None,
            accepted: VecDeque::new(),
            foreground_waiting: 0,
            unnoted: None,
            noted_at: None,
        }
    }

    /// The rate in force (`None`: unlimited).
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }

    /// Follows a changed `max_requests_per_sec`.
    pub fn set_ceiling(&mut self, ceiling: Option<f64>, now: Instant) {
        if self.ceiling != ceiling {
            *self = Limiter {
                foreground_waiting: self.foreground_waiting,
                ..Limiter::new(ceiling, now)
            };
        }
    }

    fn refill(&mut self, now: Instant) {
        // Before `refilled` is inside a pause: nothing accrues there.
        if now <= self.refilled {
            return;
        }
        let dt = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        if let Some(r) = self.rate {
            self.tokens = (self.tokens + r * dt).min(burst(r));
        }
    }

    /// Takes a permit now, or says when to ask again.
    pub fn try_take(&mut self, now: Instant, priority: Priority) -> Result<(), Instant> {
        self.refill(now);
        if let Some(p) = self.paused_until {
            if now < p {
                return Err(p);
            }
            self.paused_until = None;
        }
        let interval = self.rate.map_or(Duration::from_millis(5), |r| {
            Duration::from_secs_f64(1.0 / r)
        });
        if priority == Priority::Background && self.foreground_waiting > 0 {
            return Err(now + interval.min(Duration::from_millis(50)));
        }
        match self.rate {
            None => Ok(()),
            Some(_) if self.tokens >= 1.0 => {
                self.tokens -= 1.0;
                Ok(())
            }
            Some(r) => Err(now + Duration::from_secs_f64((1.0 - self.tokens) / r)),
        }
    }

    fn accepted_last_second(&mut self, now: Instant) -> usize {
        while self
            .accepted
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > Duration::from_secs(1))
        {
            self.accepted.pop_front();
        }
        self.accepted.len()
    }

    /// Records how a request sent at `sent` ended, at `now`.
    pub fn answer(&mut self, sent: Instant, now: Instant, answer: Answer) {
        match answer {
            Answer::Accepted => {
                self.accepted.push_back(now);
                self.accepted_last_second(now);
                self.increase(now);
            }
            Answer::Throttled(retry_after) => self.throttled(sent, now, retry_after),
            Answer::NoAnswer => {}
        }
    }

    fn increase(&mut self, now: Instant) {
        let Some(r) = self.rate else { return };
        if self.slow_start {
            if now.saturating_duration_since(self.doubled_at) >= SLOW_START_STEP {
                self.doubled_at = now;
                let doubled = r * 2.0;
                self.rate = (doubled <= UNLIMITED_ABOVE).then_some(doubled);
                self.slow_start = self.rate.is_some();
            }
            return;
        }
        if self.ceiling.is_some_and(|c| r >= c) {
            return;
        }
        let step = match self.known_limit {
            Some(k) if r < 0.95 * k => FAST_INCREASE,
            Some(k) if r < 1.1 * k => SLOW_INCREASE,
            Some(_) => {
                // Well past the old limit without a refusal: it has moved.
                self.known_limit = None;
                FAST_INCREASE
            }
            None => FAST_INCREASE,
        };
        // Per accepted request, so a second at the full rate adds `step`.
        let next = r + step / r;
        self.rate = Some(self.ceiling.map_or(next, |c| next.min(c)));
    }

    fn throttled(&mut self, sent: Instant, now: Instant, retry_after: Option<Duration>) {
        let pause = retry_after.unwrap_or(DEFAULT_PAUSE).min(MAX_PAUSE);
        let until = now + pause;
        if self.paused_until.is_none_or(|p| p < until) {
            self.paused_until = Some(until);
        }
        let (_, n) = self.unnoted.unwrap_or((now, 0));
        self.unnoted = Some((now, n + 1));
        if self.decreased_at.is_some_and(|d| sent < d) {
            return; // sent before the last decrease: the same episode
        }
        let accepted = self.accepted_last_second(now) as f64;
        let current = self.rate.unwrap_or(f64::INFINITY);
        let basis = if accepted >= 1.0 {
            current.min(accepted)
        } else if current.is_finite() {
            current
        } else {
            1.0
        };
        let mut next = (basis * DECREASE).max(MIN_RATE);
        if let Some(c) = self.ceiling {
            next = next.min(c);
        }
        self.rate = Some(next);
        self.known_limit = Some(basis);
        self.slow_start = false;
        self.decreased_at = Some(now);
        // No burst after the pause: start from an empty bucket.
        self.tokens = 0.0;
        self.refilled = until;
    }

    /// The throttling since the last note, at most once per [`NOTE_EVERY`].
    pub fn take_note(&mut self, now: Instant) -> Option<ThrottleNote> {
        let (at, refusals) = self.unnoted?;
        if self
            .noted_at
            .is_some_and(|n| now.saturating_duration_since(n) < NOTE_EVERY)
        {
            return None;
        }
        self.unnoted = None;
        self.noted_at = Some(now);
        Some(ThrottleNote {
            at,
            allowed_rate: self.rate.unwrap_or(f64::INFINITY),
            refusals,
        })
    }
}

/// Why a permit was not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldBack {
    /// When the budget could give one.
    pub wait: Duration,
}

/// A permit for one request: report its answer with [`Budgets::answer`].
#[derive(Debug)]
pub struct Permit {
    tenant: Arc<TenantBudget>,
    sent: Instant,
}

#[derive(Debug)]
struct TenantBudget {
    name: String,
    limiter: Mutex<Limiter>,
}

impl TenantBudget {
    fn lock(&self) -> MutexGuard<'_, Limiter> {
        // Plain numbers: a panic elsewhere leaves them usable.
        self.limiter.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Counts a foreground waiter for as long as it waits (also when its
/// future is dropped mid-wait).
struct Waiting<'a>(&'a TenantBudget);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut l = self.0.lock();
        l.foreground_waiting = l.foreground_waiting.saturating_sub(1);
    }
}

/// Every tenant's budget in this process; cheap to clone.
#[derive(Clone)]
pub struct Budgets {
    tenants: Arc<Mutex<HashMap<String, Arc<TenantBudget>>>>,
    metrics: Metrics,
}

impl Budgets {
    pub fn new(metrics: Metrics) -> Budgets {
        Budgets {
            tenants: Arc::default(),
            metrics,
        }
    }

    fn tenant(&self, name: &str, ceiling: Option<f64>) -> Arc<TenantBudget> {
        let mut m = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = m.get(name).cloned() {
            drop(m);
            t.lock().set_ceiling(ceiling, Instant::now());
            return t;
        }
        let limiter = Limiter::new(ceiling, Instant::now());
        // Shown from the first request on, before any answer moves it; the
        // 429 counter too, at 0, so a rate() over it has a series to start from.
        self.metrics
            .upstream_allowed_rate(name, limiter.rate().unwrap_or(f64::INFINITY));
        self.metrics.upstream_throttled_register(name);
        let t = Arc::new(TenantBudget {
            name: name.to_string(),
            limiter: Mutex::new(limiter),
        });
        m.insert(name.to_string(), t.clone());
        t
    }

    /// Waits for a permit of `tenant` (whose configured rate is `ceiling`),
    /// but not longer than `max_wait`: a caller holding a lease gives the
    /// work back instead of outwaiting it.
    pub async fn acquire(
        &self,
        tenant: &str,
        ceiling: Option<f64>,
        priority: Priority,
        max_wait: Duration,
    ) -> Result<Permit, HeldBack> {
        let t = self.tenant(tenant, ceiling);
        let start = Instant::now();
        let _waiting = (priority == Priority::Foreground).then(|| {
            t.lock().foreground_waiting += 1;
            Waiting(&t)
        });
        loop {
            let now = Instant::now();
            let next = t.lock().try_take(now, priority);
            match next {
                Ok(()) => {
                    self.metrics.upstream_request(tenant, priority.as_str());
                    return Ok(Permit {
                        tenant: t.clone(),
                        sent: now,
                    });
                }
                Err(at) => {
                    if at.saturating_duration_since(start) > max_wait {
                        return Err(HeldBack {
                            wait: at.saturating_duration_since(now),
                        });
                    }
                    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                }
            }
        }
    }

    /// Reports how the request of `permit` ended.
    pub fn answer(&self, permit: Permit, answer: Answer) {
        let rate = {
            let mut l = permit.tenant.lock();
            l.answer(permit.sent, Instant::now(), answer);
            l.rate()
        };
        if matches!(answer, Answer::Throttled(_)) {
            self.metrics.upstream_throttled(&permit.tenant.name);
        }
        self.metrics
            .upstream_allowed_rate(&permit.tenant.name, rate.unwrap_or(f64::INFINITY));
    }

    /// The rate in force for `tenant` (`None`: unlimited, or not used yet).
    pub fn rate(&self, tenant: &str) -> Option<f64> {
        let m = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        let t = m.get(tenant)?.clone();
        drop(m);
        t.lock().rate()
    }

    /// `tenant`'s throttling since the last note, at most once per 10 s.
    pub fn take_note(&self, tenant: &str) -> Option<ThrottleNote> {
        let m = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        let t = m.get(tenant)?.clone();
        drop(m);
        t.lock().take_note(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Sends as fast as the limiter allows for `secs`, each request answered
    /// at once by `answer(send time)`; returns the send times.
    fn drive(
        l: &mut Limiter,
        t0: Instant,
        secs: f64,
        mut answer: impl FnMut(Instant) -> Answer,
    ) -> Vec<Instant> {
        let end = t0 + Duration::from_secs_f64(secs);
        let mut now = t0;
        let mut sent = Vec::new();
        while now < end {
            match l.try_take(now, Priority::Background) {
                Ok(()) => {
                    sent.push(now);
                    let a = answer(now);
                    l.answer(now, now, a);
                    // One client at a time, each request 0.1 ms.
                    now += Duration::from_micros(100);
                }
                Err(at) => now = at.max(now + Duration::from_micros(1)),
            }
        }
        sent
    }

    fn max_in_any_window(times: &[Instant], window: Duration) -> usize {
        let mut best = 0;
        let mut lo = 0;
        for hi in 0..times.len() {
            while times[hi].saturating_duration_since(times[lo]) >= window {
                lo += 1;
            }
            best = best.max(hi - lo + 1);
        }
        best
    }

    #[test]
    fn a_configured_rate_holds_in_every_window() {
        let t0 = Instant::now();
        let mut l = Limiter::new(Some(20.0), t0);
        let sent = drive(&mut l, t0, 10.0, |_| Answer::Accepted);
        assert!((199..=202).contains(&sent.len()), "{}", sent.len());
        assert!(max_in_any_window(&sent, Duration::from_secs(1)) <= 21);
        assert_eq!(l.rate(), Some(20.0), "no increase past the configured rate");
    }

    #[test]
    fn fractions_are_rates_too() {
        let t0 = Instant::now();
        let mut l = Limiter::new(Some(0.5), t0);
        let sent = drive(&mut l, t0, 10.0, |_| Answer::Accepted);
        // One at once (the burst), then one every 2 s.
        assert_eq!(sent.len(), 5, "{sent:?}");
    }

    #[test]
    fn without_a_rate_it_starts_slowly_then_is_unlimited() {
        let t0 = Instant::now();
        let mut l = Limiter::new(None, t0);
        assert_eq!(l.rate(), Some(SLOW_START_RATE));
        let first = drive(&mut l, t0, 0.2, |_| Answer::Accepted);
        assert!(first.len() <= 25, "{}", first.len());
        drive(&mut l, t0 + ms(200), 3.0, |_| Answer::Accepted);
        assert_eq!(l.rate(), None, "unlimited after the slow start");
        assert!(l.try_take(t0 + ms(3300), Priority::Background).is_ok());
    }

    #[test]
    fn a_429_pauses_for_retry_after_and_lowers_the_rate_once_per_episode() {
        let t0 = Instant::now();
        let mut l = Limiter::new(None, t0);
        for i in 0..15 {
            l.answer(t0, t0 + ms(i), Answer::Accepted);
        }
        // Three requests in flight together are refused: one decrease.
        let sent = t0 + ms(20);
        l.answer(
            sent,
            t0 + ms(21),
            Answer::Throttled(Some(Duration::from_secs(2))),
        );
        let after_first = l.rate();
        l.answer(
            sent,
            t0 + ms(22),
            Answer::Throttled(Some(Duration::from_secs(2))),
        );
        l.answer(sent, t0 + ms(23), Answer::Throttled(None));
        assert_eq!(l.rate(), after_first);
        let r = after_first.unwrap_or(0.0);
        assert!((r - 15.0 * DECREASE).abs() < 1e-9, "{r}");
        // Nothing before the Retry-After.
        // (the latest Retry-After, from the refusal at 22 ms, counts)
        assert_eq!(
            l.try_take(t0 + ms(1000), Priority::Foreground),
            Err(t0 + ms(2022))
        );
        assert!(l.try_take(t0 + ms(2022), Priority::Foreground).is_err()); // empty bucket
        assert!(l.try_take(t0 + ms(2022 + 75), Priority::Foreground).is_ok());
        // A refusal of a request sent after the decrease lowers it again.
        l.answer(t0 + ms(2100), t0 + ms(2101), Answer::Throttled(None));
        assert!(l.rate().unwrap_or(f64::MAX) < r);
        let note = l.take_note(t0 + ms(2102));
        assert_eq!(note.map(|n| n.refusals), Some(4));
        assert_eq!(l.take_note(t0 + ms(2103)), None);
    }

    #[test]
    fn the_rate_recovers_fast_to_near_the_limit_then_slowly() {
        let t0 = Instant::now();
        let mut l = Limiter::new(None, t0);
        for i in 0..20 {
            l.answer(t0, t0 + ms(i), Answer::Accepted);
        }
        l.answer(t0 + ms(30), t0 + ms(30), Answer::Throttled(None));
        assert_eq!(l.rate(), Some(18.0));
        let t1 = t0 + Duration::from_secs(2);
        drive(&mut l, t1, 1.0, |_| Answer::Accepted);
        let r = l.rate().unwrap_or(0.0);
        assert!((19.0..19.5).contains(&r), "fast back to 95% of 20: {r}");
        drive(&mut l, t1 + Duration::from_secs(1), 10.0, |_| {
            Answer::Accepted
        });
        let r = l.rate().unwrap_or(0.0);
        assert!((19.5..21.5).contains(&r), "slowly past it: {r}");
    }

    #[test]
    fn a_throttling_upstream_sees_few_refusals() {
        // The upstream accepts at most 15 in any trailing second and refuses
        // the rest with Retry-After 1, like the simulator's knob.
        let t0 = Instant::now();
        let mut l = Limiter::new(None, t0);
        let mut accepted: VecDeque<Instant> = VecDeque::new();
        let mut refused = 0;
        let mut ok = 0;
        let sent = drive(&mut l, t0, 60.0, |now| {
            while accepted
                .front()
                .is_some_and(|t| now.saturating_duration_since(*t) >= Duration::from_secs(1))
            {
                accepted.pop_front();
            }
            if accepted.len() >= 15 {
                refused += 1;
                Answer::Throttled(Some(Duration::from_secs(1)))
            } else {
                accepted.push_back(now);
                ok += 1;
                Answer::Accepted
            }
        });
        eprintln!(
            "{refused} refused of {}, {ok} accepted, rate {:?}",
            sent.len(),
            l.rate()
        );
        assert!(
            refused * 100 <= sent.len() * 2,
            "{refused} of {}",
            sent.len()
        );
        // Within 10% of the limit's pace.
        assert!(ok >= 15 * 60 * 9 / 10, "{ok} accepted in 60 s");
    }

    #[test]
    fn a_configured_rate_is_lowered_by_a_429_and_recovers_to_it_not_past() {
        let t0 = Instant::now();
        let mut l = Limiter::new(Some(10.0), t0);
        l.answer(t0, t0, Answer::Accepted);
        l.answer(t0, t0 + ms(1), Answer::Throttled(None));
        assert_eq!(l.rate(), Some(0.9));
        drive(&mut l, t0 + Duration::from_secs(1), 30.0, |_| {
            Answer::Accepted
        });
        assert_eq!(l.rate(), Some(10.0));
    }

    #[test]
    fn foreground_goes_first() {
        let t0 = Instant::now();
        let mut l = Limiter::new(Some(10.0), t0);
        assert!(l.try_take(t0, Priority::Background).is_ok());
        l.foreground_waiting = 1;
        // A token is there at 100 ms, but a foreground request waits for it.
        assert!(l.try_take(t0 + ms(100), Priority::Background).is_err());
        assert!(l.try_take(t0 + ms(100), Priority::Foreground).is_ok());
        l.foreground_waiting = 0;
        assert!(l.try_take(t0 + ms(200), Priority::Background).is_ok());
    }

    #[tokio::test]
    async fn acquire_gives_up_past_max_wait_and_counts_no_waiter_after() {
        let b = Budgets::new(Metrics::install());
        let p = b
            .acquire("acme", Some(0.1), Priority::Foreground, ms(10))
            .await;
        assert!(p.is_ok());
        let held = b
            .acquire("acme", Some(0.1), Priority::Foreground, ms(10))
            .await;
        let wait = held.err().map(|h| h.wait).unwrap_or_default();
        assert!(wait > Duration::from_secs(9), "{wait:?}");
        let t = b.tenant("acme", Some(0.1));
        assert_eq!(t.lock().foreground_waiting, 0);
        // Another tenant is not slowed.
        assert!(
            b.acquire("beta", Some(0.1), Priority::Background, ms(10))
                .await
                .is_ok()
        );
    }
}
