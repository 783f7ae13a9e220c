//! Every config key, declared once: its section, name, type (with the range
//! validation enforces), default and doc line. From this one table come the
//! typed defaults ([`defaults`]), the ranges and defaults validation applies
//! ([`ConfigKey::int`], [`ConfigKey::float`]), the commented example that `print-config`
//! prints ([`render_example`]), the key table in the README
//! ([`render_readme_table`]) and the `skillsync.toml(5)` man page (which
//! `manpages` renders from [`SECTIONS`] and [`KEYS`]). A test
//! (`tests/it/config_keys.rs`) fails when the parser, the README or the
//! example knows a key this table does not declare, or the other way round.
//!
//! What a key's value must look like beyond its type and range (an address,
//! a cron string, a secret read from a file) stays with the section's
//! validation in `config`; this file renders text and checks numbers only.

use super::{ConfigError, err};

/// How a key's value is read and checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KeyKind {
    /// A whole number in `min..=max`.
    Int {
        min: i64,
        max: i64,
    },
    /// A number (fractions allowed) in `min..=max`.
    Float {
        min: f64,
        max: f64,
    },
    Bool,
    /// Non-empty text.
    Text,
    /// `address:port`.
    Address,
    /// `address:port` or `"off"`.
    AddressOrOff,
    /// A URL path (`/…`).
    UrlPath,
    /// A file path.
    File,
    /// A URL path that must hold the placeholder, e.g. `{id}`.
    Template(&'static str),
    /// A non-empty list of non-empty names.
    Names,
    /// A list of IP networks (CIDR) or addresses.
    Networks,
    /// A cron string with seconds (UTC), or `"off"`.
    Schedule,
    /// An `http://` or `https://` base URL.
    BaseUrl,
    /// `[a-z0-9_-]`, 1 to 64 characters.
    TenantName,
    /// A secret written inline.
    Secret,
    /// A list of secrets written inline.
    Secrets,
    /// A file holding secrets (one per line).
    SecretFile,
    /// The name of an environment variable holding a secret.
    SecretEnv,
    /// `postgres://…` or `postgresql://…`.
    PostgresUrl,
    /// A PostgreSQL schema name.
    Schema,
    /// A JSON field path, `Field` or `$.Field.Nested`.
    FieldPath,
    /// A report column: `"$.Path"` or `{ path = "$.Path", type = "…" }`.
    Column,
}

impl KeyKind {
    /// The type in words, for the man page.
    pub fn describe(&self) -> String {
        match self {
            KeyKind::Int { min, max } => format!("integer, {min} to {max}"),
            KeyKind::Float { min, max } => format!("number, {min} to {max}"),
            KeyKind::Bool => "true or false".into(),
            KeyKind::Text => "text".into(),
            KeyKind::Address => "address:port".into(),
            KeyKind::AddressOrOff => "address:port, or \"off\"".into(),
            KeyKind::UrlPath => "URL path".into(),
            KeyKind::File => "file path".into(),
            KeyKind::Template(p) => format!("URL path holding {p}"),
            KeyKind::Names => "list of names".into(),
            KeyKind::Networks => "list of CIDR networks".into(),
            KeyKind::Schedule => "cron with seconds (UTC), or \"off\"".into(),
            KeyKind::BaseUrl => "http(s) URL".into(),
            KeyKind::TenantName => "name, [a-z0-9_-], 1 to 64 characters".into(),
            KeyKind::Secret => "secret".into(),
            KeyKind::Secrets => "list of secrets".into(),
            KeyKind::SecretFile => "file path (a secret)".into(),
            KeyKind::SecretEnv => "environment variable name".into(),
            KeyKind::PostgresUrl => "postgres:// URL".into(),
            KeyKind::Schema => "schema name, [a-z0-9_]".into(),
            KeyKind::FieldPath => "field path".into(),
            KeyKind::Column => "field path, or { path, type }".into(),
        }
    }
}

/// A default value, typed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DefaultValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(&'static str),
    List(&'static [&'static str]),
}

impl DefaultValue {
    /// As written in TOML: `65536`, `"/skillsevent"`, `["Version"]`.
    pub fn toml(&self) -> String {
        match self {
            DefaultValue::Int(i) => i.to_string(),
            // `{:?}` keeps the fraction (`0.0`, not `0`, which TOML reads as an integer).
            DefaultValue::Float(f) => format!("{f:?}"),
            DefaultValue::Bool(b) => b.to_string(),
            DefaultValue::Text(s) => quote(s),
            DefaultValue::List(l) => {
                let items: Vec<String> = l.iter().map(|s| quote(s)).collect();
                format!("[{}]", items.join(", "))
            }
        }
    }

