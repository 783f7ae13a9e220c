//! The webhook listener: warp filters (read the request), the handler
//! (verify the secret, parse and validate the payload, record the event) and
//! the one place that maps every error to its HTTP status and JSON body.
//! Also the public `/healthz`, answered from [`Health`] (no write per
//! request). `/metrics` is not here: it is served only on the metrics
//! listener (see [`crate::metrics::routes`]), since it names tenants.
//!
//! Order of checks: path, then the secret (so an unauthenticated client
//! never gets its body read or learns anything), then size, content type,
//! JSON and fields, then the durable write. Only a committed event gets 200.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use chrono::Utc;
use futures_util::{Stream, StreamExt};
use reqwest::Url;
use serde_json::json;
use subtle::ConstantTimeEq;
use warp::Filter;
use warp::http::{HeaderMap, StatusCode};
use warp::reply::Response;

use crate::config::{Config, TenantConfig};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::server::ClientAddr;
use crate::store::queue::NewEvent;
use crate::store::{Store, StoreError};
use crate::wake::Wake;

/// A client gets this long to send its body once the headers arrived.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// One tenant as the listener sees it: digests of its secrets (never the
/// secrets themselves) and what its document URLs must look like.
struct TenantAuth {
    name: String,
    digests: Vec<[u8; 32]>,
    api_base: Url,
}

/// Everything the handlers share.
#[derive(Clone)]
pub struct WebhookState {
    store: Store,
    /// Tenants in config order; matched by secret digest in constant time.
    tenants: Arc<Vec<TenantAuth>>,
    config: Arc<Config>,
    /// Wakes a tenant's fetch workers when an event is queued.
    wake: Wake,
    metrics: Metrics,
    /// Answers `/healthz`; every commit or refused commit of an event is evidence for it.
    health: Health,
}

impl WebhookState {
    pub fn new(
        config: Arc<Config>,
        store: Store,
        wake: Wake,
        metrics: Metrics,
        health: Health,
    ) -> Self {
        let tenants = config
            .tenants
            .iter()
            .map(|t: &TenantConfig| TenantAuth {
                name: t.name.clone(),
                digests: t
                    .webhook_secrets
                    .iter()
                    .map(|s| sha256(s.expose().as_bytes()))
                    .collect(),
                api_base: t.api_base.clone(),
            })
            .collect();
        WebhookState {
            store,
            tenants: Arc::new(tenants),
            config,
            wake,
            metrics,
            health,
        }
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Why a request was refused; mapped to a status and body in `into_response`.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("unauthorized")]
    Unauthorized,
    #[error("{message}")]
    BadRequest {
        field: &'static str,
        message: String,
    },
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    #[error("content type must be application/json")]
    UnsupportedMediaType,
    #[error("request body not received in time")]
    Timeout,
    #[error("not found")]
    NotFound,
    #[error("method not allowed: POST the event")]
    MethodNotAllowed,
    #[error("database unavailable, retry later")]
    Unavailable(StoreError),
    #[error("internal error")]
    Internal(StoreError),
}

impl WebhookError {
    fn bad(field: &'static str, message: impl Into<String>) -> Self {
        WebhookError::BadRequest {
            field,
            message: message.into(),
        }
    }

