//! Man pages and shell completions, generated from the definitions users
//! already see: one page per subcommand from the clap definitions (the same
//! text as `--help`, through clap_mangen), and `skillsync.toml(5)` from the
//! commented example config that `print-config` prints
//! ([`crate::config::EXAMPLE_CONFIG`]), so neither can drift from its source.
//!
//! The clap command is passed in by `cli` (nothing here imports `cli`).
//! This module only renders text and writes files; it reads no config.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap_mangen::roff::{Roff, bold, italic, roman};

use crate::config::EXAMPLE_CONFIG;

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

/// One key of the example config, as the config page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigKey {
    /// Dotted name: `server.listen`, `tenant.app_secret`, `reporting.job.NAME`'s examples.
    pub name: String,
    /// What a missing key means.
    pub default: KeyDefault,
    /// The value the example shows.
    pub example: String,
    /// The example's comment on it, joined into one line.
    pub doc: String,
}

/// What a key is worth when the config leaves it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyDefault {
    /// The value shown in the example is the default.
    Value(String),
    /// The comment says what the default is (`default: none`, …).
    Stated(String),
    /// The key must be set (the comment says `required`).
    Required,
    /// One of several forms of a required key (`# or: key = …` lines).
    Alternative,
    /// A name of the user's own choosing (the `[reporting.job]` columns).
    Example,
}

impl std::fmt::Display for KeyDefault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyDefault::Value(v) => write!(f, "{v}"),
            KeyDefault::Stated(s) => f.write_str(s),
            KeyDefault::Required => f.write_str("none: required"),
            KeyDefault::Alternative => f.write_str("none: instead of the key before it"),
            KeyDefault::Example => f.write_str("none: a column name of your own"),
        }
    }
}

/// A `[section]` of the example with its keys.
#[derive(Debug, Clone, Default)]
pub struct ConfigSection {
    /// `server`, `tenant` (for `[[tenant]]`), `reporting.job`, …
    pub name: String,
    /// `[[name]]`: an array of tables (one per tenant).
    pub array: bool,
    /// Commented out in the example (`# [postgres]`): absent means off.
    pub optional: bool,
    /// The section's own comment lines.
    pub doc: Vec<String>,
    pub keys: Vec<ConfigKey>,
}

/// Sections whose keys are names the operator chooses (report columns):
/// the example shows sample names, not keys with defaults.
const USER_NAMED_SECTIONS: &[&str] = &["reporting.job", "reporting.project"];

/// The example config read as sections and keys: every key line, set
/// (`key = value`) or commented (`# key = value`), and the `# or: key = …`
/// alternatives; a comment indented under a key continues that key's doc.
pub fn parse_example(example: &str) -> (Vec<String>, Vec<ConfigSection>) {
    let mut intro = Vec::new();
    let mut sections: Vec<ConfigSection> = Vec::new();
    let mut last_key = false;
    // Plain comments wait here: those just above a section header describe
    // that section, the others the section they sit in.
    let mut pending: Vec<String> = Vec::new();
    for raw in example.lines() {
        let line = raw.trim_end();
        if line.trim().is_empty() {
            last_key = false;
            continue;
        }
        // An indented comment continues the key above it.
        if raw.starts_with(char::is_whitespace) && line.trim_start().starts_with('#') {
            if let (true, Some(key)) = (last_key, current_key(&mut sections)) {
                let more = line.trim_start().trim_start_matches('#').trim();
                key.doc = join(&key.doc, more);
            }
            continue;
        }
        let (commented, body) = match line.strip_prefix('#') {
            Some(rest) => (true, rest.trim()),
            None => (false, line),
        };
        if let Some(section) = section_header(body) {
            let (header, doc) = split_comment(section);
            let array = header.starts_with("[[");
            let mut section_doc = Vec::new();
            if sections.is_empty() {
                intro.append(&mut pending);
            } else {
                section_doc.append(&mut pending);
            }
            section_doc.extend(doc);
            sections.push(ConfigSection {
                name: header.trim_matches(['[', ']']).trim().to_string(),
                array,
                optional: commented,
                doc: section_doc,
                keys: Vec::new(),
            });
            last_key = false;
            continue;
        }
        let (alternative, body) = match body.strip_prefix("or:") {
            Some(rest) if commented => (true, rest.trim()),
            _ => (false, body),
        };
        if let Some((name, rest)) = key_line(body) {
            let Some(section) = sections.last_mut() else {
                continue;
            };
            section.doc.append(&mut pending);
            let (value, doc) = split_comment(rest);
            let doc = doc.unwrap_or_default();
            // Judged from the first comment line here; again once the
            // key's continuation lines are in (see `settle_default`).
            let default = if alternative {
                KeyDefault::Alternative
            } else if USER_NAMED_SECTIONS.contains(&section.name.as_str()) {
                KeyDefault::Example
            } else {
                KeyDefault::Value(value.to_string())
            };
            section.keys.push(ConfigKey {
                name: format!("{}.{name}", section.name),
                default,
                example: value.to_string(),
                doc,
            });
            last_key = true;
            continue;
        }
        // A plain comment: the doc of the section it sits in or precedes.
        pending.push(body.to_string());
        last_key = false;
    }
    match sections.last_mut() {
        Some(s) => s.doc.append(&mut pending),
        None => intro.append(&mut pending),
    }
    for key in sections.iter_mut().flat_map(|s| s.keys.iter_mut()) {
        settle_default(key);
    }
    (intro, sections)
}

