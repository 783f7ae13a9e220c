//! The accuracy audit through the real binary (`skillsync verify`) against
//! the simulator: a mirror corrupted by hand in SQLite is found, repaired
//! and then found right; a partial sample's count and bound agree with what
//! it sampled; upstream failures, a wrong path and changes still on their
//! way are never counted as mismatches; `status` turns degraded on a
//! mismatch and back once an audit finds none.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use serde_json::{Map, Value};
use skillsync::app::oneshot::{OneShot, reconcile_once};
use skillsync::model::{DocType, RunKind};
use skillsync::simulator::{Faults, Simulator};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

/// A mirror of `jobs` jobs, filled by one in-process reconciliation from
/// a simulator that keeps running for the test.
struct Mirror {
    _dir: tempfile::TempDir,
    db: PathBuf,
    config_path: PathBuf,
    /// The settings written at `config_path`.
    settings: TestConfig,
    sim: Simulator,
    _token: CancellationToken,
}

async fn mirror_of(jobs: usize) -> Mirror {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("skillsync.db");
    let token = CancellationToken::new();
    let sim = start_sim(&token).await;
    sim.seed(DocType::Job, jobs);
    let mut settings = TestConfig::new(&db, &sim.base_url());
    settings.fetch = FetchSettings::quick(8, 3);
    let config_path = dir.path().join("skillsync.toml");
    settings.write(&config_path);
    let config = settings.config();
    let what = OneShot {
        types: vec![DocType::Job],
        ..OneShot::everything(RunKind::Incremental)
    };
    let report = reconcile_once(Arc::new(config), what, CancellationToken::new()).await;
    assert!(report.all_ok(), "the first reconciliation: {report}");
    let m = Mirror {
        _dir: dir,
        db,
        config_path,
        settings,
        sim,
        _token: token,
    };
    assert_eq!(
        count(
            &m.sql(),
            "SELECT count(*) FROM jobs WHERE deleted_at IS NULL"
        ),
        jobs as i64
    );
    m
}

impl Mirror {
    fn sql(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(&self.db).expect("open db")
    }

    /// Runs the real binary; returns its exit code and stdout.
    async fn skillsync(&self, args: &[&str]) -> (i32, String) {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_skillsync"))
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .env_remove("SKILLSYNC_CONFIG")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output()
            .await
            .expect("run skillsync");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        (
            out.status.code().unwrap_or(-1),
            format!("{stdout}\n--- stderr:\n{stderr}"),
        )
    }

    /// The latest audit row of acme's jobs, by column name.
    fn last_audit(&self) -> HashMap<String, Value> {
        let c = self.sql();
        let mut s = c
            .prepare("SELECT * FROM audits WHERE tenant = 'acme' AND doc_type = 'job' ORDER BY id DESC LIMIT 1")
            .expect("prepare");
        let names: Vec<String> = s.column_names().iter().map(|n| n.to_string()).collect();
        s.query_row([], |r| {
            let mut m = HashMap::new();
            for (i, n) in names.iter().enumerate() {
                let v = match r.get_ref(i)? {
                    rusqlite::types::ValueRef::Null => Value::Null,
                    rusqlite::types::ValueRef::Integer(i) => Value::from(i),
                    rusqlite::types::ValueRef::Real(f) => Value::from(f),
                    rusqlite::types::ValueRef::Text(t) => {
                        Value::from(String::from_utf8_lossy(t).to_string())
                    }
                    rusqlite::types::ValueRef::Blob(_) => Value::Null,
                };
                m.insert(n.clone(), v);
            }
            Ok(m)
        })
        .expect("an audits row")
    }

    /// Ids of mirrored jobs whose document differs from the simulator's.
    fn differing(&self, ids: &[String]) -> Vec<String> {
        let upstream = self.sim.documents(DocType::Job);
        let c = self.sql();
        ids.iter()
            .filter(|id| {
                let doc: String = c
                    .query_row("SELECT document FROM jobs WHERE id = ?1", [id], |r| {
                        r.get(0)
                    })
                    .expect("mirrored");
                let mirror: Value = serde_json::from_str(&doc).expect("json");
                mirror != Value::Object(upstream[id.as_str()].clone())
            })
            .cloned()
            .collect()
    }
}

