//! What the benchmarks share (included with `mod common;`): the daemon's
//! config, the credentials its simulator expects and starting that
//! simulator, and the statistics — the median of several rounds with their
//! spread, formatted for the tables.

#![allow(dead_code)]

use std::path::Path;

use skillsync::simulator::{SimCredentials, Simulator};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Tenant acme's webhook secret in every benchmark.
pub const SECRET: &str = "bench-webhook-secret-0123456789";
/// The API secret the simulator expects.
pub const APP_SECRET: &str = "bench-app-secret-0123456789";

/// The credentials the simulator checks (those [`daemon_toml`] sends).
pub fn creds() -> SimCredentials {
    SimCredentials {
        app_tenant: "bench-tenant".into(),
        app_id: "bench-app".into(),
        app_secret: APP_SECRET.into(),
    }
}

/// A simulator on a fresh loopback port that accepts [`creds`]; it stops
/// with `token`.
pub async fn start_sim(token: &CancellationToken) -> Simulator {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    Simulator::start(listener, creds(), token.clone()).unwrap()
}

/// A daemon config: tenant acme against the simulator at `sim_base`,
/// schedules off, the database at `db`; `server` and `database` add keys to
/// those sections, `sections` adds whole sections (`[fetch]`, `[upstream]`).
pub fn daemon_toml(
    db: &Path,
    sim_base: &str,
    server: &str,
    database: &str,
    sections: &str,
) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
metrics_listen = "off"
{server}
[database]
path = "{db}"
{database}
{sections}
[[tenant]]
name = "acme"
webhook_secrets = ["{SECRET}"]
api_base = "{sim_base}"
extraction_base = "{sim_base}"
app_tenant = "bench-tenant"
app_id = "bench-app"
app_secret = "{APP_SECRET}"
reconcile_schedule = "off"
full_sweep_schedule = "off"
"#,
        db = db.display()
    )
}

/// A knob from the environment, or its default.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Median, min and max.
pub fn summary(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let med = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    (med, s[0], s[n - 1])
}

/// "median [min–max]", or just the median when every round agreed.
pub fn cell(v: &[f64], prec: usize) -> String {
    let (m, lo, hi) = summary(v);
    if (hi - lo).abs() < f64::EPSILON {
        format!("{m:.prec$}")
    } else {
        format!("{m:.prec$} [{lo:.prec$}–{hi:.prec$}]")
    }
}

/// Median time to append 4 KiB and `fdatasync` it in `dir` (50 tries): how
/// busy the shared disk is right now (context for the numbers, not a result).
pub fn fsync_probe_ms(dir: &Path) -> f64 {
    use std::io::Write;
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).expect("probe file");
    let block = [0u8; 4096];
    let mut v = Vec::new();
    for _ in 0..50 {
        let t = std::time::Instant::now();
        f.write_all(&block).expect("probe write");
        f.sync_data().expect("probe fdatasync");
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let _ = std::fs::remove_file(&path);
    summary(&v).0
}

/// The benches' tokio runtime: two workers, as many as the machine's cores.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A loopback port free now (bound, then released for the daemon to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// RSS and peak RSS (`VmHWM`) of process `pid` in MB, from `/proc`; NaN
/// where it cannot be read.
pub fn rss_mb(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| -> f64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (kb("VmRSS:") / 1024.0, kb("VmHWM:") / 1024.0)
}

/// A wrk Lua script that posts `payloads` round robin, JSON with tenant
/// acme's [`SECRET`]; with `delay_ms`, each connection waits that long
/// between its requests (wrk's `delay()`).
pub fn wrk_script(payloads: &[serde_json::Value], delay_ms: Option<u64>) -> String {
    let bodies: Vec<String> = payloads.iter().map(|p| format!("[==[{p}]==]")).collect();
    let delay = match delay_ms {
        Some(ms) => format!("function delay() return {ms} end\n"),
        None => String::new(),
    };
    format!(
        r#"local bodies = {{ {} }}
local reqs = {{}}
local n = 0
function init(args)
  for i, b in ipairs(bodies) do
    reqs[i] = wrk.format("POST", nil, {{["Content-Type"] = "application/json", ["X-Webhook-Secret"] = "{SECRET}"}}, b)
  end
end
function request()
  n = n % #reqs + 1
  return reqs[n]
end
{delay}"#,
        bodies.join(", ")
    )
}

/// `skillsync serve` (the binary `bin`) as its own process with the config
/// file `config`, stderr to `log`, listening on `port`. Stopped with
/// SIGTERM by [`Serve::stop`]; killed on drop if still running, so a bench
/// that panics leaves no daemon loading the host for the next measurement.
pub struct Serve {
    child: std::process::Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Serve {
    /// Starts it and waits (up to 120 s) until it accepts connections.
    pub fn start(bin: &str, config: &Path, log: &Path, port: u16) -> Serve {
        use std::time::{Duration, Instant};
        let file = std::fs::File::create(log).expect("log file");
        let mut child = std::process::Command::new(bin)
            .arg("--config")
            .arg(config)
            .arg("serve")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start skillsync serve");
        let deadline = Instant::now() + Duration::from_secs(120);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "skillsync serve exited ({status}) before listening; see {}",
                    log.display()
                );
            }
            assert!(Instant::now() < deadline, "daemon not listening in 120 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Serve {
            child,
            port,
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The webhook URL (the default `webhook_path`).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/skillsevent", self.port)
    }

    /// Its stderr log.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// SIGTERM (the daemon's clean stop) and up to 60 s to exit, then kill.
    pub fn stop(mut self) {
        use std::time::{Duration, Instant};
        let _ = std::process::Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// POSTs one webhook `body` to `url` as JSON with tenant acme's [`SECRET`].
pub async fn post_webhook(
    client: &reqwest::Client,
    url: &str,
    body: String,
) -> reqwest::Result<reqwest::Response> {
    client
        .post(url)
        .header("content-type", "application/json")
        .header("x-webhook-secret", SECRET)
        .body(body)
        .send()
        .await
}
