//! The webhook handler: which tenant (path and secret), size and content
//! type, the body read within its deadline, the payload validated
//! ([`crate::payload`]), then the one durable write. Only a committed event
//! gets 200.
//!
//! Order of checks: path (in the route), method, then the secret (so an
//! unauthenticated client never gets its body read or learns anything), then
//! size, content type, JSON and fields, then the durable write.

use std::net::IpAddr;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use chrono::Utc;
use futures_util::{Stream, StreamExt};
use warp::http::{HeaderMap, Method};

use super::auth::authenticate;
use super::error::WebhookError;
use super::{Live, WebhookState};
use crate::payload::parse_payload;
use crate::store::NewEvent;
use crate::store::StoreError;

/// A client gets this long to send its body once the headers arrived.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The tenant named by a webhook path under `base`: `Some(None)` for
/// `{base}` or `{base}/`, `Some(Some(t))` for `{base}/{t}` (a trailing `/`
/// allowed), `None` for any other path.
pub(super) fn tenant_in_path<'p>(base: &str, path: &'p str) -> Option<Option<&'p str>> {
    let rest = path.strip_prefix(base)?;
    if rest.is_empty() || rest == "/" {
        return Some(None);
    }
    let tenant = rest.strip_prefix('/')?.trim_end_matches('/');
    if tenant.is_empty() || tenant.contains('/') {
        return None;
    }
    Some(Some(tenant))
}

/// One webhook request on a webhook path: the tenant, event id and whether
/// it was recorded as ignored; or the tenant (once known) and the refusal.
pub(super) async fn handle_webhook<S, B>(
    state: &WebhookState,
    live: &Live,
    method: Method,
    path_tenant: Option<String>,
    headers: &HeaderMap,
    body: S,
) -> Result<(String, i64, bool), (Option<String>, WebhookError)>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    if method != Method::POST {
        return Err((None, WebhookError::MethodNotAllowed));
    }
    let provided = headers
        .get("x-webhook-secret")
        .map(|v| v.as_bytes().trim_ascii())
        .filter(|v| !v.is_empty())
        .ok_or((None, WebhookError::Unauthorized))?;
    let idx = authenticate(&live.tenants, provided, path_tenant.as_deref())
        .ok_or((None, WebhookError::Unauthorized))?;
    let tenant = &live.tenants[idx];
    let name = Some(tenant.name.clone());
    let limit = live.config.server.max_body_bytes;
    let declared = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err((name, WebhookError::TooLarge(limit)));
    }
    if !is_json_content_type(headers) {
        return Err((name, WebhookError::UnsupportedMediaType));
    }
    let body = read_body(body, limit)
        .await
        .map_err(|e| (name.clone(), e))?;
    let parsed = parse_payload(&body, &tenant.api_base, &live.config)
        .map_err(|e| (name.clone(), e.into()))?;
    let payload = String::from_utf8_lossy(&body).into_owned();
    let ignored = parsed.ignored;
    let event = NewEvent {
        tenant: tenant.name.clone(),
        received_at: Utc::now(),
        action: parsed.action,
        doc_type: parsed.doc_type,
        doc_id: parsed.doc_id,
        ignored,
        payload,
    };
    let id = state.store.insert_event(event).await.map_err(|e| {
        let err = match e {
            StoreError::Unavailable(_) => WebhookError::Unavailable(e),
            other => WebhookError::Internal(other),
        };
        (name.clone(), err)
    })?;
    if !ignored {
        if let Some(n) = live.wake.get(&tenant.name) {
            n.notify_one();
        }
    }
    Ok((tenant.name.clone(), id, ignored))
}

/// Counts and logs a refused request; `tenant` once the secret named one.
pub(super) fn log_refusal(
    state: &WebhookState,
    tenant: Option<&str>,
    e: &WebhookError,
    ip: Option<IpAddr>,
) {
    let t = tenant.unwrap_or("unknown");
    state.metrics.webhook(t, e.outcome());
    match e {
        WebhookError::Unavailable(err) => {
            state.health.failed(err.to_string());
            tracing::error!(tenant = t, error = %err, client = ?ip, "event not recorded: database cannot commit");
        }
        WebhookError::Internal(err) => {
            tracing::error!(tenant = t, error = %err, client = ?ip, "event not recorded: database cannot commit");
        }
        _ => {
            tracing::info!(tenant = t, outcome = e.outcome(), error = %e, client = ?ip, "webhook refused")
        }
    }
}

fn is_json_content_type(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get("content-type").and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// The body, refused past `limit` bytes or [`BODY_READ_TIMEOUT`].
async fn read_body<S, B>(mut stream: S, limit: usize) -> Result<bytes::Bytes, WebhookError>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    let mut buf = BytesMut::new();
    let read = async {
        while let Some(chunk) = stream.next().await {
            let mut chunk = chunk
                .map_err(|e| WebhookError::bad("body", format!("body could not be read: {e}")))?;
            if buf.len() + chunk.remaining() > limit {
                return Err(WebhookError::TooLarge(limit));
            }
            while chunk.has_remaining() {
                let part = chunk.chunk();
                let n = part.len();
                buf.extend_from_slice(part);
                chunk.advance(n);
            }
        }
        Ok(())
    };
    tokio::time::timeout(BODY_READ_TIMEOUT, read)
        .await
        .map_err(|_| WebhookError::Timeout)??;
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_paths_name_their_tenant() {
        let base = "/skillsevent";
        assert_eq!(tenant_in_path(base, "/skillsevent"), Some(None));
        assert_eq!(tenant_in_path(base, "/skillsevent/"), Some(None));
        assert_eq!(
            tenant_in_path(base, "/skillsevent/acme"),
            Some(Some("acme"))
        );
        assert_eq!(
            tenant_in_path(base, "/skillsevent/acme/"),
            Some(Some("acme"))
        );
        for other in [
            "/skillseventx",
            "/skillsevent//",
            "/skillsevent/a/b",
            "/elsewhere",
            "/",
        ] {
            assert_eq!(tenant_in_path(base, other), None, "{other}");
        }
    }
}
