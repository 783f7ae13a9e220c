//! The webhook payload, parsed and validated: pure (no I/O, no HTTP types),
//! so it is unit-tested here and fuzzed (`fuzz/fuzz_targets/webhook_payload.rs`).
//! Reads only the fields it checks (`action`, `document.type`, `.id`,
//! `.url`), borrowing strings from the body, and refuses a `document.url`
//! that is not this document's URL on the tenant's `api_base`, so a payload
//! never chooses where credentials are sent. The HTTP edge answers a
//! [`PayloadError`] with 400.

use std::borrow::Cow;

use reqwest::Url;

use crate::config::Config;
use crate::model::DocType;

/// Why a payload was refused: the field at fault and what the sender reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PayloadError {
    /// The field named in the answer: `body`, `action`, `document`, `document.type`, ...
    pub field: &'static str,
    pub message: String,
}

impl PayloadError {
    fn new(field: &'static str, message: impl Into<String>) -> Self {
        PayloadError {
            field,
            message: message.into(),
        }
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
) -> Result<ParsedEvent, PayloadError> {
    let payload: Payload<'_> = serde_json::from_slice(body)
        .map_err(|e| PayloadError::new("body", format!("body is not valid JSON: {e}")))?;
    let Payload::Object { action, document } = payload else {
        return Err(PayloadError::new("body", "body must be a JSON object"));
    };
    let action = match action {
        Some(Field::Str(s)) if !s.trim().is_empty() && s.len() <= 100 => s.trim().to_string(),
        Some(_) => {
            return Err(PayloadError::new(
                "action",
                "action must be a non-empty string",
            ));
        }
        None => return Err(PayloadError::new("action", "action is required")),
    };
    let document = match document {
        None | Some(DocumentField::Null) => None,
        Some(DocumentField::Object(d)) => Some(d),
        Some(DocumentField::Other) => {
            return Err(PayloadError::new(
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
        return Err(PayloadError::new("document", "document is required"));
    };
    let sender_type = match &document.ty {
        Some(Field::Str(s)) if !s.trim().is_empty() && s.len() <= 200 => s.trim(),
        Some(_) => {
            return Err(PayloadError::new(
                "document.type",
                "document.type must be a non-empty string",
            ));
        }
        None => {
            return Err(PayloadError::new(
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
        Some(DocType::Job)
    } else if u
        .project_types
        .iter()
        .any(|t| t.eq_ignore_ascii_case(sender_type))
    {
        Some(DocType::Project)
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
            return Err(PayloadError::new(
                "document.id",
                "document.id must be a string",
            ));
        }
        None => return Err(PayloadError::new("document.id", "document.id is required")),
    };
    let id = uuid::Uuid::try_parse(raw_id)
        .map_err(|_| PayloadError::new("document.id", "document.id must be a UUID"))?
        .hyphenated()
        .to_string();
    let url = match &document.url {
        Some(Field::Str(s)) => &**s,
        Some(_) => {
            return Err(PayloadError::new(
                "document.url",
                "document.url must be a string",
            ));
        }
        None => {
            return Err(PayloadError::new(
                "document.url",
                "document.url is required",
            ));
        }
    };
    check_document_url(
        url,
        api_base,
        &config.upstream.document_path(doc_type, raw_id),
        &config.upstream.document_path(doc_type, &id),
    )?;
    Ok(ParsedEvent {
        action,
        doc_type: Some(doc_type.as_str().to_string()),
        doc_id: Some(id),
        ignored: is_test,
    })
}

/// We never send credentials to a URL a payload chose: the URL must be on the
/// tenant's `api_base` origin and name the same type and id.
fn check_document_url(
    url: &str,
    api_base: &Url,
    raw_path: &str,
    norm_path: &str,
) -> Result<(), PayloadError> {
    let bad = || {
        PayloadError::new(
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::TestResult;

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
                Err(PayloadError { field, .. }) => {
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
            Err(PayloadError { field, .. }) => field,
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
}