    /// As the README shows it: text without its quotes.
    fn plain(&self) -> String {
        match self {
            DefaultValue::Text(s) => s.to_string(),
            other => other.toml(),
        }
    }
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// What a key is worth when the config leaves it out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KeyDefault {
    Value(DefaultValue),
    /// No value; the text says what that means (`none`, `off`, …).
    Unset(&'static str),
    /// The key must be given.
    Required,
    /// One of several forms of the required key declared before it.
    Alternative,
    /// A name of the user's own choosing (report columns).
    Example,
}

impl std::fmt::Display for KeyDefault {
    /// As the man page shows it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyDefault::Value(v) => f.write_str(&v.toml()),
            KeyDefault::Unset(s) => f.write_str(s),
            KeyDefault::Required => f.write_str("none: required"),
            KeyDefault::Alternative => f.write_str("none: instead of the key before it"),
            KeyDefault::Example => f.write_str("none: a column name of your own"),
        }
    }
}

/// How the example config shows a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    /// `key = value`.
    Set,
    /// `# key = value`.
    Commented,
    /// `# or: key = value`: another form of the key before it.
    Or,
}

/// One declared key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConfigKey {
    /// `server`, `tenant` (one table per tenant), `reporting.job`, …
    pub section: &'static str,
    /// `listen`; `NAME` for a name of the user's choosing.
    pub name: &'static str,
    pub kind: KeyKind,
    pub default: KeyDefault,
    pub show: Show,
    /// The value the example shows instead of the default (TOML text; for
    /// a column, whole `name = value` lines).
    pub example: Option<&'static str>,
    /// The doc comment: its first paragraph is the example's comment, all
    /// of it the README's and the man page's text.
    pub doc: &'static str,
}

impl ConfigKey {
    /// `server.listen`, `tenant.name`: the key as the man page names it.
    pub fn path(&self) -> String {
        format!("{}.{}", self.section, self.name)
    }

    /// The key as an error names it: `tenant[2].name` for the third tenant.
    pub fn at(&self, index: usize) -> String {
        format!("{}[{index}].{}", self.section, self.name)
    }

    /// The doc's paragraphs, each joined into one line.
    pub fn paragraphs(&self) -> Vec<String> {
        paragraphs(self.doc)
    }

    /// The whole doc as one line, its paragraphs as sentences.
    pub fn doc_line(&self) -> String {
        let mut out = String::new();
        for p in self.paragraphs() {
            if !out.is_empty() {
                if !out.ends_with(['.', '!', '?']) {
                    out.push('.');
                }
                out.push(' ');
            }
            out.push_str(&p);
        }
        out
    }

    /// The integer given, or the default; an error at `at` when out of range.
    pub fn int_at(&self, at: &str, v: Option<i64>) -> Result<i64, ConfigError> {
        let KeyKind::Int { min, max } = self.kind else {
            return Err(err(at, "is not declared as an integer (a bug)"));
        };
        let v = match (v, self.default) {
            (Some(v), _) => v,
            (None, KeyDefault::Value(DefaultValue::Int(d))) => d,
            (None, _) => return Err(err(at, "is required")),
        };
        if v < min || v > max {
            return Err(err(at, format!("must be between {min} and {max}, got {v}")));
        }
        Ok(v)
    }

    /// [`ConfigKey::int_at`] at this key's own path.
    pub fn int(&self, v: Option<i64>) -> Result<i64, ConfigError> {
        self.int_at(&self.path(), v)
    }

    /// The text given, or the default; a template must hold its placeholder,
    /// other text must not be blank (and is trimmed).
    pub fn text(&self, v: Option<String>) -> Result<String, ConfigError> {
        let at = self.path();
        let default = match self.default {
            KeyDefault::Value(DefaultValue::Text(d)) => Some(d.to_string()),
            _ => None,
        };
        match self.kind {
            KeyKind::Template(placeholder) => {
                super::path_template(&at, v.or(default).unwrap_or_default(), placeholder)
            }
            _ => super::required_text(&at, v.or(default)),
        }
    }

    /// The list given, or the default: at least one name, none blank.
    pub fn names(&self, v: Option<Vec<String>>) -> Result<Vec<String>, ConfigError> {
        let default = match self.default {
            KeyDefault::Value(DefaultValue::List(d)) => d,
            _ => &[],
        };
        super::non_empty_list(&self.path(), v, default)
    }

    /// The schedule given, or the default; `None` for `"off"`. The error is at `at`.
    pub fn schedule_at(&self, at: &str, v: Option<String>) -> Result<Option<String>, ConfigError> {
        let default = match self.default {
            KeyDefault::Value(DefaultValue::Text(d)) => d,
            _ => "off",
        };
        super::parse_schedule(at, v, default)
    }

