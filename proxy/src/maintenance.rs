//! The once-a-second housekeeping: the readiness probe (and a real login when none has shown
//! lately that the server serves), idle clients disconnected, idle and aged server connections
//! closed, `min_pool_size` warm connections opened, server gauges set.

use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};

use crate::context::Context;
use crate::metrics;
use crate::pool::Lease;
use crate::server::{self, ServerConn, Target};

/// Once a second: probes the server for readiness, closes idle and aged server connections,
/// and keeps `min_pool_size` warm ones.
pub async fn run(ctx: Arc<Context>) {
    let ready = ctx.ready.clone();
    let logging_in = Arc::new(AtomicBool::new(false));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
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
        let first = cfg
            .databases
            .keys()
            .next()
            .cloned()
            .zip(cfg.users.keys().next().cloned());
        if let Some((database, user)) = ready.stale(first) {
            if !logging_in.swap(true, Ordering::AcqRel) {
                let (ctx, logging_in) = (ctx.clone(), logging_in.clone());
                tokio::spawn(async move {
                    login(&ctx, &database, &user).await;
                    logging_in.store(false, Ordering::Release);
                });
            }
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
    let (mut active, mut idle, mut connecting) = (0, 0, 0);
    for p in ctx.pools.pool_stats() {
        active += p.active.saturating_sub(p.connecting);
        idle += p.idle;
        connecting += p.connecting;
    }
    let g = metrics::global();
    g.servers_active.set(f64::from(active));
    g.servers_idle.set(f64::from(idle));
    g.servers_connecting.set(f64::from(connecting));
    let (tls, plain) = ctx.servers.tls_counts();
    g.servers_tls.set(tls as f64);
    g.servers_plain.set(plain as f64);
}
