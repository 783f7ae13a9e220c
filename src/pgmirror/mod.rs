//! The PostgreSQL mirror: a second copy of the SQLite mirror in a
//! PostgreSQL database, for reporting tools on other machines.
//!
//! SQLite stays the source of truth; PostgreSQL is fed from the outbox
//! (see [`crate::store::outbox`]) by one sink thread. This module owns the
//! `[postgres]` config, the connection (rustls, `sslmode` honoured), and the
//! submodules: [`schema`] (tables and views in PostgreSQL, versioned),
//! [`sink`] (the thread that copies, backfills and keeps the cursor) and
//! [`check`] (`skillsync postgres-check`). The synchronous `postgres` client
//! runs its own small runtime, so it is only ever called from the sink's
//! thread or a CLI command, never from inside the daemon's tokio runtime.
//! It must not touch SQLite except through [`crate::store`].

pub mod check;
pub mod schema;
pub mod sink;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{ConfigError, Secret};

/// The validated `[postgres]` section.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// The connection URL as written (it may carry a password: kept secret).
    url: Secret,
    /// The password from `password_file` / `password_env`, if given.
    password: Option<Secret>,
    /// The schema every table and view lives in.
    pub schema: String,
    /// Documents per PostgreSQL transaction.
    pub batch_size: usize,
    /// `status` is degraded when the oldest change not yet in PostgreSQL is older than this.
    pub lag_alert_secs: u64,
    /// `user@host:port/database schema S`, for logs and `status` (never a password).
    pub target: String,
}

/// The `[postgres]` table as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawPostgres {
    url: Option<String>,
    password_file: Option<PathBuf>,
    password_env: Option<String>,
    schema: Option<String>,
    batch_size: Option<i64>,
    lag_alert_secs: Option<i64>,
}

fn err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: format!("postgres.{key}"),
        message: message.into(),
    }
}

/// libpq's `sslmode` values mapped to what the client understands, plus
/// `sslrootcert` taken out of the URL (we load it ourselves).
struct Normalised {
    url: String,
    root_cert: Option<PathBuf>,
}

fn normalise_url(url: &str) -> Result<Normalised, String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut kept = Vec::new();
    let mut root_cert = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match (k, v) {
            // The certificate is always verified (rustls): verify-ca and
            // verify-full are what `require` does here.
            ("sslmode", "verify-ca" | "verify-full") => kept.push("sslmode=require".to_string()),
            ("sslmode", "allow") => kept.push("sslmode=prefer".to_string()),
            ("sslmode", "disable" | "prefer" | "require") => kept.push(pair.to_string()),
            ("sslmode", other) => {
                return Err(format!(
                    "sslmode `{other}` is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ));
            }
            ("sslrootcert", path) => root_cert = Some(PathBuf::from(path)),
            _ => kept.push(pair.to_string()),
        }
    }
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok(Normalised { url, root_cert })
}

impl RawPostgres {
    /// Validates the section; reads the password unless `read_secrets` is false.
    pub fn validate(
        self,
        read_secret: impl Fn(
            &str,
            Option<&PathBuf>,
            Option<&String>,
        ) -> Result<Option<Secret>, ConfigError>,
        read_secrets: bool,
    ) -> Result<PostgresConfig, ConfigError> {
        let url = self
            .url
            .filter(|u| !u.trim().is_empty())
            .ok_or_else(|| err("url", "is required (postgres://user@host:port/database)"))?;
        let url = url.trim().to_string();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(err("url", "must start with postgres:// or postgresql://"));
        }
        let n = normalise_url(&url).map_err(|m| err("url", m))?;
        let parsed: postgres::Config = n
            .url
            .parse()
            .map_err(|e| err("url", format!("not a valid PostgreSQL URL: {e}")))?;
        if self.password_file.is_some() && self.password_env.is_some() {
            return Err(err(
                "password_file",
                "give one of password_file, password_env",
            ));
        }
        if parsed.get_password().is_some()
            && (self.password_file.is_some() || self.password_env.is_some())
        {
            return Err(err(
                "url",
                "carries a password and password_file/password_env gives another: keep one (not the url)",
            ));
        }
        let password = if read_secrets {
            read_secret(
                if self.password_file.is_some() {
                    "password_file"
                } else {
                    "password_env"
                },
                self.password_file.as_ref(),
                self.password_env.as_ref(),
            )?
        } else {
            None
        };
        if let Some(path) = &n.root_cert {
            if read_secrets && !path.is_file() {
                return Err(err(
                    "url",
                    format!("sslrootcert {} is not a readable file", path.display()),
                ));
            }
        }
        let schema = self.schema.unwrap_or_else(|| "skillsync".to_string());
        let ok = !schema.is_empty()
            && schema.len() <= 63
            && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !ok || schema.starts_with("pg_") {
            return Err(err(
                "schema",
                format!(
                    "`{schema}` must be 1-63 characters of [a-z0-9_], not starting with a digit or pg_"
                ),
            ));
        }
        let batch_size = match self.batch_size {
            None => 1000,
            Some(n) if (1..=50_000).contains(&n) => n as usize,
            Some(_) => return Err(err("batch_size", "must be between 1 and 50000")),
        };
        let lag_alert_secs = match self.lag_alert_secs {
            None => 300,
            Some(n) if (1..=86_400 * 7).contains(&n) => n as u64,
            Some(_) => return Err(err("lag_alert_secs", "must be between 1 and 604800")),
        };
        let host = parsed
            .get_hosts()
            .first()
            .map(|h| match h {
                postgres::config::Host::Tcp(h) => h.clone(),
                postgres::config::Host::Unix(p) => p.display().to_string(),
            })
            .unwrap_or_else(|| "localhost".into());
        let port = parsed.get_ports().first().copied().unwrap_or(5432);
        let target = format!(
            "{}@{host}:{port}/{} schema {schema}",
            parsed.get_user().unwrap_or("(user)"),
            parsed.get_dbname().unwrap_or("(default database)"),
        );
        Ok(PostgresConfig {
            url: Secret::new(url),
            password,
            schema,
            batch_size,
            lag_alert_secs,
            target,
        })
    }
}

