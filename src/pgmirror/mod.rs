//! The PostgreSQL mirror: a second copy of the SQLite mirror in a
//! PostgreSQL database, for reporting tools on other machines.
//!
//! SQLite stays the source of truth; PostgreSQL is fed from the outbox
//! (`pg_outbox`, which SQLite triggers fill in the same transaction as each
//! mirror change; the store's outbox module names them) by one sink thread,
//! which reads it through [`crate::store::ReadOnlyStore`] and acknowledges
//! through [`crate::store::Store`]. This module owns the connection (rustls, the certificate verified, plain text only with
//! `sslmode=disable`; the `[postgres]` section itself
//! is validated in [`crate::config`]), and the
//! submodules: [`schema`] (tables and views in PostgreSQL, versioned),
//! [`sink`] (the thread that copies, backfills and keeps the cursor) and
//! [`check`] (`skillsync postgres-check`). The synchronous `postgres` client
//! runs its own small runtime, so it is only ever called from the sink's
//! thread or a CLI command, never from inside the daemon's tokio runtime.
//! It must not touch SQLite except through [`crate::store`].

pub mod check;
pub mod schema;
pub mod sink;

use std::sync::Arc;
use std::time::Duration;

// Not re-exported: the one path is `config::PostgresConfig` (sink and
// check name it through `super`).
use crate::config::{PostgresConfig, SslMode, normalise_url};

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
        // Over Unix sockets only: nothing leaves the machine (libpq uses no
        // TLS there either, whatever sslmode says).
        let local = c
            .get_hosts()
            .iter()
            .all(|h| matches!(h, postgres::config::Host::Unix(_)));
        if n.tls == SslMode::Disable || (local && !c.get_hosts().is_empty()) {
            c.ssl_mode(postgres::config::SslMode::Disable);
            return c.connect(postgres::NoTls).map_err(|e| self.error(&e));
        }
        // Never `prefer`: a server (or a man-in-the-middle) that refuses TLS
        // gets no password, only a refused connection.
        c.ssl_mode(postgres::config::SslMode::Require);
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
/// Degraded when the sink recorded that the copy is not following (a whole
/// copy in progress after a lineage mismatch, a refusal: with its reason),
/// when the oldest change not yet in PostgreSQL is older than
/// `postgres.lag_alert_secs`, or when the sink was never switched on.
pub fn status_of(
    path: &std::path::Path,
    config: Option<&crate::config::Config>,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<SinkStatus> {
    let pg = config?.postgres.as_ref()?;
    let read =
        crate::store::ReadOnlyStore::open(path).and_then(|db| Ok((db.lag()?, db.sink_problem()?)));
    let mut st = SinkStatus {
        target: pg.target.clone(),
        lag_rows: 0,
        lag_secs: 0.0,
        threshold_secs: pg.lag_alert_secs,
        problem: None,
    };
    match read {
        Ok((lag, problem)) => {
            if let Some(l) = &lag {
                st.lag_rows = l.rows;
                st.lag_secs = l.seconds(now);
            }
            // Both when both hold: a copy cut short by an outage is still
            // "being copied", and the lag says how long it has been stuck.
            let lagging = (lag.is_some() && st.lag_secs > pg.lag_alert_secs as f64).then(|| {
                format!(
                    "PostgreSQL lags {:.0} s behind (more than postgres.lag_alert_secs = {}): is it reachable? see the serve log",
                    st.lag_secs, pg.lag_alert_secs
                )
            });
            st.problem = match (problem, lagging, lag) {
                (Some(p), Some(l), _) => Some(format!("{p}; {l}")),
                (Some(p), None, _) | (None, Some(p), _) => Some(p),
                (None, None, Some(_)) => None,
                (None, None, None) => Some(
                    "the PostgreSQL sink has not started yet (is `serve` running with this config?)"
                        .into(),
                ),
            };
        }
        Err(e) => st.problem = Some(format!("cannot read the outbox: {e}")),
    }
    Some(st)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::Duration;

    use super::PostgresConfig;
    use std::thread::JoinHandle;

    use crate::TestResult;

    const PASSWORD: &str = "pw-never-in-clear-77";

    /// A PostgreSQL server as far as the start of authentication: it
    /// refuses TLS ('N' to an SSLRequest), asks for a clear-text password,
    /// and returns every byte the client sent.
    fn refuses_tls<S: Read + Write + Send + 'static>(mut s: S) -> Vec<u8> {
        let mut seen = Vec::new();
        let mut typed = false;
        loop {
            let mut kind = [0u8; 1];
            if typed {
                if s.read_exact(&mut kind).is_err() {
                    break;
                }
                seen.push(kind[0]);
            }
            let mut len = [0u8; 4];
            if s.read_exact(&mut len).is_err() {
                break;
            }
            let mut body = vec![0u8; (u32::from_be_bytes(len) as usize).saturating_sub(4)];
            if s.read_exact(&mut body).is_err() {
                break;
            }
            seen.extend(len);
            seen.extend(&body);
            if !typed && body.starts_with(&80_877_103u32.to_be_bytes()) {
                if s.write_all(b"N").is_err() {
                    break;
                }
            } else if !typed {
                // The startup message: authenticate with a clear-text password.
                typed = true;
                if s.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3]).is_err() {
                    break;
                }
            } else {
                break; // the password message: enough
            }
        }
        seen
    }

    fn tcp_server() -> Result<(u16, JoinHandle<Vec<u8>>), std::io::Error> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        Ok((
            port,
            std::thread::spawn(move || match listener.accept() {
                Ok((s, _)) => {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                    refuses_tls(s)
                }
                Err(_) => Vec::new(),
            }),
        ))
    }

    fn pg(url: &str) -> Result<PostgresConfig, Box<dyn std::error::Error>> {
        let toml = format!(
            "[database]\npath = \"/tmp/x.db\"\n[[tenant]]\nname = \"acme\"\nwebhook_secrets = [\"s3cret-acme-1\"]\napi_base = \"https://api.example.com\"\nextraction_base = \"https://x.example.com\"\napp_tenant = \"t\"\napp_id = \"i\"\napp_secret = \"app-s3cret\"\n[postgres]\nurl = \"{url}\"\n"
        );
        Ok(crate::config::Config::from_toml(&toml, None)?
            .postgres
            .ok_or("no [postgres]")?)
    }

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    }

    #[test]
    fn without_sslmode_a_server_refusing_tls_gets_no_password() -> TestResult {
        crate::test_setup();
        for mode in ["", "?sslmode=prefer", "?sslmode=allow"] {
            let (port, server) = tcp_server()?;
            let config = pg(&format!(
                "postgres://sk:{PASSWORD}@127.0.0.1:{port}/r{mode}"
            ))?;
            let e = config.connect().err().ok_or("connected without TLS")?;
            let seen = server.join().map_err(|_| "server thread")?;
            assert!(
                !contains(&seen, PASSWORD),
                "{mode:?}: the password went out in clear text"
            );
            assert!(
                !contains(&seen, "sk\0"),
                "{mode:?}: a startup message went out"
            );
            assert!(e.to_string().contains("TLS"), "{mode:?}: {e}");
            assert!(!e.to_string().contains(PASSWORD), "{e}");
        }
        Ok(())
    }

    #[test]
    fn plain_text_only_with_an_explicit_disable_or_over_a_unix_socket() -> TestResult {
        crate::test_setup();
        let (port, server) = tcp_server()?;
        let config = pg(&format!(
            "postgres://sk:{PASSWORD}@127.0.0.1:{port}/r?sslmode=disable"
        ))?;
        assert!(
            config.connect().is_err(),
            "the fake server stops at the password"
        );
        let seen = server.join().map_err(|_| "server thread")?;
        assert!(
            contains(&seen, PASSWORD),
            "sslmode=disable sends it as asked"
        );

        // A Unix socket: no SSLRequest (the server's first bytes are the startup message).
        let dir = tempfile::tempdir()?;
        let listener = std::os::unix::net::UnixListener::bind(dir.path().join(".s.PGSQL.5432"))?;
        let server = std::thread::spawn(move || match listener.accept() {
            Ok((s, _)) => {
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                refuses_tls(s)
            }
            Err(_) => Vec::new(),
        });
        let host: String = dir.path().display().to_string().replace('/', "%2F");
        let config = pg(&format!("postgres://sk:{PASSWORD}@{host}:5432/r"))?;
        assert!(config.connect().is_err());
        let seen = server.join().map_err(|_| "server thread")?;
        assert!(!seen.is_empty() && !seen[4..8].starts_with(&80_877_103u32.to_be_bytes()));
        assert!(contains(&seen, "sk\0"), "startup over the socket");
        Ok(())
    }
}
