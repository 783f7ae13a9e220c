//! Domain types shared by the modules: document types, reconciliation run
//! kinds and statuses, document keys, timestamps in the one text format every
//! table uses, and the queue's claim and outcome types. The enums a table
//! column holds as text are declared with `text_enum!`, so their text is
//! written once. No I/O here.

use std::fmt;

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};

/// Declares an enum whose values a table column holds as text. The one list
/// of variants and texts gives `as_str` (the text written), `parse` (the
/// text read back), and `Display` and `Serialize` (the same text), so the
/// database, the logs and `--json` cannot disagree.
macro_rules! text_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// The text its column holds.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }

            /// Reads that text back; `None` for any other.
            pub fn parse(s: &str) -> Option<$name> {
                match s {
                    $( $text => Some($name::$variant), )+
                    _ => None,
                }
            }
        }

        // `pad`, not `write_str`: a width (`{:<8}` in `status` and the
        // demo's tables) applies as it does to the string.
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}

text_enum! {
    /// The document types skillsync mirrors, named `job` and `project` in
    /// every table.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub enum DocType {
        Job => "job",
        Project => "project",
    }
}

impl DocType {
    pub const ALL: [DocType; 2] = [DocType::Job, DocType::Project];

    /// The mirror table holding this type.
    pub fn table(self) -> &'static str {
        match self {
            DocType::Job => "jobs",
            DocType::Project => "projects",
        }
    }
}

text_enum! {
    /// What a reconciliation run lists, as `sync_runs.kind` holds it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum RunKind {
        /// Documents modified since the watermark.
        Incremental => "incremental",
        /// Every id: also finds deletion candidates.
        Full => "full",
    }
}

text_enum! {
    /// Where a reconciliation run stands, as `sync_runs.status` holds it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum RunStatus {
        Running => "running",
        Ok => "ok",
        /// With `sync_runs.error` saying why.
        Failed => "failed",
        /// Stopped by a signal, or its process died.
        Interrupted => "interrupted",
    }
}

/// Formats a time as every table stores it: RFC 3339 UTC, milliseconds, `Z`.
pub fn fmt_ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The current time in table format.
pub fn now_ts() -> String {
    fmt_ts(Utc::now())
}

/// Parses an upstream timestamp: RFC 3339 with any offset, or a naive
/// date-time taken as UTC (Skills Workflow omits the zone in places).
pub fn parse_upstream_ts(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for f in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M:%S",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
            return Some(t.and_utc());
        }
    }
    None
}

/// Normalises an upstream timestamp to table format so text order is time
/// order; a value that does not parse is kept as it came.
pub fn normalize_ts(s: &str) -> String {
    parse_upstream_ts(s)
        .map(fmt_ts)
        .unwrap_or_else(|| s.to_string())
}

text_enum! {
    /// Why a fetch failed, as counted in metrics and shown in `status`
    /// (`fetch_queue.last_error_class`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum ErrorClass {
        /// 401/403: credentials are wrong or revoked.
        Auth => "auth",
        /// 429.
        RateLimited => "rate_limited",
        /// 5xx.
        Server => "server",
        /// No answer within the timeout.
        Timeout => "timeout",
        /// Connection refused, reset, DNS.
        Network => "network",
        /// A 2xx body that is not a JSON object, or too large.
        Malformed => "malformed",
        /// Any other 4xx.
        Client => "client",
        /// 404/410 while documents the mirror holds live answer 404 too: a
        /// wrong path or a user who cannot see documents, not a deletion.
        UnconfirmedGone => "unconfirmed_gone",
    }
}

/// A set of document ids, compact for the common case: a UUID is kept as
/// 16 bytes instead of a 36-character string (a full sweep of 100,000
/// documents keeps every id it listed).
#[derive(Debug, Default, Clone)]
pub struct IdSet {
    uuids: std::collections::HashSet<u128>,
    other: std::collections::HashSet<String>,
}

impl IdSet {
    /// Adds an id; true if it was not there yet.
    pub fn insert(&mut self, id: &str) -> bool {
        match uuid::Uuid::try_parse(id) {
            Ok(u) => self.uuids.insert(u.as_u128()),
            Err(_) => self.other.insert(id.to_string()),
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        match uuid::Uuid::try_parse(id) {
            Ok(u) => self.uuids.contains(&u.as_u128()),
            Err(_) => self.other.contains(id),
        }
    }

    pub fn len(&self) -> usize {
        self.uuids.len() + self.other.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One document of a tenant: the key of its mirror row, its history and its
/// queue row.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DocKey {
    pub tenant: String,
    pub doc_type: DocType,
    pub id: String,
}

/// A document leased to one fetcher.
#[derive(Debug, Clone)]
pub struct Claim {
    pub tenant: String,
    pub doc_type: DocType,
    pub doc_id: String,
    /// The queue row's generation when claimed; a newer one means another
    /// request arrived during the fetch and the document must be fetched again.
    pub generation: i64,
    /// Events up to this id were received before the fetch began.
    pub max_event: i64,
    pub attempts: u32,
    pub reason: String,
    /// The fencing token: the queue row's `lease_owner` while this claim
    /// holds it (the process's owner name, `/`, a value no other claim ever
    /// had). A renewal or settlement whose token the row no longer holds is
    /// from a claim that lost its lease, and is discarded.
    pub lease: String,
    /// When the claim was made (table format): a 404 from this claim never
    /// marks deleted a document a fetch stored after it.
    pub claimed_at: String,
}

impl Claim {
    /// The claimed document's key.
    pub fn key(&self) -> DocKey {
        DocKey {
            tenant: self.tenant.clone(),
            doc_type: self.doc_type,
            id: self.doc_id.clone(),
        }
    }
}

/// A key of a document looked up case-insensitively (the upstream schema
/// is not published): the fetcher, the listing and the report columns all
/// match field names this way.
pub fn get_ci<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A width pads the name as it pads a string (`status` aligns its
    /// columns with `{:<8}`).
    #[test]
    fn names_take_a_width_like_strings() {
        assert_eq!(format!("[{:<8}]", DocType::Job), "[job     ]");
        assert_eq!(
            format!("[{:>8}]", RunKind::Full),
            format!("[{:>8}]", RunKind::Full.as_str())
        );
        assert_eq!(DocType::Project.to_string(), "project");
    }

    #[test]
    fn run_kinds_and_statuses_read_back_what_they_write() {
        for k in [RunKind::Incremental, RunKind::Full] {
            assert_eq!(RunKind::parse(k.as_str()), Some(k));
        }
        for s in [
            RunStatus::Running,
            RunStatus::Ok,
            RunStatus::Failed,
            RunStatus::Interrupted,
        ] {
            assert_eq!(RunStatus::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::json!(s), s.as_str());
        }
        assert_eq!(RunStatus::parse("done"), None);
    }

    #[test]
    fn timestamps_normalise_to_millis_z() {
        assert_eq!(
            normalize_ts("2026-11-28T12:00:00Z"),
            "2026-11-28T12:00:00.000Z"
        );
        assert_eq!(
            normalize_ts("2026-11-28T13:00:00.5+01:00"),
            "2026-11-28T12:00:00.500Z"
        );
        assert_eq!(
            normalize_ts("2026-11-28T12:00:00.1234567"),
            "2026-11-28T12:00:00.123Z"
        );
        assert_eq!(normalize_ts("yesterday"), "yesterday");
    }
}
