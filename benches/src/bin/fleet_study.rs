//! The fleet scale study (benches/fleet-study.sh writes benches/FLEET.md from its output): the
//! real coordinator, as `--instances` Sluice instances in this process, each with its own
//! pools, client port and coordination session, sharing `--budget` through one PostgreSQL,
//! under phases of function-like load that move between the instances.
//!
//! Each client holds a connection to one instance and runs `SELECT pg_sleep(0.02)` transactions
//! back to back (a warm function container). Every 100 ms the sampler reads each instance's
//! fleet view and pools. Reported per phase: transactions per second; the time until the fleet
//! serves 90 % of the demand it can serve (demand per instance: its clients plus its
//! coordination session, over the fleet, up to the budget less the spare slot); budget wasted:
//! slots held by instances whose pools had room while clients elsewhere waited; the most slots
//! the fleet held at once. The server's own count comes from its log
//! (`--pg-log`, log_connections and log_disconnections). An idle phase measures what
//! coordination alone costs the server: statements (pg_stat_database.xact_commit) and CPU time
//! of the coordination backends (/proc/PID/stat), per instance per second.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use clap::Parser;
use sluice::config::{Config, Overrides};

#[derive(Parser)]
struct Args {
    /// PostgreSQL for the instances: postgres://USER:PASSWORD@HOST:PORT/DB.
    #[arg(long)]
    upstream: String,
    /// A superuser's URL, for the server-side measurements.
    #[arg(long)]
    superuser: String,
    /// The server's log file (log_connections, log_disconnections, %p in the prefix).
    #[arg(long)]
    pg_log: std::path::PathBuf,
    #[arg(long, default_value_t = 50)]
    instances: usize,
    #[arg(long, default_value_t = 400)]
    budget: u32,
    /// Seconds per phase.
    #[arg(long, default_value_t = 10)]
    phase_secs: u64,
    #[arg(long, default_value_t = 1000)]
    fleet_interval_ms: u64,
}

/// One phase: how many clients each instance gets.
struct Phase {
    name: &'static str,
    clients: Vec<usize>,
}

