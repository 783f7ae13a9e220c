//! `skillsync demo`: the whole pipeline on this machine with no account.
//! Starts the simulator and the real daemon ([`Application`]) on loopback, sends
//! webhooks, changes and deletes documents upstream without webhooks, runs
//! reconciliation beside the daemon, then an accuracy audit that finds a
//! change nothing else could see (and a second that finds none), and prints
//! what the mirror holds.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::Application;
use crate::app::oneshot::OneShot;
use crate::config::Config;
use crate::model::{DocType, RunKind};
use crate::simulator::{SimCredentials, Simulator, send_webhooks};
use crate::store::Store;

/// `skillsync demo` options.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Where to write the demo database (replaced if it exists).
    #[arg(long, default_value = "skillsync-demo.db")]
    pub db: PathBuf,
    /// Jobs the simulator starts with.
    #[arg(long, default_value_t = 40)]
    pub jobs: usize,
    /// Projects the simulator starts with.
    #[arg(long, default_value_t = 8)]
    pub projects: usize,
}

const TENANT: &str = "demo";
const WEBHOOK_SECRET: &str = "demo-webhook-secret";

fn demo_config(db: &std::path::Path, base: &str) -> anyhow::Result<Config> {
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"
metrics_listen = "off"
[database]
path = {db:?}
[fetch]
concurrency = 8
timeout_secs = 5
retry_initial_secs = 1
[[tenant]]
name = "{TENANT}"
webhook_secrets = ["{WEBHOOK_SECRET}"]
api_base = "{base}"
extraction_base = "{base}"
app_tenant = "demo-tenant"
app_id = "demo-app"
app_secret = "demo-app-secret"
reconcile_schedule = "off"
full_sweep_schedule = "off"
audit_schedule = "off"
"#,
        db = db.display().to_string()
    );
    Ok(Config::from_toml(&toml, None)?)
}