    /// The outcome label counted in metrics.
    fn outcome(&self) -> &'static str {
        match self {
            WebhookError::Unauthorized => "unauthorized",
            WebhookError::BadRequest { .. } => "bad_request",
            WebhookError::TooLarge(_) => "too_large",
            WebhookError::UnsupportedMediaType => "unsupported_media_type",
            WebhookError::Timeout => "timeout",
            WebhookError::NotFound => "not_found",
            WebhookError::MethodNotAllowed => "method_not_allowed",
            WebhookError::Unavailable(_) => "unavailable",
            WebhookError::Internal(_) => "error",
        }
    }

    /// The one place an error becomes an HTTP answer.
    fn into_response(self) -> Response {
        let (status, body) = match &self {
            WebhookError::Unauthorized => {
                (StatusCode::UNAUTHORIZED, json!({"error": "unauthorized"}))
            }
            WebhookError::BadRequest { field, message } => (
                StatusCode::BAD_REQUEST,
                json!({"error": message, "field": field}),
            ),
            WebhookError::TooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"error": self.to_string()}),
            ),
            WebhookError::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                json!({"error": self.to_string()}),
            ),
            WebhookError::Timeout => (
                StatusCode::REQUEST_TIMEOUT,
                json!({"error": self.to_string()}),
            ),
            WebhookError::NotFound => (StatusCode::NOT_FOUND, json!({"error": "not found"})),
            WebhookError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"error": self.to_string()}),
            ),
            WebhookError::Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": self.to_string()}),
            ),
            WebhookError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": self.to_string()}),
            ),
        };
        let mut resp =
            warp::reply::with_status(warp::reply::json(&body), status).into_response_inner();
        if matches!(
            self,
            WebhookError::Unavailable(_) | WebhookError::Internal(_)
        ) {
            if let Ok(v) = "5".parse() {
                resp.headers_mut().insert("retry-after", v);
            }
        }
        resp
    }
}

trait IntoResponseInner {
    fn into_response_inner(self) -> Response;
}
impl<T: warp::Reply> IntoResponseInner for T {
    fn into_response_inner(self) -> Response {
        warp::Reply::into_response(self)
    }
}

/// What a valid payload says.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedEvent {
    pub action: String,
    pub doc_type: Option<String>,
    pub doc_id: Option<String>,
    pub ignored: bool,
}

/// A JSON value as the payload checks see it: only strings are kept
/// (borrowed from the body unless they hold escapes); objects and arrays
/// nested where a string is expected are skipped, not built.
enum Field<'a> {
    Null,
    Str(Cow<'a, str>),
    Other,
}

impl<'a> Field<'a> {
    fn as_str(&self) -> Option<&str> {
        match self {
            Field::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// The fields of `document` that validation reads.
#[derive(Default)]
struct DocumentFields<'a> {
    ty: Option<Field<'a>>,
    id: Option<Field<'a>>,
    url: Option<Field<'a>>,
}

/// `document`: null, an object, or anything else (refused).
enum DocumentField<'a> {
    Null,
    Object(DocumentFields<'a>),
    Other,
}

/// The body: an object with the fields validation reads, or anything else.
enum Payload<'a> {
    Object {
        action: Option<Field<'a>>,
        document: Option<DocumentField<'a>>,
    },
    NotObject,
}

/// Shared by the three visitors: every JSON type other than the one each
/// cares about becomes `$other` (skipping nested values without building
/// them). Duplicate keys keep the last value, as `serde_json::Value` does.
macro_rules! accept_anything_else {
    ($other:expr) => {
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok($other)
        }
    };
}

struct FieldVisitor;

impl<'de> serde::de::Visitor<'de> for FieldVisitor {
    type Value = Field<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Field::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Field::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Field::Str(Cow::Owned(v)))
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(Field::Null)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map
            .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
            .is_some()
        {}
        Ok(Field::Other)
    }
    accept_anything_else!(Field::Other);
}

impl<'de> serde::Deserialize<'de> for Field<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FieldVisitor)
    }
}

struct DocumentVisitor;

impl<'de> serde::de::Visitor<'de> for DocumentVisitor {
    type Value = DocumentField<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(DocumentField::Other)
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(DocumentField::Null)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut d = DocumentFields::default();
        while let Some(key) = map.next_key::<Field<'de>>()? {
            let slot = match key.as_str() {
                Some("type") => &mut d.ty,
                Some("id") => &mut d.id,
                Some("url") => &mut d.url,
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    continue;
                }
            };
            *slot = Some(map.next_value()?);
        }
        Ok(DocumentField::Object(d))
    }
    accept_anything_else!(DocumentField::Other);
}

