//! Typed configuration: parsing the TOML file, validating every key at load,
//! resolving secrets from inline values, files (systemd credentials) or the
//! environment, and keeping them out of `Debug` output.
//!
//! Nothing else in the crate reads the config file or the environment for
//! settings; every other module receives the validated [`Config`].
//!
//! Each key is declared once, in `config/keys.rs` (type, range, default, doc
//! line); the sections' validation here reads its defaults and ranges from
//! there, and the example config, the README's key table and the man page
//! are rendered from it.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use reqwest::Url;
use serde::Deserialize;

mod keys;
mod postgres_config;

pub use keys::{
    ConfigKey, ConfigSection, DefaultValue, KEYS, KeyDefault, KeyKind, README_TABLE_END,
    README_TABLE_START, SECTIONS, Show, defaults, key, render_example, render_readme_table,
};
pub use postgres_config::PostgresConfig;
pub(crate) use postgres_config::{SslMode, normalise_url};

/// The commented example configuration, rendered from the key declarations:
/// printed by `skillsync print-config`, kept in
/// `systemd/skillsync.example.toml` (a test checks they agree) and checked
/// by a test to load (with its placeholder secrets) cleanly.
pub static EXAMPLE_CONFIG: LazyLock<String> = LazyLock::new(render_example);

/// The example config with every inline secret emptied (`webhook_secrets = []`,
/// `app_secret = ""`), everything else as [`EXAMPLE_CONFIG`]: what the Debian
/// package installs as `/etc/skillsync/skillsync.toml`. It does not load (the
/// error names the empty secret's key), so a service started before the
/// operator fills it in exits with a config error instead of running with a
/// placeholder secret.
pub fn example_with_empty_secrets() -> String {
    let mut out = String::with_capacity(EXAMPLE_CONFIG.len());
    for line in EXAMPLE_CONFIG.lines() {
        let emptied = [("webhook_secrets = ", "[]"), ("app_secret = ", "\"\"")]
            .iter()
            .find_map(|(key, empty)| {
                let rest = line.strip_prefix(key)?;
                // Keep the trailing comment where it was: pad the empty value
                // to the width of the value it replaces.
                let value_len = rest.find('#').map_or(rest.len(), |i| i);
                let comment = &rest[value_len..];
                let width = if comment.is_empty() { 0 } else { value_len };
                Some(format!("{key}{empty:<width$}{comment}"))
            });
        out.push_str(emptied.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// A config error that names the key at fault.
#[derive(Debug, thiserror::Error)]
#[error("config error at `{key}`: {message}")]
pub struct ConfigError {
    /// Dotted path of the key, e.g. `tenant[0].api_base`.
    pub key: String,
    /// What is wrong with it, never including a secret value.
    pub message: String,
}

fn err(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        message: message.into(),
    }
}

/// A secret value: redacted in `Debug` and `Display`, readable only through
/// [`Secret::expose`], which names every place that sends it somewhere.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value read from config, a file or the environment.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself, for the one place that must send or hash it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// An IP network: `10.0.0.0/8`, `::1/128`, or a bare address (one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    /// At most 32 for IPv4, 128 for IPv6.
    prefix: u8,
}

impl Cidr {
    /// Parses `address[/prefix]`; the error quotes the text (never a secret).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or CIDR network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match len {
            Some(l) => l
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("`{s}` has a bad prefix length"))?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }

    /// Whether `ip` is in this network (an IPv4 address is never in an IPv6 one).
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip_in(ip, self.addr, self.prefix)
    }
}

fn ip_in(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub fetch: FetchConfig,
    pub upstream: UpstreamConfig,
    pub retention: RetentionConfig,
    pub tenants: Vec<TenantConfig>,
    /// `[reporting]`: extra or overriding report view columns, the stage field.
    pub reporting: crate::reporting::ReportingConfig,
    /// `[postgres]`: the PostgreSQL mirror; `None` (off) when absent.
    pub postgres: Option<PostgresConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Always starts with `/` and never ends with one.
    pub webhook_path: String,
    pub max_body_bytes: usize,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Networks whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<Cidr>,
    /// Connections served at once; further ones wait in the kernel backlog.
    pub max_connections: usize,
    /// Time a client has to send a request's headers (slow-loris guard).
    pub header_read_timeout_secs: u64,
    /// Where `/metrics` (and detailed health) is served; `None` when "off".
    /// Never the public `listen`: the metrics name tenants and scan tables.
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DatabaseConfig {
    pub path: PathBuf,
    /// How long a write waits for another writer before the webhook answers 503.
    pub busy_timeout_ms: u64,
    /// Whether concurrent writes share one durable commit (default true;
    /// false only to measure what grouping buys).
    pub group_commit: bool,
}

#[derive(Debug, Clone)]
pub struct FetchConfig {
    pub concurrency: usize,
    pub timeout_secs: u64,
    pub max_attempts: u32,
    pub retry_initial_secs: u64,
    pub retry_max_secs: u64,
    /// A 2xx body larger than this is an error, never a stored document.
    pub max_document_bytes: usize,
}

/// Everything SPEC calls "a config default, not a constant": paths, query
/// names, field names and the document type names the sender uses.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub job_path: String,
    pub project_path: String,
    pub listing_path: String,
    pub jobs_query: String,
    pub projects_query: String,
    pub job_id_field: String,
    pub project_id_field: String,
    pub modified_field: String,
    pub page_size: u32,
    pub overlap_secs: u64,
    /// How long a listing may keep failing (429, 5xx, timeouts) before the
    /// run gives up; each failed page is retried with backoff meanwhile.
    pub listing_retry_secs: u64,
    pub job_types: Vec<String>,
    pub project_types: Vec<String>,
    pub number_fields: Vec<String>,
    pub name_fields: Vec<String>,
    pub modified_fields: Vec<String>,
    pub version_fields: Vec<String>,
}

