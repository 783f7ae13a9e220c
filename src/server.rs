//! The HTTP accept loop shared by the daemon and the simulator: serves a warp
//! filter on a listener it is given (so tests bind port 0), with limits on
//! concurrent connections, header size and header read time (a slow-loris
//! client is dropped, not waited on), and a graceful stop: on cancellation it
//! stops accepting, lets in-flight requests finish within a deadline, and
//! returns.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower_service::Service;
use warp::Filter;

/// The peer address of a connection, put in each request's extensions
/// (read with `warp::ext::optional::<ClientAddr>()`).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// Limits applied to every connection.
#[derive(Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    /// Bytes hyper buffers for a request head; a larger head is refused.
    pub max_header_bytes: usize,
    /// How long in-flight requests may take to finish after the stop signal.
    pub drain_deadline: Duration,
    /// Terminate TLS on every connection (built-in HTTPS), when set.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            drain_deadline: Duration::from_secs(10),
            tls: None,
        }
    }
}

/// Serves `filter` on `listener` until `shutdown` is cancelled and in-flight
/// requests have finished (or `drain_deadline` passed).
pub async fn serve<F>(listener: TcpListener, filter: F, limits: Limits, shutdown: CancellationToken)
where
    F: Filter + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let service = warp::service(filter);
    loop {
        // Take a connection slot first: when all are busy, new connections
        // wait in the kernel's backlog instead of costing us memory.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let svc = service.clone();
        let hyper_svc =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ClientAddr(peer));
                let mut svc = svc.clone();
                async move { svc.call(req).await }
            });
        let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.max_header_bytes.max(8192));
        let watcher = graceful.watcher();
        let tls = limits.tls.clone();
        let handshake_deadline = limits.header_read_timeout;
        tokio::spawn(async move {
            let served = match tls {
                None => {
                    let conn = builder
                        .serve_connection(TokioIo::new(stream), hyper_svc)
                        .into_owned();
                    watcher.watch(conn).await
                }
                Some(acceptor) => {
                    // The handshake shares the header deadline: a silent client is dropped.
                    match tokio::time::timeout(handshake_deadline, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => {
                            let conn = builder
                                .serve_connection(TokioIo::new(tls_stream), hyper_svc)
                                .into_owned();
                            watcher.watch(conn).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, peer = %peer, "TLS handshake failed");
                            Ok(())
                        }
                        Err(_) => {
                            tracing::debug!(peer = %peer, "TLS handshake timed out");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(e) = served {
                tracing::debug!(error = %e, peer = %peer, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain_deadline, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish within the drain deadline");
    }
}