impl<'de> serde::Deserialize<'de> for DocumentField<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DocumentVisitor)
    }
}

struct PayloadVisitor;

impl<'de> serde::de::Visitor<'de> for PayloadVisitor {
    type Value = Payload<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Payload::NotObject)
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(Payload::NotObject)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut action, mut document) = (None, None);
        while let Some(key) = map.next_key::<Field<'de>>()? {
            match key.as_str() {
                Some("action") => action = Some(map.next_value()?),
                Some("document") => document = Some(map.next_value()?),
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(Payload::Object { action, document })
    }
    accept_anything_else!(Payload::NotObject);
}

impl<'de> serde::Deserialize<'de> for Payload<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PayloadVisitor)
    }
}

/// Parses and validates a payload for `tenant`. Pure: unit-tested and fuzzed.
///
/// The body is read into [`Payload`] (only the fields checked, strings
/// borrowed), not a `serde_json::Value` tree: the same answers for every
/// input, without building maps for the whole document.
pub fn parse_payload(
    body: &[u8],
    api_base: &Url,
    config: &Config,
) -> Result<ParsedEvent, WebhookError> {
    let payload: Payload<'_> = serde_json::from_slice(body)
        .map_err(|e| WebhookError::bad("body", format!("body is not valid JSON: {e}")))?;
    let Payload::Object { action, document } = payload else {
        return Err(WebhookError::bad("body", "body must be a JSON object"));
    };
    let action = match action {
        Some(Field::Str(s)) if !s.trim().is_empty() && s.len() <= 100 => s.trim().to_string(),
        Some(_) => {
            return Err(WebhookError::bad(
                "action",
                "action must be a non-empty string",
            ));
        }
        None => return Err(WebhookError::bad("action", "action is required")),
    };
    let document = match document {
        None | Some(DocumentField::Null) => None,
        Some(DocumentField::Object(d)) => Some(d),
        Some(DocumentField::Other) => {
            return Err(WebhookError::bad(
                "document",
                "document must be an object or null",
            ));
        }
    };
    let is_test = action.eq_ignore_ascii_case("test");
    let Some(document) = document else {
        if is_test {
            return Ok(ParsedEvent {
                action,
                doc_type: None,
                doc_id: None,
                ignored: true,
            });
        }
        return Err(WebhookError::bad("document", "document is required"));
    };
    let sender_type = match &document.ty {
        Some(Field::Str(s)) if !s.trim().is_empty() && s.len() <= 200 => s.trim(),
        Some(_) => {
            return Err(WebhookError::bad(
                "document.type",
                "document.type must be a non-empty string",
            ));
        }
        None => {
            return Err(WebhookError::bad(
                "document.type",
                "document.type is required",
            ));
        }
    };
    let u = &config.upstream;
    let doc_type = if u
        .job_types
        .iter()
        .any(|t| t.eq_ignore_ascii_case(sender_type))
    {
        Some(crate::model::DocType::Job)
    } else if u
        .project_types
        .iter()
        .any(|t| t.eq_ignore_ascii_case(sender_type))
    {
        Some(crate::model::DocType::Project)
    } else {
        None
    };
    let Some(doc_type) = doc_type else {
        // An unknown type is recorded with the sender's own string, never fetched.
        let id = document
            .id
            .as_ref()
            .and_then(Field::as_str)
            .map(|s| s.chars().take(200).collect());
        return Ok(ParsedEvent {
            action,
            doc_type: Some(sender_type.to_string()),
            doc_id: id,
            ignored: true,
        });
    };
    let raw_id = match &document.id {
        Some(Field::Str(s)) => &**s,
        Some(_) => {
            return Err(WebhookError::bad(
                "document.id",
                "document.id must be a string",
            ));
        }
        None => return Err(WebhookError::bad("document.id", "document.id is required")),
    };
    let id = uuid::Uuid::try_parse(raw_id)
        .map_err(|_| WebhookError::bad("document.id", "document.id must be a UUID"))?
        .hyphenated()
        .to_string();
    let url = match &document.url {
        Some(Field::Str(s)) => &**s,
        Some(_) => {
            return Err(WebhookError::bad(
                "document.url",
                "document.url must be a string",
            ));
        }
        None => {
            return Err(WebhookError::bad(
                "document.url",
                "document.url is required",
            ));
        }
    };
    check_document_url(
        url,
        api_base,
        &document_path(config, doc_type, raw_id),
        &document_path(config, doc_type, &id),
    )?;
    Ok(ParsedEvent {
        action,
        doc_type: Some(doc_type.as_str().to_string()),
        doc_id: Some(id),
        ignored: is_test,
    })
}