/// Every `[upstream]` key at its default: what `columns` assumes without a config.
impl Default for UpstreamConfig {
    fn default() -> Self {
        let list = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        UpstreamConfig {
            job_path: defaults::JOB_PATH.into(),
            project_path: defaults::PROJECT_PATH.into(),
            listing_path: defaults::LISTING_PATH.into(),
            jobs_query: defaults::JOBS_QUERY.into(),
            projects_query: defaults::PROJECTS_QUERY.into(),
            job_id_field: defaults::JOB_ID_FIELD.into(),
            project_id_field: defaults::PROJECT_ID_FIELD.into(),
            modified_field: defaults::MODIFIED_FIELD.into(),
            page_size: defaults::PAGE_SIZE as u32,
            overlap_secs: defaults::OVERLAP_SECS as u64,
            listing_retry_secs: defaults::LISTING_RETRY_SECS as u64,
            job_types: list(defaults::JOB_TYPES),
            project_types: list(defaults::PROJECT_TYPES),
            number_fields: list(defaults::NUMBER_FIELDS),
            name_fields: list(defaults::NAME_FIELDS),
            modified_fields: list(defaults::MODIFIED_FIELDS),
            version_fields: list(defaults::VERSION_FIELDS),
        }
    }
}

impl UpstreamConfig {
    /// The path of one document under a tenant's `api_base`, from the
    /// configured template: where the fetcher GETs it and what a webhook's
    /// `document.url` must name.
    pub fn document_path(&self, doc_type: crate::model::DocType, id: &str) -> String {
        let template = match doc_type {
            crate::model::DocType::Job => &self.job_path,
            crate::model::DocType::Project => &self.project_path,
        };
        template.replace("{id}", id)
    }
}

#[derive(Debug, Clone)]
pub struct RetentionConfig {
    /// `done` and `ignored` events older than this are pruned; 0 keeps them.
    pub events_days: u32,
    /// `document_history` rows older than this are pruned (never a
    /// document's latest revision); 0 keeps them.
    pub history_days: u32,
}

#[derive(Debug, Clone)]
pub struct TenantConfig {
    pub name: String,
    pub webhook_secrets: Vec<Secret>,
    pub api_base: Url,
    pub extraction_base: Url,
    pub app_tenant: String,
    pub app_id: String,
    pub app_secret: Secret,
    pub app_user: Option<String>,
    /// `None` when the schedule is `"off"`.
    pub reconcile_schedule: Option<String>,
    pub full_sweep_schedule: Option<String>,
    pub max_delete_fraction: f64,
    /// Every upstream call of this tenant shares this budget, requests/s;
    /// `None`: no budget (the rate adapts to 429s only).
    pub max_requests_per_sec: Option<f64>,
    /// When the accuracy audit runs (`skillsync verify` on a schedule);
    /// `None` when `"off"`.
    pub audit_schedule: Option<String>,
    /// Documents an audit samples per type: also its most upstream calls.
    pub audit_sample: u32,
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            err(
                "--config",
                format!("cannot read config file {}: {e}", path.display()),
            )
        })?;
        Config::from_toml(&text, path.parent())
    }

    /// Parses and validates TOML text; relative secret files resolve against
    /// `$CREDENTIALS_DIRECTORY` when set, else against `base_dir`.
    pub fn from_toml(text: &str, base_dir: Option<&Path>) -> Result<Config, ConfigError> {
        Config::parse(text, base_dir, true)
    }

    /// Reads and validates the file without reading any secret (every secret
    /// is left empty): for `status`, which a monitoring user without access
    /// to the credentials must be able to run.
    pub fn load_without_secrets(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            err(
                "--config",
                format!("cannot read config file {}: {e}", path.display()),
            )
        })?;
        Config::parse(&text, path.parent(), false)
    }

    fn parse(text: &str, base_dir: Option<&Path>, secrets: bool) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let msg = e.message().to_string();
            let start = e.span().map(|s| s.start.min(text.len()));
            let key = unknown_field_name(&msg)
                .or_else(|| start.and_then(|o| key_at(text, o)))
                .unwrap_or_else(|| "(file)".to_string());
            // The line the error points at: an inline table (`tenant = [{ …,
            // app_secret = 1 }]`) names its secret key only there.
            let line = start
                .map(|o| {
                    let from = text[..o].rfind('\n').map_or(0, |i| i + 1);
                    text[from..]
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_ascii_lowercase()
                })
                .unwrap_or_default();
            let mentions_secret = line.contains("secret") || line.contains("password");
            let msg = if names_a_public_key(&key) && !mentions_secret {
                msg
            } else {
                without_value(&msg)
            };
            let at = start
                .map(|o| format!(" (line {})", text[..o].matches('\n').count() + 1))
                .unwrap_or_default();
            err(key, format!("{msg}{at}"))
        })?;
        raw.validate(base_dir, secrets)
    }

    /// The tenant with this name.
    pub fn tenant(&self, name: &str) -> Option<&TenantConfig> {
        self.tenants.iter().find(|t| t.name == name)
    }
}

/// The dotted key written on the line holding `offset` (`table.key`), for
/// parse errors that only carry a position.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let mut line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    // Inside a list spread over several lines: the key is on the line that
    // opened it (a bracket still open at `offset`).
    while !text[line_start..].lines().next()?.contains('=') && line_start > 0 {
        let prev = text[..line_start - 1].rfind('\n').map_or(0, |i| i + 1);
        let opened =
            text[prev..offset].matches('[').count() > text[prev..offset].matches(']').count();
        if text[prev..line_start].contains('=') && !opened {
            return None;
        }
        line_start = prev;
    }
    let line = text[line_start..].lines().next()?;
    let outer = line.split('=').next()?.trim();
    if outer.is_empty() || outer.starts_with('[') || !line.contains('=') {
        return None;
    }
    // Inside an inline table (`tenant = [{ name = "a", app_secret = 1 }]`):
    // the key written just before the value.
    let before = &text[line_start..offset.max(line_start)];
    let inner = before
        .contains('{')
        .then(|| before.rsplit_once('=')?.0.rsplit([',', '{']).next())
        .flatten()
        .map(str::trim)
        .filter(|k| !k.is_empty() && *k != outer);
    let key = match inner {
        Some(k) => format!("{outer}.{k}"),
        None => outer.to_string(),
    };
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|h| h.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    Some(match table {
        Some(t) if !t.is_empty() => format!("{t}.{key}"),
        _ => key.to_string(),
    })
}

