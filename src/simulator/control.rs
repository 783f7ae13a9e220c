//! The simulator's control API: the `/_sim/…` HTTP knobs that
//! `skillsync simulate` users and the benchmarks turn from outside the
//! process (create, update and delete documents, set faults, read stats).

use std::time::Duration;

use serde_json::{Value, json};
use warp::http::StatusCode;
use warp::reply::Response;

use super::{Faults, Simulator, reply};
use crate::model::DocType;

impl Simulator {
    /// The control API used by `skillsync simulate` users and benchmarks
    /// (loopback test tool: no authentication). Body: JSON.
    /// - `create|update|delete` `{"type": "job"|"project", "count": N}`
    /// - `faults` `{"latency_ms", "error_rate", "rate_limit_next", "retry_after_secs", "rate_limit_per_sec",
    ///   "hang_rate", "hang_secs", "malformed_rate", "reset_rate", "listing_fail_after", "auth_broken",
    ///   "listing_error_next", "listing_error_rate", "page_cap"}`
    /// - `stats` → `{"total_gets", "listing_calls", "auth_failures", "throttled", "jobs", "projects"}`
    pub(super) fn control(&self, cmd: &str, body: &[u8]) -> Response {
        let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let ty = match v["type"].as_str() {
            Some("project") => DocType::Project,
            _ => DocType::Job,
        };
        let count = v["count"].as_u64().unwrap_or(1) as usize;
        match cmd {
            "create" => {
                let ids = self.seed(ty, count);
                reply(StatusCode::OK, json!({"created": ids.len()}))
            }
            "update" | "delete" => {
                let mut ids = self.ids(ty);
                fastrand::shuffle(&mut ids);
                let mut n = 0;
                for id in ids.iter().take(count) {
                    let ok = if cmd == "update" {
                        self.update(ty, id)
                    } else {
                        self.delete(ty, id)
                    };
                    n += usize::from(ok);
                }
                reply(StatusCode::OK, json!({ cmd: n }))
            }
            "faults" => {
                let f = Faults {
                    latency: Duration::from_millis(v["latency_ms"].as_u64().unwrap_or(0)),
                    error_rate: v["error_rate"].as_f64().unwrap_or(0.0),
                    rate_limit_next: v["rate_limit_next"].as_u64().unwrap_or(0) as u32,
                    retry_after_secs: v["retry_after_secs"].as_u64().unwrap_or(1),
                    rate_limit_per_sec: v["rate_limit_per_sec"].as_f64(),
                    hang_rate: v["hang_rate"].as_f64().unwrap_or(0.0),
                    hang_for: Duration::from_secs(v["hang_secs"].as_u64().unwrap_or(60)),
                    malformed_rate: v["malformed_rate"].as_f64().unwrap_or(0.0),
                    oversize_rate: v["oversize_rate"].as_f64().unwrap_or(0.0),
                    oversize_bytes: v["oversize_bytes"].as_u64().unwrap_or(8 << 20) as usize,
                    reset_rate: v["reset_rate"].as_f64().unwrap_or(0.0),
                    listing_fail_after: v["listing_fail_after"].as_u64(),
                    auth_broken: v["auth_broken"].as_bool().unwrap_or(false),
                    listing_error_next: v["listing_error_next"].as_u64().unwrap_or(0) as u32,
                    listing_error_rate: v["listing_error_rate"].as_f64().unwrap_or(0.0),
                    page_cap: v["page_cap"].as_u64(),
                    listing_row_padding: v["listing_row_padding"].as_u64().unwrap_or(0) as usize,
                    all_gone: v["all_gone"].as_bool().unwrap_or(false),
                };
                self.set_faults(f);
                reply(StatusCode::OK, json!({"faults": "set"}))
            }
            "stats" => {
                let (jobs, projects) = (
                    self.ids(DocType::Job).len(),
                    self.ids(DocType::Project).len(),
                );
                reply(
                    StatusCode::OK,
                    json!({"total_gets": self.total_gets(), "listing_calls": self.listing_calls(),
                           "auth_failures": self.auth_failures(),
                           "throttled": self.requests().iter().filter(|r| r.throttled).count(),
                           "jobs": jobs, "projects": projects}),
                )
            }
            _ => reply(
                StatusCode::NOT_FOUND,
                json!({"error": "unknown control command"}),
            ),
        }
    }
}