/// The path of one document under `api_base`, from the configured template.
pub fn document_path(config: &Config, doc_type: crate::model::DocType, id: &str) -> String {
    let template = match doc_type {
        crate::model::DocType::Job => &config.upstream.job_path,
        crate::model::DocType::Project => &config.upstream.project_path,
    };
    template.replace("{id}", id)
}

/// We never send credentials to a URL a payload chose: the URL must be on the
/// tenant's `api_base` origin and name the same type and id.
fn check_document_url(
    url: &str,
    api_base: &Url,
    raw_path: &str,
    norm_path: &str,
) -> Result<(), WebhookError> {
    let bad = || {
        WebhookError::bad(
            "document.url",
            "document.url must be this document's URL on the tenant's api_base (same scheme, host, port, type and id)",
        )
    };
    // The common case, the document's URL spelled exactly as the API spells
    // it, is recognised without parsing (Url::parse with its IDNA step was a
    // measurable share of a request); anything else gets the full check.
    if canonical_url_matches(url, api_base, norm_path)
        || parsed_url_matches(url, api_base, raw_path, norm_path)
    {
        return Ok(());
    }
    Err(bad())
}

/// The full check of [`check_document_url`]: parsed, so any spelling of the
/// same URL passes.
fn parsed_url_matches(url: &str, api_base: &Url, raw_path: &str, norm_path: &str) -> bool {
    let Ok(parsed) = Url::parse(url) else {
        return false;
    };
    if parsed.scheme() != api_base.scheme()
        || parsed.host_str().map(str::to_ascii_lowercase)
            != api_base.host_str().map(str::to_ascii_lowercase)
        || parsed.port_or_known_default() != api_base.port_or_known_default()
        || !parsed.username().is_empty()
        || parsed.password().is_some()
        || parsed.fragment().is_some()
    {
        return false;
    }
    let base = api_base.path().trim_end_matches('/');
    let path = parsed.path();
    [raw_path, norm_path]
        .iter()
        .any(|p| path.eq_ignore_ascii_case(&format!("{base}{p}")))
}

/// Whether `url` is, ignoring ASCII case, `api_base`'s origin and path
/// followed by `path`, written in the form `Url` would print it. Accepts only
/// strings made of characters `Url::parse` leaves as they are and with no
/// dot segments, so everything accepted here passes the full check too.
fn canonical_url_matches(url: &str, api_base: &Url, path: &str) -> bool {
    let Some(host) = api_base.host_str() else {
        return false;
    };
    let scheme = api_base.scheme();
    let base = api_base.path().trim_end_matches('/');
    let plain = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~' | b'/'))
            && !s.contains("/.")
    };
    let plain_host = host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':' | b'[' | b']'));
    if !plain(base) || !plain(path) || !plain_host {
        return false;
    }
    let mut rest = url;
    let mut take = |part: &str| -> bool {
        match rest.get(..part.len()) {
            Some(head) if head.eq_ignore_ascii_case(part) => {
                rest = &rest[part.len()..];
                true
            }
            _ => false,
        }
    };
    let port = api_base.port().map(|p| format!(":{p}"));
    take(scheme)
        && take("://")
        && take(host)
        && port.as_deref().is_none_or(&mut take)
        && take(base)
        && take(path)
        && rest.is_empty()
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

