//! Where log records go and how they look, chosen once at start-up:
//!
//! - `--log-format json`: one JSON object a line on stderr, for pipelines.
//! - Under systemd (`JOURNAL_STREAM` names our stderr): natively to the
//!   journal, each record with its priority and its fields as journal fields
//!   (`TENANT=acme`, `DOC_TYPE=job`, `EVENT_ID=…`), so `journalctl -p warning`
//!   and `-o json` work. If the journal socket cannot be reached, plain text
//!   on stderr instead (which systemd also collects).
//! - Otherwise text on stderr, coloured only when stdout and stderr are both
//!   terminals and `NO_COLOR` is not set: a file, a pipe or the journal never
//!   gets escape codes.
//!
//! Reads the environment only for these choices (and `RUST_LOG`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Sets up tracing as described above; level from `RUST_LOG` (default
/// `default_level`, the cron scheduler's and HTTP stacks' chatter at warn).
pub fn init(json: bool, default_level: &str) {
    let filter = || {
        EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            EnvFilter::new(format!(
                "{default_level},tokio_cron_scheduler=warn,hyper=warn,reqwest=warn"
            ))
        })
    };
    if json {
        let _ = tracing_subscriber::fmt()
            .json()
            .with_ansi(false)
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .try_init();
        return;
    }
    let journal_failed = if stderr_is_journal() {
        match journald_layer() {
            Ok(layer) => {
                let _ = tracing_subscriber::registry()
                    .with(filter())
                    .with(layer)
                    .try_init();
                return;
            }
            Err(e) => Some(e),
        }
    } else {
        None
    };
    let _ = tracing_subscriber::fmt()
        .with_ansi(colour_wanted())
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .try_init();
    if let Some(e) = journal_failed {
        tracing::warn!(error = %e, "the journal's socket is not reachable; logging plain text to stderr");
    }
}

/// The journal layer: identifier `skillsync`, fields under their own names
/// (no `F_` prefix), INFO as "informational" so `-p notice` shows only what
/// needs a look.
fn journald_layer() -> std::io::Result<tracing_journald::Layer> {
    let mut priorities = tracing_journald::PriorityMappings::new();
    priorities.info = tracing_journald::Priority::Informational;
    priorities.debug = tracing_journald::Priority::Debug;
    Ok(tracing_journald::layer()?
        .with_syslog_identifier("skillsync".into())
        .with_field_prefix(None)
        .with_priority_mappings(priorities))
}

/// Colours only for a person at a terminal who did not ask for none
/// (<https://no-color.org>: `NO_COLOR` set and non-empty), and not on a
/// terminal that cannot show them.
fn colour_wanted() -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let dumb = std::env::var_os("TERM").is_some_and(|t| t == "dumb");
    !no_color && !dumb && std::io::stdout().is_terminal() && std::io::stderr().is_terminal()
}

/// Whether stderr is the journal stream systemd connected (`JOURNAL_STREAM`
/// is `device:inode` of that stream; a redirected stderr no longer matches).
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some((dev, ino)) = std::env::var("JOURNAL_STREAM").ok().and_then(|v| {
        let (d, i) = v.split_once(':')?;
        Some((d.trim().parse::<u64>().ok()?, i.trim().parse::<u64>().ok()?))
    }) else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(fd)
        .metadata()
        .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}
