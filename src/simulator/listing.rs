//! The simulated Data Extraction listing: `fields`, `filters` (the
//! DevExtreme-style terms the daemon sends), `skip`/`take`, `totalCount`,
//! and its faults (failing after page N, outages, a page cap, padded rows). A page is a
//! binary-searched key range of the (ModifiedOn, id) index.

use serde_json::{Map, Value, json};
use warp::http::StatusCode;
use warp::reply::Response;

use super::{Simulator, reply};
use crate::model::{DocType, normalize_ts};

impl Simulator {
    pub(super) async fn listing(
        self,
        ty: DocType,
        headers: warp::http::HeaderMap,
        body: Value,
    ) -> Response {
        let faults = match self.gate(&headers, |s| s.listing_calls += 1).await {
            Ok(faults) => faults,
            Err(refused) => return refused,
        };
        let q = &body["queryBuilder"];
        let skip = q["skip"].as_u64().unwrap_or(0);
        let take = q["take"].as_u64().unwrap_or(500).min(10_000);
        if let Some(fail) = faults.listing_fail_after {
            if self.lock().listing_pages_since_faults >= fail {
                return reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": "simulated listing failure"}),
                );
            }
        }
        let outage = {
            let mut s = self.lock();
            if s.faults.listing_error_next > 0 {
                s.faults.listing_error_next -= 1;
                true
            } else {
                false
            }
        };
        if outage
            || (faults.listing_error_rate > 0.0 && fastrand::f64() < faults.listing_error_rate)
        {
            let mut r = reply(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "simulated listing outage"}),
            );
            if let Ok(v) = "1".parse() {
                r.headers_mut().insert("retry-after", v);
            }
            return r;
        }
        let fields: Vec<String> = q["fields"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|f| f.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let id_field = match ty {
            DocType::Job => "JobId",
            DocType::Project => "ProjectId",
        };
        // Known columns only, as the real named queries have.
        for f in &fields {
            let known: &[&str] = match ty {
                DocType::Job => &[
                    "JobId",
                    "JobNumber",
                    "Job",
                    "ProjectId",
                    "Client",
                    "Stage",
                    "StageType",
                    "StartDate",
                    "EndDate",
                    "ModifiedOn",
                    "Version",
                ],
                DocType::Project => &[
                    "ProjectId",
                    "ProjectNumber",
                    "Project",
                    "Client",
                    "Stage",
                    "StartDate",
                    "EndDate",
                    "ModifiedOn",
                ],
            };
            if !known.iter().any(|k| k.eq_ignore_ascii_case(f)) {
                return reply(
                    StatusCode::BAD_REQUEST,
                    json!({"error": format!("unknown field {f}")}),
                );
            }
        }
        let filters = match parse_filters(&q["filters"], id_field) {
            Ok(f) => f,
            Err(e) => return reply(StatusCode::BAD_REQUEST, json!({ "error": e })),
        };
        let mut s = self.lock();
        s.listing_pages += 1;
        s.listing_pages_since_faults += 1;
        let page_no = s.listing_pages;
        let hook = s.listing_hook.clone();
        let take = faults.page_cap.map_or(take, |cap| take.min(cap));
        let empty = Vec::new();
        let index = match &s.listing_snapshot {
            Some(snap) => snap.get(&ty).unwrap_or(&empty),
            None => s.index.get(&ty).unwrap_or(&empty),
        };
        // The index is in (ModifiedOn, id) order, so the terms the daemon
        // sends (bounds on ModifiedOn, and `id >` inside one ModifiedOn) are
        // a range found by binary search: a page and its totalCount cost
        // O(log n + page), not a scan of the rest of the index.
        let (lo, hi) = key_range(index, &filters);
        let range = &index[lo..hi];
        let with_equal = filters
            .iter()
            .any(|f| f.on_modified && f.op == "=" && f.value.is_some());
        let exact = filters.iter().all(|f| f.is_range_term(with_equal));
        let (total, matching): (usize, Vec<&(String, String)>) = if exact {
            let page = range.iter().skip(skip as usize).take(take as usize);
            (range.len(), page.collect())
        } else {
            let all: Vec<&(String, String)> = range
                .iter()
                .filter(|(m, id)| filters.iter().all(|f| f.matches(m, id)))
                .collect();
            let page = all.iter().copied().skip(skip as usize).take(take as usize);
            (all.len(), page.collect())
        };
        let data: Vec<Value> = matching
            .into_iter()
            .filter_map(|(m, id)| s.docs.get(&(ty, id.clone())).map(|d| (m, d)))
            .map(|(m, d)| {
                let mut row = Map::new();
                for f in &fields {
                    let v = if f.eq_ignore_ascii_case(id_field) {
                        d.doc.get(id_field).or_else(|| d.doc.get("Id")).cloned()
                    } else if f.eq_ignore_ascii_case("ModifiedOn") {
                        // As the listing's read path knows it (it may lag).
                        Some(json!(m))
                    } else if f.eq_ignore_ascii_case("Job") {
                        d.doc.get("Subject").cloned()
                    } else if f.eq_ignore_ascii_case("Project") {
                        d.doc.get("Name").cloned()
                    } else {
                        d.doc.get(f.as_str()).cloned()
                    };
                    row.insert(f.clone(), v.unwrap_or(Value::Null));
                }
                if faults.listing_row_padding > 0 {
                    row.insert(
                        "Padding".into(),
                        json!("x".repeat(faults.listing_row_padding)),
                    );
                }
                Value::Object(row)
            })
            .collect();
        drop(s);
        if let Some(hook) = hook {
            hook(&self, page_no);
        }
        reply(StatusCode::OK, json!({"data": data, "totalCount": total}))
    }
}