    /// The number given, or the default (`None` when it has none); the
    /// declared range for the caller's message, since a rate and a fraction
    /// say theirs differently.
    pub fn float(&self, v: Option<f64>) -> (Option<f64>, f64, f64) {
        let (min, max) = match self.kind {
            KeyKind::Float { min, max } => (min, max),
            _ => (f64::NAN, f64::NAN),
        };
        let default = match self.default {
            KeyDefault::Value(DefaultValue::Float(d)) => Some(d),
            _ => None,
        };
        (v.or(default), min, max)
    }
}

fn paragraphs(doc: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in doc.lines().map(str::trim) {
        if line.is_empty() {
            if !current.is_empty() {
                out.push(std::mem::take(&mut current));
            }
            continue;
        }
        if !current.is_empty() {
            current.push(' ');
        }
        current.push_str(line);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// A `[section]` of the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigSection {
    /// `server`, `tenant`, `reporting.job`, …
    pub name: &'static str,
    /// `[[name]]`: one table per tenant.
    pub array: bool,
    /// Absent means off (`[postgres]`): the example shows it commented.
    pub optional: bool,
    /// Where the example's comments start, so they line up.
    pub column: usize,
    pub doc: &'static str,
}

impl ConfigSection {
    /// The keys declared in this section, in order.
    pub fn keys(&self) -> impl Iterator<Item = &'static ConfigKey> + '_ {
        KEYS.iter().filter(move |k| k.section == self.name)
    }

    /// `[server]`, `[[tenant]]`.
    pub fn header(&self) -> String {
        if self.array {
            format!("[[{}]]", self.name)
        } else {
            format!("[{}]", self.name)
        }
    }

    pub fn paragraphs(&self) -> Vec<String> {
        paragraphs(self.doc)
    }
}

/// The sections, in the order the example shows them.
pub const SECTIONS: &[ConfigSection] = &[
    ConfigSection {
        name: "server",
        array: false,
        optional: false,
        column: 35,
        doc: "",
    },
    ConfigSection {
        name: "database",
        array: false,
        optional: false,
        column: 35,
        doc: "",
    },
    ConfigSection {
        name: "fetch",
        array: false,
        optional: false,
        column: 35,
        doc: "",
    },
    ConfigSection {
        name: "retention",
        array: false,
        optional: false,
        column: 35,
        doc: "",
    },
    ConfigSection {
        name: "upstream",
        array: false,
        optional: false,
        column: 35,
        doc: "Paths, query names and field names of the Skills Workflow APIs. Defaults follow \
              the public documentation; change them only if your tenant differs.",
    },
    ConfigSection {
        name: "reporting",
        array: false,
        optional: false,
        column: 36,
        doc: "The job_report / project_report views show typed columns (defaults: number, name, \
              client, stage, project_id for jobs, created_on, modified_on, start_date, end_date, \
              version). `skillsync columns --type job` lists a tenant's fields and prints lines \
              for here.",
    },
    ConfigSection {
        name: "reporting.job",
        array: false,
        optional: false,
        column: 36,
        doc: "Extra or overriding job_report columns: name = \"$.Path\" or { path, type }.",
    },
    ConfigSection {
        name: "reporting.project",
        array: false,
        optional: false,
        column: 36,
        doc: "Extra or overriding project_report columns, as for jobs.",
    },
    ConfigSection {
        name: "postgres",
        array: false,
        optional: true,
        column: 36,
        doc: "A second copy of the mirror in PostgreSQL (>= 13), for reporting tools on another \
              machine (off while this section is absent). Tables, views and the cursor live in \
              one schema.",
    },
    ConfigSection {
        name: "tenant",
        array: true,
        optional: false,
        column: 43,
        doc: "",
    },
];

/// Declares every key once: a typed default in [`defaults`] (for keys that
/// have one), a [`ConfigKey`] in [`key`], and its place in [`KEYS`].
macro_rules! config_keys {
    (@const $id:ident Int($v:expr)) => { pub const $id: i64 = $v; };
    (@const $id:ident Float($v:expr)) => { pub const $id: f64 = $v; };
    (@const $id:ident Bool($v:expr)) => { pub const $id: bool = $v; };
    (@const $id:ident Text($v:expr)) => { pub const $id: &str = $v; };
    (@const $id:ident List($v:expr)) => { pub const $id: &[&str] = $v; };
    (@const $id:ident $($other:tt)*) => {};

    (@default $id:ident Int($v:expr)) => { KeyDefault::Value(DefaultValue::Int(defaults::$id)) };
    (@default $id:ident Float($v:expr)) => { KeyDefault::Value(DefaultValue::Float(defaults::$id)) };
    (@default $id:ident Bool($v:expr)) => { KeyDefault::Value(DefaultValue::Bool(defaults::$id)) };
    (@default $id:ident Text($v:expr)) => { KeyDefault::Value(DefaultValue::Text(defaults::$id)) };
    (@default $id:ident List($v:expr)) => { KeyDefault::Value(DefaultValue::List(defaults::$id)) };
    (@default $id:ident Unset($s:expr)) => { KeyDefault::Unset($s) };
    (@default $id:ident Required) => { KeyDefault::Required };
    (@default $id:ident Alternative) => { KeyDefault::Alternative };
    (@default $id:ident Example) => { KeyDefault::Example };

    (@example) => { None };
    (@example $e:expr) => { Some($e) };

    ($(
        $(#[doc = $doc:literal])*
        $section:literal $name:ident => $id:ident:
            $default:ident $(($($d:tt)*))?, $kind:expr, $show:ident $(($example:expr))?;
    )*) => {
        /// Every default the config fills in, typed, from the declarations
        /// in [`key`]: validation reads them, and so does the simulator (its
        /// paths and query names are the config's defaults, so a default
        /// config talks to it as is).
        pub mod defaults {
            $( config_keys!(@const $id $default $(($($d)*))?); )*
        }

        /// Each key's declaration, by name.
        pub mod key {
            use super::*;
            $(
                $(#[doc = $doc])*
                pub const $id: ConfigKey = ConfigKey {
                    section: $section,
                    name: stringify!($name),
                    kind: $kind,
                    default: config_keys!(@default $id $default $(($($d)*))?),
                    show: Show::$show,
                    example: config_keys!(@example $($example)?),
                    doc: concat!($($doc, "\n"),*),
                };
            )*
        }

        /// Every key, section by section, in the example's order.
        pub const KEYS: &[ConfigKey] = &[$(key::$id),*];
    };
}

config_keys! {
    /// where the webhook listener binds (put TLS in front, see README)
    "server" listen => LISTEN: Text("127.0.0.1:8080"), KeyKind::Address, Set;
    /// POST here (tenant chosen by secret) or to {webhook_path}/{tenant}
    ///
    /// Not /healthz or /metrics.
    "server" webhook_path => WEBHOOK_PATH: Text("/skillsevent"), KeyKind::UrlPath, Set;
    /// larger webhook bodies get 413
    "server" max_body_bytes => MAX_BODY_BYTES:
        Int(65536), KeyKind::Int { min: 256, max: 16 << 20 }, Set;
    /// /metrics (Prometheus) and detailed /healthz; "off" disables.
    /// Never the same as listen: the public listener serves only
    /// the webhook path and /healthz.
    "server" metrics_listen => METRICS_LISTEN: Text("127.0.0.1:9187"), KeyKind::AddressOrOff, Set;
    /// X-Forwarded-For honoured only from these
    ///
    /// The logs then show the real client.
    "server" trusted_proxies => TRUSTED_PROXIES:
        Unset("none"), KeyKind::Networks, Commented(r#"["127.0.0.1/32"]"#);
    /// connections served at once
    ///
    /// More wait in the kernel backlog.
    "server" max_connections => MAX_CONNECTIONS:
        Int(1024), KeyKind::Int { min: 1, max: 100_000 }, Commented;
    /// a client that sends headers slower than this is dropped
    "server" header_read_timeout_secs => HEADER_READ_TIMEOUT_SECS:
        Int(10), KeyKind::Int { min: 1, max: 300 }, Commented;
    /// built-in HTTPS, or terminate TLS in nginx or Caddy
    ///
    /// PEM, full chain; TLS 1.2/1.3. Goes with tls_key_file.
    "server" tls_cert_file => TLS_CERT_FILE:
        Unset("none"), KeyKind::File, Commented(r#""/etc/skillsync/tls/fullchain.pem""#);
    /// re-read on SIGHUP (systemctl reload) and when the files change
    ///
    /// A bad new certificate keeps the old one.
    "server" tls_key_file => TLS_KEY_FILE:
        Unset("none"), KeyKind::File, Commented(r#""/etc/skillsync/tls/privkey.pem""#);

    /// the SQLite file; its directory must exist and be writable
    "database" path => DATABASE_PATH:
        Text("/var/lib/skillsync/skillsync.db"), KeyKind::File, Set;
    /// how long a write waits on another writer before the webhook answers 503
    "database" busy_timeout_ms => BUSY_TIMEOUT_MS:
        Int(5000), KeyKind::Int { min: 0, max: 600_000 }, Commented;
    /// concurrent events share one fsync'd commit
    /// (false: one commit each; for benchmarks only)
    "database" group_commit => GROUP_COMMIT: Bool(true), KeyKind::Bool, Commented;

    /// fetches in flight per tenant
    ///
    /// Webhooks and reconciliation share them.
    "fetch" concurrency => FETCH_CONCURRENCY:
        Int(8), KeyKind::Int { min: 1, max: 256 }, Set;
    /// whole-request timeout for one upstream call
    "fetch" timeout_secs => FETCH_TIMEOUT_SECS:
        Int(35), KeyKind::Int { min: 1, max: 600 }, Set;
    /// then the event is dead (see: skillsync retry --dead)
    "fetch" max_attempts => MAX_ATTEMPTS: Int(10), KeyKind::Int { min: 1, max: 1000 }, Set;
    /// the first retry's delay: exponential backoff with jitter...
    ///
    /// Not more than retry_max_secs.
    "fetch" retry_initial_secs => RETRY_INITIAL_SECS:
        Int(2), KeyKind::Int { min: 0, max: 86_400 }, Set;
    /// ...capped here (an upstream Retry-After wins, up to one hour)
    "fetch" retry_max_secs => RETRY_MAX_SECS:
        Int(3600), KeyKind::Int { min: 1, max: 86_400 }, Set;
    /// a larger upstream document is an error, never stored
    "fetch" max_document_bytes => MAX_DOCUMENT_BYTES:
        Int(4 << 20), KeyKind::Int { min: 1024, max: 256 << 20 }, Commented;

    /// prune done/ignored events older than this (0 keeps all)
    "retention" events_days => EVENTS_DAYS:
        Int(30), KeyKind::Int { min: 0, max: 36_500 }, Commented;
    /// prune document_history older than this (0 keeps all; latest revision always kept)
    "retention" history_days => HISTORY_DAYS:
        Int(0), KeyKind::Int { min: 0, max: 36_500 }, Commented;

    /// a job, under the tenant's api_base
    "upstream" job_path => JOB_PATH: Text("/api/jobs/{id}"), KeyKind::Template("{id}"), Commented;
    /// a project, under the tenant's api_base
    "upstream" project_path => PROJECT_PATH:
        Text("/api/projects/{id}"), KeyKind::Template("{id}"), Commented;
    /// the listing (Data Extraction API), under the tenant's extraction_base
    "upstream" listing_path => LISTING_PATH:
        Text("/api/v3/analytics/named-query/{query}/dynamic-execute"),
        KeyKind::Template("{query}"), Commented;
    /// the named query that lists jobs
    "upstream" jobs_query => JOBS_QUERY: Text("DE-Jobs"), KeyKind::Text, Commented;
    /// the named query that lists projects
    "upstream" projects_query => PROJECTS_QUERY: Text("DE-Projects"), KeyKind::Text, Commented;
    /// a job's id in a listing row
    "upstream" job_id_field => JOB_ID_FIELD: Text("JobId"), KeyKind::Text, Commented;
    /// a project's id in a listing row
    "upstream" project_id_field => PROJECT_ID_FIELD: Text("ProjectId"), KeyKind::Text, Commented;
    /// the modification time a listing filters and orders by
    "upstream" modified_field => MODIFIED_FIELD: Text("ModifiedOn"), KeyKind::Text, Commented;
    /// listing page size
    "upstream" page_size => PAGE_SIZE: Int(500), KeyKind::Int { min: 1, max: 10_000 }, Commented;
    /// incremental runs re-list this far behind the watermark
    "upstream" overlap_secs => OVERLAP_SECS:
        Int(300), KeyKind::Int { min: 0, max: 86_400 }, Commented;
    /// a listing page failing (429/5xx/timeouts) is retried this long, then the run fails
    "upstream" listing_retry_secs => LISTING_RETRY_SECS:
        Int(900), KeyKind::Int { min: 0, max: 86_400 }, Commented;
    /// the document type names the sender uses for jobs
    "upstream" job_types => JOB_TYPES:
        List(&["SkillsWorkflow.Job", "Job"]), KeyKind::Names, Commented;
    /// the document type names the sender uses for projects
    "upstream" project_types => PROJECT_TYPES:
        List(&["SkillsWorkflow.Project", "Project"]), KeyKind::Names, Commented;
    /// a document's number: the first of these fields present
    "upstream" number_fields => NUMBER_FIELDS:
        List(&["Number", "JobNumber", "ProjectNumber"]), KeyKind::Names, Commented;
    /// a document's name: the first of these fields present
    "upstream" name_fields => NAME_FIELDS:
        List(&["Name", "Subject", "Job", "Project"]), KeyKind::Names, Commented;
    /// a document's modification time: the first of these fields present
    "upstream" modified_fields => MODIFIED_FIELDS:
        List(&["ModifiedOn", "ModifiedOnUtc", "UpdatedAt"]), KeyKind::Names, Commented;
    /// a document's version: the first of these fields present
    "upstream" version_fields => VERSION_FIELDS: List(&["Version"]), KeyKind::Names, Commented;

    /// the field whose changes make job_stages / project_stages
    "reporting" stage_field => STAGE_FIELD: Text("Stage"), KeyKind::FieldPath, Commented;
    /// type: text | integer | real | timestamp
    ///
    /// NAME = "$.Path" (text) or NAME = { path = "$.Path.Nested", type = "…" }; NAME is
    /// snake_case, not tenant or id; extra columns follow the defaults in name order.
    "reporting.job" NAME => JOB_COLUMN: Example, KeyKind::Column, Commented(concat!(
        "stage_type = \"$.StageType\"\n",
        "budget = { path = \"$.Budget\", type = \"real\" }"
    ));
    /// type: text | integer | real | timestamp
    ///
    /// As for jobs, in project_report.
    "reporting.project" NAME => PROJECT_COLUMN:
        Example, KeyKind::Column, Commented("client = \"$.Client\"");

    /// TLS: rustls, certificate always verified
    ///
    /// sslmode disable, and only that, sends in plain text; see the README.
    "postgres" url => POSTGRES_URL: Required, KeyKind::PostgresUrl,
        Set(r#""postgres://skillsync@db.example.com:5432/reports?sslmode=verify-full""#);
    /// never in the url of a shared config
    "postgres" password_file => POSTGRES_PASSWORD_FILE:
        Unset("none"), KeyKind::SecretFile, Commented(r#""pg-password""#);
    /// the variable holding the password
    "postgres" password_env => POSTGRES_PASSWORD_ENV:
        Alternative, KeyKind::SecretEnv, Or(r#""PGPASSWORD""#);
    /// one schema per SQLite database
    "postgres" schema => POSTGRES_SCHEMA: Text("skillsync"), KeyKind::Schema, Set;
    /// documents per PostgreSQL transaction
    "postgres" batch_size => POSTGRES_BATCH_SIZE:
        Int(1000), KeyKind::Int { min: 1, max: 50_000 }, Set;
    /// `status` is degraded when PostgreSQL lags more than this
    "postgres" lag_alert_secs => POSTGRES_LAG_ALERT_SECS:
        Int(300), KeyKind::Int { min: 1, max: 86_400 * 7 }, Set;

    /// [a-z0-9_-], the key in every table
    "tenant" name => TENANT_NAME: Required, KeyKind::TenantName, Set(r#""acme""#);
    /// or a form below; several allowed while rotating
    "tenant" webhook_secrets => WEBHOOK_SECRETS:
        Required, KeyKind::Secrets, Set(r#"["replace-with-the-webhook-secret"]"#);
    /// one per line (# and blank lines ignored); relative to $CREDENTIALS_DIRECTORY
    "tenant" webhook_secret_file => WEBHOOK_SECRET_FILE:
        Alternative, KeyKind::SecretFile, Or(r#""acme-webhook-secret""#);
    /// the variable holding the webhook secret
    "tenant" webhook_secret_env => WEBHOOK_SECRET_ENV:
        Alternative, KeyKind::SecretEnv, Or(r#""ACME_WEBHOOK_SECRET""#);
    /// single documents: GET {api_base}/api/jobs/{id}
    "tenant" api_base => API_BASE:
        Required, KeyKind::BaseUrl, Set(r#""https://integration-api-we.skillsworkflow.com""#);
    /// listing (Data Extraction API)
    "tenant" extraction_base => EXTRACTION_BASE:
        Required, KeyKind::BaseUrl, Set(r#""https://apiv2-acme.skillsworkflow.com""#);
    /// X-AppTenant
    "tenant" app_tenant => APP_TENANT: Required, KeyKind::Text, Set(r#""replace-with-X-AppTenant""#);
    /// X-AppId
    "tenant" app_id => APP_ID: Required, KeyKind::Text, Set(r#""replace-with-X-AppId""#);
    /// X-AppSecret, or a form below
    "tenant" app_secret => APP_SECRET:
        Required, KeyKind::Secret, Set(r#""replace-with-X-AppSecret""#);
    /// systemd LoadCredential=, see systemd/skillsync.service
    ///
    /// A relative file resolves against $CREDENTIALS_DIRECTORY.
    "tenant" app_secret_file => APP_SECRET_FILE:
        Alternative, KeyKind::SecretFile, Or(r#""acme-app-secret""#);
    /// the variable holding the app secret
    "tenant" app_secret_env => APP_SECRET_ENV:
        Alternative, KeyKind::SecretEnv, Or(r#""ACME_APP_SECRET""#);
    /// X-AppUser
    "tenant" app_user => APP_USER:
        Unset("none"), KeyKind::Text, Commented(r#""integration@acme.example""#);
    /// incremental catch-up (cron with seconds, UTC) or "off"
    "tenant" reconcile_schedule => RECONCILE_SCHEDULE:
        Text("0 */15 * * * *"), KeyKind::Schedule, Set;
    /// full id sweep, detects deletions, or "off"
    "tenant" full_sweep_schedule => FULL_SWEEP_SCHEDULE:
        Text("0 30 2 * * *"), KeyKind::Schedule, Set;
    /// a sweep that would mark more deleted stops (override: reconcile --full --force)
    ///
    /// A sweep whose deletion candidates (live documents missing from its listing) exceed
    /// this fraction of the type's live documents checks and marks nothing and fails; below
    /// it, each candidate is deleted only if its GET answers 404/410.
    "tenant" max_delete_fraction => MAX_DELETE_FRACTION:
        Float(0.1), KeyKind::Float { min: 0.0, max: 1.0 }, Set;
    /// every upstream call of this tenant shares this budget, requests/s
    /// (fractions allowed)
    ///
    /// Document GETs, listing pages and control GETs each take a permit, with a burst of 5%
    /// of a second (at least 1); `0.5` is one every 2 s. Without it the rate still adapts to
    /// 429s. Per process: a `reconcile` beside `serve` has its own, so the two may add up to
    /// twice the rate.
    "tenant" max_requests_per_sec => MAX_REQUESTS_PER_SEC:
        Unset("none, the rate adapts to 429s only"),
        KeyKind::Float { min: 0.01, max: 100_000.0 }, Commented("10");
    /// accuracy audit (skillsync verify): cron with seconds, UTC, or "off"
    ///
    /// Daily at 04:00 UTC by default, after the full sweep; each type in turn.
    "tenant" audit_schedule => AUDIT_SCHEDULE: Text("0 0 4 * * *"), KeyKind::Schedule, Set;
    /// documents per type per audit, live and deleted; also its most upstream GETs
    ///
    /// Each GET is a background permit from the tenant's request budget.
    "tenant" audit_sample => AUDIT_SAMPLE: Int(500), KeyKind::Int { min: 1, max: 1_000_000 }, Set;
}

/// The lines at the top of the example.
const EXAMPLE_INTRO: &str = "\
# skillsync example configuration.
# Every key is shown; a commented key shows its default unless its comment says
# \"default:\" or \"required\". Unknown keys are errors. Reference: man skillsync.toml
# Validate with: skillsync check-config --config /etc/skillsync/skillsync.toml
";

/// The commented example config, every key in it: what `print-config`
/// prints (and `systemd/skillsync.example.toml` holds, checked by a test).
pub fn render_example() -> String {
    let mut out = String::from(EXAMPLE_INTRO);
    for section in SECTIONS {
        out.push('\n');
        let hash = if section.optional { "# " } else { "" };
        out.push_str(&format!("{hash}{}\n", section.header()));
        for p in section.paragraphs() {
            for line in wrap(&p, 88) {
                out.push_str(&format!("# {line}\n"));
            }
        }
        for key in section.keys() {
            example_lines(&mut out, section, key);
        }
    }
    out
}

/// The example's line(s) for one key: `key = value   # doc`, commented as
/// the declaration says, its doc's first paragraph in the comment.
fn example_lines(out: &mut String, section: &ConfigSection, key: &ConfigKey) {
    let commented = section.optional || key.show != Show::Set;
    let prefix = match key.show {
        Show::Or => "# or: ",
        _ if commented => "# ",
        _ => "",
    };
    let mut comment: Vec<String> = key
        .doc
        .split("\n\n")
        .next()
        .unwrap_or("")
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    match key.default {
        KeyDefault::Required => {
            if let Some(first) = comment.first_mut() {
                *first = format!("(required) {first}");
            }
        }
        KeyDefault::Unset(s) => {
            if let Some(last) = comment.last_mut() {
                *last = format!("{last} (default: {s})");
            }
        }
        _ => {}
    }
    let lines: Vec<String> = match (key.kind, key.example, key.default) {
        (KeyKind::Column, Some(ex), _) => ex.lines().map(str::to_string).collect(),
        (_, Some(ex), _) => vec![format!("{} = {ex}", key.name)],
        (_, None, KeyDefault::Value(v)) => vec![format!("{} = {}", key.name, v.toml())],
        (_, None, _) => vec![format!("{} = ", key.name)],
    };
    let last = lines.len().saturating_sub(1);
    for (i, line) in lines.iter().enumerate() {
        let text = format!("{prefix}{line}");
        if i < last {
            out.push_str(&text);
            out.push('\n');
            continue;
        }
        let mut comments = comment.iter();
        match comments.next() {
            Some(c) => {
                let pad = if text.len() < section.column {
                    section.column - text.len()
                } else {
                    3
                };
                out.push_str(&format!("{text}{}# {c}\n", " ".repeat(pad)));
                for more in comments {
                    out.push_str(&format!("{}# {more}\n", " ".repeat(section.column)));
                }
            }
            None => {
                out.push_str(&text);
                out.push('\n');
            }
        }
    }
}

/// Words of `text` in lines of at most `width` characters.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// Where the README's key table starts and ends (the lines themselves are kept).
pub const README_TABLE_START: &str =
    "<!-- config keys: generated from src/config/keys.rs; tests/it/config_keys.rs checks it -->";
pub const README_TABLE_END: &str = "<!-- end of config keys -->";

/// The README's key table: a row per key, `tenant[].name` for a tenant's.
pub fn render_readme_table() -> String {
    let mut out = String::from("| key | type | default | meaning |\n|---|---|---|---|\n");
    for section in SECTIONS {
        for key in section.keys() {
            let name = if section.array {
                format!("{}[].{}", key.section, key.name)
            } else {
                key.path()
            };
            let default = match key.default {
                KeyDefault::Value(v) => format!("`{}`", v.plain()),
                KeyDefault::Unset(s) => s.split(',').next().unwrap_or(s).to_string(),
                KeyDefault::Required => "required".to_string(),
                KeyDefault::Alternative => "instead of the key above".to_string(),
                KeyDefault::Example => "—".to_string(),
            };
            let meaning = key.doc_line().replace('|', "\\|");
            let kind = key.kind.describe().replace('|', "\\|");
            out.push_str(&format!("| `{name}` | {kind} | {default} | {meaning} |\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_in_a_declared_section_once() {
        let mut seen = std::collections::HashSet::new();
        for k in KEYS {
            assert!(
                SECTIONS.iter().any(|s| s.name == k.section),
                "{} is in no section",
                k.path()
            );
            assert!(seen.insert(k.path()), "{} declared twice", k.path());
            assert!(!k.doc.trim().is_empty(), "{} has no doc line", k.path());
            if let (KeyKind::Int { min, max }, KeyDefault::Value(DefaultValue::Int(d))) =
                (k.kind, k.default)
            {
                assert!(
                    (min..=max).contains(&d),
                    "{}'s default is out of range",
                    k.path()
                );
            }
            if let (KeyKind::Float { min, max }, KeyDefault::Value(DefaultValue::Float(d))) =
                (k.kind, k.default)
            {
                assert!(
                    (min..=max).contains(&d),
                    "{}'s default is out of range",
                    k.path()
                );
            }
        }
    }

    #[test]
    fn int_reads_the_declared_default_and_range_and_names_the_key() {
        assert_eq!(key::MAX_BODY_BYTES.int(None).ok(), Some(65536));
        assert_eq!(key::MAX_BODY_BYTES.int(Some(256)).ok(), Some(256));
        let e = key::MAX_BODY_BYTES
            .int(Some(255))
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some(
                "config error at `server.max_body_bytes`: must be between 256 and 16777216, got 255"
            )
        );
        let e = key::AUDIT_SAMPLE.int_at("tenant[3].audit_sample", Some(0));
        assert_eq!(
            e.err().map(|e| e.key).as_deref(),
            Some("tenant[3].audit_sample")
        );
        // A key that is not an integer is a declaration bug, said so, not a panic.
        assert!(key::LISTEN.int(None).is_err());
    }

    #[test]
    fn the_example_shows_each_key_once_with_its_default_or_example() {
        let example = render_example();
        for k in KEYS.iter().filter(|k| k.kind != KeyKind::Column) {
            let shown = example
                .lines()
                .filter(|l| {
                    let body = l.trim_start_matches("# or: ").trim_start_matches("# ");
                    body.starts_with(&format!("{} = ", k.name))
                })
                .count();
            // `name` is also a tenant's name only: one line per key.
            assert!(shown >= 1, "{} not in the example", k.path());
        }
        assert!(example.contains("\nlisten = \"127.0.0.1:8080\""));
        assert!(example.contains("\n# max_connections = 1024 "));
        assert!(example.contains("\n# or: app_secret_env = \"ACME_APP_SECRET\""));
        assert!(example.contains("\n# [postgres]\n"));
        assert!(example.contains("\n# url = \"postgres://"));
        assert!(example.contains("# (required) [a-z0-9_-]"));
    }
}