fn n(row: &HashMap<String, Value>, col: &str) -> i64 {
    row[col]
        .as_i64()
        .unwrap_or_else(|| panic!("{col}: {:?}", row[col]))
}

/// The same JSON content spelled otherwise: keys in reverse order, spaces
/// and newlines, whole numbers as `1.0`.
fn respelled(doc: &Map<String, Value>) -> String {
    let parts: Vec<String> = doc
        .iter()
        .rev()
        .map(|(k, v)| {
            let v = match v {
                Value::Number(x) if x.is_i64() => format!("{x}.0"),
                other => other.to_string(),
            };
            format!("\n  {:?} :  {v}", k)
        })
        .collect();
    format!("{{{}\n}}", parts.join(","))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_every_hand_made_corruption_repairs_it_and_then_finds_none() {
    let m = mirror_of(2000).await;
    let mut ids: Vec<String> = m.sim.ids(DocType::Job);
    ids.sort();
    let tampered: Vec<String> = ids.iter().step_by(150).take(10).cloned().collect();
    let undeleted: Vec<String> = ids.iter().skip(7).step_by(500).take(2).cloned().collect();
    let respelt: Vec<String> = ids.iter().skip(3).step_by(300).take(5).cloned().collect();
    {
        let c = m.sql();
        for id in &tampered {
            c.execute(
                "UPDATE jobs SET document = json_set(document, '$.Client', 'Tampered by hand') WHERE id = ?1",
                [id],
            )
            .expect("tamper");
        }
        for id in &undeleted {
            c.execute(
                "UPDATE jobs SET deleted_at = '2026-11-01T00:00:00.000Z' WHERE id = ?1",
                [id],
            )
            .expect("mark deleted");
        }
        let upstream = m.sim.documents(DocType::Job);
        for id in &respelt {
            c.execute(
                "UPDATE jobs SET document = ?2 WHERE id = ?1",
                [id, &respelled(&upstream[id.as_str()])],
            )
            .expect("respell");
        }
    }
    assert_eq!(m.differing(&tampered).len(), 10);
    assert!(m.sim.documents(DocType::Job).len() == 2000);

    let gets = m.sim.total_gets();
    let (code, out) = m
        .skillsync(&[
            "verify",
            "--type",
            "job",
            "--sample",
            "2000",
            "--max-rate",
            "0",
        ])
        .await;
    assert_eq!(code, 1, "mismatches found: exit 1\n{out}");
    assert!(out.contains("2000 sampled, 12 wrong"), "{out}");
    let a = m.last_audit();
    assert_eq!(n(&a, "sampled"), 2000, "{a:?}");
    assert_eq!(n(&a, "stale"), 10, "{a:?}");
    assert_eq!(n(&a, "wrongly_deleted"), 2, "{a:?}");
    assert_eq!(n(&a, "missing"), 0, "{a:?}");
    // The respelt documents are the same content: matched, not stale.
    assert_eq!(n(&a, "matched"), 1988, "{a:?}");
    assert_eq!(n(&a, "refetched"), 12, "{a:?}");
    assert_eq!(n(&a, "unreadable") + n(&a, "in_flight"), 0, "{a:?}");
    for id in tampered.iter().chain(&undeleted) {
        assert!(out.contains(id.as_str()), "{id} not named: {out}");
    }
    // One GET per sampled document, plus the 12 refetches: nothing more.
    assert_eq!(m.sim.total_gets() - gets, 2012);
    // Repaired by the refetches verify worked before it exited.
    assert!(
        m.differing(&tampered).is_empty(),
        "{:?}",
        m.differing(&tampered)
    );
    let c = m.sql();
    assert_eq!(
        count(&c, "SELECT count(*) FROM jobs WHERE deleted_at IS NOT NULL"),
        0
    );
    assert_eq!(count(&c, "SELECT count(*) FROM fetch_queue"), 0);

    // status: degraded by the mismatch, in plain words.
    let (code, out) = m.skillsync(&["status"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("found 12 document(s) the mirror had wrong"),
        "{out}"
    );
    let (_, json) = m.skillsync(&["status", "--json"]).await;
    assert!(json.contains("\"stale\":10"), "{json}");

    let (code, out) = m
        .skillsync(&[
            "verify",
            "--type",
            "job",
            "--sample",
            "2000",
            "--max-rate",
            "0",
        ])
        .await;
    assert_eq!(code, 0, "nothing wrong any more: exit 0\n{out}");
    // A census of 2000 right: the bound is 0.05^(1/2000).
    assert!(
        out.contains("2000 sampled, 0 wrong: at least 99.8% right (95% confidence)"),
        "{out}"
    );
    let a = m.last_audit();
    assert_eq!((n(&a, "matched"), n(&a, "refetched")), (2000, 0), "{a:?}");
    let bound = a["accuracy_lower_bound"].as_f64().expect("bound");
    assert!((bound - 0.05f64.powf(1.0 / 2000.0)).abs() < 1e-9, "{bound}");
    let (code, out) = m.skillsync(&["status"]).await;
    assert_eq!(code, 0, "healthy again once an audit finds none: {out}");
    assert!(out.contains("2000 sampled, 0 wrong"), "{out}");
    // sync_status carries the audit too.
    let (at, b): (Option<String>, Option<f64>) = m
        .sql()
        .query_row(
            "SELECT audited_at, accuracy_lower_bound FROM sync_status WHERE tenant = 'acme' AND doc_type = 'job'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("sync_status");
    assert!(at.is_some());
    assert_eq!(b, Some(bound));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sample_of_200_finds_what_it_sampled_and_bounds_it_consistently() {
    let m = mirror_of(2000).await;
    let mut ids: Vec<String> = m.sim.ids(DocType::Job);
    ids.sort();
    // 10% of the mirror wrong, spread over it (ids are random UUIDs).
    let tampered: Vec<String> = ids.iter().step_by(10).cloned().collect();
    assert_eq!(tampered.len(), 200);
    {
        let c = m.sql();
        for id in &tampered {
            c.execute(
                "UPDATE jobs SET document = json_set(document, '$.Stage', 'Tampered') WHERE id = ?1",
                [id],
            )
            .expect("tamper");
        }
    }
    let gets = m.sim.total_gets();
    let requests_before = m.sim.requests().len();
    let (code, out) = m
        .skillsync(&["verify", "--type", "job", "--sample", "200"])
        .await;
    let a = m.last_audit();
    let found = n(&a, "stale");
    // 180 picked at random (the bound's sample), 10 most recently changed, 10 longest unchanged.
    assert_eq!(n(&a, "sampled"), 200, "{a:?}");
    assert_eq!(n(&a, "bound_sample"), 180, "{a:?}");
    assert_eq!(n(&a, "matched") + found, 200, "{a:?}");
    assert_eq!(n(&a, "missing") + n(&a, "wrongly_deleted"), 0, "{a:?}");
    // About 10% of 200 (20): at least one, far below 60, with probability
    // 1 - 1e-9 for a uniform sample.
    assert!((1..=60).contains(&found), "found {found}: {a:?}");
    assert_eq!(code, 1, "{out}");
    // Exactly what it found was refetched and repaired: no more, no less.
    assert_eq!(n(&a, "refetched"), found, "{a:?}");
    assert_eq!(m.sim.total_gets() - gets, 200 + found as u64);
    // The audit's 200 GETs (the refetches come after them) keep the default
    // pace: at most 50 a second, so no 1 s window holds more than 51.
    let audit: Vec<std::time::Instant> = m.sim.requests()[requests_before..]
        .iter()
        .take(200)
        .map(|r| r.at)
        .collect();
    let busiest = audit
        .iter()
        .map(|t| {
            audit
                .iter()
                .filter(|u| **u >= *t && **u - *t < std::time::Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0);
    assert!(busiest <= 51, "{busiest} audit GETs in one second");
    let still = m.differing(&tampered).len() as i64;
    assert_eq!(200 - still, found, "repaired documents vs found");
    // The bound is the Clopper-Pearson bound of the random part's count,
    // below its observed share, and below the true share (90%) unless the
    // random 180 held at most 2 of the 200 (probability about 1e-6).
    let wrong = n(&a, "bound_wrong");
    assert!(wrong <= found);
    let bound = a["accuracy_lower_bound"].as_f64().expect("bound");
    let want = skillsync::audit::lower_bound(180 - wrong as u64, 180, 0.95).expect("bound");
    assert!((bound - want).abs() < 1e-12, "{bound} vs {want}");
    assert!(bound < (180 - wrong) as f64 / 180.0, "{bound}");
    assert!(bound < 0.96, "{bound} with {wrong} wrong of 180");
    assert!(
        out.contains(&format!("200 sampled, {found} wrong: at least"))
            && out.contains("from the 180 picked at random"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_a_wrong_path_and_changes_on_their_way_are_not_mismatches() {
    let m = mirror_of(300).await;
    // 1. A flaky upstream: 5xx, a burst of 429s, cut connections, bodies
    // that are not JSON. The mirror is right: nothing may count as wrong.
    m.sim.set_faults(Faults {
        error_rate: 0.2,
        rate_limit_next: 10,
        retry_after_secs: 1,
        reset_rate: 0.05,
        malformed_rate: 0.05,
        ..Faults::default()
    });
    let (code, out) = m
        .skillsync(&["verify", "--type", "job", "--sample", "300"])
        .await;
    let a = m.last_audit();
    assert_eq!(
        (
            n(&a, "stale"),
            n(&a, "missing"),
            n(&a, "wrongly_deleted"),
            n(&a, "refetched")
        ),
        (0, 0, 0, 0),
        "{a:?}\n{out}"
    );
    assert!(n(&a, "unreadable") >= 10, "{a:?}");
    assert_eq!(n(&a, "matched") + n(&a, "unreadable"), 300, "{a:?}");
    assert_eq!(code, 2, "some could not be read, none wrong: exit 2\n{out}");
    assert!(out.contains("not readable upstream (not counted)"), "{out}");
    assert_eq!(count(&m.sql(), "SELECT count(*) FROM fetch_queue"), 0);
    let (code, out) = m.skillsync(&["status"]).await;
    assert_eq!(code, 0, "unreadable is not a mismatch: {out}");
    m.sim.set_faults(Faults::default());

    // 2. A wrong job_path: every GET answers 404. Not 300 missing documents.
    let mut wrong = m.settings.clone();
    wrong.upstream.job_path = Some("/api/nowhere/{id}".into());
    let wrong_path = m.config_path.with_file_name("wrong-path.toml");
    wrong.write(&wrong_path);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_skillsync"))
        .arg("--config")
        .arg(&wrong_path)
        .args(["verify", "--type", "job", "--sample", "50"])
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("verify");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    let a = m.last_audit();
    assert_eq!((n(&a, "missing"), n(&a, "unreadable")), (0, 50), "{a:?}");
    assert!(text.contains("check job_path"), "{text}");
    assert_eq!(
        count(
            &m.sql(),
            "SELECT count(*) FROM jobs WHERE deleted_at IS NOT NULL"
        ),
        0
    );

    // 3. Changes on their way: 3 with a webhook recorded but not fetched
    // yet, 2 changed upstream just now without one (their webhook may still
    // come): in flight, not wrong. 2 changed quietly long ago (same
    // ModifiedOn, other content): stale.
    let ids = m.sim.ids(DocType::Job);
    let store =
        skillsync::store::Store::open(&m.db, std::time::Duration::from_secs(5)).expect("store");
    for id in &ids[0..3] {
        m.sim.update(DocType::Job, id);
        store
            .insert_event(recorded_event(&m.sim, id))
            .await
            .expect("record the webhook");
    }
    for id in &ids[3..5] {
        m.sim.update(DocType::Job, id);
    }
    for id in &ids[5..7] {
        let mut doc = m.sim.documents(DocType::Job)[id.as_str()].clone();
        doc.insert("Client".into(), Value::from("Changed quietly"));
        m.sim.put_raw(DocType::Job, id, doc);
    }
    drop(store);
    let (code, out) = m
        .skillsync(&["verify", "--type", "job", "--sample", "300"])
        .await;
    let a = m.last_audit();
    assert_eq!(n(&a, "in_flight"), 5, "{a:?}\n{out}");
    assert_eq!(n(&a, "stale"), 2, "{a:?}\n{out}");
    assert_eq!(n(&a, "matched"), 293, "{a:?}");
    // The quiet changes and the unannounced recent ones; the webhooks'
    // documents were queued already.
    assert_eq!(n(&a, "refetched"), 4, "{a:?}");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("5 being updated when checked (not counted)"),
        "{out}"
    );
    for id in &ids[5..7] {
        assert!(out.contains(id.as_str()) && out.contains("stale"), "{out}");
    }
    assert!(m.differing(&ids[3..7]).is_empty());
}
