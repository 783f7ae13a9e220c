//! The `[postgres]` section: parsed and validated at load like every other
//! section (the URL parsed, `sslmode` understood, the password read from
//! its file or variable). Connecting is the PostgreSQL mirror's business;
//! it reads the URL and password from here.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, Secret, defaults, key};

/// The validated `[postgres]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct PostgresConfig {
    /// The connection URL as written (it may carry a password: kept secret).
    pub(crate) url: Secret,
    /// The password from `password_file` / `password_env`, if given.
    pub(crate) password: Option<Secret>,
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

/// How the connection treats TLS, from the URL's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SslMode {
    /// `sslmode=disable`, written out: plain TCP, the password in clear text.
    Disable,
    /// Anything else, `sslmode` absent included: TLS with the server's
    /// certificate verified, or no connection. `prefer` and `allow` are read
    /// as `require`: falling back to plain text when the server refuses TLS
    /// is what a man-in-the-middle needs to read the password. Over a Unix
    /// socket nothing leaves the machine and libpq uses no TLS there either.
    Verify,
}

/// The URL without `sslmode` and `sslrootcert` (we apply both ourselves).
pub(crate) struct Normalised {
    pub(crate) url: String,
    pub(crate) tls: SslMode,
    pub(crate) root_cert: Option<PathBuf>,
}

pub(crate) fn normalise_url(url: &str) -> Result<Normalised, String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut kept = Vec::new();
    let mut root_cert = None;
    let mut tls = SslMode::Verify;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match (k, v) {
            ("sslmode", "disable") => tls = SslMode::Disable,
            // The certificate is always verified (rustls), so every mode but
            // `disable` is verify-full here.
            ("sslmode", "allow" | "prefer" | "require" | "verify-ca" | "verify-full") => {
                tls = SslMode::Verify
            }
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
    Ok(Normalised {
        url,
        tls,
        root_cert,
    })
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
        let schema = self
            .schema
            .unwrap_or_else(|| defaults::POSTGRES_SCHEMA.to_string());
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
        let batch_size = key::POSTGRES_BATCH_SIZE.int(self.batch_size)? as usize;
        let lag_alert_secs = key::POSTGRES_LAG_ALERT_SECS.int(self.lag_alert_secs)? as u64;
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

#[cfg(test)]
mod tests {
    use super::*;

    use crate::TestResult;

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
    fn only_an_explicit_disable_allows_plain_text() -> TestResult {
        let n = normalise_url(
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=/x/ca.pem&connect_timeout=3",
        )?;
        assert_eq!(n.url, "postgres://u@h/db?connect_timeout=3");
        assert_eq!(n.tls, SslMode::Verify);
        assert_eq!(n.root_cert, Some(PathBuf::from("/x/ca.pem")));
        assert!(normalise_url("postgres://u@h/db?sslmode=bogus").is_err());
        let n = normalise_url("postgres://u@h/db")?;
        assert_eq!(
            (n.url.as_str(), n.tls),
            ("postgres://u@h/db", SslMode::Verify)
        );
        for mode in ["allow", "prefer", "require", "verify-ca"] {
            let n = normalise_url(&format!("postgres://u@h/db?sslmode={mode}"))?;
            assert_eq!(
                n.tls,
                SslMode::Verify,
                "{mode} never falls back to plain text"
            );
        }
        let n = normalise_url("postgres://u@h/db?sslmode=disable")?;
        assert_eq!(
            (n.url.as_str(), n.tls),
            ("postgres://u@h/db", SslMode::Disable)
        );
        Ok(())
    }
}
