//! `skillsync backup` beside a running `serve` (the real binary, a webhook
//! stream on loopback, the simulator upstream): the copy is consistent,
//! passes `integrity_check` and holds every event acknowledged before the
//! backup started; failures exit 1 with the reason and leave nothing behind.

use std::time::{Duration, Instant};

use skillsync::model::DocType;
use tokio_util::sync::CancellationToken;

use crate::helpers::start_sim;
use crate::process::{Process, Stream, integrity, missing_events, terminate};

#[tokio::test]
async fn a_backup_beside_serve_under_a_webhook_stream_holds_every_acknowledged_event() {
    let token = CancellationToken::new();
    let sim = start_sim(&token).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("skillsync.db");
    let p = Process::spawn(dir.path(), &db, &sim, "", 0);
    p.ready().await;
    // Some bulk, so the copy takes many steps.
    let client = reqwest::Client::new();
    for chunk in (0..400).collect::<Vec<_>>().chunks(50) {
        let ids: Vec<String> = chunk.iter().map(|_| sim.create(DocType::Job)).collect();
        let sent = ids
            .iter()
            .map(|id| p.notify_event(&client, &sim, DocType::Job, id, "created"));
        for e in futures_util::future::join_all(sent).await {
            assert!(e.is_some(), "webhook acknowledged");
        }
    }
    let stream = Stream::start(&p, &sim, Duration::from_millis(20));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let before = stream.acked_before(started);
    assert!(!before.is_empty());

    let target = dir.path().join("backups").join("skillsync-copy.db");
    std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
    let mut cmd = p.cmd(&["backup", target.to_str().expect("utf-8")]);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run backup"))
        .await
        .expect("backup thread");
    let during = stream.acked_after(started);
    stream.stop().await;
    assert!(
        out.status.success(),
        "backup failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("integrity_check ok"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    eprintln!(
        "{} events acknowledged before the backup, {during} during or after it",
        before.len()
    );
    assert_eq!(integrity(&target), "ok");
    assert_eq!(missing_events(&target, &before), Vec::<i64>::new());
    // No temporary file is left beside it.
    let left: Vec<_> = std::fs::read_dir(target.parent().expect("parent"))
        .expect("read dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("skillsync-copy.db")]);

    // A target that cannot be written: exit 1 with the reason.
    let mut cmd = p.cmd(&["backup", "/nonexistent-dir/x.db"]);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run backup"))
        .await
        .expect("backup thread");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot create"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The live database itself is refused.
    let mut cmd = p.cmd(&["backup", db.to_str().expect("utf-8")]);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run backup"))
        .await
        .expect("backup thread");
    assert_eq!(out.status.code(), Some(1));
    terminate(p);
    // The copy is a database serve starts on.
    let p = Process::spawn(dir.path(), &target, &sim, "", 1);
    p.ready().await;
    terminate(p);
    token.cancel();
}