fn current_key(sections: &mut [ConfigSection]) -> Option<&mut ConfigKey> {
    sections.last_mut().and_then(|s| s.keys.last_mut())
}

fn join(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_string()
    } else {
        format!("{a} {b}")
    }
}

/// `[name]` or `[[name]]`, possibly followed by a comment.
fn section_header(body: &str) -> Option<&str> {
    let head = body.split('#').next().unwrap_or("").trim();
    let inner = head.strip_prefix('[')?.strip_suffix(']')?;
    let inner = inner.trim_matches(['[', ']']);
    let ok = !inner.is_empty()
        && inner
            .chars()
            .all(|c| c.is_ascii_lowercase() || c == '_' || c == '.');
    ok.then_some(body)
}

/// `name = value…` where name is a bare TOML key of lowercase letters and `_`.
fn key_line(body: &str) -> Option<(&str, &str)> {
    let (name, rest) = body.split_once('=')?;
    let name = name.trim();
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    ok.then_some((name, rest.trim()))
}

/// Splits `value   # comment` at the first `#` outside a quoted string.
fn split_comment(s: &str) -> (&str, Option<String>) {
    let mut quote: Option<char> = None;
    for (i, c) in s.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') => {
                return (s[..i].trim(), Some(s[i + 1..].trim().to_string()));
            }
            _ => {}
        }
    }
    (s.trim(), None)
}

/// A key's comment, whole, may state its default (`default: none`) or
/// that it is required; otherwise the value shown is the default.
fn settle_default(key: &mut ConfigKey) {
    if !matches!(key.default, KeyDefault::Value(_)) {
        return;
    }
    if let Some(stated) = stated_default(&key.doc) {
        key.default = KeyDefault::Stated(stated);
    } else if key.doc.contains("(required") {
        key.default = KeyDefault::Required;
    }
}

/// `... (default: none, the rate adapts ...)` → `none, the rate adapts ...`.
fn stated_default(doc: &str) -> Option<String> {
    let at = doc.find("default: ")?;
    let rest = &doc[at + "default: ".len()..];
    let end = rest.find([')', ';', ',']).unwrap_or(rest.len());
    Some(rest[..end].trim().to_string())
}

/// `skillsync.toml(5)`: every key of the example config with its default,
/// section by section.
pub fn config_page_roff(version: String) -> String {
    let (intro, sections) = parse_example(EXAMPLE_CONFIG);
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
        roman(", the source of this page."),
    ]);
    if !intro.is_empty() {
        r.control("PP", NO_ARGS);
        r.text([roman(intro.join(" "))]);
    }
    r.control("SH", ["KEYS"]);
    for section in &sections {
        let header = if section.array {
            format!("[[{}]]", section.name)
        } else {
            format!("[{}]", section.name)
        };
        r.control("SS", [header.as_str()]);
        if section.optional {
            r.text([roman("Optional: absent means off.")]);
        }
        if section.array {
            r.text([roman("One such table per tenant.")]);
        }
        if !section.doc.is_empty() {
            r.control("PP", NO_ARGS);
            r.text([roman(section.doc.join(" "))]);
        }
        for key in &section.keys {
            r.control("TP", NO_ARGS);
            r.text([bold(key.name.clone())]);
            r.control("br", NO_ARGS);
            r.text([italic("default: "), roman(key.default.to_string())]);
            if !matches!(key.default, KeyDefault::Value(_)) && !key.example.is_empty() {
                r.control("br", NO_ARGS);
                r.text([italic("example: "), roman(key.example.clone())]);
            }
            if !key.doc.is_empty() {
                r.control("br", NO_ARGS);
                r.text([roman(key.doc.clone())]);
            }
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
