//! The command line: subcommands, logging set-up, exit codes. Each command
//! is a thin call into the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::app::oneshot::OneShot;
use crate::config::{Config, EXAMPLE_CONFIG};
use crate::model::{DocType, RunKind};

#[derive(Parser, Debug)]
#[command(
    name = "skillsync",
    version,
    about = "Keeps a local SQLite mirror of Skills Workflow Jobs and Projects",
    long_about = "skillsync receives Skills Workflow webhooks, records each event durably before answering, \
fetches the document from the Skills Workflow API and upserts it into SQLite tables that reporting tools read. \
Scheduled reconciliation catches every change whose webhook was lost.\n\n\
Start with `skillsync demo` (no account needed), then `skillsync print-config > skillsync.toml`."
)]
pub struct Cli {
    /// Config file (TOML).
    #[arg(
        long,
        global = true,
        env = "SKILLSYNC_CONFIG",
        default_value = "/etc/skillsync/skillsync.toml"
    )]
    config: PathBuf,
    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "SKILLSYNC_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum TypeArg {
    Job,
    Project,
}

impl From<TypeArg> for DocType {
    fn from(t: TypeArg) -> DocType {
        match t {
            TypeArg::Job => DocType::Job,
            TypeArg::Project => DocType::Project,
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon: webhook listener, fetch workers, scheduled reconciliation. Stops cleanly on SIGTERM/SIGINT.
    Serve,
    /// Run the whole pipeline against a built-in simulator on loopback, print what was mirrored, exit.
    Demo(crate::demo::DemoArgs),
    /// Run the Skills Workflow simulator alone (for trying a setup, tests, benchmarks).
    Simulate(Box<crate::simulator::SimulateArgs>),
    /// Validate the config; exits non-zero with a message naming the key at fault.
    CheckConfig,
    /// Print a commented example config with every key (reads no config, prints no secret).
    PrintConfig {
        /// Leave every secret empty (`webhook_secrets = []`, `app_secret = ""`): a config that
        /// does not load until the secrets are filled in. The Debian package installs this one.
        #[arg(long)]
        empty_secrets: bool,
    },
    /// Write the man pages: skillsync(1), one skillsync-COMMAND(1) per subcommand and
    /// skillsync.toml(5), generated from the same definitions as --help and print-config.
    Man {
        /// Write every page into this directory (created if missing); without it, print
        /// skillsync(1) alone on stdout.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Print the shell completion script for SHELL on stdout.
    #[command(
        long_about = "Print the shell completion script for SHELL on stdout, generated from the same \
definitions as --help. The Debian package installs those for bash, zsh and fish. By hand:\n\n  \
skillsync completions bash > /etc/bash_completion.d/skillsync\n  \
skillsync completions zsh > /usr/local/share/zsh/site-functions/_skillsync\n  \
skillsync completions fish > ~/.config/fish/completions/skillsync.fish"
    )]
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Report per tenant and type: mirrored, deleted, pending, retrying, dead, last reconciliation.
    /// Exit 0 healthy, 1 degraded, 2 database unreadable.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Database file to read (default: database.path from the config).
        #[arg(long)]
        db: Option<PathBuf>,
    },
    /// Run one reconciliation now, including the fetches it queues, then exit (safe while `serve` runs).
    Reconcile {
        /// Only this tenant (default: all).
        #[arg(long)]
        tenant: Option<String>,
        /// Only this type (default: both).
        #[arg(long, value_enum)]
        r#type: Option<TypeArg>,
        /// A full sweep: list every id and mark documents gone upstream as deleted.
        #[arg(long)]
        full: bool,
        /// With --full: mark deletions even beyond max_delete_fraction.
        #[arg(long, requires = "full")]
        force: bool,
    },
    /// The accuracy audit: GET a sample of mirrored documents (live and deleted), compare them
    /// with the mirror by content, record an `audits` row, refetch each mismatch, then exit.
    #[command(
        long_about = "The accuracy audit, once, now (serve also runs it on each tenant's audit_schedule). \
Per tenant and type it GETs a sample of the mirror's documents upstream (live ones at random, plus the most \
recently changed and the longest unchanged, and some marked deleted), compares each with the mirror by \
content (JSON values: key order, whitespace and number spelling do not matter), records an `audits` row, \
queues a refetch for each mismatch and works those refetches before it exits (safe while serve runs).\n\n\
It prints what it found and a lower bound on the share of live documents that are right, e.g. \
\"500 sampled, 0 wrong: at least 99.4% right (95% confidence)\". Upstream failures (5xx, 429, timeouts) \
are not mismatches: they are counted as not readable.\n\n\
Exit status: 0 every sampled document matched; 1 mismatches found (stale, missing upstream, or wrongly \
deleted; their refetches were queued); 2 nothing wrong found, but some document or the database could \
not be read (or the config cannot be loaded)."
    )]
    Verify {
        /// Only this tenant (default: all).
        #[arg(long)]
        tenant: Option<String>,
        /// Only this type (default: both).
        #[arg(long, value_enum)]
        r#type: Option<TypeArg>,
        /// Documents to sample per type (default: the tenant's audit_sample).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        sample: Option<u32>,
        /// At most this many GETs per second per audit (default 50; 0: as fast as the
        /// tenant's request budget allows).
        #[arg(long, value_parser = clap::value_parser!(u32))]
        max_rate: Option<u32>,
    },
    /// Survey the mirrored documents: each field with its JSON types and fill rate, and the
    /// `[reporting]` lines that add it to job_report / project_report.
    Columns {
        /// Only this type (default: both).
        #[arg(long, value_enum)]
        r#type: Option<TypeArg>,
        /// Database file to read (default: database.path from the config).
        #[arg(long)]
        db: Option<PathBuf>,
    },
    /// Compare the PostgreSQL copy with SQLite row by row (revision, deleted_at, document hash);
    /// exit 0 when equal, 1 when they differ, 2 when either cannot be read.
    PostgresCheck {
        /// Compare again until equal, for up to this many seconds (changes in flight settle).
        #[arg(long, default_value_t = 0)]
        wait: u64,
    },
    /// Say which schema migrations and report-table rebuilds this binary will run on the
    /// database, and roughly how long (--dry-run); or run them now, with the service stopped.
    #[command(
        long_about = "Say which schema migrations (by number and name) and which report-table \
rebuilds this binary will run on the database at the next start of `serve`, with a rough time from \
the row counts (rows times a per-row cost measured on a 2-core VM; expect up to 3x either way).\n\n\
Run the new binary's `migrate --dry-run` before switching binaries: it opens the database read-only \
and is safe beside a running serve of any version. Without --dry-run it runs the work now and says \
how long it took; stop the service first (it refuses while a serve's health probe is fresh).\n\n\
Exit status: 0 nothing to do (or done); 1 work pending (--dry-run); 2 this binary cannot use the \
database (schema newer than it knows, unreadable, not a skillsync database), the config cannot be \
loaded, or a serve seems to be running (without --dry-run)."
    )]
    Migrate {
        /// Only say what would run and roughly how long; the database is opened read-only.
        #[arg(long)]
        dry_run: bool,
        /// Database file to read (default: database.path from the config); with --dry-run only.
        #[arg(long, requires = "dry_run")]
        db: Option<PathBuf>,
        /// Print JSON instead of text (with --dry-run).
        #[arg(long, requires = "dry_run")]
        json: bool,
        /// Run even though a serve wrote its health probe in the last 30 s (it is known to be stopped).
        #[arg(long, conflicts_with = "dry_run")]
        force: bool,
    },
    /// A consistent online copy of the database beside a running `serve`: written to a temporary
    /// file beside PATH, fsynced, checked with `PRAGMA integrity_check`, renamed into place.
    /// Never stalls intake. Progress on a terminal; exit 0 done, 1 failed (with the reason).
    Backup {
        /// Where the copy goes (replaced atomically if it exists).
        path: PathBuf,
        /// Database file to copy (default: database.path from the config).
        #[arg(long)]
        db: Option<PathBuf>,
    },
    /// Put dead events back in the queue (a running `serve` picks them up within seconds).
    Retry {
        /// One event by id.
        #[arg(long, conflicts_with = "dead")]
        event: Option<i64>,
        /// Every dead event.
        #[arg(long)]
        dead: bool,
    },
}