/// Whether the value of `key` may be quoted in an error: not a secret, and
/// positively identified (a parse error inside a multi-line list may point
/// at a line that names no key at all).
fn names_a_public_key(key: &str) -> bool {
    let last = key.rsplit('.').next().unwrap_or(key);
    let secret_ish = last.contains("secret") || last.contains("password");
    let names_source = last.ends_with("_file") || last.ends_with("_env");
    key != "(file)" && (!secret_ish || names_source)
}

/// A serde/toml message with the offending value taken out: `invalid type:
/// string "…", expected a sequence` becomes `wrong type: a string where a
/// sequence was expected (value not shown)`.
fn without_value(msg: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = msg.strip_prefix(prefix) {
            let (found, expected) = rest.split_once(", expected ").unwrap_or((rest, ""));
            // The kind comes before the quoted value: `string "…"`, `integer `…``.
            let kind = found.split(['"', '`', '\'']).next().unwrap_or("").trim();
            let expected = expected.trim();
            let what = if prefix.starts_with("invalid type") {
                "wrong type"
            } else {
                "invalid value"
            };
            return match (kind.is_empty(), expected.is_empty()) {
                (false, false) => {
                    format!("{what}: {kind} where {expected} was expected (value not shown)")
                }
                (true, false) => format!("{what}: expected {expected} (value not shown)"),
                _ => format!("{what} (value not shown)"),
            };
        }
    }
    // Other messages (syntax, duplicate or unknown keys) carry no value;
    // anything quoted is dropped all the same.
    match msg.find(['"', '`', '\'']) {
        Some(i) => format!("{} (value not shown)", msg[..i].trim_end()),
        None => msg.to_string(),
    }
}

