//! The once-a-second housekeeping: the readiness probe (and a real login when none has shown
//! lately that the server serves), idle clients disconnected, idle and aged server connections
//! closed, `min_pool_size` warm connections opened, server gauges set.

use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};

use crate::check;
use crate::context::Context;
use crate::metrics;
use crate::pool::Lease;
use crate::server::{self, ServerConn, Target};

/// Once a second: probes the server for readiness, closes idle and aged server connections and
/// those the server has closed, and keeps `min_pool_size` warm ones.
pub async fn run(ctx: Arc<Context>, status: Arc<crate::status::Status>) {
    let ready = ctx.ready.clone();
    let logging_in = Arc::new(AtomicBool::new(false));
    let reading_limits = Arc::new(AtomicBool::new(false));
    let mut ticks: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        ticks += 1;
        let cfg = ctx.config();
        let connector = ctx.tls().connector;
        let up = server::probe(
            &connector,
            &cfg.server_host,
            cfg.server_port,
            Duration::from_secs(1),
        )
        .await;
        ready.upstream_ok.store(up, Ordering::Relaxed);
        if let Some((database, user)) = ready.stale(cfg.first_login()) {
            if !logging_in.swap(true, Ordering::AcqRel) {
                let (ctx, logging_in) = (ctx.clone(), logging_in.clone());
                tokio::spawn(async move {
                    login(&ctx, &database, &user).await;
                    logging_in.store(false, Ordering::Release);
                });
            }
        }
        let limits_due = ready.budget_pending.load(Ordering::Relaxed)
            || ready.budget_unchecked.load(Ordering::Relaxed);
        if limits_due
            && up
            && ticks % LIMITS_RETRY_TICKS == 0
            && !reading_limits.swap(true, Ordering::AcqRel)
        {
            let (ctx, reading_limits) = (ctx.clone(), reading_limits.clone());
            tokio::spawn(async move {
                server_limits(&ctx).await;
                reading_limits.store(false, Ordering::Release);
            });
        }
        let kicked = ctx.clients.sweep();
        if kicked > 0 {
            tracing::debug!(
                clients = kicked,
                "client_idle_timeout: disconnecting idle clients"
            );
        }
        let dead = ctx.pools.reap(
            tokio::time::Instant::now(),
            cfg.server_idle_timeout,
            cfg.server_lifetime,
        );
        drop(dead);
        // Idle connections the server has closed or spoken on (a restart's 57P01, a backend
        // terminated): gone within a second, so warm pools refill before a client needs them.
        let gone = ctx.pools.reap_gone(|conn| !conn.is_reusable());
        drop(gone);
        for slot in ctx.pools.warm_slots() {
            let Some(stats) = ctx.pools.pool_stats().into_iter().nth(slot.pool().0) else {
                continue;
            };
            let ctx = ctx.clone();
            tokio::spawn(
                async move { fill(&ctx, slot, &stats.database, &stats.user, "warm-up").await },
            );
        }
        server_gauges(&ctx);
        status.sample(&ctx);
    }
}

/// Seconds between attempts to read the server's limit while it is due.
const LIMITS_RETRY_TICKS: u64 = 3;

/// Reads the server's limit that start-up could not: derives the budget from it
/// (`max_server_connections = 0`) or checks the configured one against it.
async fn server_limits(ctx: &Context) {
    let cfg = ctx.config();
    let Some((database, user)) = cfg.first_login() else {
        return;
    };
    let connector = ctx.tls().connector;
    let password = ctx.server_password(&user);
    let server = format!("{}:{}", cfg.server_host, cfg.server_port);
    let limits = match check::read_limits(&cfg, &connector, password, &database, &user).await {
        Ok((_, limits)) => limits,
        Err(e) => {
            let fix = check::advice(&e, &cfg, &database, &user);
            tracing::debug!(%server, error = %e, %fix, "cannot read the server's max_connections yet");
            return;
        }
    };
    if ctx.ready.budget_pending.load(Ordering::Relaxed) {
        match limits.derived_budget() {
            Some(budget) => {
                ctx.set_budget(budget);
                ctx.ready.budget_pending.store(false, Ordering::Relaxed);
                tracing::info!(%server, limits = %limits.describe(), max_server_connections = budget, "derived the server connection budget from the server's max_connections");
            }
            None => {
                tracing::error!(%server, limits = %limits.describe(), "the server leaves no room for a budget: raise its max_connections or set max_server_connections");
            }
        }
    } else if ctx.ready.budget_unchecked.swap(false, Ordering::Relaxed) {
        match limits.budget_problem(cfg.max_server_connections) {
            None => {
                tracing::info!(%server, limits = %limits.describe(), max_server_connections = cfg.max_server_connections, "the budget fits below the server's limit")
            }
            Some(problem) => {
                tracing::error!(%server, %problem, "max_server_connections does not fit below the server's limit: lower it and RELOAD")
            }
        }
    }
}

/// Logs in to the server as `user` to `database` for readiness: nothing else has shown lately
/// whether logins succeed. The login takes a spare slot of the pool, inside the budget and
/// `max_connecting`, and its connection stays in the pool; with no slot spare, sessions are
/// busy logging in or holding every connection, and nothing is done.
async fn login(ctx: &Context, database: &str, user: &str) {
    let cfg = ctx.config();
    let pool = ctx.pools.pool(
        database,
        user,
        cfg.pool_size_for(database),
        cfg.min_pool_size_for(database),
    );
    if let Some(slot) = ctx.pools.spare_slot(pool) {
        fill(ctx, slot, database, user, "readiness login").await;
    }
}

/// Connects a slot of the pool for (`database`, `user`) and puts the connection in the pool.
async fn fill(
    ctx: &Context,
    mut slot: Lease<Box<ServerConn>>,
    database: &str,
    user: &str,
    what: &str,
) {
    let cfg = ctx.config();
    let connector = ctx.tls().connector;
    let target = Target::new(&cfg, &connector, ctx.server_password(user), database, user);
    match ServerConn::connect(&target, database, &ctx.servers).await {
        Ok(conn) => {
            ctx.record_login(slot.pool(), database, user, Ok(&conn));
            slot.fill(Box::new(conn));
            slot.release();
        }
        Err(e) => {
            ctx.record_login(slot.pool(), database, user, Err(&e));
            tracing::warn!(error = %e, %database, %user, "{what} failed");
        }
    }
}

/// Sets the server connection gauges from the pools' state.
pub fn server_gauges(ctx: &Context) {
    let (active, idle, connecting) = ctx.pools.server_counts();
    let g = metrics::global();
    g.servers_active.set(f64::from(active));
    g.servers_idle.set(f64::from(idle));
    g.servers_connecting.set(f64::from(connecting));
    ctx.pools.set_oldest_wait_gauges();
    let (tls, plain) = ctx.servers.tls_counts();
    g.servers_tls.set(tls as f64);
    g.servers_plain.set(plain as f64);
}
