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