/// Which tenant's secret matches, comparing against every configured secret
/// (no early exit) so timing reveals neither the tenant nor the prefix.
fn authenticate(
    tenants: &[TenantAuth],
    provided: &[u8],
    path_tenant: Option<&str>,
) -> Option<usize> {
    let digest = sha256(provided);
    let mut found: Option<usize> = None;
    for (i, t) in tenants.iter().enumerate() {
        let mut any = subtle::Choice::from(0u8);
        for d in &t.digests {
            any |= d.ct_eq(&digest);
        }
        if bool::from(any) {
            found = Some(i);
        }
    }
    match (found, path_tenant) {
        (Some(i), Some(name)) if tenants[i].name != name => None,
        (f, _) => f,
    }
}

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

/// The client address for logs: `X-Forwarded-For` only from a trusted proxy.
fn client_ip(config: &Config, peer: Option<ClientAddr>, headers: &HeaderMap) -> Option<IpAddr> {
    let peer_ip = peer.map(|p| p.0.ip())?;
    let trusted = config
        .server
        .trusted_proxies
        .iter()
        .any(|(net, len)| ip_in(peer_ip, *net, *len));
    if trusted {
        if let Some(ip) = headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .and_then(|v| v.trim().parse().ok())
        {
            return Some(ip);
        }
    }
    Some(peer_ip)
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

async fn handle_webhook<S, B>(
    state: WebhookState,
    method: warp::http::Method,
    path: String,
    headers: HeaderMap,
    body: S,
) -> Result<(String, i64, bool), (Option<String>, WebhookError)>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    let base = &state.config.server.webhook_path;
    let path_tenant = if path == *base || path == format!("{base}/") {
        None
    } else if let Some(rest) = path.strip_prefix(&format!("{base}/")) {
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() || rest.contains('/') {
            return Err((None, WebhookError::NotFound));
        }
        Some(rest.to_string())
    } else {
        return Err((None, WebhookError::NotFound));
    };
    if method != warp::http::Method::POST {
        return Err((None, WebhookError::MethodNotAllowed));
    }
    let provided = headers
        .get("x-webhook-secret")
        .map(|v| v.as_bytes().trim_ascii())
        .filter(|v| !v.is_empty())
        .ok_or((None, WebhookError::Unauthorized))?;
    let idx = authenticate(&state.tenants, provided, path_tenant.as_deref())
        .ok_or((None, WebhookError::Unauthorized))?;
    let tenant = &state.tenants[idx];
    let name = Some(tenant.name.clone());
    let limit = state.config.server.max_body_bytes;
    let declared = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err((name, WebhookError::TooLarge(limit)));
    }
    if !is_json_content_type(&headers) {
        return Err((name, WebhookError::UnsupportedMediaType));
    }
    let body = read_body(body, limit)
        .await
        .map_err(|e| (name.clone(), e))?;
    let parsed =
        parse_payload(&body, &tenant.api_base, &state.config).map_err(|e| (name.clone(), e))?;
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
        if let Some(n) = state.wake.get(&tenant.name) {
            n.notify_one();
        }
    }
    Ok((tenant.name.clone(), id, ignored))
}