fn unknown_field_name(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("unknown field `")?;
    rest.split('`').next().map(str::to_string)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    database: RawDatabase,
    #[serde(default)]
    fetch: RawFetch,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    retention: RawRetention,
    #[serde(default)]
    reporting: RawReporting,
    postgres: Option<postgres_config::RawPostgres>,
    #[serde(default, rename = "tenant")]
    tenants: Vec<RawTenant>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    webhook_path: Option<String>,
    max_body_bytes: Option<i64>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    trusted_proxies: Option<Vec<String>>,
    max_connections: Option<i64>,
    header_read_timeout_secs: Option<i64>,
    metrics_listen: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    path: Option<PathBuf>,
    busy_timeout_ms: Option<i64>,
    group_commit: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFetch {
    concurrency: Option<i64>,
    timeout_secs: Option<i64>,
    max_attempts: Option<i64>,
    retry_initial_secs: Option<i64>,
    retry_max_secs: Option<i64>,
    max_document_bytes: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    job_path: Option<String>,
    project_path: Option<String>,
    listing_path: Option<String>,
    jobs_query: Option<String>,
    projects_query: Option<String>,
    job_id_field: Option<String>,
    project_id_field: Option<String>,
    modified_field: Option<String>,
    page_size: Option<i64>,
    overlap_secs: Option<i64>,
    listing_retry_secs: Option<i64>,
    job_types: Option<Vec<String>>,
    project_types: Option<Vec<String>>,
    number_fields: Option<Vec<String>>,
    name_fields: Option<Vec<String>>,
    modified_fields: Option<Vec<String>>,
    version_fields: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    events_days: Option<i64>,
    history_days: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawReporting {
    stage_field: Option<String>,
    job: Option<toml::Table>,
    project: Option<toml::Table>,
}

/// No `[reporting]`: the default stage field and no configured columns.
impl Default for crate::reporting::ReportingConfig {
    fn default() -> Self {
        crate::reporting::ReportingConfig {
            stage_field: crate::reporting::FieldPath::single(defaults::STAGE_FIELD),
            job: Vec::new(),
            project: Vec::new(),
        }
    }
}

impl RawReporting {
    fn validate(self) -> Result<crate::reporting::ReportingConfig, ConfigError> {
        use crate::reporting::{
            ColumnType, ConfiguredColumn, FieldPath, RESERVED_COLUMNS, ReportingConfig,
            is_column_name,
        };
        let stage_field = match self.stage_field {
            Some(s) => FieldPath::parse(&s).map_err(|m| err("reporting.stage_field", m))?,
            None => FieldPath::single(defaults::STAGE_FIELD),
        };
        let columns = |ty: &str, table: Option<toml::Table>| {
            let mut out = Vec::new();
            for (name, v) in table.unwrap_or_default() {
                let key = format!("reporting.{ty}.{name}");
                if !is_column_name(&name) || RESERVED_COLUMNS.contains(&name.as_str()) {
                    return Err(err(
                        key,
                        "a column name is a snake_case identifier ([a-z][a-z0-9_]*, at most 63 characters), not tenant or id",
                    ));
                }
                let (path, ty_name) = match v {
                    toml::Value::String(p) => (p, None),
                    toml::Value::Table(mut t) => {
                        let path = match t.remove("path") {
                            Some(toml::Value::String(p)) => p,
                            _ => {
                                return Err(err(
                                    format!("{key}.path"),
                                    "is required (a string such as \"$.Budget\")",
                                ));
                            }
                        };
                        let ty_name = match t.remove("type") {
                            None => None,
                            Some(toml::Value::String(s)) => Some(s),
                            Some(_) => return Err(err(format!("{key}.type"), "must be a string")),
                        };
                        if let Some(extra) = t.keys().next() {
                            return Err(err(
                                format!("{key}.{extra}"),
                                "unknown key (a column takes `path` and `type`)",
                            ));
                        }
                        (path, ty_name)
                    }
                    _ => {
                        return Err(err(
                            key,
                            "must be a path (\"$.Field\") or a table { path = \"$.Field\", type = \"real\" }",
                        ));
                    }
                };
                let path = FieldPath::parse(&path).map_err(|m| {
                    err(
                        if ty_name.is_some() {
                            format!("{key}.path")
                        } else {
                            key.clone()
                        },
                        m,
                    )
                })?;
                let col_ty = match ty_name {
                    None => ColumnType::Text,
                    Some(t) => ColumnType::parse(&t).ok_or_else(|| {
                        err(
                            format!("{key}.type"),
                            format!("`{t}` is not one of text, integer, real, timestamp"),
                        )
                    })?,
                };
                out.push(ConfiguredColumn {
                    name,
                    path,
                    ty: col_ty,
                });
            }
            Ok(out)
        };
        Ok(ReportingConfig {
            stage_field,
            job: columns("job", self.job)?,
            project: columns("project", self.project)?,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    name: Option<String>,
    webhook_secrets: Option<Vec<String>>,
    webhook_secret_file: Option<PathBuf>,
    webhook_secret_env: Option<String>,
    api_base: Option<String>,
    extraction_base: Option<String>,
    app_tenant: Option<String>,
    app_id: Option<String>,
    app_user: Option<String>,
    app_secret: Option<String>,
    app_secret_file: Option<PathBuf>,
    app_secret_env: Option<String>,
    reconcile_schedule: Option<String>,
    full_sweep_schedule: Option<String>,
    max_delete_fraction: Option<f64>,
    max_requests_per_sec: Option<f64>,
    audit_schedule: Option<String>,
    audit_sample: Option<i64>,
}

fn non_empty_list(
    key: &str,
    v: Option<Vec<String>>,
    default: &[&str],
) -> Result<Vec<String>, ConfigError> {
    let v = v.unwrap_or_else(|| default.iter().map(|s| s.to_string()).collect());
    if v.is_empty() || v.iter().any(|s| s.trim().is_empty()) {
        return Err(err(key, "must be a non-empty list of non-empty names"));
    }
    Ok(v)
}

fn path_template(key: &str, v: String, placeholder: &str) -> Result<String, ConfigError> {
    if !v.starts_with('/') || !v.contains(placeholder) {
        return Err(err(
            key,
            format!("must start with `/` and contain `{placeholder}`"),
        ));
    }
    Ok(v)
}

/// Validates a six-field cron string (seconds first, UTC) the same way the
/// scheduler will parse it, or the word `off`.
pub fn parse_schedule(
    key: &str,
    v: Option<String>,
    default: &str,
) -> Result<Option<String>, ConfigError> {
    let v = v.unwrap_or_else(|| default.to_string());
    if v.trim() == "off" {
        return Ok(None);
    }
    cron_parser()
        .parse(&v)
        .map_err(|e| err(key, format!("not a valid cron schedule with seconds (\"sec min hour dom mon dow\") or \"off\": {e}")))?;
    if v.split_whitespace().count() != 6 {
        return Err(err(
            key,
            "a schedule has six fields, seconds first, e.g. \"0 */15 * * * *\"",
        ));
    }
    Ok(Some(v))
}

/// The cron dialect tokio-cron-scheduler uses: seconds required, day-of-month
/// and day-of-week combined with AND.
pub fn cron_parser() -> croner::parser::CronParser {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .dom_and_dow(true)
        .build()
}

/// Reads secret lines from a file: whitespace trimmed, blank and `#` lines ignored.
fn secrets_from_file(
    key: &str,
    path: &Path,
    base_dir: Option<&Path>,
) -> Result<Vec<Secret>, ConfigError> {
    let resolved = resolve_secret_path(path, base_dir);
    let text = std::fs::read_to_string(&resolved)
        .map_err(|e| err(key, format!("cannot read {}: {e}", resolved.display())))?;
    let secrets: Vec<Secret> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(Secret::new)
        .collect();
    if secrets.is_empty() {
        return Err(err(key, format!("{} holds no secret", resolved.display())));
    }
    Ok(secrets)
}

fn resolve_secret_path(path: &Path, base_dir: Option<&Path>) -> PathBuf {
    if path.is_absolute() {
        return path.to_path_buf();
    }
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        return PathBuf::from(dir).join(path);
    }
    match base_dir {
        Some(b) => b.join(path),
        None => path.to_path_buf(),
    }
}

fn secret_from_env(key: &str, var: &str) -> Result<Secret, ConfigError> {
    let v = std::env::var(var)
        .map_err(|_| err(key, format!("environment variable `{var}` is not set")))?;
    let v = v.trim();
    if v.is_empty() {
        return Err(err(key, format!("environment variable `{var}` is empty")));
    }
    Ok(Secret::new(v))
}

fn base_url(key: &str, v: Option<String>) -> Result<Url, ConfigError> {
    let v = v.ok_or_else(|| err(key, "is required"))?;
    let url = Url::parse(&v).map_err(|e| err(key, format!("not a valid URL: {e}")))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(err(key, "must be an http:// or https:// URL"));
    }
    if url.host_str().is_none() || !url.username().is_empty() || url.password().is_some() {
        return Err(err(key, "must name a host and carry no user or password"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(err(key, "must not have a query or fragment"));
    }
    Ok(url)
}

/// `server.metrics_listen`: an address:port (port 0 picks a free one), or
/// "off"; never the public listener's address.
fn parse_metrics_listen(
    v: Option<String>,
    listen: SocketAddr,
) -> Result<Option<SocketAddr>, ConfigError> {
    const KEY: &str = "server.metrics_listen";
    let text = v.unwrap_or_else(|| defaults::METRICS_LISTEN.to_string());
    if text.trim() == "off" {
        return Ok(None);
    }
    let addr: SocketAddr = text.trim().parse().map_err(|_| {
        err(
            KEY,
            format!("`{text}` is not an address:port (e.g. \"127.0.0.1:9187\") or \"off\""),
        )
    })?;
    let overlaps =
        addr.ip() == listen.ip() || addr.ip().is_unspecified() || listen.ip().is_unspecified();
    if addr.port() != 0 && addr.port() == listen.port() && overlaps {
        return Err(err(
            KEY,
            "must differ from server.listen: /metrics is never served on the public listener",
        ));
    }
    Ok(Some(addr))
}

fn required_text(key: &str, v: Option<String>) -> Result<String, ConfigError> {
    match v {
        Some(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        _ => Err(err(key, "is required")),
    }
}

impl RawConfig {
    /// Each section in turn; the first key at fault is the error.
    fn validate(self, base_dir: Option<&Path>, read_secrets: bool) -> Result<Config, ConfigError> {
        let secrets = SecretReader {
            base_dir,
            read: read_secrets,
        };
        let server = self.server.validate()?;
        let database = self.database.validate()?;
        let fetch = self.fetch.validate()?;
        let upstream = self.upstream.validate()?;
        let reporting = self.reporting.validate()?;
        let postgres = match self.postgres {
            None => None,
            Some(p) => Some(p.validate(
                |key, file, env| {
                    match (file, env) {
                        (Some(path), _) => secrets
                            .one_from_file(&format!("postgres.{key}"), path)
                            .map(Some),
                        (None, Some(var)) => {
                            secret_from_env(&format!("postgres.{key}"), var).map(Some)
                        }
                        (None, None) => Ok(None),
                    }
                },
                read_secrets,
            )?),
        };
        let retention = self.retention.validate()?;
        let tenants = validate_tenants(self.tenants, &secrets)?;
        Ok(Config {
            server,
            database,
            fetch,
            upstream,
            retention,
            tenants,
            reporting,
            postgres,
        })
    }
}

impl RawServer {
    fn validate(self) -> Result<ServerConfig, ConfigError> {
        let s = self;
        let listen_text = s.listen.unwrap_or_else(|| defaults::LISTEN.to_string());
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            err(
                "server.listen",
                format!("`{listen_text}` is not an address:port"),
            )
        })?;
        let webhook_path = s
            .webhook_path
            .unwrap_or_else(|| defaults::WEBHOOK_PATH.to_string());
        let webhook_path = webhook_path.trim_end_matches('/').to_string();
        if !webhook_path.starts_with('/')
            || webhook_path.len() < 2
            || webhook_path.contains("//")
            || !webhook_path
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "/-_.~".contains(c))
            || webhook_path == "/healthz"
            || webhook_path == "/metrics"
        {
            return Err(err(
                "server.webhook_path",
                "must be a path like \"/skillsevent\" (letters, digits, -_.~/), not /healthz or /metrics",
            ));
        }
        if s.tls_cert_file.is_some() != s.tls_key_file.is_some() {
            let key = if s.tls_cert_file.is_some() {
                "server.tls_key_file"
            } else {
                "server.tls_cert_file"
            };
            return Err(err(key, "tls_cert_file and tls_key_file go together"));
        }
        if let (Some(cert), Some(key)) = (&s.tls_cert_file, &s.tls_key_file) {
            crate::tls::load_certified_key(cert, key).map_err(|e| match e {
                crate::tls::TlsError::Cert { .. } => err("server.tls_cert_file", e.to_string()),
                crate::tls::TlsError::Key { .. } => err("server.tls_key_file", e.to_string()),
            })?;
        }
        let trusted_proxies = s
            .trusted_proxies
            .unwrap_or_default()
            .iter()
            .map(|p| Cidr::parse(p).map_err(|m| err("server.trusted_proxies", m)))
            .collect::<Result<Vec<_>, _>>()?;
        let metrics_listen = parse_metrics_listen(s.metrics_listen, listen)?;
        Ok(ServerConfig {
            metrics_listen,
            listen,
            webhook_path,
            max_body_bytes: key::MAX_BODY_BYTES.int(s.max_body_bytes)? as usize,
            tls_cert_file: s.tls_cert_file,
            tls_key_file: s.tls_key_file,
            trusted_proxies,
            max_connections: key::MAX_CONNECTIONS.int(s.max_connections)? as usize,
            header_read_timeout_secs: key::HEADER_READ_TIMEOUT_SECS
                .int(s.header_read_timeout_secs)? as u64,
        })
    }
}

impl RawDatabase {
    fn validate(self) -> Result<DatabaseConfig, ConfigError> {
        let database = DatabaseConfig {
            path: self
                .path
                .unwrap_or_else(|| PathBuf::from(defaults::DATABASE_PATH)),
            busy_timeout_ms: key::BUSY_TIMEOUT_MS.int(self.busy_timeout_ms)? as u64,
            group_commit: self.group_commit.unwrap_or(defaults::GROUP_COMMIT),
        };
        if database.path.as_os_str().is_empty() {
            return Err(err("database.path", "must not be empty"));
        }
        Ok(database)
    }
}

impl RawFetch {
    fn validate(self) -> Result<FetchConfig, ConfigError> {
        let f = self;
        let fetch = FetchConfig {
            concurrency: key::FETCH_CONCURRENCY.int(f.concurrency)? as usize,
            timeout_secs: key::FETCH_TIMEOUT_SECS.int(f.timeout_secs)? as u64,
            max_attempts: key::MAX_ATTEMPTS.int(f.max_attempts)? as u32,
            retry_initial_secs: key::RETRY_INITIAL_SECS.int(f.retry_initial_secs)? as u64,
            retry_max_secs: key::RETRY_MAX_SECS.int(f.retry_max_secs)? as u64,
            max_document_bytes: key::MAX_DOCUMENT_BYTES.int(f.max_document_bytes)? as usize,
        };
        if fetch.retry_initial_secs > fetch.retry_max_secs {
            return Err(err(
                "fetch.retry_initial_secs",
                "must not exceed fetch.retry_max_secs",
            ));
        }
        Ok(fetch)
    }
}

impl RawUpstream {
    fn validate(self) -> Result<UpstreamConfig, ConfigError> {
        let u = self;
        Ok(UpstreamConfig {
            job_path: key::JOB_PATH.text(u.job_path)?,
            project_path: key::PROJECT_PATH.text(u.project_path)?,
            listing_path: key::LISTING_PATH.text(u.listing_path)?,
            jobs_query: key::JOBS_QUERY.text(u.jobs_query)?,
            projects_query: key::PROJECTS_QUERY.text(u.projects_query)?,
            job_id_field: key::JOB_ID_FIELD.text(u.job_id_field)?,
            project_id_field: key::PROJECT_ID_FIELD.text(u.project_id_field)?,
            modified_field: key::MODIFIED_FIELD.text(u.modified_field)?,
            page_size: key::PAGE_SIZE.int(u.page_size)? as u32,
            overlap_secs: key::OVERLAP_SECS.int(u.overlap_secs)? as u64,
            listing_retry_secs: key::LISTING_RETRY_SECS.int(u.listing_retry_secs)? as u64,
            job_types: key::JOB_TYPES.names(u.job_types)?,
            project_types: key::PROJECT_TYPES.names(u.project_types)?,
            number_fields: key::NUMBER_FIELDS.names(u.number_fields)?,
            name_fields: key::NAME_FIELDS.names(u.name_fields)?,
            modified_fields: key::MODIFIED_FIELDS.names(u.modified_fields)?,
            version_fields: key::VERSION_FIELDS.names(u.version_fields)?,
        })
    }
}

impl RawRetention {
    fn validate(self) -> Result<RetentionConfig, ConfigError> {
        Ok(RetentionConfig {
            events_days: key::EVENTS_DAYS.int(self.events_days)? as u32,
            history_days: key::HISTORY_DAYS.int(self.history_days)? as u32,
        })
    }
}

/// Where secrets are read from, and whether they are read at all (not for
/// `status`, whose user may have no access to them).
struct SecretReader<'a> {
    base_dir: Option<&'a Path>,
    read: bool,
}

impl SecretReader<'_> {
    /// A file that must hold exactly one secret.
    fn one_from_file(&self, key: &str, path: &Path) -> Result<Secret, ConfigError> {
        let mut list = secrets_from_file(key, path, self.base_dir)?;
        match (list.pop(), list.is_empty()) {
            (Some(s), true) => Ok(s),
            _ => Err(err(key, "must hold exactly one secret")),
        }
    }
}

/// Where one secret setting comes from; a tenant gives exactly one.
enum SecretFrom<'a, T> {
    Inline(T),
    File(&'a Path),
    Env(&'a str),
}

impl<'a, T> SecretFrom<'a, T> {
    /// The one source given of the inline value, the file and the variable
    /// (their keys in `keys`); the error is at the first key.
    fn one_of(
        keys: [String; 3],
        inline: Option<T>,
        file: Option<&'a PathBuf>,
        env: Option<&'a String>,
    ) -> Result<Self, ConfigError> {
        match (inline, file, env) {
            (Some(v), None, None) => Ok(SecretFrom::Inline(v)),
            (None, Some(p), None) => Ok(SecretFrom::File(p)),
            (None, None, Some(v)) => Ok(SecretFrom::Env(v)),
            _ => {
                let names: Vec<&str> = keys
                    .iter()
                    .map(|k| k.rsplit('.').next().unwrap_or(k))
                    .collect();
                let message = format!("give exactly one of {}", names.join(", "));
                let [first, ..] = keys;
                Err(err(first, message))
            }
        }
    }
}

/// The names and webhook secrets of the tenants validated so far: each
/// must be unique across tenants.
#[derive(Default)]
struct TenantsSeen {
    names: HashSet<String>,
    secrets: Vec<(String, Secret)>,
}

fn validate_tenants(
    raw: Vec<RawTenant>,
    secrets: &SecretReader,
) -> Result<Vec<TenantConfig>, ConfigError> {
    if raw.is_empty() {
        return Err(err("tenant", "at least one [[tenant]] is required"));
    }
    let mut seen = TenantsSeen::default();
    raw.into_iter()
        .enumerate()
        .map(|(i, t)| t.validate(i, secrets, &mut seen))
        .collect()
}

impl RawTenant {
    fn validate(
        self,
        i: usize,
        secrets: &SecretReader,
        seen: &mut TenantsSeen,
    ) -> Result<TenantConfig, ConfigError> {
        let t = self;
        let k = |f: &str| format!("tenant[{i}].{f}");
        let name = required_text(&k("name"), t.name)?;
        if name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        {
            return Err(err(
                k("name"),
                format!("`{name}` must be 1-64 characters of [a-z0-9_-]"),
            ));
        }
        if !seen.names.insert(name.clone()) {
            return Err(err(k("name"), format!("tenant `{name}` is defined twice")));
        }
        let webhook_from = SecretFrom::one_of(
            [
                k("webhook_secrets"),
                k("webhook_secret_file"),
                k("webhook_secret_env"),
            ],
            t.webhook_secrets,
            t.webhook_secret_file.as_ref(),
            t.webhook_secret_env.as_ref(),
        )?;
        let webhook_secrets = match webhook_from {
            _ if !secrets.read => Vec::new(),
            SecretFrom::Inline(list) => {
                let list: Vec<Secret> = list.iter().map(|s| Secret::new(s.trim())).collect();
                if list.is_empty() || list.iter().any(|s| s.expose().is_empty()) {
                    return Err(err(
                        k("webhook_secrets"),
                        "must hold at least one non-empty secret",
                    ));
                }
                list
            }
            SecretFrom::File(path) => {
                secrets_from_file(&k("webhook_secret_file"), path, secrets.base_dir)?
            }
            SecretFrom::Env(var) => vec![secret_from_env(&k("webhook_secret_env"), var)?],
        };
        for s in &webhook_secrets {
            if s.expose().len() < 8 {
                return Err(err(
                    k("webhook_secrets"),
                    "a webhook secret must be at least 8 characters",
                ));
            }
            if let Some((other, _)) = seen.secrets.iter().find(|(_, o)| o == s) {
                return Err(err(
                    k("webhook_secrets"),
                    format!(
                        "the same webhook secret is configured for tenant `{other}`; each tenant needs its own"
                    ),
                ));
            }
        }
        for s in &webhook_secrets {
            seen.secrets.push((name.clone(), s.clone()));
        }
        let app_from = SecretFrom::one_of(
            [k("app_secret"), k("app_secret_file"), k("app_secret_env")],
            t.app_secret,
            t.app_secret_file.as_ref(),
            t.app_secret_env.as_ref(),
        )?;
        let app_secret = match app_from {
            _ if !secrets.read => Secret::new(""),
            SecretFrom::Inline(v) => {
                if v.trim().is_empty() {
                    return Err(err(k("app_secret"), "must not be empty"));
                }
                Secret::new(v.trim())
            }
            SecretFrom::File(path) => secrets.one_from_file(&k("app_secret_file"), path)?,
            SecretFrom::Env(var) => secret_from_env(&k("app_secret_env"), var)?,
        };
        let (max_delete_fraction, lo, hi) = key::MAX_DELETE_FRACTION.float(t.max_delete_fraction);
        // Declared with a default, so never NaN here; NaN would be refused.
        let max_delete_fraction = max_delete_fraction.unwrap_or(f64::NAN);
        if !(lo..=hi).contains(&max_delete_fraction) {
            return Err(err(
                k("max_delete_fraction"),
                format!("must be between {lo:?} and {hi:?}"),
            ));
        }
        let (max_requests_per_sec, lo, hi) =
            key::MAX_REQUESTS_PER_SEC.float(t.max_requests_per_sec);
        if let Some(r) = max_requests_per_sec {
            if !(lo..=hi).contains(&r) {
                return Err(err(
                    k("max_requests_per_sec"),
                    format!(
                        "must be a rate in requests per second from {lo} to {hi} (fractions allowed, e.g. 0.5), got {r}"
                    ),
                ));
            }
        }
        Ok(TenantConfig {
            webhook_secrets,
            api_base: base_url(&k("api_base"), t.api_base)?,
            extraction_base: base_url(&k("extraction_base"), t.extraction_base)?,
            app_tenant: required_text(&k("app_tenant"), t.app_tenant)?,
            app_id: required_text(&k("app_id"), t.app_id)?,
            app_secret,
            app_user: t.app_user.filter(|u| !u.trim().is_empty()),
            reconcile_schedule: key::RECONCILE_SCHEDULE
                .schedule_at(&k("reconcile_schedule"), t.reconcile_schedule)?,
            full_sweep_schedule: key::FULL_SWEEP_SCHEDULE
                .schedule_at(&k("full_sweep_schedule"), t.full_sweep_schedule)?,
            max_delete_fraction,
            max_requests_per_sec,
            audit_schedule: key::AUDIT_SCHEDULE
                .schedule_at(&k("audit_schedule"), t.audit_schedule)?,
            audit_sample: key::AUDIT_SAMPLE.int_at(&k("audit_sample"), t.audit_sample)? as u32,
            name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::TestResult;

    fn tenant(extra: &str) -> String {
        format!(
            "[database]\npath = \"/tmp/x.db\"\n[[tenant]]\nname = \"acme\"\nwebhook_secrets = [\"s3cret-acme-1\"]\napi_base = \"https://api.example.com\"\nextraction_base = \"https://apiv2-acme.example.com\"\napp_tenant = \"t\"\napp_id = \"i\"\napp_secret = \"app-s3cret\"\n{extra}"
        )
    }

    #[test]
    fn minimal_config_gets_spec_defaults() -> TestResult {
        let c = Config::from_toml(&tenant(""), None)?;
        assert_eq!(c.server.webhook_path, "/skillsevent");
        assert_eq!(c.server.max_body_bytes, 65536);
        assert_eq!(c.fetch.concurrency, 8);
        assert_eq!(c.fetch.max_attempts, 10);
        assert_eq!(
            c.tenants[0].reconcile_schedule.as_deref(),
            Some("0 */15 * * * *")
        );
        assert_eq!(
            c.tenants[0].full_sweep_schedule.as_deref(),
            Some("0 30 2 * * *")
        );
        assert!((c.tenants[0].max_delete_fraction - 0.1).abs() < 1e-9);
        Ok(())
    }

    #[test]
    fn upstream_default_is_what_a_config_without_upstream_gets() -> TestResult {
        let c = Config::from_toml(&tenant(""), None)?;
        assert_eq!(
            format!("{:?}", UpstreamConfig::default()),
            format!("{:?}", c.upstream)
        );
        let reporting = crate::reporting::ReportingConfig::default();
        assert_eq!(reporting, c.reporting);
        Ok(())
    }

    #[test]
    fn debug_output_hides_secrets() -> TestResult {
        let c = Config::from_toml(&tenant(""), None)?;
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cret-acme-1"));
        assert!(!dbg.contains("app-s3cret"));
        assert!(dbg.contains("[redacted]"));
        Ok(())
    }

    #[test]
    fn example_config_is_valid() -> TestResult {
        let c = Config::from_toml(&EXAMPLE_CONFIG, None)?;
        assert!(!c.tenants.is_empty());
        Ok(())
    }

    #[test]
    fn metrics_listen_defaults_turns_off_and_names_its_key() -> TestResult {
        let c = Config::from_toml(&tenant(""), None)?;
        assert_eq!(
            c.server.metrics_listen,
            Some("127.0.0.1:9187".parse::<SocketAddr>()?)
        );
        let off = Config::from_toml(
            &format!("[server]\nmetrics_listen = \"off\"\n{}", tenant("")),
            None,
        )?;
        assert_eq!(off.server.metrics_listen, None);
        for bad in ["nowhere", "127.0.0.1:8080"] {
            let e = Config::from_toml(
                &format!("[server]\nmetrics_listen = \"{bad}\"\n{}", tenant("")),
                None,
            )
            .err()
            .ok_or("accepted")?;
            assert_eq!(e.key, "server.metrics_listen", "{bad}: {e}");
        }
        Ok(())
    }

    #[test]
    fn reporting_columns_validate_naming_the_key() -> TestResult {
        let ok = "[reporting]\nstage_field = \"Status\"\n[reporting.job]\nclient = \"$.Customer\"\nbudget = { path = \"$.Budget.Amount\", type = \"real\" }\n";
        let c = Config::from_toml(&format!("{}{ok}", tenant("")), None)?;
        assert_eq!(c.reporting.job.len(), 2);
        assert_eq!(c.reporting.stage_field.to_string(), "$.Status");
        for (bad, key) in [
            (
                "[reporting.job]\nBudget = \"$.Budget\"\n",
                "reporting.job.Budget",
            ),
            ("[reporting.job]\nid = \"$.Other\"\n", "reporting.job.id"),
            (
                "[reporting.project]\nbudget = \"$.A.B.C\"\n",
                "reporting.project.budget",
            ),
            (
                "[reporting.job]\nbudget = { path = \"$.Budget\", type = \"money\" }\n",
                "reporting.job.budget.type",
            ),
            (
                "[reporting.job]\nbudget = { type = \"real\" }\n",
                "reporting.job.budget.path",
            ),
            (
                "[reporting.job]\nbudget = { path = \"$.B\", kind = \"real\" }\n",
                "reporting.job.budget.kind",
            ),
            (
                "[reporting]\nstage_field = \"$.\"\n",
                "reporting.stage_field",
            ),
            ("[reporting]\nstages = \"Stage\"\n", "stages"),
        ] {
            match Config::from_toml(&format!("{}{bad}", tenant("")), None) {
                Err(e) => assert_eq!(e.key, key, "{bad}: {e}"),
                Ok(_) => panic!("accepted {bad}"),
            }
        }
        Ok(())
    }

    #[test]
    fn type_errors_on_secret_keys_hide_the_value() {
        for (toml, value) in [
            (
                tenant("").replace("[\"s3cret-acme-1\"]", "\"s3cret-acme-1\""),
                "s3cret-acme-1",
            ),
            (
                tenant("").replace("\"app-s3cret\"", "123456789"),
                "123456789",
            ),
            (
                "tenant = [{ name = \"acme\", app_secret = 987654321 }]\n".to_string(),
                "987654321",
            ),
        ] {
            let e = Config::from_toml(&toml, None).err().map(|e| e.to_string());
            let e = e.unwrap_or_default();
            assert!(e.contains("secret"), "key not named: {e}");
            assert!(e.contains("expected"), "expected type not said: {e}");
            assert!(!e.contains(value), "value quoted: {e}");
        }
        // A public key keeps its value in the message: it helps.
        let e = Config::from_toml(
            &format!("[fetch]\nconcurrency = \"lots\"\n{}", tenant("")),
            None,
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.contains("lots"), "{e}");
    }

    #[test]
    fn ip_matching() -> TestResult {
        assert!(ip_in("10.1.2.3".parse()?, "10.0.0.0".parse()?, 8));
        assert!(!ip_in("11.1.2.3".parse()?, "10.0.0.0".parse()?, 8));
        assert!(ip_in("::1".parse()?, "::1".parse()?, 128));
        Ok(())
    }

    #[test]
    fn max_requests_per_sec_is_optional_takes_fractions_and_names_its_key() -> TestResult {
        assert_eq!(
            Config::from_toml(&tenant(""), None)?.tenants[0].max_requests_per_sec,
            None
        );
        for (text, want) in [("20", 20.0), ("0.5", 0.5), ("12.5", 12.5)] {
            let c = Config::from_toml(&tenant(&format!("max_requests_per_sec = {text}")), None)?;
            assert_eq!(c.tenants[0].max_requests_per_sec, Some(want), "{text}");
        }
        for bad in ["0", "-1", "0.001", "1e9", "nan", "inf"] {
            let e = Config::from_toml(&tenant(&format!("max_requests_per_sec = {bad}")), None)
                .err()
                .ok_or(format!("accepted {bad}"))?;
            assert_eq!(e.key, "tenant[0].max_requests_per_sec", "{bad}: {e}");
        }
        // A type error is found by the parser, which names the table, not its index.
        let e = Config::from_toml(&tenant("max_requests_per_sec = \"fast\""), None)
            .err()
            .ok_or("accepted a string")?;
        assert_eq!(e.key, "tenant.max_requests_per_sec", "{e}");
        Ok(())
    }

    #[test]
    fn schedule_off_disables() -> TestResult {
        let c = Config::from_toml(&tenant("reconcile_schedule = \"off\""), None)?;
        assert!(c.tenants[0].reconcile_schedule.is_none());
        Ok(())
    }

    #[test]
    fn audit_keys_default_validate_and_name_their_key() -> TestResult {
        let c = Config::from_toml(&tenant(""), None)?;
        assert_eq!(c.tenants[0].audit_schedule.as_deref(), Some("0 0 4 * * *"));
        assert_eq!(c.tenants[0].audit_sample, 500);
        let c = Config::from_toml(
            &tenant("audit_schedule = \"off\"\naudit_sample = 2000"),
            None,
        )?;
        assert!(c.tenants[0].audit_schedule.is_none());
        assert_eq!(c.tenants[0].audit_sample, 2000);
        for (text, key) in [
            ("audit_schedule = \"daily\"", "tenant[0].audit_schedule"),
            ("audit_schedule = \"0 4 * * *\"", "tenant[0].audit_schedule"),
            ("audit_sample = 0", "tenant[0].audit_sample"),
            ("audit_sample = 1000001", "tenant[0].audit_sample"),
        ] {
            let e = Config::from_toml(&tenant(text), None)
                .err()
                .ok_or(format!("{text} was accepted"))?;
            assert_eq!(e.key, key, "{text}: {e}");
        }
        Ok(())
    }
}