/// Sets up tracing: see [`crate::logging`] (text, JSON, or the journal).
pub fn init_logging(json: bool, default_level: &str) {
    crate::logging::init(json, default_level);
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("skillsync: {e}");
        ExitCode::from(2)
    })
}

/// [`load`], then refuses (exit 2) a `--tenant` the config does not name.
fn load_for_tenant(path: &std::path::Path, tenant: Option<&str>) -> Result<Config, ExitCode> {
    let config = load(path)?;
    if let Some(t) = tenant {
        if config.tenant(t).is_none() {
            eprintln!("skillsync: no tenant named `{t}` in {}", path.display());
            return Err(ExitCode::from(2));
        }
    }
    Ok(config)
}

/// The types a `--type` names: that one, or both.
fn types_of(t: Option<TypeArg>) -> Vec<DocType> {
    match t {
        Some(t) => vec![t.into()],
        None => DocType::ALL.to_vec(),
    }
}

/// Runs a one-shot command (`reconcile`, `verify`) on a fresh runtime with
/// a token that SIGTERM and SIGINT cancel.
fn one_shot<F, Fut>(command: F) -> Result<ExitCode, ExitCode>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<ExitCode, ExitCode>>,
{
    let rt = runtime()?;
    rt.block_on(async move {
        let token = CancellationToken::new();
        crate::shutdown::cancel_on_signals(token.clone());
        command(token).await
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("skillsync: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        })
}

pub fn main() -> ExitCode {
    // Help and usage errors in colour only when stdout is a terminal too
    // (clap itself checks the stream it writes to and NO_COLOR).
    let mut command = <Cli as clap::CommandFactory>::command();
    if !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        command = command.color(clap::ColorChoice::Never);
    }
    command = ignore_empty_env(command);
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&command.get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // The demo narrates on stdout; its log shows only problems unless RUST_LOG says otherwise.
    let level = if matches!(cli.command, Command::Demo(_)) {
        "warn"
    } else {
        "info"
    };
    init_logging(cli.log_format == LogFormat::Json, level);
    crate::upstream::install_crypto();
    match run(cli) {
        Ok(code) => code,
        Err(code) => code,
    }
}

/// The options that read a variable, by clap id and variable name.
const ENV_OPTIONS: [(&str, &str); 2] = [
    ("config", "SKILLSYNC_CONFIG"),
    ("log_format", "SKILLSYNC_LOG_FORMAT"),
];

/// A variable that is set but empty (`SKILLSYNC_CONFIG=` in a unit or a
/// shell) counts as unset, as it does for most tools: clap would otherwise
/// take the empty string as the value and refuse every command, even
/// `print-config`. The option keeps its flag and its default.
fn ignore_empty_env(mut command: clap::Command) -> clap::Command {
    for (id, var) in ENV_OPTIONS {
        let empty = std::env::var_os(var).is_some_and(|v| v.to_string_lossy().trim().is_empty());
        if empty {
            command = command.mut_arg(id, |arg| arg.env(None::<&'static str>));
        }
    }
    command
}

fn run(cli: Cli) -> Result<ExitCode, ExitCode> {
    match cli.command {
        Command::PrintConfig { empty_secrets } => {
            if empty_secrets {
                print!("{}", crate::config::example_with_empty_secrets());
            } else {
                print!("{}", *EXAMPLE_CONFIG);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => {
            let cmd = <Cli as clap::CommandFactory>::command();
            match dir {
                Some(dir) => match crate::manpages::write_all(cmd, &dir) {
                    Ok(pages) => {
                        for page in pages {
                            println!("{}", page.display());
                        }
                        Ok(ExitCode::SUCCESS)
                    }
                    Err(e) => {
                        eprintln!("skillsync man: cannot write to {}: {e}", dir.display());
                        Err(ExitCode::FAILURE)
                    }
                },
                None => {
                    let mut out = std::io::stdout().lock();
                    crate::manpages::write_main_page(cmd, &mut out).map_err(|e| {
                        eprintln!("skillsync man: {e}");
                        ExitCode::FAILURE
                    })?;
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
        Command::Completions { shell } => {
            let cmd = <Cli as clap::CommandFactory>::command();
            crate::manpages::write_completions(shell, cmd, &mut std::io::stdout().lock());
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig => {
            let c = load(&cli.config)?;
            println!(
                "{}: ok ({} tenant{}: {})",
                cli.config.display(),
                c.tenants.len(),
                if c.tenants.len() == 1 { "" } else { "s" },
                c.tenants
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve => {
            let config = load(&cli.config)?;
            let rt = runtime()?;
            rt.block_on(async move {
                let listener = listener(&config).await?;
                let metrics_listener = crate::app::bind_metrics(&config).await.map_err(|e| {
                    eprintln!("skillsync: {e:#}");
                    ExitCode::from(2)
                })?;
                let token = CancellationToken::new();
                crate::shutdown::cancel_on_signals(token.clone());
                let path = cli.config.clone();
                let built = crate::app::Application::builder(config)
                    .listener(listener)
                    .metrics_listener(metrics_listener)
                    .reload_from(path)
                    .build()
                    .await;
                let outcome = match built {
                    Ok(app) => app.run(token).await,
                    Err(e) => Err(e),
                };
                outcome.map_err(|e| {
                    eprintln!("skillsync: {e:#}");
                    // A database newer than this binary: exit 2 so systemd does not restart in a loop.
                    let too_new = e.chain().any(|c| {
                        matches!(
                            c.downcast_ref::<crate::store::StoreError>(),
                            Some(
                                crate::store::StoreError::TooNew { .. }
                                    | crate::store::StoreError::Reverted
                            )
                        )
                    });
                    if too_new {
                        ExitCode::from(2)
                    } else {
                        ExitCode::FAILURE
                    }
                })?;
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Status { json, db } => {
            let (path, config) = database_to_read(&cli.config, db)?;
            Ok(
                match crate::status::print_status(&path, config.as_ref(), json) {
                    crate::status::StatusOutcome::Healthy => ExitCode::SUCCESS,
                    crate::status::StatusOutcome::Degraded => ExitCode::from(1),
                    crate::status::StatusOutcome::Unreadable => ExitCode::from(2),
                },
            )
        }
        Command::Migrate {
            dry_run: true,
            db,
            json,
            ..
        } => {
            let (path, config) = database_to_read(&cli.config, db)?;
            Ok(migrate_exit(crate::migrate::print_dry_run(
                &path,
                config.as_ref(),
                json,
            )))
        }
        Command::Migrate { force, .. } => {
            let config = Config::load_without_secrets(&cli.config).map_err(|e| {
                eprintln!("skillsync: {e}");
                ExitCode::from(2)
            })?;
            let rt = runtime()?;
            Ok(migrate_exit(
                rt.block_on(crate::migrate::apply(&config, force)),
            ))
        }
        Command::Columns { r#type, db } => {
            let (path, config) = database_to_read(&cli.config, db)?;
            let types: Vec<DocType> = match r#type {
                Some(t) => vec![t.into()],
                None => DocType::ALL.to_vec(),
            };
            crate::columns::print_columns(&path, config.as_ref(), &types).map_err(|e| {
                eprintln!("skillsync: {e}");
                ExitCode::from(2)
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Backup { path, db } => {
            let (source, _) = database_to_read(&cli.config, db)?;
            use std::io::IsTerminal;
            let report = crate::store::backup_reporter(std::io::stderr().is_terminal());
            match crate::store::backup(&source, &path, report) {
                Ok(done) => {
                    tracing::info!(
                        path = %done.path.display(),
                        bytes = done.bytes,
                        pages = done.pages,
                        ms = done.elapsed.as_millis() as u64,
                        busy_retries = done.busy_retries,
                        "backup done"
                    );
                    println!(
                        "backup of {} written to {} ({} bytes in {:.1} s; integrity_check ok)",
                        source.display(),
                        done.path.display(),
                        done.bytes,
                        done.elapsed.as_secs_f64()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("skillsync backup: {e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::Retry { event, dead } => {
            if event.is_none() && !dead {
                eprintln!("skillsync: say which: --event ID or --dead");
                return Err(ExitCode::from(2));
            }
            let config = load(&cli.config)?;
            let rt = runtime()?;
            rt.block_on(async move {
                let store = crate::app::open_store(&config, crate::store::ReportRole::Follower)
                    .await
                    .map_err(|e| {
                        eprintln!("skillsync: {e:#}");
                        ExitCode::FAILURE
                    })?;
                match store.retry_dead(event, chrono::Utc::now()).await {
                    Ok(n) => {
                        println!(
                            "{n} event{} put back in the queue",
                            if n == 1 { "" } else { "s" }
                        );
                        if n == 0 && event.is_some() {
                            eprintln!(
                                "skillsync: event {} is not dead (or does not exist)",
                                event.unwrap_or_default()
                            );
                            return Err(ExitCode::FAILURE);
                        }
                        Ok(ExitCode::SUCCESS)
                    }
                    Err(e) => {
                        eprintln!("skillsync: {e}");
                        Err(ExitCode::FAILURE)
                    }
                }
            })
        }
        Command::Reconcile {
            tenant,
            r#type,
            full,
            force,
        } => {
            let config = load_for_tenant(&cli.config, tenant.as_deref())?;
            one_shot(|token| async move {
                let types = types_of(r#type);
                let kind = if full {
                    RunKind::Full
                } else {
                    RunKind::Incremental
                };
                match reconcile_now(Arc::new(config), tenant, types, kind, force, token).await {
                    Ok(true) => Ok(ExitCode::SUCCESS),
                    Ok(false) => Err(ExitCode::FAILURE),
                    Err(e) => {
                        eprintln!("skillsync: {e:#}");
                        Err(ExitCode::FAILURE)
                    }
                }
            })
        }
        Command::Verify {
            tenant,
            r#type,
            sample,
            max_rate,
        } => {
            let config = load_for_tenant(&cli.config, tenant.as_deref())?;
            one_shot(|token| async move {
                let types = types_of(r#type);
                let what = crate::app::verify::VerifyWhat {
                    tenant,
                    types,
                    sample: sample.map(|n| n as usize),
                    max_rate: max_rate.map(f64::from),
                };
                let report = crate::app::verify::verify_once(Arc::new(config), what, token).await;
                print!("{report}");
                use crate::app::verify::Verdict;
                Ok(match report.verdict() {
                    Verdict::AllMatched => ExitCode::SUCCESS,
                    Verdict::Mismatches => ExitCode::from(1),
                    Verdict::Unreadable => ExitCode::from(2),
                })
            })
        }
        Command::PostgresCheck { wait } => {
            let config = load(&cli.config)?;
            use crate::pgmirror::check::CheckOutcome;
            Ok(match crate::pgmirror::check::run_cli(&config, wait) {
                CheckOutcome::Equal => ExitCode::SUCCESS,
                CheckOutcome::Different => ExitCode::from(1),
                CheckOutcome::Failed => ExitCode::from(2),
            })
        }
        Command::Demo(args) => {
            let rt = runtime()?;
            rt.block_on(crate::demo::run(args)).map_err(|e| {
                eprintln!("skillsync demo: {e:#}");
                ExitCode::FAILURE
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Simulate(args) => {
            let rt = runtime()?;
            rt.block_on(crate::simulator::run_cli(*args)).map_err(|e| {
                eprintln!("skillsync simulate: {e:#}");
                ExitCode::FAILURE
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The database a read-only command (`status`, `columns`) reads, and the
/// config if it loads. No secret is read: a monitoring or reporting user
/// needs no credentials; with `--db` a missing or broken config is fine.
fn database_to_read(
    config_path: &std::path::Path,
    db: Option<PathBuf>,
) -> Result<(PathBuf, Option<Config>), ExitCode> {
    let config = match &db {
        Some(_) => Config::load_without_secrets(config_path).ok(),
        None => Some(Config::load_without_secrets(config_path).map_err(|e| {
            eprintln!("skillsync: {e}");
            ExitCode::from(2)
        })?),
    };
    let path = match (db, &config) {
        (Some(p), _) => p,
        (None, Some(c)) => c.database.path.clone(),
        (None, None) => return Err(ExitCode::from(2)),
    };
    Ok((path, config))
}

/// The listening socket: the one systemd passed (socket activation,
/// `LISTEN_FDS`), else a fresh bind of `server.listen`.
async fn listener(config: &Config) -> Result<tokio::net::TcpListener, ExitCode> {
    let mut fds = listenfd::ListenFd::from_env();
    match fds.take_tcp_listener(0) {
        Ok(Some(std_listener)) => {
            let addr = std_listener.local_addr().ok();
            let l = std_listener
                .set_nonblocking(true)
                .and_then(|_| tokio::net::TcpListener::from_std(std_listener))
                .map_err(|e| {
                    eprintln!("skillsync: cannot use the socket passed by systemd: {e}");
                    ExitCode::FAILURE
                })?;
            tracing::info!(address = ?addr, "using the socket passed by systemd (socket activation); server.listen is ignored");
            return Ok(l);
        }
        Ok(None) => {}
        Err(e) => {
            eprintln!("skillsync: LISTEN_FDS is set but fd 3 is not a TCP socket: {e}");
            return Err(ExitCode::FAILURE);
        }
    }
    tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| {
            eprintln!(
                "skillsync: config error at `server.listen`: cannot listen on {}: {e}",
                config.server.listen
            );
            ExitCode::from(2)
        })
}

/// `skillsync reconcile`: [`crate::app::oneshot::reconcile_once`], its
/// report printed. Returns whether every run succeeded.
pub async fn reconcile_now(
    config: Arc<Config>,
    tenant: Option<String>,
    types: Vec<DocType>,
    kind: RunKind,
    force: bool,
    token: CancellationToken,
) -> anyhow::Result<bool> {
    let what = OneShot {
        tenant,
        types,
        kind,
        force,
    };
    let report = crate::app::oneshot::reconcile_once(config, what, token).await;
    print!("{report}");
    report.outcome()
}

/// `migrate`'s exit code: 0 up to date (or done), 1 work pending or failed,
/// 2 refused.
fn migrate_exit(outcome: crate::migrate::MigrateOutcome) -> ExitCode {
    use crate::migrate::MigrateOutcome;
    match outcome {
        MigrateOutcome::UpToDate => ExitCode::SUCCESS,
        MigrateOutcome::Pending | MigrateOutcome::Failed => ExitCode::from(1),
        MigrateOutcome::Refused => ExitCode::from(2),
    }
}