/// All routes of the public listener: the webhook and `/healthz`. Any
/// other path answers 404 (`/metrics` included).
pub fn routes(
    state: WebhookState,
) -> impl Filter<Extract = (Response,), Error = std::convert::Infallible> + Clone {
    let with_state = {
        let s = state.clone();
        warp::any().map(move || s.clone())
    };
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .and(with_state.clone())
        .map(|s: WebhookState| {
            // Only the verdict here: the detail (and its error text) is on
            // the metrics listener.
            if s.health.report().healthy {
                warp::reply::with_status(
                    warp::reply::json(&json!({"status": "ok"})),
                    StatusCode::OK,
                )
                .into_response_inner()
            } else {
                warp::reply::with_status(
                    warp::reply::json(
                        &json!({"status": "unavailable", "error": "database not writable"}),
                    ),
                    StatusCode::SERVICE_UNAVAILABLE,
                )
                .into_response_inner()
            }
        });
    let webhook = warp::method()
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .and(warp::ext::optional::<ClientAddr>())
        .and(with_state)
        .then(
            |method, path: warp::path::FullPath, headers: HeaderMap, body, peer: Option<ClientAddr>, s: WebhookState| async move {
                let ip = client_ip(&s.config, peer, &headers);
                match handle_webhook(s.clone(), method, path.as_str().to_string(), headers, Box::pin(body)).await {
                    Ok((tenant, id, ignored)) => {
                        s.health.ok();
                        let status = if ignored { "ignored" } else { "accepted" };
                        s.metrics.webhook(&tenant, status);
                        tracing::debug!(tenant = %tenant, event_id = id, status, client = ?ip, "event recorded");
                        warp::reply::json(&json!({"status": status, "event_id": id})).into_response_inner()
                    }
                    Err((tenant, e)) => {
                        let t = tenant.as_deref().unwrap_or("unknown");
                        s.metrics.webhook(t, e.outcome());
                        match &e {
                            WebhookError::Unavailable(err) => {
                                s.health.failed(err.to_string());
                                tracing::error!(tenant = t, error = %err, client = ?ip, "event not recorded: database cannot commit");
                            }
                            WebhookError::Internal(err) => {
                                tracing::error!(tenant = t, error = %err, client = ?ip, "event not recorded: database cannot commit");
                            }
                            _ => tracing::info!(tenant = t, outcome = e.outcome(), error = %e, client = ?ip, "webhook refused"),
                        }
                        e.into_response()
                    }
                }
            },
        );
    healthz
        .or(webhook)
        .unify()
        .recover(|rej: warp::Rejection| async move {
            let status = if rej.is_not_found() {
                StatusCode::NOT_FOUND
            } else if rej.find::<warp::reject::MethodNotAllowed>().is_some() {
                StatusCode::METHOD_NOT_ALLOWED
            } else {
                StatusCode::BAD_REQUEST
            };
            Ok::<_, std::convert::Infallible>(
                warp::reply::with_status(
                    warp::reply::json(&json!({"error": status.canonical_reason()})),
                    status,
                )
                .into_response_inner(),
            )
        })
        .unify()
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn config() -> Result<Config, Box<dyn std::error::Error>> {
        Ok(Config::from_toml(
            "[[tenant]]\nname = \"acme\"\nwebhook_secrets = [\"secret-acme\"]\napi_base = \"https://api.example.com\"\nextraction_base = \"https://x.example.com\"\napp_tenant = \"t\"\napp_id = \"i\"\napp_secret = \"s\"\n",
            None,
        )?)
    }

    fn body(url: &str) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
        Ok(serde_json::to_vec(
            &json!({"action": "created", "document": {"type": "SkillsWorkflow.Job", "id": "32A8C937-2C65-463D-A292-E4C4E13ED263", "url": url}}),
        )?)
    }

    #[test]
    fn accepts_the_senders_example() -> TestResult {
        let c = config()?;
        let base = c.tenants[0].api_base.clone();
        let p = parse_payload(
            &body("https://api.example.com/api/jobs/32a8c937-2c65-463d-a292-e4c4e13ed263")?,
            &base,
            &c,
        )?;
        assert_eq!(p.doc_type.as_deref(), Some("job"));
        assert_eq!(
            p.doc_id.as_deref(),
            Some("32a8c937-2c65-463d-a292-e4c4e13ed263")
        );
        assert!(!p.ignored);
        Ok(())
    }

    #[test]
    fn refuses_foreign_urls() -> TestResult {
        let c = config()?;
        let base = c.tenants[0].api_base.clone();
        for url in [
            "https://evil.example.com/api/jobs/32a8c937-2c65-463d-a292-e4c4e13ed263",
            "http://api.example.com/api/jobs/32a8c937-2c65-463d-a292-e4c4e13ed263",
            "https://api.example.com:8443/api/jobs/32a8c937-2c65-463d-a292-e4c4e13ed263",
            "https://api.example.com/api/projects/32a8c937-2c65-463d-a292-e4c4e13ed263",
            "https://api.example.com/api/jobs/00000000-2c65-463d-a292-e4c4e13ed263",
            "https://user@api.example.com/api/jobs/32a8c937-2c65-463d-a292-e4c4e13ed263",
        ] {
            match parse_payload(&body(url)?, &base, &c) {
                Err(WebhookError::BadRequest { field, .. }) => {
                    assert_eq!(field, "document.url", "{url}")
                }
                other => panic!("{url}: {other:?}"),
            }
        }
        Ok(())
    }

    #[test]
    fn the_unparsed_url_check_accepts_only_what_the_parsed_one_accepts() -> TestResult {
        let id = "32a8c937-2c65-463d-a292-e4c4e13ed263";
        let path = format!("/api/jobs/{id}");
        for base in [
            "https://api.example.com",
            "https://api.example.com/v2/",
            "http://127.0.0.1:8080",
            "http://[::1]:9000/base",
        ] {
            let api_base = Url::parse(base)?;
            let b = base.trim_end_matches('/');
            let mut fast_hits = 0;
            for url in [
                format!("{b}{path}"),
                format!("{}{path}", b.to_ascii_uppercase()),
                format!("{b}{path}?x=1"),
                format!("{b}{path}#f"),
                format!("{b}/api/./jobs/{id}"),
                format!("{b}{path}/"),
                format!("{b}:443{path}"),
                format!("{b}/api/jobs/{}", id.to_ascii_uppercase()),
                format!("{b}/api/projects/{id}"),
                format!("https://user@api.example.com{path}"),
                format!("{b}{path}x"),
            ] {
                if canonical_url_matches(&url, &api_base, &path) {
                    fast_hits += 1;
                    assert!(
                        parsed_url_matches(&url, &api_base, &path, &path),
                        "{url} accepted unparsed but not parsed"
                    );
                }
            }
            assert!(
                fast_hits >= 2,
                "{base}: the canonical spelling takes the fast path"
            );
        }
        Ok(())
    }

    #[test]
    fn payload_shapes_get_the_same_answers() -> TestResult {
        let c = config()?;
        let base = c.tenants[0].api_base.clone();
        let url = "https://api.example.com/api/jobs/32a8c937-2c65-463d-a292-e4c4e13ed263";
        let field = |body: &str| match parse_payload(body.as_bytes(), &base, &c) {
            Ok(_) => "ok",
            Err(WebhookError::BadRequest { field, .. }) => field,
            Err(_) => "other",
        };
        let doc = |extra: &str| {
            format!(
                r#"{{"action":"created","document":{{"type":"SkillsWorkflow.Job","id":"32A8C937-2C65-463D-A292-E4C4E13ED263","url":"{url}"{extra}}}}}"#
            )
        };
        assert_eq!(field(&doc("")), "ok");
        assert_eq!(
            field(&doc(r#","nested":{"a":[1,{"b":null}]},"n":1e5"#)),
            "ok"
        );
        assert_eq!(field(&doc(r#","id":"nope""#)), "document.id");
        assert_eq!(
            field(
                r#"{"action":"created","document":{"type":"SkillsWorkflow.Job","id":"32a8c937-2c65-463d-a292-e4c4e13ed263","url":"https:\/\/api.example.com\/api\/jobs\/32a8c937-2c65-463d-a292-e4c4e13ed263"}}"#
            ),
            "ok"
        );
        assert_eq!(field("[1,2]"), "body");
        assert_eq!(field("\"x\""), "body");
        assert_eq!(field("{"), "body");
        assert_eq!(field(r#"{"action":"x"} trailing"#), "body");
        assert_eq!(field(r#"{"document":null}"#), "action");
        assert_eq!(field(r#"{"action":["created"]}"#), "action");
        assert_eq!(field(r#"{"action":"  "}"#), "action");
        assert_eq!(field(r#"{"action":"test"}"#), "ok");
        assert_eq!(field(r#"{"action":"test","document":null}"#), "ok");
        assert_eq!(field(r#"{"action":"created"}"#), "document");
        assert_eq!(field(r#"{"action":"created","document":[1]}"#), "document");
        assert_eq!(field(r#"{"action":"created","document":"x"}"#), "document");
        assert_eq!(
            field(r#"{"action":"created","document":{}}"#),
            "document.type"
        );
        assert_eq!(
            field(r#"{"action":"created","document":{"type":{"a":1}}}"#),
            "document.type"
        );
        assert_eq!(
            field(r#"{"action":"created","document":{"type":"Other.Kind","id":7}}"#),
            "ok"
        );
        assert_eq!(
            field(r#"{"action":"created","document":{"type":"SkillsWorkflow.Job","id":7}}"#),
            "document.id"
        );
        assert_eq!(
            field(
                r#"{"action":"created","document":{"type":"SkillsWorkflow.Job","id":"32a8c937-2c65-463d-a292-e4c4e13ed263","url":5}}"#
            ),
            "document.url"
        );
        // Duplicate keys: the last one counts, as with serde_json::Value.
        assert_eq!(
            field(
                r#"{"action":5,"action":"created","document":{"type":"x","type":"SkillsWorkflow.Job","id":"32a8c937-2c65-463d-a292-e4c4e13ed263","url":"https://api.example.com/api/jobs/32a8c937-2c65-463d-a292-e4c4e13ed263"}}"#
            ),
            "ok"
        );
        let p = parse_payload(
            r#"{"action":"created","document":{"type":"Other.Kind","id":"abc"}}"#.as_bytes(),
            &base,
            &c,
        )?;
        assert_eq!(
            (p.doc_type.as_deref(), p.doc_id.as_deref(), p.ignored),
            (Some("Other.Kind"), Some("abc"), true)
        );
        Ok(())
    }

    #[test]
    fn authenticate_respects_the_path_tenant() -> TestResult {
        let tenants = vec![
            TenantAuth {
                name: "a".into(),
                digests: vec![sha256(b"secret-a")],
                api_base: Url::parse("https://x")?,
            },
            TenantAuth {
                name: "b".into(),
                digests: vec![sha256(b"secret-b1"), sha256(b"secret-b2")],
                api_base: Url::parse("https://x")?,
            },
        ];
        assert_eq!(authenticate(&tenants, b"secret-b2", None), Some(1));
        assert_eq!(authenticate(&tenants, b"secret-b2", Some("b")), Some(1));
        assert_eq!(authenticate(&tenants, b"secret-b2", Some("a")), None);
        assert_eq!(authenticate(&tenants, b"nope", None), None);
        assert_eq!(authenticate(&tenants, b"secret-a", Some("zzz")), None);
        Ok(())
    }

    #[test]
    fn ip_matching() -> TestResult {
        assert!(ip_in("10.1.2.3".parse()?, "10.0.0.0".parse()?, 8));
        assert!(!ip_in("11.1.2.3".parse()?, "10.0.0.0".parse()?, 8));
        assert!(ip_in("::1".parse()?, "::1".parse()?, 128));
        Ok(())
    }
}
