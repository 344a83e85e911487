//! The admin console: the virtual database `sluice`, for users listed in `admin_users`.
//!
//! Speaks the simple query protocol: `SHOW POOLS|CLIENTS|SERVERS|STATS|GROUP_STATS|DATABASES|
//! USERS|LISTS|CONFIG|GROUPS|VERSION|HELP`, `PAUSE [db]`, `RESUME [db]`, `KILL db`,
//! `RECONNECT [db]`, `WAIT_CLOSE [db]`, `RELOAD`, `SHUTDOWN`. Column names follow PgBouncer's where the concept is the same,
//! so habits and scripts carry over.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;

use crate::client_conn::{ClientConn, Exit};
use crate::clients::ClientState;
use crate::config::{Config, PoolMode};
use crate::context::{Context, VERIFY_GROUP, VERIFY_USER};
use crate::error::{sqlstate, PgError, Side};
use crate::protocol::backend::{Out, TxStatus};
use crate::protocol::frontend::{self, tag};
use crate::server::ServerState;

/// Largest admin command accepted.
const MAX_COMMAND: usize = 64 * 1024;
/// How long PAUSE waits for lent server connections to come back.
const PAUSE_WAIT: Duration = Duration::from_secs(30);

/// The columns SHOW CLIENTS and SHOW SERVERS share (PgBouncer's names).
const CONNECTION_COLUMNS: &[(&str, bool)] = &[
    ("type", false),
    ("user", false),
    ("database", false),
    ("state", false),
    ("addr", false),
    ("port", true),
    ("connect_time", false),
];

