//! Restarts lose no webhook: `serve` restarted five times (SIGTERM, wait for
//! its exit, exec the same binary again) under a steady 50 webhooks/s, with
//! the listening socket held by the test across restarts and handed to each
//! process as fd 3 with `LISTEN_FDS=1` and `LISTEN_PID`, the way
//! `skillsync.socket` hands it over. While no process accepts, the kernel
//! queues connections on the held socket. The test also plays systemd's
//! `NOTIFY_SOCKET`, so it sends SIGTERM only to a process that said
//! `READY=1`. Every webhook must be answered 200 (none refused, none timed
//! out), and every acknowledged event must be in `events`.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use skillsync::model::DocType;
use skillsync::simulator::Simulator;

use crate::helpers::*;

/// Restarts under load, after the first start.
const RESTARTS: usize = 5;
/// One webhook every 20 ms: 50 a second.
const EVERY: Duration = Duration::from_millis(20);
/// How long each process serves (after its `READY=1`) before its SIGTERM.
const SERVE_FOR: Duration = Duration::from_secs(3);
/// The client's limit for one webhook: generous, it only catches a hang.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// A `serve` process started by the test; killed if the test panics first.
struct Daemon {
    child: Option<Child>,
    log: Option<std::thread::JoinHandle<String>>,
}

