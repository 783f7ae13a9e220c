//! `skillsync backup PATH`: a consistent online copy of the database,
//! taken beside a running `serve` without stalling intake.
//!
//! How: SQLite's online backup API, from a read transaction held open for
//! the whole copy (in WAL mode that pins one snapshot: the writer carries
//! on, and the copy is never restarted by its commits). It copies
//! [`PAGES_PER_STEP`] pages a step and sleeps [`PAUSE`] between steps, and
//! flushes the copy to disk every [`SYNC_EVERY_BYTES`], so neither the disk
//! queue nor the page cache fills with the copy's writes in front of the
//! writer's WAL fsyncs (the stall that `VACUUM INTO` caused in its last part).
//! The copy goes to a temporary file beside PATH; then it is fsynced, checked
//! with `PRAGMA integrity_check`, renamed over PATH and the directory fsynced.
//! Any failure removes the temporary file and says why.
//!
//! It must not write to the source database (it opens it read-only).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};

use super::StoreError;

/// Pages copied per step (1 MiB at the default 4 KiB page size).
pub const PAGES_PER_STEP: i32 = 256;
/// The pause between two steps: the copy yields the disk and the CPU.
pub const PAUSE: Duration = Duration::from_millis(2);
/// The copy is flushed to disk after this many bytes written.
pub const SYNC_EVERY_BYTES: u64 = 32 << 20;

/// How far the copy is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub pages_done: u64,
    pub pages_total: u64,
    pub page_size: u64,
}

/// What a finished backup did.
#[derive(Debug, Clone)]
pub struct Done {
    pub path: PathBuf,
    pub bytes: u64,
    pub pages: u64,
    pub elapsed: Duration,
    /// Times the source was busy and a step was retried.
    pub busy_retries: u64,
}

/// Copies the database at `source` to `target` (see the module doc);
/// `progress` is called after every step.
pub fn backup(
    source: &Path,
    target: &Path,
    mut progress: impl FnMut(Progress),
) -> Result<Done, StoreError> {
    let started = Instant::now();
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same(source, target) {
        return Err(StoreError::Other(format!(
            "{} is the database itself: give the backup another path",
            target.display()
        )));
    }
    let name = target
        .file_name()
        .ok_or_else(|| StoreError::Other(format!("{} names no file", target.display())))?;
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let r = copy_checked(source, &tmp, &mut progress).and_then(|(pages, page_size, busy)| {
        std::fs::rename(&tmp, target).map_err(|e| {
            StoreError::Other(format!(
                "cannot rename {} to {}: {e}",
                tmp.display(),
                target.display()
            ))
        })?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::Other(format!("cannot fsync {}: {e}", dir.display())))?;
        Ok(Done {
            path: target.to_path_buf(),
            bytes: pages * page_size,
            pages,
            elapsed: started.elapsed(),
            busy_retries: busy,
        })
    });
    if r.is_err() {
        for ext in ["", "-journal", "-wal", "-shm"] {
            let mut p = tmp.as_os_str().to_owned();
            p.push(ext);
            let _ = std::fs::remove_file(PathBuf::from(p));
        }
    }
    r
}

/// Copies into `tmp`, fsyncs it and checks it; (pages, page size, busy retries).
fn copy_checked(
    source: &Path,
    tmp: &Path,
    progress: &mut impl FnMut(Progress),
) -> Result<(u64, u64, u64), StoreError> {
    let src = Connection::open_with_flags(
        source,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| StoreError::Other(format!("cannot open {}: {e}", source.display())))?;
    src.busy_timeout(Duration::from_secs(5))?;
    let version: i64 = src.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version == 0 {
        return Err(StoreError::Other(format!(
            "{} is not a skillsync database (no schema)",
            source.display()
        )));
    }
    let _ = std::fs::remove_file(tmp);
    let mut dst = Connection::open(tmp)
        .map_err(|e| StoreError::Other(format!("cannot create {}: {e}", tmp.display())))?;
    // The copy is fsynced by us, in slices and at the end.
    dst.execute_batch("PRAGMA synchronous = OFF; PRAGMA journal_mode = OFF;")?;
    // One snapshot for the whole copy: the read transaction stays open
    // across the steps, so commits by `serve` neither block nor restart it.
    src.execute_batch("BEGIN")?;
    src.query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(()))?;
    let page_size: u64 = src.pragma_query_value(None, "page_size", |r| r.get::<_, i64>(0))? as u64;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(tmp)
        .map_err(|e| StoreError::Other(format!("cannot open {}: {e}", tmp.display())))?;
    let mut busy = 0u64;
    let mut synced_at = 0u64;
    let total;
    {
        let b = Backup::new(&src, &mut dst)?;
        loop {
            let step = b.step(PAGES_PER_STEP)?;
            let p = b.progress();
            let (remaining, count) = (p.remaining.max(0) as u64, p.pagecount.max(0) as u64);
            let done = count.saturating_sub(remaining);
            progress(Progress {
                pages_done: done,
                pages_total: count,
                page_size,
            });
            match step {
                StepResult::Done => {
                    total = count;
                    break;
                }
                StepResult::More => {
                    if (done - synced_at.min(done)) * page_size >= SYNC_EVERY_BYTES {
                        file.sync_data().map_err(|e| {
                            StoreError::Other(format!("cannot fsync {}: {e}", tmp.display()))
                        })?;
                        synced_at = done;
                    }
                    std::thread::sleep(PAUSE);
                }
                // Busy or locked (or a future kind): wait a little and go on.
                _ => {
                    busy += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
    let _ = src.execute_batch("COMMIT");
    drop(src);
    file.sync_all()
        .map_err(|e| StoreError::Other(format!("cannot fsync {}: {e}", tmp.display())))?;
    let check: Vec<String> = {
        let mut s = dst.prepare("PRAGMA integrity_check")?;
        let rows = s.query_map([], |r| r.get::<_, String>(0))?;
        rows.collect::<Result<_, _>>()?
    };
    if check != ["ok"] {
        return Err(StoreError::Other(format!(
            "the copy failed PRAGMA integrity_check: {}",
            check.join("; ")
        )));
    }
    dst.close().map_err(|(_, e)| StoreError::from(e))?;
    Ok((total, page_size, busy))
}

/// Prints progress on a terminal (`\r`-updated line on stderr), or logs it
/// every few seconds otherwise; returns the callback for [`backup`].
pub fn reporter(terminal: bool) -> impl FnMut(Progress) {
    let mut last = Instant::now();
    let mut first = true;
    move |p: Progress| {
        let every = if terminal {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(5)
        };
        let finished = p.pages_done >= p.pages_total;
        if !(first || finished || last.elapsed() >= every) {
            return;
        }
        first = false;
        last = Instant::now();
        let mb = |pages: u64| (pages * p.page_size) as f64 / 1_048_576.0;
        let pct = if p.pages_total == 0 {
            100.0
        } else {
            p.pages_done as f64 * 100.0 / p.pages_total as f64
        };
        if terminal {
            let mut e = std::io::stderr();
            let _ = write!(
                e,
                "\rbackup: {pct:5.1}% ({:.0} of {:.0} MiB){}",
                mb(p.pages_done),
                mb(p.pages_total),
                if finished { "\n" } else { "" }
            );
            let _ = e.flush();
        } else {
            tracing::info!(
                pages_done = p.pages_done,
                pages_total = p.pages_total,
                percent = format!("{pct:.1}"),
                "backup in progress"
            );
        }
    }
}