type Table = (Vec<(&'static str, bool)>, Vec<Vec<Option<String>>>);

/// `out` holds the end of authentication, sent with the greeting.
pub async fn serve(
    ctx: &Arc<Context>,
    conn: &mut ClientConn,
    user: &str,
    mut out: BytesMut,
) -> Exit {
    for (name, value) in [
        ("server_version", "15.0 (Sluice admin console)"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("standard_conforming_strings", "on"),
        ("integer_datetimes", "on"),
    ] {
        Out::parameter_status(&mut out, name, value);
    }
    Out::backend_key_data(&mut out, 0, 0);
    Out::ready_for_query(&mut out, TxStatus::Idle);
    if conn.send(&out).await.is_err() {
        return Exit::Quiet;
    }
    tracing::info!(%user, "admin console session");
    let mut extended_error = false;
    loop {
        let msg = match conn.read_message(MAX_COMMAND).await {
            Ok(msg) => msg,
            Err(e) => return e.into(),
        };
        out.clear();
        match msg.tag {
            tag::TERMINATE => return Exit::Quiet,
            tag::QUERY => {
                let sql = match frontend::query(&msg.body) {
                    Ok(q) => String::from_utf8_lossy(q).into_owned(),
                    Err(e) => return PgError::protocol_violation(e.to_string()).into(),
                };
                run_command(ctx, &sql, &mut out).await;
                Out::ready_for_query(&mut out, TxStatus::Idle);
            }
            tag::SYNC => {
                if std::mem::take(&mut extended_error) {
                    PgError::error(
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        "the admin console supports only simple queries",
                    )
                    .with_side(Side::Client)
                    .encode(&mut out);
                }
                Out::ready_for_query(&mut out, TxStatus::Idle);
            }
            _ => extended_error = true,
        }
        if !out.is_empty() && conn.send(&out).await.is_err() {
            return Exit::Quiet;
        }
    }
}

async fn run_command(ctx: &Arc<Context>, sql: &str, out: &mut BytesMut) {
    let raw: Vec<&str> = sql
        .trim()
        .trim_end_matches(';')
        .split_whitespace()
        .collect();
    let words: Vec<String> = raw.iter().map(|w| w.to_ascii_uppercase()).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    // A database argument, as written (names are case-sensitive), quotes dropped.
    let db = raw.get(1).map(|d| d.trim_matches('"'));
    let table = match words.as_slice() {
        [] => {
            Out::empty_query_response(out);
            return;
        }
        ["SHOW", "POOLS"] => pools(ctx),
        ["SHOW", "CLIENTS"] => clients(ctx),
        ["SHOW", "SERVERS"] => servers(ctx),
        ["SHOW", "STATS"] => database_stats(ctx),
        ["SHOW", "GROUP_STATS"] => stats(ctx),
        ["SHOW", "CONFIG"] => config(&ctx.config()),
        ["SHOW", "GROUPS"] => groups(ctx),
        ["SHOW", "DATABASES"] => databases(ctx),
        ["SHOW", "USERS"] => users(ctx),
        ["SHOW", "LISTS"] => lists(ctx),
        ["SHOW", "VERSION"] => (
            vec![("version", false)],
            vec![vec![s(concat!("Sluice ", env!("CARGO_PKG_VERSION")))]],
        ),
        ["SHOW", "HELP"] | ["HELP"] => help(),
        ["PAUSE" | "RESUME" | "KILL" | "RECONNECT" | "WAIT_CLOSE", ..] if words.len() <= 2 => {
            if let Err(e) = control(ctx, words[0], db).await {
                e.with_side(Side::Client).encode(out);
            } else {
                Out::command_complete(out, words[0]);
            }
            return;
        }
        ["SHUTDOWN"] => {
            shutdown(ctx);
            Out::command_complete(out, "SHUTDOWN");
            return;
        }
        ["RELOAD"] => {
            match ctx.reload().await {
                Ok(()) => Out::command_complete(out, "RELOAD"),
                Err(e) => PgError::error(sqlstate::INTERNAL_ERROR, format!("RELOAD failed: {e}"))
                    .encode(out),
            }
            return;
        }
        _ => {
            let msg = format!("unknown admin command: {}; try SHOW HELP", sql.trim());
            PgError::error(sqlstate::SYNTAX_ERROR, msg)
                .with_side(Side::Client)
                .encode(out);
            return;
        }
    };
    let (columns, rows) = table;
    Out::row_description(out, &columns);
    for row in &rows {
        let values: Vec<Option<&str>> = row.iter().map(|v| v.as_deref()).collect();
        Out::data_row(out, &values);
    }
    Out::command_complete(out, &format!("SHOW {}", rows.len()));
}

/// `PAUSE`, `RESUME`, `KILL`, `RECONNECT` and `WAIT_CLOSE`, for one database or (without one,
/// where allowed) all.
async fn control(ctx: &Arc<Context>, command: &str, db: Option<&str>) -> Result<(), PgError> {
    if let Some(db) = db {
        if !ctx.config().databases.contains_key(db) && !ctx.pools.has_database(db) {
            return Err(PgError::error(
                sqlstate::INVALID_CATALOG_NAME,
                format!("{command}: no database \"{db}\""),
            ));
        }
    }
    let wait_idle = |deadline: Option<tokio::time::Instant>,
                     what: fn(&Context, Option<&str>) -> u32| {
        let ctx = ctx.clone();
        let db = db.map(str::to_string);
        async move {
            while what(&ctx, db.as_deref()) > 0 {
                if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            true
        }
    };
    match (command, db) {
        ("PAUSE", None) => {
            ctx.pools.set_paused(true);
            let done = wait_idle(Some(tokio::time::Instant::now() + PAUSE_WAIT), |c, _| {
                c.pools.active()
            })
            .await;
            tracing::info!(done, "pools paused from the admin console");
        }
        ("PAUSE", Some(d)) => {
            ctx.pools.set_database_paused(Some(d), true);
            let done = wait_idle(Some(tokio::time::Instant::now() + PAUSE_WAIT), |c, d| {
                c.pools.active_in(d)
            })
            .await;
            tracing::info!(database = d, done, "database paused from the admin console");
        }
        ("RESUME", None) => {
            ctx.pools.set_paused(false);
            ctx.pools.set_database_paused(None, false);
            tracing::info!("pools resumed from the admin console");
        }
        ("RESUME", Some(d)) => {
            ctx.pools.set_database_paused(Some(d), false);
            tracing::info!(database = d, "database resumed from the admin console");
        }
        ("KILL", Some(d)) => {
            ctx.pools.set_database_paused(Some(d), true);
            let clients = ctx.clients.kick_database(d);
            let servers = ctx.pools.reconnect(Some(d));
            tracing::warn!(
                database = d,
                clients,
                idle_servers_closed = servers,
                "KILL from the admin console: its clients are disconnected and it is paused until RESUME"
            );
        }
        ("KILL", None) => {
            return Err(PgError::error(
                sqlstate::SYNTAX_ERROR,
                "KILL needs a database: KILL name",
            ))
        }
        ("RECONNECT", d) => {
            let closed = ctx.pools.reconnect(d);
            tracing::info!(
                database = d.unwrap_or("*"),
                idle_servers_closed = closed,
                "RECONNECT from the admin console: the others close as they come back"
            );
        }
        ("WAIT_CLOSE", _) => {
            wait_idle(None, |c, d| c.pools.close_needed(d)).await;
        }
        _ => {}
    }
    Ok(())
}

/// `SHUTDOWN`: what SIGTERM does, `/readyz` 503 for `shutdown_grace`, then stop accepting and
/// drain.
fn shutdown(ctx: &Arc<Context>) {
    let ctx = ctx.clone();
    tracing::info!("SHUTDOWN from the admin console");
    tokio::spawn(async move { ctx.shut_down(std::future::pending()).await });
}

fn database_stats(ctx: &Context) -> Table {
    let us = |d: Duration| d.as_micros().to_string();
    let rows = ctx
        .pools
        .database_stats()
        .into_iter()
        .map(|d| {
            let n = d.transactions.max(1) as u32;
            vec![
                s(&d.database),
                s(d.transactions),
                Some(us(d.transaction_time)),
                Some(us(d.wait_time)),
                Some(us(d.transaction_time / n)),
                Some(us(d.wait_time / n)),
            ]
        })
        .collect();
    let cols = vec![
        ("database", false),
        ("total_xact_count", true),
        ("total_xact_time", true),
        ("total_wait_time", true),
        ("avg_xact_time", true),
        ("avg_wait_time", true),
    ];
    (cols, rows)
}

fn databases(ctx: &Context) -> Table {
    let cfg = ctx.config();
    let stats = ctx.pools.database_stats();
    let rows = cfg
        .databases
        .keys()
        .map(|name| {
            let d = stats.iter().find(|d| d.database == *name);
            let mode = match cfg.pool_mode_for(name) {
                PoolMode::Transaction => "transaction",
                PoolMode::Session => "session",
            };
            vec![
                s(name),
                s(&cfg.server_host),
                s(cfg.server_port),
                s(cfg.server_dbname(name)),
                s(cfg.pool_size_for(name)),
                s(cfg.min_pool_size_for(name)),
                s(mode),
                s(d.map_or(0, |d| d.connections)),
                s(u8::from(d.is_some_and(|d| d.paused))),
                s(0),
            ]
        })
        .collect();
    let cols = vec![
        ("name", false),
        ("host", false),
        ("port", true),
        ("database", false),
        ("pool_size", true),
        ("min_pool_size", true),
        ("pool_mode", false),
        ("current_connections", true),
        ("paused", true),
        ("disabled", true),
    ];
    (cols, rows)
}

fn users(ctx: &Context) -> Table {
    let cfg = ctx.config();
    let servers = ctx.servers.snapshot();
    let clients = ctx.clients.snapshot();
    let rows = cfg
        .users
        .keys()
        .map(|name| {
            vec![
                s(name),
                s(servers.iter().filter(|i| i.user == *name).count()),
                s(clients.iter().filter(|(_, c)| *c.user == *name).count()),
                s(if cfg.admin_users.contains(name) {
                    "yes"
                } else {
                    "no"
                }),
            ]
        })
        .collect();
    let cols = vec![
        ("name", false),
        ("current_connections", true),
        ("current_client_connections", true),
        ("admin", false),
    ];
    (cols, rows)
}

fn lists(ctx: &Context) -> Table {
    let cfg = ctx.config();
    let pools = ctx.pools.pool_stats();
    let clients = ctx.clients.state_counts();
    let (used, free, login) = ctx.pools.server_counts();
    let rows = [
        ("databases", cfg.databases.len()),
        ("users", cfg.users.len()),
        ("pools", pools.len()),
        ("groups", ctx.pools.group_stats().len()),
        ("used_clients", clients.iter().sum()),
        ("waiting_clients", clients[ClientState::Waiting as usize]),
        ("free_servers", free as usize),
        ("used_servers", used as usize),
        ("login_servers", login as usize),
    ]
    .iter()
    .map(|(k, v)| vec![s(k), s(v)])
    .collect();
    (vec![("list", false), ("items", true)], rows)
}

fn s(v: impl ToString) -> Option<String> {
    Some(v.to_string())
}

fn time(t: SystemTime) -> Option<String> {
    s(humantime::format_rfc3339_seconds(t))
}

fn pools(ctx: &Context) -> Table {
    let cfg = ctx.config();
    // Client counts by pool: [active, waiting, idle], from each client's own state.
    let mut by_pool: std::collections::HashMap<(String, String), [u32; 3]> = Default::default();
    for (_, c) in ctx.clients.snapshot() {
        let counts = by_pool
            .entry((c.database.to_string(), c.user.to_string()))
            .or_default();
        match c.state() {
            ClientState::Active => counts[0] += 1,
            ClientState::Waiting => counts[1] += 1,
            ClientState::Idle => counts[2] += 1,
        }
    }
    let rows = ctx
        .pools
        .pool_stats()
        .into_iter()
        .map(|p| {
            let mode = match cfg.pool_mode_for(&p.database) {
                PoolMode::Transaction => "transaction",
                PoolMode::Session => "session",
            };
            let key = (p.database.clone(), p.user.clone());
            let [cl_active, cl_waiting, cl_idle] = by_pool.get(&key).copied().unwrap_or_default();
            let user = match p.user.as_str() {
                VERIFY_USER => VERIFY_GROUP,
                user => user,
            };
            vec![
                s(&p.database),
                s(user),
                s(cl_active),
                s(cl_waiting),
                s(cl_idle),
                s(p.active),
                s(p.idle),
                s(p.connecting),
                s(p.size),
                s(mode),
            ]
        })
        .collect();
    let cols = vec![
        ("database", false),
        ("user", false),
        ("cl_active", true),
        ("cl_waiting", true),
        ("cl_idle", true),
        ("sv_active", true),
        ("sv_idle", true),
        ("sv_login", true),
        ("pool_size", true),
        ("pool_mode", false),
    ];
    (cols, rows)
}

fn clients(ctx: &Context) -> Table {
    let rows = ctx
        .clients
        .snapshot()
        .into_iter()
        .map(|(pid, c)| {
            let server = c.server();
            vec![
                s("C"),
                s(&c.user),
                s(&c.database),
                s(c.state().as_str()),
                c.addr.map(|a| a.ip().to_string()),
                c.addr.map(|a| a.port().to_string()),
                time(c.connected_at()),
                s(pid),
                s(&c.application_name),
                server.map(|k| k.process_id.to_string()),
                s(if c.tls { "TLS" } else { "" }),
            ]
        })
        .collect();
    let cols = [
        CONNECTION_COLUMNS,
        &[
            ("pid", true),
            ("application_name", false),
            ("server_pid", true),
            ("tls", false),
        ],
    ]
    .concat();
    (cols, rows)
}

fn servers(ctx: &Context) -> Table {
    let rows = ctx
        .servers
        .snapshot()
        .into_iter()
        .map(|i| {
            let state = match i.state() {
                ServerState::Active => "active",
                ServerState::Idle => "idle",
            };
            vec![
                s("S"),
                s(&i.user),
                s(&i.database),
                s(state),
                s(i.addr.ip()),
                s(i.addr.port()),
                time(i.connected_at),
                s(i.process_id),
                s(match (i.tls, i.channel_binding) {
                    (true, true) => "TLS, channel binding",
                    (true, false) => "TLS",
                    _ => "",
                }),
            ]
        })
        .collect();
    let cols = [CONNECTION_COLUMNS, &[("remote_pid", true), ("tls", false)]].concat();
    (cols, rows)
}

fn stats(ctx: &Context) -> Table {
    let us = |d: Duration| d.as_micros().to_string();
    let rows = ctx
        .pools
        .group_stats()
        .into_iter()
        .map(|g| {
            let n = g.transactions.max(1) as u32;
            vec![
                s(&g.name),
                s(g.transactions),
                Some(us(g.transaction_time)),
                Some(us(g.wait_time)),
                s(g.rejected),
                Some(us(g.transaction_time / n)),
                Some(us(g.wait_time / n)),
            ]
        })
        .collect();
    let cols = vec![
        ("group", false),
        ("total_xact_count", true),
        ("total_xact_time", true),
        ("total_wait_time", true),
        ("total_rejected", true),
        ("avg_xact_time", true),
        ("avg_wait_time", true),
    ];
    (cols, rows)
}

fn groups(ctx: &Context) -> Table {
    let rows = ctx
        .pools
        .group_stats()
        .into_iter()
        .map(|g| {
            vec![
                s(&g.name),
                s(g.active),
                s(g.waiting),
                g.max_connections.map(|m| m.to_string()),
                s(g.reserved),
            ]
        })
        .collect();
    let cols = vec![
        ("group", false),
        ("active", true),
        ("waiting", true),
        ("max_connections", true),
        ("reserved_connections", true),
    ];
    (cols, rows)
}

/// Every key with its value; secrets are masked.
fn config(cfg: &Config) -> Table {
    let mut rows = Vec::new();
    if let Ok(value) = toml::Value::try_from(cfg) {
        flatten("", &value, &mut rows);
    }
    (vec![("key", false), ("value", false)], rows)
}

fn flatten(prefix: &str, v: &toml::Value, rows: &mut Vec<Vec<Option<String>>>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, rows);
            }
        }
        other => {
            let secret = prefix.ends_with("password") || prefix == "upstream";
            let shown = match other {
                toml::Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            rows.push(vec![
                s(prefix),
                if secret { s("********") } else { Some(shown) },
            ]);
        }
    }
}

fn help() -> Table {
    let rows = [
        "SHOW POOLS",
        "SHOW CLIENTS",
        "SHOW SERVERS",
        "SHOW STATS",
        "SHOW GROUP_STATS",
        "SHOW DATABASES",
        "SHOW USERS",
        "SHOW LISTS",
        "SHOW CONFIG",
        "SHOW GROUPS",
        "SHOW VERSION",
        "PAUSE [db]",
        "RESUME [db]",
        "KILL db",
        "RECONNECT [db]",
        "WAIT_CLOSE [db]",
        "RELOAD",
        "SHUTDOWN",
    ]
    .iter()
    .map(|c| vec![s(c)])
    .collect();
    (vec![("command", false)], rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_rows_mask_secrets() {
        let mut cfg = Config::default();
        cfg.users.insert(
            "app".into(),
            crate::config::UserConfig {
                password: Some("hunter2".into()),
                ..Default::default()
            },
        );
        let (_, rows) = config(&cfg);
        let find = |k: &str| {
            rows.iter()
                .find(|r| r[0].as_deref() == Some(k))
                .and_then(|r| r[1].clone())
        };
        assert_eq!(find("users.app.password").as_deref(), Some("********"));
        assert_eq!(find("pool_size").as_deref(), Some("20"));
        assert_eq!(find("wait_timeout").as_deref(), Some("5s"));
        assert!(rows.iter().all(|r| r[1].as_deref() != Some("hunter2")));
    }
}
