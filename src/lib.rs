//! skillsync keeps a local SQLite mirror of Skills Workflow Jobs and Projects.
//!
//! The pipeline reads in one direction: the HTTP edge records events in the
//! store; the fetcher claims them, GETs the documents from upstream and
//! stores them; reconciliation lists upstream and queues what the webhooks
//! missed; `app` wires these together and `cli` sits on top. Each module
//! below imports only from modules listed after it (the foundations last),
//! never from one listed before it.
//!
//! Entry points (on top):
//! - [`cli`]: the command line: subcommands, exit codes, printing. Nothing imports it.
//! - [`demo`]: `skillsync demo`, the whole pipeline against the simulator.
//! - [`status`], [`columns`]: the read-only `status` and `columns` commands
//!   (they say what they found; `cli` turns it into the exit code).
//! - [`migrate`]: `skillsync migrate [--dry-run]`, the upgrade work this
//!   binary will run on a database and its estimated time.
//! - [`app`]: [`app::Application`], the whole daemon built in one place
//!   (listeners, store, pipeline, health, TLS) and run (fetch workers,
//!   schedules, retention, the PostgreSQL sink, both servers, SIGHUP
//!   reloads) for `serve`, the demo and the tests; [`run()`] is the two in
//!   one call. [`app::Pipeline`], the store, metrics, upstream client,
//!   fetcher, wake-ups, reconciler and auditor wired once, under the
//!   application and alone for the one-shot commands: [`app::oneshot`]
//!   (`reconcile` run once and reported) and [`app::verify`].
//! - [`simulator`]: a Skills Workflow stand-in for the demo, tests and benchmarks.
//! - [`manpages`]: `skillsync man` and `completions`: pages from the clap
//!   definitions `cli` passes in, `skillsync.toml(5)` from the config key
//!   declarations.
//!
//! The pipeline:
//! - [`http`]: the warp routes of the public listener (webhook, `/healthz`)
//!   and the metrics listener; tenant auth, client address, every refusal
//!   mapped to a status in one place. HTTP types stop here.
//! - [`payload`]: the webhook payload parsed and validated; pure, fuzzed.
//! - [`reconcile`]: incremental and full sweeps; the pure `plan` step.
//! - [`audit`]: the accuracy audit (`verify`, `audit_schedule`): a sample
//!   GET upstream and compared with the mirror by content, refetches
//!   queued for what was wrong, the confidence bound.
//! - [`fetcher`]: workers that turn queued documents into mirror rows.
//! - [`upstream`]: the Skills Workflow API client (single documents, listing).
//! - [`budget`]: each tenant's request budget (token bucket, adaptive on
//!   429, foreground before background); every upstream call takes a permit.
//! - [`retention`]: pruning old events and history in small batches.
//! - [`health`]: the periodic durable-write probe that `/healthz` answers from.
//! - [`pgmirror`]: the PostgreSQL copy: the sink thread fed by the outbox
//!   (read through `ReadOnlyStore`, acknowledged through `Store`), its
//!   schema and views in PostgreSQL, `postgres-check`.
//! - [`metrics`]: the Prometheus recorder, counters, HELP text, scrape-time
//!   gauges (the PostgreSQL lag among them).
//! - [`store`]: the only place with SQL: pool, single group-committing writer,
//!   schema and migrations; events, fetch queue, mirror, reconciliation
//!   state, report tables, the PostgreSQL outbox (filled by SQLite triggers
//!   it names), retention's statements, and the read-only upgrade plan. Its
//!   submodules are private: callers get [`store::Store`] (the writer side),
//!   [`store::ReadOnlyStore`] (typed reads for the read-only commands and
//!   the PostgreSQL sink's thread) and row types; no SQLite type leaves it.
//!
//! Beside it:
//! - [`server`]: the accept loop with connection limits, optional TLS and graceful stop.
//! - [`shutdown`]: SIGTERM/SIGINT → a cancelled token.
//! - [`logging`]: text, JSON or the systemd journal; colours only on a terminal.
//!
//! Foundations:
//! - [`wake`]: the per-tenant wake-up of the fetch workers.
//! - [`config`]: the TOML config, validated section by section at load,
//!   secrets redacted; `[postgres]` included. Each key is declared once
//!   (`config/keys.rs`: type, range, default, doc line), and its defaults,
//!   the example `print-config` prints, the README's key table and
//!   `skillsync.toml(5)` come from that declaration.
//! - [`tls`]: built-in TLS (rustls), certificate loading and rotation
//!   without a restart.
//! - [`reporting`]: report view columns (defaults, `[reporting]`), typed values, the field survey,
//!   and the report and stage view SQL that SQLite and PostgreSQL share.
//! - [`model`]: shared domain types, the timestamp format, case-insensitive field lookup.

pub mod app;
pub mod audit;
pub mod budget;
pub mod cli;
pub mod columns;
pub mod config;
pub mod demo;
pub mod fetcher;
pub mod health;
pub mod http;
pub mod logging;
pub mod manpages;
pub mod metrics;
pub mod migrate;
pub mod model;
pub mod payload;
pub mod pgmirror;
pub mod reconcile;
pub mod reporting;
pub mod retention;
pub mod server;
pub mod shutdown;
pub mod simulator;
pub mod status;
pub mod store;
pub mod tls;
pub mod upstream;
pub mod wake;

pub use app::run;

/// What a unit test returns: `?` on any error fails the test and shows it.
#[cfg(test)]
pub(crate) type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The unit tests' shared set-up (a second call does nothing): the TLS
/// crypto provider, as `cli::main` and [`app::Application`] install it.
#[cfg(test)]
pub(crate) fn test_setup() {
    upstream::install_crypto();
}