async fn wait_for(
    store: &Store,
    what: &str,
    deadline: Duration,
    pred: impl Fn(&[crate::store::StatusRow]) -> bool,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let rows = store.status().await?;
        if pred(&rows) {
            return Ok(());
        }
        if start.elapsed() > deadline {
            anyhow::bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn count(
    rows: &[crate::store::StatusRow],
    ty: DocType,
    f: impl Fn(&crate::store::StatusRow) -> i64,
) -> i64 {
    rows.iter()
        .filter(|r| r.tenant == TENANT && r.doc_type == ty)
        .map(f)
        .sum()
}

/// Runs the demo; returns when the daemon has stopped.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    for suffix in ["", "-wal", "-shm"] {
        let mut p = args.db.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
    let token = CancellationToken::new();
    let sim = Simulator::start(
        TcpListener::bind("127.0.0.1:0").await?,
        SimCredentials {
            app_tenant: "demo-tenant".into(),
            app_id: "demo-app".into(),
            app_secret: "demo-app-secret".into(),
        },
        token.clone(),
    )?;
    let jobs = sim.seed(DocType::Job, args.jobs);
    let projects = sim.seed(DocType::Project, args.projects);
    println!(
        "1. Simulator with {} jobs and {} projects at {}",
        jobs.len(),
        projects.len(),
        sim.base_url()
    );

    let config = demo_config(&args.db, &sim.base_url())?;
    let app = Application::build(config.clone()).await?;
    let webhook_url = format!("http://{}{}", app.address()?, config.server.webhook_path);
    let store = app.store().clone();
    let daemon = tokio::spawn(app.run(token.clone()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    if daemon.is_finished() {
        return daemon
            .await
            .context("daemon task")?
            .context("the daemon stopped at start");
    }
    println!("2. Daemon listening for webhooks at {webhook_url}");

    let payloads = jobs
        .iter()
        .map(|id| sim.webhook_payload(DocType::Job, id, "created"))
        .chain(
            projects
                .iter()
                .map(|id| sim.webhook_payload(DocType::Project, id, "created")),
        )
        .collect::<Vec<_>>();
    let n = payloads.len();
    let r = send_webhooks(&webhook_url, WEBHOOK_SECRET, payloads, 8, None).await;
    println!(
        "3. Sent {n} `created` webhooks: {} acknowledged (200) after a durable commit",
        r.acked.len()
    );
    if r.acked.len() != n {
        anyhow::bail!(
            "not every webhook was acknowledged: answers by status {:?}",
            r.statuses
        );
    }
    let (nj, np) = (jobs.len() as i64, projects.len() as i64);
    wait_for(
        &store,
        "the first webhooks to be mirrored",
        Duration::from_secs(30),
        |rows| {
            count(rows, DocType::Job, |r| r.mirrored) == nj
                && count(rows, DocType::Project, |r| r.mirrored) == np
        },
    )
    .await?;
    println!("   mirrored: {nj} jobs, {np} projects");

    // Stage changes announced by webhooks (a burst of 3 per job: coalesced).
    let moved: Vec<&String> = jobs.iter().take(10).collect();
    let mut payloads = Vec::new();
    for id in &moved {
        sim.update(DocType::Job, id);
        for _ in 0..3 {
            payloads.push(sim.webhook_payload(DocType::Job, id, "updated"));
        }
    }
    let gets_before = sim.total_gets();
    send_webhooks(&webhook_url, WEBHOOK_SECRET, payloads, 8, None).await;
    wait_for(&store, "the updates", Duration::from_secs(30), |rows| {
        count(rows, DocType::Job, |r| r.pending_events + r.queued_fetches) == 0
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    println!(
        "4. 10 jobs moved stage, 30 `updated` webhooks sent: {} upstream fetches (bursts coalesced)",
        sim.total_gets() - gets_before
    );

    // Changes nobody announces: reconciliation must find them.
    for id in jobs.iter().skip(10).take(5) {
        sim.update(DocType::Job, id);
    }
    let created = sim.seed(DocType::Job, 3);
    sim.delete(DocType::Job, &jobs[jobs.len() - 1]);
    sim.update(DocType::Project, &projects[0]);
    println!(
        "5. Upstream without webhooks: 5 jobs changed, 3 created, 1 deleted, 1 project changed"
    );

    let cfg = Arc::new(config.clone());
    let quiet = CancellationToken::new();
    for (step, kind) in [
        (
            "6. skillsync reconcile (incremental), beside the running daemon:",
            RunKind::Incremental,
        ),
        (
            "7. skillsync reconcile --full (detects deletions):",
            RunKind::Full,
        ),
    ] {
        println!("{step}");
        let report = crate::app::oneshot::reconcile_once(
            cfg.clone(),
            OneShot::everything(kind),
            quiet.clone(),
        )
        .await;
        print!("{report}");
        report.outcome()?;
    }

    // A change no webhook and no reconciliation can see: the content moves,
    // ModifiedOn and Version do not. Only the accuracy audit finds it.
    let quiet_job = &jobs[jobs.len() / 2];
    if let Some(mut doc) = sim.documents(DocType::Job).remove(quiet_job) {
        doc.insert("Client".into(), serde_json::json!("Changed Quietly Ltd"));
        sim.put_raw(DocType::Job, quiet_job, doc);
    }
    for step in [
        "8. Upstream changed one job's Client without a new ModifiedOn or a webhook (no reconciliation can see it).\n   skillsync verify, the accuracy audit (GETs a sample and compares it by content):",
        "9. skillsync verify again, after the refetch:",
    ] {
        println!("{step}");
        let report = crate::app::verify::verify_once(
            cfg.clone(),
            crate::app::verify::VerifyWhat::everything(),
            quiet.clone(),
        )
        .await;
        print!("{report}");
        if !report.errors.is_empty() {
            anyhow::bail!("the audit did not run: {}", report.errors.join("; "));
        }
    }

    let rows = store.status().await?;
    println!("\nWhat the mirror holds ({}):", args.db.display());
    for r in &rows {
        println!(
            "  {:<8} mirrored {:>3}  deleted {:>2}  pending {:>2}  dead {:>2}  drift (missed by webhooks) {:>2}  complete as of {}",
            r.doc_type,
            r.mirrored,
            r.deleted,
            r.pending_events,
            r.dead_events,
            r.missed_total,
            r.complete_as_of.as_deref().unwrap_or("-")
        );
    }
    let expect_jobs = nj + created.len() as i64 - 1;
    let jobs_now = count(&rows, DocType::Job, |r| r.mirrored);
    println!("\nA few jobs (most revised first):");
    for s in store.sample(TENANT.into(), DocType::Job, 5).await? {
        println!(
            "  {}  {:<8} {:<28} stage {:<12} revision {}{}",
            s.id,
            s.number.unwrap_or_default(),
            s.name.unwrap_or_default(),
            s.stage.unwrap_or_default(),
            s.revision,
            s.deleted_at
                .map(|d| format!("  deleted upstream at {d}"))
                .unwrap_or_default()
        );
    }
    token.cancel();
    daemon.await.context("daemon task")??;
    let db = std::fs::canonicalize(&args.db).unwrap_or(args.db.clone());
    println!("\nDatabase: {}", db.display());
    println!(
        "Try:  sqlite3 -readonly {} \"SELECT stage, client, count(*) AS jobs FROM job_report GROUP BY stage, client\"",
        db.display()
    );
    println!(
        "      sqlite3 -readonly {} \"SELECT * FROM sync_status\"",
        db.display()
    );
    println!("Demo finished in {:.1}s.", started.elapsed().as_secs_f64());
    if jobs_now != expect_jobs {
        anyhow::bail!("expected {expect_jobs} live jobs in the mirror, found {jobs_now}");
    }
    Ok(())
}