/// Seconds since the oldest change PostgreSQL has not acknowledged (0 when none).
pub fn lag_seconds(lag: &crate::store::outbox::Lag, now: chrono::DateTime<chrono::Utc>) -> f64 {
    lag.oldest_changed_at
        .as_deref()
        .and_then(crate::model::parse_upstream_ts)
        .map(|t| (now - t).num_milliseconds().max(0) as f64 / 1000.0)
        .unwrap_or(0.0)
}

/// Why PostgreSQL could not be used; never carries the password.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("PostgreSQL {target}: {message}")]
    Postgres { target: String, message: String },
    #[error("TLS set-up for PostgreSQL: {0}")]
    Tls(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// A PostgreSQL error with the server's message (the plain `Display` says only "db error").
pub fn describe(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{}: {} ({})", db.severity(), db.message(), db.code().code());
        if let Some(d) = db.detail() {
            s.push_str(&format!("; {d}"));
        }
        return s;
    }
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(&format!(": {inner}"));
        src = inner.source();
    }
    s
}

impl PostgresConfig {
    /// Wraps a client error with where it happened.
    pub fn error(&self, e: &postgres::Error) -> PgError {
        PgError::Postgres {
            target: self.target.clone(),
            message: describe(e),
        }
    }

    /// Connects (blocking; never call it inside a tokio runtime).
    pub fn connect(&self) -> Result<postgres::Client, PgError> {
        let n = normalise_url(self.url.expose()).map_err(|m| PgError::Postgres {
            target: self.target.clone(),
            message: m,
        })?;
        let mut c: postgres::Config = n.url.parse().map_err(|e| self.error(&e))?;
        if let Some(p) = &self.password {
            c.password(p.expose());
        }
        c.application_name("skillsync")
            .connect_timeout(Duration::from_secs(10))
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .tcp_user_timeout(Duration::from_secs(30));
        if c.get_ssl_mode() == postgres::config::SslMode::Disable {
            return c.connect(postgres::NoTls).map_err(|e| self.error(&e));
        }
        let tls = tls_config(n.root_cert.as_deref())?;
        c.connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
            .map_err(|e| self.error(&e))
    }
}