impl Daemon {
    /// Starts `serve` with `listener` as fd 3. `sh` moves the socket from
    /// stdin to fd 3, then `exec`s skillsync in the same process, so
    /// `LISTEN_PID=$$` is skillsync's own pid, as listenfd requires.
    fn start(listener: &std::net::TcpListener, notify: &Path, config: &Path) -> Daemon {
        let fd: OwnedFd = listener.try_clone().expect("dup the listener").into();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"exec 3<&0 0</dev/null; LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@""#)
            .arg(env!("CARGO_BIN_EXE_skillsync"))
            .args(["serve", "--config"])
            .arg(config)
            .stdin(Stdio::from(fd))
            .env("NOTIFY_SOCKET", notify)
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .env_remove("WATCHDOG_USEC")
            .env_remove("RUST_LOG");
        let (child, log) = spawn_logging(&mut cmd);
        Daemon {
            child: Some(child),
            log: Some(log),
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGTERM, then waits for the exit; returns the exit code and the log.
    async fn stop(mut self) -> (Option<i32>, String) {
        let pid = self.pid().to_string();
        assert!(
            crate::helpers::kill(["-TERM", &pid])
                .expect("run kill")
                .success(),
            "kill -TERM {pid}"
        );
        let mut child = self.child.take().expect("a running child");
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .expect("join")
            .expect("wait for serve");
        let log = self
            .log
            .take()
            .map(|l| l.join().unwrap_or_default())
            .unwrap_or_default();
        (status.code(), log)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits for a `READY=1` datagram on the test's `NOTIFY_SOCKET`.
async fn wait_ready(notify: &Arc<UnixDatagram>, what: &str) {
    let sock = notify.clone();
    let what = what.to_string();
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 4096];
        loop {
            assert!(Instant::now() < deadline, "{what}: no READY=1 within 60 s");
            match sock.recv(&mut buf) {
                Ok(n)
                    if String::from_utf8_lossy(&buf[..n])
                        .lines()
                        .any(|l| l == "READY=1") =>
                {
                    return;
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("{what}: NOTIFY_SOCKET: {e}"),
            }
        }
    })
    .await
    .expect("join");
}

/// What one webhook got.
struct Answer {
    result: Result<(u16, Option<i64>), String>,
    sent_at: Instant,
    took: Duration,
}

/// Posts one `created` webhook for a new simulator job on a fresh connection.
async fn one_webhook(client: reqwest::Client, url: String, sim: Simulator) -> Answer {
    let id = sim.create(DocType::Job);
    let body = sim
        .webhook_payload(DocType::Job, &id, "created")
        .to_string();
    let started = Instant::now();
    let sent = client
        .post(&url)
        .header("content-type", "application/json")
        .header("x-webhook-secret", SECRET_ACME)
        .body(body)
        .send()
        .await;
    let result = match sent {
        Ok(r) => {
            let status = r.status().as_u16();
            let v: serde_json::Value = r.json().await.unwrap_or_default();
            Ok((status, v["event_id"].as_i64()))
        }
        Err(e) if e.is_timeout() => Err(format!("timed out: {e}")),
        Err(e) if e.is_connect() => Err(format!("refused: {e}")),
        Err(e) => Err(format!("failed: {e:?}")),
    };
    Answer {
        result,
        sent_at: started,
        took: started.elapsed(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_under_load_lose_no_webhook() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = tokio_util::sync::CancellationToken::new();
    let sim = start_sim(&token).await;
    let db = dir.path().join("skillsync.db");
    // server.listen is ignored: the passed socket wins.
    let config = dir.path().join("skillsync.toml");
    std::fs::write(&config, TestConfig::new(&db, &sim.base_url()).toml()).expect("config");
    // The socket a socket unit would hold: bound once, for every process.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!(
        "http://{}/skillsevent",
        listener.local_addr().expect("address")
    );
    let notify_path = dir.path().join("notify.sock");
    let notify = Arc::new(UnixDatagram::bind(&notify_path).expect("NOTIFY_SOCKET"));
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");

    let t0 = Instant::now();
    let mut terms = Vec::new();
    let mut daemon = Daemon::start(&listener, &notify_path, &config);
    wait_ready(&notify, "the first serve").await;

    // A new connection per webhook, as a sender that keeps none open.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(CLIENT_TIMEOUT)
        .build()
        .expect("client");
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, sim, url) = (stop.clone(), sim.clone(), url.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVERY);
            let mut sent = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                sent.push(tokio::spawn(one_webhook(
                    client.clone(),
                    url.clone(),
                    sim.clone(),
                )));
            }
            let mut answers = Vec::with_capacity(sent.len());
            for s in sent {
                answers.push(s.await.expect("webhook task"));
            }
            answers
        })
    };

    let mut logs = Vec::new();
    let mut gaps = Vec::new();
    for restart in 1..=RESTARTS {
        tokio::time::sleep(SERVE_FOR).await;
        let stopping = Instant::now();
        terms.push(stopping);
        let (code, log) = daemon.stop().await;
        assert_eq!(
            code,
            Some(0),
            "serve before restart {restart} exits 0: {log}"
        );
        logs.push(log);
        daemon = Daemon::start(&listener, &notify_path, &config);
        wait_ready(&notify, &format!("serve after restart {restart}")).await;
        gaps.push(stopping.elapsed());
    }
    tokio::time::sleep(SERVE_FOR).await;
    stop.store(true, Ordering::Relaxed);
    let answers = load.await.expect("load task");
    terms.push(Instant::now());
    let (code, log) = daemon.stop().await;
    assert_eq!(code, Some(0), "the last serve exits 0: {log}");
    logs.push(log);
    token.cancel();

    // Each failure with when it was sent and answered, against the SIGTERMs, for the message.
    let failed: Vec<String> = answers
        .iter()
        .filter_map(|a| {
            a.result.as_ref().err().map(|e| {
                format!(
                    "sent {:.3} s, failed {:.3} s after the start: {e}",
                    (a.sent_at - t0).as_secs_f64(),
                    (a.sent_at + a.took - t0).as_secs_f64()
                )
            })
        })
        .collect();
    let not_ok: Vec<u16> = answers
        .iter()
        .filter_map(|a| a.result.as_ref().ok())
        .map(|(s, _)| *s)
        .filter(|s| *s != 200)
        .collect();
    let context = || logs.join("\n----- next serve -----\n");
    assert!(
        failed.is_empty(),
        "{} of {} webhooks got no answer (refused, timed out or cut): {:?}; SIGTERMs at {:?} s\n{}",
        failed.len(),
        answers.len(),
        failed.iter().take(5).collect::<Vec<_>>(),
        terms
            .iter()
            .map(|t| format!("{:.3}", (*t - t0).as_secs_f64()))
            .collect::<Vec<_>>(),
        context()
    );
    assert!(
        not_ok.is_empty(),
        "{} of {} webhooks answered other than 200: {not_ok:?}",
        not_ok.len(),
        answers.len()
    );
    let acknowledged: Vec<i64> = answers
        .iter()
        .filter_map(|a| a.result.as_ref().ok().and_then(|(_, id)| *id))
        .collect();
    assert_eq!(
        acknowledged.len(),
        answers.len(),
        "every 200 names its event id"
    );
    // At ~50/s for about (RESTARTS + 1) × SERVE_FOR: the load really ran.
    assert!(
        answers.len() >= 50 * RESTARTS,
        "only {} webhooks sent",
        answers.len()
    );

    let conn =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open db");
    let mut stored = std::collections::HashSet::new();
    let mut q = conn.prepare("SELECT id FROM events").expect("query");
    for id in q.query_map([], |r| r.get::<_, i64>(0)).expect("ids") {
        stored.insert(id.expect("id"));
    }
    let missing: Vec<&i64> = acknowledged
        .iter()
        .filter(|id| !stored.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged events are not in events: {:?}",
        missing.len(),
        missing.iter().take(10).collect::<Vec<_>>()
    );
    let distinct: std::collections::HashSet<&i64> = acknowledged.iter().collect();
    assert_eq!(distinct.len(), acknowledged.len(), "one event per webhook");

    let mut took: Vec<Duration> = answers.iter().map(|a| a.took).collect();
    took.sort();
    let slowest = took.last().copied().unwrap_or_default();
    let p99 = took[(took.len() * 99 / 100).min(took.len() - 1)];
    crate::tools::notice(&format!(
        "restart::restarts_under_load_lose_no_webhook: {} webhooks over {RESTARTS} restarts, all 200 and recorded; \
         slowest answer {:.3} s, p99 {:.3} s; SIGTERM to the next READY=1: {}",
        answers.len(),
        slowest.as_secs_f64(),
        p99.as_secs_f64(),
        gaps.iter()
            .map(|g| format!("{:.2} s", g.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    ));
}
