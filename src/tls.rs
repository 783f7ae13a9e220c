//! Built-in TLS for the webhook listener (rustls with the ring provider, TLS
//! 1.2 and 1.3 only) and certificate rotation without a restart.
//!
//! The certificate lives behind a resolver that every new handshake asks,
//! so swapping it never touches connections in flight. A watcher task
//! re-reads the PEM files when their modification time changes (ACME
//! clients rotate every few weeks), and the daemon's SIGHUP handler
//! (`app`) calls [`Tls::reload`]; a bad new certificate is logged loudly and
//! the old one keeps serving.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// How often the certificate files' modification times are checked.
const POLL: Duration = Duration::from_secs(10);

/// Which file a TLS load error is about, so config errors name the key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate {path}: {message}")]
    Cert { path: String, message: String },
    #[error("private key {path}: {message}")]
    Key { path: String, message: String },
}

/// Reads a PEM certificate chain and private key and checks they belong together.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let cert_err = |message: String| TlsError::Cert {
        path: cert.display().to_string(),
        message,
    };
    let key_err = |message: String| TlsError::Key {
        path: key.display().to_string(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_err("no PEM certificate found".into()));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| key_err(e.to_string()))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(private)
        .map_err(|e| key_err(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| key_err(format!("does not match the certificate: {e}")))?;
    Ok(certified)
}

/// Hands every handshake the current certificate.
#[derive(Debug)]
struct Resolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|k| k.clone())
    }
}

/// The TLS side of the listener: an acceptor and the means to rotate its certificate.
#[derive(Clone)]
pub struct Tls {
    resolver: Arc<Resolver>,
    acceptor: TlsAcceptor,
    cert: PathBuf,
    key: PathBuf,
}

impl Tls {
    /// Loads the certificate and builds a TLS 1.2/1.3 acceptor.
    pub fn new(cert: &Path, key: &Path) -> Result<Tls, TlsError> {
        let certified = load_certified_key(cert, key)?;
        let resolver = Arc::new(Resolver {
            current: RwLock::new(Arc::new(certified)),
        });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Cert {
                path: cert.display().to_string(),
                message: e.to_string(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            resolver,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        })
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// Re-reads the files; on error keeps the old certificate. Returns whether it changed.
    pub fn reload(&self) -> bool {
        match load_certified_key(&self.cert, &self.key) {
            Ok(k) => {
                if let Ok(mut cur) = self.resolver.current.write() {
                    *cur = Arc::new(k);
                }
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "new TLS certificate is unusable; still serving the previous one");
                false
            }
        }
    }

    fn mtimes(&self) -> (Option<SystemTime>, Option<SystemTime>) {
        let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        (m(&self.cert), m(&self.key))
    }

    /// Reloads when the files' modification times change, until `shutdown`.
    pub async fn watch(self, shutdown: CancellationToken) {
        let mut seen = self.mtimes();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(POLL) => {
                    let now = self.mtimes();
                    if now != seen {
                        seen = now;
                        self.reload();
                    }
                }
            }
        }
    }
}
