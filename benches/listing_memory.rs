//! Peak memory of `skillsync serve` when four tenants' listings fire on one
//! cron tick and each is answered with a 60 MiB page (issue 24, item 4).
//!
//! The simulator (in this process) serves 500 jobs; every listing row is
//! padded with an extra field so that the first page of 500 rows is
//! `LISTING_PAGE_MIB` (60) MiB, the size of a hostile or broken server's
//! answer. The daemon (its own process, the release binary, or
//! `LISTING_BIN`) has four tenants on that simulator whose
//! `reconcile_schedule` fires on the same second; the measure is the
//! daemon's `VmHWM` (peak RSS) from `/proc` once the four job runs have
//! ended, and how each run ended.
//!
//! Reproduce: `cargo bench --bench listing_memory` (knobs:
//! `LISTING_RUNS` rounds, default 3; `LISTING_PAGE_MIB`, default 60;
//! `LISTING_PAGE_SIZE`, the `page_size` asked for and the jobs served,
//! default 500 (with 10000 and 15 MiB the page is within what its `take`
//! allows, and is parsed); `LISTING_BEFORE_BIN`, another build measured in
//! the same rounds, alternating, e.g. the previous release's binary).

mod common;
use common::{
    APP_SECRET, SECRET, cell, daemon_toml, env_usize, free_port, rss_mb, runtime, start_sim,
};

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Timelike;
use skillsync::model::DocType;
use skillsync::simulator::{Faults, Simulator};
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_skillsync");
const TENANTS: usize = 4;

/// One trial's result.
struct Trial {
    peak_mb: f64,
    /// How each tenant's job run ended (`status: error`).
    runs: Vec<String>,
    /// Seconds from the tick to the last run's end.
    secs: f64,
}

/// The config: tenant acme and three more on the simulator, every one's
/// incremental schedule firing at second `second` of each minute.
fn config(db: &Path, sim_base: &str, port: u16, second: u32, page_size: usize) -> String {
    let schedule = format!("{second} * * * * *");
    let mut toml = daemon_toml(
        db,
        sim_base,
        "",
        "",
        &format!("[fetch]\nconcurrency = 8\ntimeout_secs = 30\n[upstream]\nlisting_retry_secs = 5\npage_size = {page_size}"),
    )
    .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"))
    .replace(
        "reconcile_schedule = \"off\"",
        &format!("reconcile_schedule = \"{schedule}\""),
    );
    for i in 2..=TENANTS {
        toml.push_str(&format!(
            "\n[[tenant]]\nname = \"tenant{i}\"\nwebhook_secrets = [\"{SECRET}-{i}\"]\napi_base = \"{sim_base}\"\nextraction_base = \"{sim_base}\"\napp_tenant = \"bench-tenant\"\napp_id = \"bench-app\"\napp_secret = \"{APP_SECRET}\"\nreconcile_schedule = \"{schedule}\"\nfull_sweep_schedule = \"off\"\n"
        ));
    }
    toml
}

/// The job runs that have ended, as `status: error`.
fn ended_runs(db: &Path) -> Vec<String> {
    let Ok(c) =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return Vec::new();
    };
    let Ok(mut s) = c.prepare(
        "SELECT tenant, status, coalesce(error, '') FROM sync_runs
         WHERE doc_type = 'job' AND status <> 'running' ORDER BY tenant",
    ) else {
        return Vec::new();
    };
    s.query_map([], |r| {
        Ok(format!(
            "{}: {} {}",
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?
        ))
    })
    .map(|rows| rows.filter_map(Result::ok).collect())
    .unwrap_or_default()
}

fn trial(
    bin: &str,
    dir: &Path,
    sim: &Simulator,
    page_size: usize,
    round: usize,
    label: &str,
) -> Trial {
    let db = dir.join(format!("{label}-{round}.db"));
    let port = free_port();
    // The tick: at least 6 s from now (start-up), on a whole second.
    let tick = chrono::Utc::now() + chrono::Duration::seconds(7);
    let second = tick.second();
    let cfg = dir.join(format!("{label}-{round}.toml"));
    std::fs::write(&cfg, config(&db, &sim.base_url(), port, second, page_size)).expect("config");
    let log = std::fs::File::create(dir.join(format!("{label}-{round}.log"))).expect("log");
    let mut child: Child = Command::new(bin)
        .arg("--config")
        .arg(&cfg)
        .arg("serve")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start skillsync serve");
    let started = Instant::now();
    let fired = Instant::now()
        + (tick.with_nanosecond(0).unwrap_or(tick) - chrono::Utc::now())
            .to_std()
            .unwrap_or_default();
    let deadline = started + Duration::from_secs(180);
    let runs = loop {
        std::thread::sleep(Duration::from_millis(200));
        let runs = ended_runs(&db);
        if runs.len() >= TENANTS || Instant::now() > deadline {
            break runs;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("daemon exited early: {status}");
        }
    };
    let secs = fired.elapsed().as_secs_f64();
    let peak_mb = rss_mb(child.id()).1;
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    Trial {
        peak_mb,
        runs,
        secs,
    }
}

fn main() {
    let runs = env_usize("LISTING_RUNS", 3).max(1);
    let page_mib = env_usize("LISTING_PAGE_MIB", 60);
    let jobs = env_usize("LISTING_PAGE_SIZE", 500).clamp(1, 10_000);
    let rt = runtime();
    let _guard = rt.enter();
    skillsync::upstream::install_crypto();
    let token = CancellationToken::new();
    let sim = rt.block_on(start_sim(&token));
    sim.seed(DocType::Job, jobs);
    // A row is {"JobId": "<uuid>", "ModifiedOn": "<time>", "Padding": "x…"}.
    let padding = ((page_mib << 20) / jobs).saturating_sub(100);
    sim.set_faults(Faults {
        listing_row_padding: padding,
        ..Faults::default()
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bins = vec![("this build".to_string(), BIN.to_string())];
    if let Ok(before) = std::env::var("LISTING_BEFORE_BIN") {
        bins.insert(0, ("before".to_string(), before));
    }
    let mut peaks: Vec<Vec<f64>> = vec![Vec::new(); bins.len()];
    let mut secs: Vec<Vec<f64>> = vec![Vec::new(); bins.len()];
    let mut outcomes: Vec<Vec<String>> = vec![Vec::new(); bins.len()];
    for round in 0..runs {
        for (i, (label, bin)) in bins.iter().enumerate() {
            let label = label.replace(' ', "-");
            let t = trial(bin, dir.path(), &sim, jobs, round, &label);
            eprintln!(
                "round {}/{runs} {label}: peak RSS {:.1} MB, runs ended {:.1} s after the tick: {:?}",
                round + 1,
                t.peak_mb,
                t.secs,
                t.runs
            );
            peaks[i].push(t.peak_mb);
            secs[i].push(t.secs);
            outcomes[i] = t.runs;
        }
    }
    token.cancel();
    println!();
    println!(
        "{TENANTS} tenants' listings on one tick, each first page {page_mib} MiB ({jobs} rows of {padding} bytes of padding); {runs} rounds, median [min–max]"
    );
    println!();
    println!(
        "| daemon | peak RSS MB | runs ended after the tick, s | how the job runs ended (last round) |"
    );
    println!("|---|---:|---:|---|");
    for (i, (label, _)) in bins.iter().enumerate() {
        println!(
            "| {label} | {} | {} | {} |",
            cell(&peaks[i], 1),
            cell(&secs[i], 1),
            outcomes[i].join("; ")
        );
    }
}
