//! Man pages and shell completions, generated from the definitions users
//! already see: one page per subcommand from the clap definitions (the same
//! text as `--help`, through clap_mangen), and `skillsync.toml(5)` from the
//! config key declarations ([`crate::config::KEYS`]) that the example
//! `print-config` prints also comes from, so neither can drift from its source.
//!
//! The clap command is passed in by `cli` (nothing here imports `cli`).
//! This module only renders text and writes files; it reads no config.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap_mangen::roff::{Roff, bold, italic, roman};

use crate::config::{KeyDefault, SECTIONS};

/// A roff request without arguments.
const NO_ARGS: [&str; 0] = [];

/// The config page's file name, `skillsync.toml(5)`.
pub const CONFIG_PAGE: &str = "skillsync.toml.5";

/// Writes `skillsync.1`, one `skillsync-SUBCOMMAND.1` per subcommand, and
/// `skillsync.toml.5` into `dir` (created if missing). Returns the paths
/// written, sorted.
pub fn write_all(cmd: clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let cmd = cmd.disable_help_subcommand(true);
    clap_mangen::generate_to(cmd.clone(), dir)?;
    let config_page = dir.join(CONFIG_PAGE);
    std::fs::write(&config_page, config_page_roff(version(&cmd)))?;
    let mut written: Vec<PathBuf> = std::iter::once(config_page)
        .chain(page_names(&cmd).into_iter().map(|n| dir.join(n)))
        .collect();
    written.sort();
    Ok(written)
}

/// `skillsync(1)` alone, for `skillsync man` without `--dir`.
pub fn write_main_page(cmd: clap::Command, out: &mut dyn Write) -> std::io::Result<()> {
    clap_mangen::Man::new(cmd.disable_help_subcommand(true)).render(out)
}

/// The file names [`write_all`] writes for the commands: `skillsync.1` and
/// `skillsync-NAME.1` for each visible subcommand.
fn page_names(cmd: &clap::Command) -> Vec<String> {
    let name = cmd.get_name();
    std::iter::once(format!("{name}.1"))
        .chain(
            cmd.get_subcommands()
                .filter(|s| !s.is_hide_set())
                .map(|s| format!("{name}-{}.1", s.get_name())),
        )
        .collect()
}

fn version(cmd: &clap::Command) -> String {
    cmd.get_version().unwrap_or_default().to_string()
}

/// Writes the completion script for `shell` (bash, zsh, fish, elvish,
/// powershell) to `out`.
pub fn write_completions(shell: clap_complete::Shell, mut cmd: clap::Command, out: &mut dyn Write) {
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, out);
}

/// `skillsync.toml(5)`: every declared key with its default, type and doc,
/// section by section.
pub fn config_page_roff(version: String) -> String {
    let mut r = Roff::new();
    r.control(
        "TH",
        [
            "skillsync.toml",
            "5",
            "",
            &format!("skillsync {version}"),
            "File Formats",
        ],
    );
    r.control("SH", ["NAME"]);
    r.text([roman(
        "skillsync.toml - configuration of the skillsync daemon",
    )]);
    r.control("SH", ["SYNOPSIS"]);
    r.text([
        bold("/etc/skillsync/skillsync.toml"),
        roman(" (or "),
        bold("--config"),
        roman(" PATH, or "),
        bold("SKILLSYNC_CONFIG"),
        roman(")"),
    ]);
    r.control("SH", ["DESCRIPTION"]);
    r.text([roman(
        "A TOML file. Every key is listed below with its default (what a missing key means). \
         Unknown keys are errors, and every error names the key at fault. \
         Check a file with ",
    )]);
    r.text([
        bold("skillsync check-config"),
        roman("; print the commented example with "),
    ]);
    r.text([
        bold("skillsync print-config"),
        roman(", made from the same declarations as this page."),
    ]);
    r.control("SH", ["KEYS"]);
    for section in SECTIONS {
        r.control("SS", [section.header().as_str()]);
        if section.optional {
            r.text([roman("Optional: absent means off.")]);
        }
        if section.array {
            r.text([roman("One such table per tenant.")]);
        }
        let doc = section.paragraphs();
        if !doc.is_empty() {
            r.control("PP", NO_ARGS);
            r.text([roman(doc.join(" "))]);
        }
        for key in section.keys() {
            r.control("TP", NO_ARGS);
            r.text([bold(key.path())]);
            r.control("br", NO_ARGS);
            r.text([italic("default: "), roman(key.default.to_string())]);
            r.control("br", NO_ARGS);
            r.text([italic("type: "), roman(key.kind.describe())]);
            if let (false, Some(example)) =
                (matches!(key.default, KeyDefault::Value(_)), key.example)
            {
                r.control("br", NO_ARGS);
                r.text([italic("example: "), roman(example.replace('\n', "; "))]);
            }
            r.control("br", NO_ARGS);
            r.text([roman(key.doc_line())]);
        }
    }
    r.control("SH", ["SECRETS"]);
    r.text([roman(
        "Each tenant's webhook secrets and app secret come from exactly one of three forms: \
         inline, a file (one secret per line for webhook secrets; a relative name resolves \
         against $CREDENTIALS_DIRECTORY, where systemd's LoadCredential= puts them), or an \
         environment variable. Secrets never appear in logs, status or error messages.",
    )]);
    r.control("SH", ["FILES"]);
    r.text([bold("/etc/skillsync/skillsync.toml"), roman(" the config;")]);
    r.control("br", NO_ARGS);
    r.text([
        bold("/etc/skillsync/credentials/"),
        roman(" secret files for LoadCredential=;"),
    ]);
    r.control("br", NO_ARGS);
    r.text([
        bold("/var/lib/skillsync/skillsync.db"),
        roman(" the database (database.path)."),
    ]);
    r.control("SH", ["SEE ALSO"]);
    r.text([
        bold("skillsync"),
        roman("(1), "),
        bold("skillsync-check-config"),
        roman("(1), "),
        bold("skillsync-print-config"),
        roman("(1), "),
        bold("systemd.exec"),
        roman("(5)"),
    ]);
    r.render()
}
