//! Outside tools some tests need (sqlite3, promtool, systemd-socket-activate,
//! the DuckDB/Datasette venv, a PostgreSQL server): one rule for all of them.
//!
//! A test provisions what it can (the readers venv is built under `target/`
//! by the same script CI uses); when a tool still cannot be had, the test
//! prints a notice naming what is missing and how to get it, and passes
//! without its check — so `cargo test --locked` passes on a fresh machine.
//! CI sets `SKILLSYNC_REQUIRE_TOOLS=1` (or the tool's own
//! `SKILLSYNC_REQUIRE_<TOOL>=1`), and then a missing tool fails the test
//! instead: CI never skips.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Whether a missing tool must fail the test: `SKILLSYNC_REQUIRE_TOOLS=1` or
/// the tool's own variable set to `1`.
pub fn required(own_var: &str) -> bool {
    let set = |k: &str| std::env::var(k).as_deref() == Ok("1");
    set("SKILLSYNC_REQUIRE_TOOLS") || set(own_var)
}

/// The one way a test gives up on a missing tool: a panic when CI requires it,
/// otherwise a notice naming the tool and how to get it.
pub fn missing(test: &str, tool: &str, own_var: &str, how: &str) {
    assert!(
        !required(own_var),
        "{test}: {tool} is required ({own_var} or SKILLSYNC_REQUIRE_TOOLS) but missing: {how}"
    );
    notice(&format!(
        "notice: {test}: {tool} is missing, its check skipped; {how}"
    ));
}

/// A line on the real stderr: `eprintln!` would be captured by the test
/// harness and shown only for a failing test, and a skip must be seen.
pub fn notice(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Whether `program` runs (`program arg` exits, whatever its status).
pub fn runs(program: &str, arg: &str) -> bool {
    Command::new(program).arg(arg).output().is_ok()
}

/// The sqlite3 CLI, or `None` after the notice.
pub fn sqlite3(test: &str) -> Option<&'static str> {
    if runs("sqlite3", "-version") {
        return Some("sqlite3");
    }
    missing(
        test,
        "the sqlite3 CLI",
        "SKILLSYNC_REQUIRE_SQLITE3",
        "apt-get install sqlite3 (.ci/run installs it)",
    );
    None
}

/// systemd's `systemd-socket-activate`, or `None` after the notice.
pub fn socket_activate(test: &str) -> Option<PathBuf> {
    for p in [
        "/usr/bin/systemd-socket-activate",
        "/bin/systemd-socket-activate",
    ] {
        if Path::new(p).exists() {
            return Some(PathBuf::from(p));
        }
    }
    missing(
        test,
        "systemd-socket-activate",
        "SKILLSYNC_REQUIRE_SYSTEMD",
        "apt-get install systemd (.ci/run installs it)",
    );
    None
}

/// The venv the reader tests use: `SKILLSYNC_READERS_VENV`, else
/// `target/reporting-venv` (where `scripts/reporting-venv.sh` builds it).
fn readers_venv() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    match std::env::var_os("SKILLSYNC_READERS_VENV") {
        Some(v) if Path::new(&v).is_absolute() => PathBuf::from(v),
        Some(v) => root.join(v),
        None => root.join("target/reporting-venv"),
    }
}

/// The python with DuckDB, its sqlite extension and Datasette, building the
/// venv first when it is missing (once: `flock` serialises parallel test
/// processes, and the script reuses a venv that is already whole). `None`
/// after the notice when it cannot be built (no python3 venv/pip, no route
/// to PyPI) or `SKILLSYNC_SKIP_READERS` is set.
pub fn readers_python(test: &str) -> Option<PathBuf> {
    const VAR: &str = "SKILLSYNC_REQUIRE_READERS";
    const HOW: &str = "needs python3 with venv and pip and a route to PyPI; \
                       `bash scripts/reporting-venv.sh` builds it";
    if let Some(p) = std::env::var_os("SKILLSYNC_READERS_PYTHON") {
        let p = PathBuf::from(p);
        assert!(
            p.exists(),
            "SKILLSYNC_READERS_PYTHON names {}, which does not exist",
            p.display()
        );
        return Some(p);
    }
    if std::env::var_os("SKILLSYNC_SKIP_READERS").is_some() && !required(VAR) {
        notice(&format!(
            "notice: {test} skipped: SKILLSYNC_SKIP_READERS is set"
        ));
        return None;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = readers_venv();
    if let Some(parent) = venv.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let lock = venv.with_extension("lock");
    if !venv.join("bin/python").exists() {
        notice(&format!(
            "{test}: building the readers venv at {} (a pip install, once)",
            venv.display()
        ));
    }
    let out = Command::new("flock")
        .arg(&lock)
        .arg("bash")
        .arg(root.join("scripts/reporting-venv.sh"))
        .env("SKILLSYNC_READERS_VENV", &venv)
        // A test never installs system packages; it reports what is missing.
        .env("SKILLSYNC_READERS_NO_APT", "1")
        // Without a route to PyPI, give up in about a minute, not pip's fifteen.
        .env("PIP_DEFAULT_TIMEOUT", "10")
        .env("PIP_RETRIES", "2")
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let stdout = String::from_utf8_lossy(&o.stdout);
            let python = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
            if python.exists() {
                return Some(python);
            }
            missing(
                test,
                "the DuckDB/Datasette venv",
                VAR,
                &format!("the script printed no python ({stdout}); {HOW}"),
            );
        }
        Ok(o) => missing(
            test,
            "the DuckDB/Datasette venv",
            VAR,
            &format!(
                "building it failed ({}); {HOW}",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .rev()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(" / ")
            ),
        ),
        Err(e) => missing(
            test,
            "the DuckDB/Datasette venv",
            VAR,
            &format!("cannot run flock/bash ({e}); {HOW}"),
        ),
    }
    None
}