/// rustls with the platform's roots, or only the `sslrootcert` file's.
fn tls_config(root_cert: Option<&std::path::Path>) -> Result<rustls::ClientConfig, PgError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PgError::Tls(e.to_string()))?;
    match root_cert {
        Some(path) => {
            use rustls_pki_types::pem::PemObject;
            let mut roots = rustls::RootCertStore::empty();
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| PgError::Tls(format!("sslrootcert {}: {e}", path.display())))?;
            for cert in certs {
                let cert =
                    cert.map_err(|e| PgError::Tls(format!("sslrootcert {}: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| PgError::Tls(format!("sslrootcert {}: {e}", path.display())))?;
            }
            Ok(builder.with_root_certificates(roots).with_no_client_auth())
        }
        None => {
            use rustls_platform_verifier::BuilderVerifierExt;
            Ok(builder
                .with_platform_verifier()
                .map_err(|e| PgError::Tls(e.to_string()))?
                .with_no_client_auth())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn config(pg: &str) -> Result<crate::config::Config, crate::config::ConfigError> {
        crate::config::Config::from_toml(
            &format!(
                "[database]\npath = \"/tmp/x.db\"\n[[tenant]]\nname = \"acme\"\nwebhook_secrets = [\"s3cret-acme-1\"]\napi_base = \"https://api.example.com\"\nextraction_base = \"https://x.example.com\"\napp_tenant = \"t\"\napp_id = \"i\"\napp_secret = \"app-s3cret\"\n{pg}"
            ),
            None,
        )
    }

    #[test]
    fn postgres_section_is_optional_validated_and_never_shows_the_password() -> TestResult {
        assert!(config("")?.postgres.is_none());
        let c = config("[postgres]\nurl = \"postgres://sk@db:6543/reports\"\n")?
            .postgres
            .ok_or("postgres off")?;
        assert_eq!(c.schema, "skillsync");
        assert_eq!(c.batch_size, 1000);
        assert_eq!(c.target, "sk@db:6543/reports schema skillsync");
        let with_pw = config("[postgres]\nurl = \"postgres://sk:hunter2-pw@db/reports\"\n")?
            .postgres
            .ok_or("postgres off")?;
        assert!(!format!("{with_pw:?}").contains("hunter2-pw"));
        assert!(!with_pw.target.contains("hunter2-pw"));
        let e = config(
            "[postgres]\nurl = \"postgres://sk:hunter2-pw@db/reports\"\npassword_env = \"X\"\n",
        )
        .err()
        .ok_or("two passwords")?;
        assert!(e.to_string().contains("postgres.url") && !e.to_string().contains("hunter2"));
        let e = config("[postgres]\nurl = \"postgres://sk@db/r\"\nschema = \"Bad-Name\"\n")
            .err()
            .ok_or("bad schema")?;
        assert!(e.to_string().contains("postgres.schema"), "{e}");
        let e = config("[postgres]\nurl = \"postgres://sk@db/r\"\nbatch_size = 0\n")
            .err()
            .ok_or("batch")?;
        assert!(e.to_string().contains("postgres.batch_size"), "{e}");
        let e = config("[postgres]\nurl = \"postgres://sk@db/r\"\nbogus = 1\n")
            .err()
            .ok_or("unknown key")?;
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = config("[postgres]\nurl = \"mysql://sk@db/r\"\n")
            .err()
            .ok_or("scheme")?;
        assert!(e.to_string().contains("postgres.url"), "{e}");
        let e = config("[postgres]\nurl = \"postgres://sk@db/r\"\npassword_env = \"SKILLSYNC_TEST_UNSET_PG_PW\"\n")
            .err().ok_or("unset env")?;
        assert!(e.to_string().contains("postgres.password_env"), "{e}");
        Ok(())
    }

    #[test]
    fn libpq_sslmodes_map_to_what_the_client_knows() -> TestResult {
        let n = normalise_url(
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=/x/ca.pem&connect_timeout=3",
        )?;
        assert_eq!(n.url, "postgres://u@h/db?sslmode=require&connect_timeout=3");
        assert_eq!(n.root_cert, Some(PathBuf::from("/x/ca.pem")));
        assert!(normalise_url("postgres://u@h/db?sslmode=bogus").is_err());
        assert_eq!(normalise_url("postgres://u@h/db")?.url, "postgres://u@h/db");
        Ok(())
    }
}

/// The PostgreSQL line of `skillsync status`.
#[derive(Debug, Clone)]
pub struct SinkStatus {
    pub target: String,
    pub lag_rows: i64,
    pub lag_secs: f64,
    pub threshold_secs: u64,
    /// Why it is unhealthy, if it is.
    pub problem: Option<String>,
}

impl SinkStatus {
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "target": self.target,
            "lag_rows": self.lag_rows,
            "lag_secs": self.lag_secs,
            "lag_alert_secs": self.threshold_secs,
            "problem": self.problem,
        })
    }

    pub fn line(&self) -> String {
        let mut s = format!(
            "postgres: {}: {} change(s) not yet copied, oldest {:.1} s ago",
            self.target, self.lag_rows, self.lag_secs
        );
        if let Some(p) = &self.problem {
            s.push_str(&format!("\n  ! {p}"));
        }
        s
    }
}

/// The sink's state for `status` (read-only; `None` without `[postgres]`).
/// Degraded when the oldest change not yet in PostgreSQL is older than
/// `postgres.lag_alert_secs`, or when the sink was never switched on.
pub fn status_of(
    path: &std::path::Path,
    config: Option<&crate::config::Config>,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<SinkStatus> {
    let pg = config?.postgres.as_ref()?;
    let lag = crate::store::Store::open_read_only(path).and_then(|c| crate::store::outbox::lag(&c));
    let mut st = SinkStatus {
        target: pg.target.clone(),
        lag_rows: 0,
        lag_secs: 0.0,
        threshold_secs: pg.lag_alert_secs,
        problem: None,
    };
    match lag {
        Ok(Some(l)) => {
            st.lag_rows = l.rows;
            st.lag_secs = lag_seconds(&l, now);
            if st.lag_secs > pg.lag_alert_secs as f64 {
                st.problem = Some(format!(
                    "PostgreSQL lags {:.0} s behind (more than postgres.lag_alert_secs = {}): is it reachable? see the serve log",
                    st.lag_secs, pg.lag_alert_secs
                ));
            }
        }
        Ok(None) => {
            st.problem = Some(
                "the PostgreSQL sink has not started yet (is `serve` running with this config?)"
                    .into(),
            );
        }
        Err(e) => st.problem = Some(format!("cannot read the outbox: {e}")),
    }
    Some(st)
}
