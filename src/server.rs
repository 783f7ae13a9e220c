//! The HTTP accept loop shared by the daemon and the simulator: serves a warp
//! filter on a listener it is given (so tests bind port 0), with limits on
//! concurrent connections, header size and header read time (a slow-loris
//! client is dropped, not waited on), and a graceful stop: on cancellation it
//! stops accepting, lets in-flight requests finish within a deadline, and
//! returns. A connection accepted before the stop is answered even when its
//! request has not been read yet (see [`drive`]): under socket activation
//! the next process takes only the connections nobody accepted, so one
//! closed unread here would be a webhook lost in a restart.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;
use warp::Filter;

use crate::config::defaults;

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
            // The config's defaults (`server.max_connections`,
            // `server.header_read_timeout_secs`), for the simulator too.
            max_connections: defaults::MAX_CONNECTIONS as usize,
            header_read_timeout: Duration::from_secs(defaults::HEADER_READ_TIMEOUT_SECS as u64),
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
    let connections = TaskTracker::new();
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
        // Told when a request head has been read, so a stop knows this
        // connection has been read from (see `drive`).
        let first_request = Arc::new(Notify::new());
        let told = first_request.clone();
        let hyper_svc =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                told.notify_one();
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
        let tls = limits.tls.clone();
        let handshake_deadline = limits.header_read_timeout;
        let stop = shutdown.clone();
        connections.spawn(async move {
            let served = match tls {
                None => {
                    let conn = builder
                        .serve_connection(TokioIo::new(stream), hyper_svc)
                        .into_owned();
                    drive(conn, &first_request, &stop, handshake_deadline).await
                }
                Some(acceptor) => {
                    // The handshake shares the header deadline: a silent client is dropped.
                    match tokio::time::timeout(handshake_deadline, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => {
                            let conn = builder
                                .serve_connection(TokioIo::new(tls_stream), hyper_svc)
                                .into_owned();
                            drive(conn, &first_request, &stop, handshake_deadline).await
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
    connections.close();
    if tokio::time::timeout(limits.drain_deadline, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish within the drain deadline");
    }
}

/// Serves one connection until it ends. Once `shutdown` is cancelled, the
/// connection finishes the request it is on and closes (no keep-alive).
///
/// A connection nothing has been read from yet is first given until its
/// first request head arrives (at most `first_request_wait`, the header read
/// timeout): hyper's graceful shutdown closes such a connection at once, yet
/// it was accepted, so its sender may well have sent a webhook already,
/// sitting unread in the socket buffer. Closing it would lose that webhook
/// (the sender sees the connection cut, and never retries). A stop can then
/// take up to `first_request_wait` longer, within the drain deadline.
async fn drive<C>(
    conn: C,
    first_request: &Notify,
    shutdown: &CancellationToken,
    first_request_wait: Duration,
) -> Result<(), C::Error>
where
    C: GracefulConnection,
{
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r,
        _ = shutdown.cancelled() => {}
    }
    // `notify_one` left a permit if any request head was read already.
    tokio::select! {
        r = conn.as_mut() => return r,
        _ = first_request.notified() => {}
        _ = tokio::time::sleep(first_request_wait) => {}
    }
    conn.as_mut().graceful_shutdown();
    conn.await
}
