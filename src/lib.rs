//! skillsync keeps a local SQLite mirror of Skills Workflow Jobs and Projects.
//!
//! Module map:
//! - [`config`]: the TOML config, validated at load; secrets redacted.
//! - [`store`]: the only place with SQL: pool, single group-committing writer,
//!   schema and migrations; events, fetch queue, mirror, reconciliation state.
//! - [`webhook`]: warp filters and handlers for the public listener: the webhook and `/healthz`.
//! - [`health`]: the daemon's periodic durable-write probe that `/healthz` answers from.
//! - [`server`]: the accept loop with connection limits, optional TLS and graceful stop.
//! - [`tls`]: built-in TLS (rustls) and certificate rotation without a restart.
//! - [`upstream`]: the Skills Workflow API client (single documents, listing).
//! - [`fetcher`]: workers that turn queued documents into mirror rows.
//! - [`reconcile`]: incremental and full sweeps; the pure `plan` step.
//! - [`reporting`]: report view columns (defaults, `[reporting]`), typed values, the field survey.
//! - [`simulator`]: a Skills Workflow stand-in for the demo, tests and benchmarks.
//! - [`retention`]: pruning old events and history in small batches.
//! - [`pgmirror`]: the PostgreSQL mirror: `[postgres]`, the sink thread fed by the outbox, its
//!   schema and views in PostgreSQL, `postgres-check`.
//! - [`metrics`]: the Prometheus recorder, counters, HELP text and the metrics listener's routes.
//! - [`logging`]: text, JSON or the systemd journal; colours only on a terminal.
//! - [`columns`]: `skillsync columns`, the field survey that suggests `[reporting]` lines.
//! - [`model`]: shared domain types and the timestamp format.
//! - [`app`]: `run()`, wiring it all together the same way for `serve`, tests and the demo;
//!   SIGHUP reloads.

pub mod app;
pub mod cli;
pub mod columns;
pub mod config;
pub mod demo;
pub mod fetcher;
pub mod health;
pub mod http;
pub mod logging;
pub mod metrics;
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