#[derive(Default, Clone)]
struct Sample {
    at: Duration,
    held: Vec<u32>,
    pool_budget: Vec<u32>,
    lent: Vec<u32>,
    waiting: Vec<u32>,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let n = args.instances;
    let mut handles = Vec::with_capacity(n);
    for _ in 0..n {
        let flags = Overrides {
            upstream: Some(args.upstream.clone()),
            listen: Some("127.0.0.1:0".parse()?),
            admin_listen: Some("127.0.0.1:0".parse()?),
            max_server_connections: Some(args.budget),
            pool_size: Some(args.budget),
        };
        let mut cfg = Config::load(None, &flags).context("configuration")?;
        cfg.fleet = Some("study".into());
        cfg.fleet_interval = Duration::from_millis(args.fleet_interval_ms);
        cfg.max_waiting = 20_000;
        cfg.max_client_connections = 20_000;
        cfg.wait_timeout = Duration::from_secs(60);
        cfg.shed_target = Duration::from_secs(60);
        cfg.client_login_timeout = Duration::from_secs(60);
        handles.push(sluice::start(cfg).await.context("an instance starts")?);
    }
    let started = Instant::now();
    loop {
        let joined = handles
            .iter()
            .filter(|h| {
                h.context
                    .fleet
                    .view()
                    .is_some_and(|v| v.members as usize == n)
            })
            .count();
        if joined == n {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "only {joined} of {n} joined"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "joined: {n} instances in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let log_from = std::fs::metadata(&args.pg_log)?.len() as usize;

    let (su, su_conn) = tokio_postgres::connect(&args.superuser, tokio_postgres::NoTls).await?;
    tokio::spawn(su_conn);
    // The study's own connection is not the fleet's.
    let own: i32 = su.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    let idle = coordination_cost(&su, n, Duration::from_secs(args.phase_secs)).await?;
    println!(
        "idle coordination: {:.2} statements and {:.2} ms of server CPU per instance per second (fleet_interval {} ms)",
        idle.0, idle.1, args.fleet_interval_ms
    );

    let hot = (n / 5).max(1);
    let per = |count: usize, on: std::ops::Range<usize>| -> Vec<usize> {
        let width = on.len().max(1);
        (0..n)
            .map(|i| {
                if on.contains(&i) {
                    count / width + usize::from(i - on.start < count % width)
                } else {
                    0
                }
            })
            .collect()
    };
    let phases = [
        Phase {
            name: "spread: 4 clients on every instance",
            clients: per(4 * n, 0..n),
        },
        Phase {
            name: "burst: 400 clients on the first fifth",
            clients: per(400, 0..hot),
        },
        Phase {
            name: "the burst moves to the last fifth",
            clients: per(400, n - hot..n),
        },
        Phase {
            name: "everyone bursts: 16 clients per instance",
            clients: per(16 * n, 0..n),
        },
        Phase {
            name: "quiet: 1 client on every instance",
            clients: per(n, 0..n),
        },
    ];
    let addrs: Vec<_> = handles.iter().map(|h| h.local_addr).collect();
    let user_db = user_and_db(&args.upstream)?;
    println!();
    println!("| phase | tx/s | 90 % of servable demand served after | budget wasted: mean, max (slots) | most slots held by the fleet |");
    println!("|---|---|---|---|---|");
    for phase in &phases {
        let r = run_phase(
            phase,
            &handles,
            &addrs,
            &user_db,
            args.budget,
            Duration::from_secs(args.phase_secs),
        )
        .await;
        println!(
            "| {} | {:.0} | {} | {:.1}, {} | {} |",
            phase.name,
            r.tps,
            r.rebalanced
                .map_or("not within the phase".into(), |d| format!(
                    "{:.2} s",
                    d.as_secs_f64()
                )),
            r.waste_mean,
            r.waste_max,
            r.max_held
        );
    }
    let log = std::fs::read_to_string(&args.pg_log)?;
    let worst = concurrency_after(&log, log_from, &own.to_string());
    println!();
    println!(
        "server's own count (its log, coordination sessions included): at most {worst} connections at once; budget {}",
        args.budget
    );
    for h in handles {
        h.stop().await;
    }
    anyhow::ensure!(
        worst <= args.budget as usize,
        "the server saw {worst} connections at once, over the budget of {}",
        args.budget
    );
    Ok(())
}

struct PhaseResult {
    tps: f64,
    rebalanced: Option<Duration>,
    waste_mean: f64,
    waste_max: u32,
    max_held: u32,
}

async fn run_phase(
    phase: &Phase,
    handles: &[sluice::Handle],
    addrs: &[std::net::SocketAddr],
    (user, password, db): &(String, String, String),
    budget: u32,
    length: Duration,
) -> PhaseResult {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for (i, count) in phase.clients.iter().enumerate() {
        for _ in 0..*count {
            let url = format!(
                "postgres://{user}:{password}@{}:{}/{db}",
                addrs[i].ip(),
                addrs[i].port()
            );
            let (stop, done) = (stop.clone(), done.clone());
            clients.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((c, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                    else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    tokio::spawn(conn);
                    while !stop.load(Ordering::Relaxed) {
                        if c.simple_query("SELECT pg_sleep(0.02)").await.is_err() {
                            break;
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
    }
    let begin = Instant::now();
    let mut samples = Vec::new();
    while begin.elapsed() < length {
        samples.push(sample(handles, begin));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tps = done.load(Ordering::Relaxed) as f64 / begin.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    // Servable demand: each instance's clients and its coordination session, up to the budget
    // less the spare slot.
    let demand: Vec<u32> = phase.clients.iter().map(|c| 1 + *c as u32).collect();
    let servable = (demand.iter().sum::<u32>()).min(budget.saturating_sub(1)) as f64;
    let rebalanced = samples
        .iter()
        .find(|s| {
            let served: u32 = s.held.iter().zip(&demand).map(|(h, d)| (*h).min(*d)).sum();
            f64::from(served) >= 0.9 * servable
        })
        .map(|s| s.at);
    let waste: Vec<u32> = samples
        .iter()
        .map(|s| {
            if s.waiting.iter().sum::<u32>() == 0 {
                return 0;
            }
            s.pool_budget
                .iter()
                .zip(&s.lent)
                .zip(&s.waiting)
                .filter(|(_, w)| **w == 0)
                .map(|((b, l), _)| b.saturating_sub(*l))
                .sum()
        })
        .collect();
    let max_held = samples
        .iter()
        .map(|s| s.held.iter().sum::<u32>())
        .max()
        .unwrap_or(0);
    PhaseResult {
        tps,
        rebalanced,
        waste_mean: waste.iter().sum::<u32>() as f64 / waste.len().max(1) as f64,
        waste_max: waste.iter().copied().max().unwrap_or(0),
        max_held,
    }
}

fn sample(handles: &[sluice::Handle], begin: Instant) -> Sample {
    let mut s = Sample {
        at: begin.elapsed(),
        ..Default::default()
    };
    for h in handles {
        let v = h.context.fleet.view().unwrap_or_default();
        let (lent, waiting, _) = h.context.pools.demand();
        s.held.push(v.held);
        s.pool_budget.push(v.pool_budget);
        s.lent.push(lent);
        s.waiting.push(waiting);
    }
    s
}

/// Statements (counted by the coordinator) and server CPU milliseconds of the coordination
/// backends (/proc/PID/stat) per instance per second while no client is served.
async fn coordination_cost(
    su: &tokio_postgres::Client,
    n: usize,
    length: Duration,
) -> Result<(f64, f64)> {
    let pids: Vec<i32> = su
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'sluice-fleet%'",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    anyhow::ensure!(
        pids.len() == n,
        "{} coordination sessions for {n} instances",
        pids.len()
    );
    let cpu = |pids: &[i32]| -> u64 {
        pids.iter()
            .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
            .filter_map(|s| {
                let rest = s.rsplit_once(") ")?.1.to_string();
                let f: Vec<&str> = rest.split(' ').collect();
                Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
            })
            .sum()
    };
    let statements = || sluice::coordinator::STATEMENTS.load(Ordering::Relaxed);
    let (s0, t0, at) = (statements(), cpu(&pids), Instant::now());
    tokio::time::sleep(length).await;
    let (s1, t1) = (statements(), cpu(&pids));
    let secs = at.elapsed().as_secs_f64() * n as f64;
    // /proc's CPU times are in clock ticks (USER_HZ, 100 on Linux).
    Ok(((s1 - s0) as f64 / secs, (t1 - t0) as f64 * 10.0 / secs))
}

fn user_and_db(url: &str) -> Result<(String, String, String)> {
    let rest = url
        .strip_prefix("postgres://")
        .context("a postgres:// URL")?;
    let (cred, rest) = rest.split_once('@').context("user:password@")?;
    let (user, password) = cred.split_once(':').context("user:password")?;
    let db = rest.split_once('/').context("/database")?.1;
    let db = db.split('?').next().unwrap_or(db);
    Ok((user.into(), password.into(), db.into()))
}

/// The most connections open at once in a server log with log_connections and
/// log_disconnections (`[pid]` in each line's prefix), from byte `from` on, counting those
/// opened before, except the backend `except`; a pid with a single line (a port probe) is no
/// connection.
fn concurrency_after(log: &str, from: usize, except: &str) -> usize {
    let pid = |line: &str| {
        line.split_once(" [")
            .and_then(|(_, rest)| rest.split_once(']'))
            .map(|(pid, _)| pid.to_string())
    };
    let mut lines_of: HashMap<String, usize> = HashMap::new();
    for p in log.lines().filter_map(pid) {
        *lines_of.entry(p).or_default() += 1;
    }
    let mut open = HashSet::new();
    let (mut max, mut at) = (0, 0);
    for line in log.lines() {
        let counts = at >= from;
        at += line.len() + 1;
        let Some(p) = pid(line).filter(|p| lines_of[p] > 1 && p != except) else {
            continue;
        };
        if line.contains("LOG:  connection received:") {
            open.insert(p);
        } else if line.contains("LOG:  disconnection:") || line.contains("FATAL:") {
            open.remove(&p);
        }
        if counts {
            max = max.max(open.len());
        }
    }
    max
}