/// One term of a listing's `filters` (all terms must hold, as in the Data
/// Extraction API's DevExtreme-style filter arrays; `"and"` between terms is
/// accepted and implied).
struct FilterTerm {
    on_modified: bool,
    op: String,
    /// Normalised time for ModifiedOn, lower-case for ids; `None` is null.
    value: Option<String>,
}

impl FilterTerm {
    fn matches(&self, modified: &str, id: &str) -> bool {
        let field = if self.on_modified { modified } else { id };
        let Some(v) = self.value.as_deref() else {
            // Every simulated row has both fields: `= null` never holds.
            return self.op == "<>";
        };
        match self.op.as_str() {
            ">=" => field >= v,
            ">" => field > v,
            "=" => field == v,
            "<=" => field <= v,
            "<" => field < v,
            _ => field != v,
        }
    }
}

impl FilterTerm {
    /// Whether [`key_range`] applies this term exactly (no scan needed);
    /// `with_equal`: the filters also hold a `ModifiedOn =` term.
    fn is_range_term(&self, with_equal: bool) -> bool {
        match (self.on_modified, self.op.as_str(), self.value.is_some()) {
            (true, ">=" | ">" | "=" | "<=" | "<", true) => true,
            (true, "<>", false) => true, // every simulated row has a time
            (false, ">", true) => with_equal,
            _ => false,
        }
    }
}

/// The slice of the (ModifiedOn, id)-ordered index that the range terms
/// allow: bounds on ModifiedOn, and `id >` within a `ModifiedOn =` term.
fn key_range(index: &[(String, String)], filters: &[FilterTerm]) -> (usize, usize) {
    let (mut lo, mut hi) = (0, index.len());
    let equal = filters
        .iter()
        .find(|f| f.on_modified && f.op == "=")
        .and_then(|f| f.value.clone());
    for f in filters {
        let Some(v) = f.value.as_deref() else {
            continue;
        };
        match (f.on_modified, f.op.as_str()) {
            (true, ">=") | (true, "=") => {
                lo = lo.max(index.partition_point(|(m, _)| m.as_str() < v))
            }
            (true, ">") => lo = lo.max(index.partition_point(|(m, _)| m.as_str() <= v)),
            _ => {}
        }
        match (f.on_modified, f.op.as_str()) {
            (true, "<=") | (true, "=") => {
                hi = hi.min(index.partition_point(|(m, _)| m.as_str() <= v))
            }
            (true, "<") => hi = hi.min(index.partition_point(|(m, _)| m.as_str() < v)),
            _ => {}
        }
        if let (false, ">", Some(t)) = (f.on_modified, f.op.as_str(), equal.as_deref()) {
            lo = lo.max(index.partition_point(|(m, id)| (m.as_str(), id.as_str()) <= (t, v)));
        }
    }
    (lo, hi.max(lo))
}

fn parse_filters(v: &Value, id_field: &str) -> Result<Vec<FilterTerm>, String> {
    let mut out = Vec::new();
    let Some(terms) = v.as_array() else {
        return Ok(out);
    };
    for t in terms {
        if t.as_str().is_some_and(|s| s.eq_ignore_ascii_case("and")) {
            continue;
        }
        let Some([field, op, value]) = t.as_array().map(Vec::as_slice) else {
            return Err(format!("unsupported filter term {t}"));
        };
        let field = field.as_str().unwrap_or_default();
        let on_modified = field.eq_ignore_ascii_case("ModifiedOn");
        if !on_modified && !field.eq_ignore_ascii_case(id_field) {
            return Err(format!("cannot filter on {field}"));
        }
        let op = op.as_str().unwrap_or_default().to_string();
        if !matches!(op.as_str(), ">=" | ">" | "=" | "<=" | "<" | "<>") {
            return Err(format!("unsupported operator {op}"));
        }
        let value = match value {
            Value::Null => None,
            Value::String(s) if on_modified => Some(normalize_ts(s)),
            Value::String(s) => Some(s.to_ascii_lowercase()),
            other => return Err(format!("unsupported filter value {other}")),
        };
        out.push(FilterTerm {
            on_modified,
            op,
            value,
        });
    }
    Ok(out)
}
