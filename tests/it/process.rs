//! `skillsync serve` as a real process (kill -9, SIGTERM, environment
//! failpoints, CLI commands against its config), for the tests where a
//! process boundary matters.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use skillsync::model::DocType;
use skillsync::simulator::Simulator;

use crate::helpers::{SECRET_ACME, TestConfig, free_port, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_skillsync");
const PATIENCE: Duration = Duration::from_secs(60);

/// `skillsync serve` as a process, killed with SIGKILL on drop.
pub struct Process {
    pub child: Child,
    log: PathBuf,
    config: PathBuf,
    pub listen: String,
}

impl Process {
    pub fn spawn(dir: &Path, db: &Path, sim: &Simulator, extra: &str, n: usize) -> Process {
        Process::spawn_env(dir, db, sim, extra, n, &[])
    }

    /// [`Process::spawn`] with the settings changed by `edit` first.
    pub fn spawn_edited(
        dir: &Path,
        db: &Path,
        sim: &Simulator,
        extra: &str,
        n: usize,
        edit: impl Fn(&mut TestConfig),
    ) -> Process {
        Process::spawn_full(dir, db, sim, extra, n, &[], edit)
    }

    /// [`Process::spawn`] with extra environment.
    pub fn spawn_env(
        dir: &Path,
        db: &Path,
        sim: &Simulator,
        extra: &str,
        n: usize,
        env: &[(&str, &Path)],
    ) -> Process {
        Process::spawn_full(dir, db, sim, extra, n, env, |_| {})
    }

    fn spawn_full(
        dir: &Path,
        db: &Path,
        sim: &Simulator,
        extra: &str,
        n: usize,
        env: &[(&str, &Path)],
        edit: impl Fn(&mut TestConfig),
    ) -> Process {
        let port = free_port();
        let mut settings = TestConfig::new(db, &sim.base_url()).on_port(port);
        settings.sections = extra.to_string();
        edit(&mut settings);
        let config = dir.join(format!("serve-{n}.toml"));
        settings.write(&config);
        let log = dir.join(format!("serve-{n}.log"));
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .env("RUST_LOG", "info,tokio_cron_scheduler=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start serve");
        Process {
            child,
            log,
            config,
            listen: format!("127.0.0.1:{port}"),
        }
    }

    /// Sends one webhook to this daemon; the HTTP status.
    pub async fn notify(&self, sim: &Simulator, ty: DocType, id: &str, action: &str) -> u16 {
        reqwest::Client::new()
            .post(format!("http://{}/skillsevent", self.listen))
            .header("content-type", "application/json")
            .header("x-webhook-secret", SECRET_ACME)
            .body(sim.webhook_payload(ty, id, action).to_string())
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    /// Sends one webhook; the event id of a 200 answer.
    pub async fn notify_event(
        &self,
        client: &reqwest::Client,
        sim: &Simulator,
        ty: DocType,
        id: &str,
        action: &str,
    ) -> Option<i64> {
        let r = client
            .post(format!("http://{}/skillsevent", self.listen))
            .header("content-type", "application/json")
            .header("x-webhook-secret", SECRET_ACME)
            .body(sim.webhook_payload(ty, id, action).to_string())
            .send()
            .await
            .ok()?;
        if r.status() != 200 {
            return None;
        }
        let v: serde_json::Value = r.json().await.ok()?;
        v["event_id"].as_i64()
    }

    /// `skillsync <args> --config <this daemon's config>`, to run.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args).arg("--config").arg(&self.config);
        c
    }

    /// Waits until the daemon answers `/healthz`.
    pub async fn ready(&self) {
        let url = format!("http://{}/healthz", self.listen);
        wait_until(PATIENCE, "serve to answer", || {
            let r = reqwest::get(url.clone());
            async move { r.await.map(|r| r.status() == 200).unwrap_or(false) }
        })
        .await;
    }

    /// `skillsync <args> --config <this daemon's config>`: exit code and stdout.
    pub fn command(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("run skillsync");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Stops a daemon the way systemd does (SIGTERM) and waits for it.
pub fn terminate(mut p: Process) {
    let pid = p.child.id().to_string();
    let ok = crate::helpers::kill(["-TERM", &pid]).expect("kill");
    assert!(ok.success());
    let status = p.child.wait().expect("wait for serve");
    assert!(status.success(), "serve exited {status:?}:\n{}", p.log());
}

/// Webhooks sent in the background, one every `every` (a new job every
/// fifth, else an update of one already sent), to whichever daemon
/// `target` names (tests point it at a restarted one); records when each
/// event was acknowledged (a 200 with its id). Failed sends are skipped.
pub struct Stream {
    pub target: Arc<Mutex<String>>,
    acked: Arc<Mutex<Vec<(Instant, i64)>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Stream {
    pub fn start(p: &Process, sim: &Simulator, every: Duration) -> Stream {
        let target = Arc::new(Mutex::new(p.listen.clone()));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (t, a, s, sim) = (target.clone(), acked.clone(), stop.clone(), sim.clone());
        let task = tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut ids: Vec<String> = Vec::new();
            let mut n = 0usize;
            let mut tick = tokio::time::interval(every);
            while !s.is_cancelled() {
                tick.tick().await;
                let (id, action) = if n % 5 == 0 || ids.is_empty() {
                    let id = sim.create(DocType::Job);
                    ids.push(id.clone());
                    (id, "created")
                } else {
                    let id = ids[n % ids.len()].clone();
                    sim.update(DocType::Job, &id);
                    (id, "updated")
                };
                n += 1;
                let listen = t.lock().map(|l| l.clone()).unwrap_or_default();
                let r = client
                    .post(format!("http://{listen}/skillsevent"))
                    .header("content-type", "application/json")
                    .header("x-webhook-secret", SECRET_ACME)
                    .body(sim.webhook_payload(DocType::Job, &id, action).to_string())
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await;
                if let Ok(r) = r {
                    if r.status() == 200 {
                        if let Ok(v) = r.json::<serde_json::Value>().await {
                            if let Some(e) = v["event_id"].as_i64() {
                                a.lock().expect("acked").push((Instant::now(), e));
                            }
                        }
                    }
                }
            }
        });
        Stream {
            target,
            acked,
            stop,
            task,
        }
    }

    /// Events acknowledged before `t`.
    pub fn acked_before(&self, t: Instant) -> Vec<i64> {
        self.acked
            .lock()
            .expect("acked")
            .iter()
            .filter(|(at, _)| *at < t)
            .map(|(_, e)| *e)
            .collect()
    }

    /// How many events were acknowledged after `t`.
    pub fn acked_after(&self, t: Instant) -> usize {
        self.acked
            .lock()
            .expect("acked")
            .iter()
            .filter(|(at, _)| *at >= t)
            .count()
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// The event ids of `ids` missing from the `events` table of the database at `db`.
pub fn missing_events(db: &Path, ids: &[i64]) -> Vec<i64> {
    let c = rusqlite::Connection::open(db).expect("open the copy");
    let mut q = c
        .prepare("SELECT 1 FROM events WHERE id = ?1")
        .expect("prepare");
    ids.iter()
        .copied()
        .filter(|id| !q.exists([id]).expect("query"))
        .collect()
}

/// `PRAGMA integrity_check` of the database at `db`.
pub fn integrity(db: &Path) -> String {
    let c = rusqlite::Connection::open(db).expect("open");
    c.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0))
        .expect("integrity_check")
}
