//! What Sluice learns about its server before serving: whether each configured login works,
//! the server's connection limit, and whether the budget fits below it. `sluice check` prints
//! it all; start-up derives the budget from it (`max_server_connections = 0`) or checks the
//! configured one against it.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use crate::config::Config;
use crate::server::{self, ServerConn, ServerError, ServerPassword, Target};
use crate::tls::Connector;

/// Connections kept back from the derived budget for administrators and migrations.
const HEADROOM_FRACTION: f64 = 0.1;

/// The server's connection limit, as it reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    pub max_connections: i64,
    /// `superuser_reserved_connections` plus `reserved_connections` (PostgreSQL 16).
    pub reserved: i64,
    /// Client backends connected now (Sluice's, and everyone else's).
    pub connected: i64,
}

impl ServerLimits {
    /// Connections roles without a reservation may open (on RDS that includes the master
    /// user, which is not a superuser).
    pub fn usable(&self) -> i64 {
        self.max_connections - self.reserved
    }

    /// Connections left to administrators and migrations: 10 % of the usable ones, at least 2.
    pub fn headroom(&self) -> i64 {
        ((self.usable() as f64 * HEADROOM_FRACTION).ceil() as i64).max(2)
    }

    /// The budget Sluice takes when none is configured: the usable connections minus the
    /// headroom; `None` when that leaves nothing.
    pub fn derived_budget(&self) -> Option<u32> {
        u32::try_from(self.usable() - self.headroom())
            .ok()
            .filter(|b| *b >= 1)
    }

    /// What is wrong with `budget` against this limit, if anything.
    pub fn budget_problem(&self, budget: u32) -> Option<String> {
        let usable = self.usable();
        let room = usable - i64::from(budget);
        (room <= 0).then(|| {
            format!(
                "max_server_connections {budget} {} the {usable} connections the server allows \
                 ordinary roles (max_connections {} minus {} reserved), leaving {} for \
                 administrators, migrations and anything else: lower it to {} or less",
                if room < 0 { "exceeds" } else { "takes all of" },
                self.max_connections,
                self.reserved,
                room.max(0),
                (usable - self.headroom()).max(1),
            )
        })
    }

    /// One line for the log and `sluice check`.
    pub fn describe(&self) -> String {
        format!(
            "max_connections {}, {} reserved (superuser_reserved_connections, \
             reserved_connections): {} for ordinary roles; {} connected now",
            self.max_connections,
            self.reserved,
            self.usable(),
            self.connected
        )
    }
}

/// Logs in as `user` to `database` (the name clients use) and reads the server's limits.
pub async fn read_limits(
    cfg: &Config,
    tls: &Arc<Connector>,
    password: Option<Arc<ServerPassword>>,
    database: &str,
    user: &str,
) -> Result<(ServerConn, ServerLimits), ServerError> {
    let t = Target::new(cfg, tls, password, database, user);
    let mut conn = ServerConn::connect(&t, database, &server::ServerRegistry::default()).await?;
    let row = conn
        .read_row(
            "SELECT current_setting('max_connections'), \
             current_setting('superuser_reserved_connections'), \
             coalesce(current_setting('reserved_connections', true), '0'), \
             (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')",
        )
        .await?;
    let num = |i: usize| -> i64 { row.get(i).and_then(|v| v.parse().ok()).unwrap_or(0) };
    let limits = ServerLimits {
        max_connections: num(0),
        reserved: num(1) + num(2),
        connected: num(3),
    };
    Ok((conn, limits))
}

/// What an operator should do about a failed server connection, in one sentence.
pub fn advice(e: &ServerError, cfg: &Config, database: &str, user: &str) -> String {
    let server = format!("{}:{}", cfg.server_host, cfg.server_port);
    match e {
        ServerError::Connect { source, .. } if is_dns(source) => format!(
            "the name {} does not resolve: check server_host (or upstream's host) and this host's DNS",
            cfg.server_host
        ),
        ServerError::Connect { .. } => format!(
            "nothing accepts connections at {server}: check server_host and server_port (or \
             upstream), and that the database is running"
        ),
        ServerError::ConnectTimeout(_) => format!(
            "{server} did not answer within server_connect_timeout ({}): check that security \
             groups, network ACLs and firewalls let this host reach it",
            humantime::format_duration(cfg.server_connect_timeout)
        ),
        ServerError::Tls { .. } | ServerError::TlsUnsupported { .. } => {
            "fix server_tls, server_tls_ca_file or the host name (for RDS: server_tls = \
             \"verify-full\" with the RDS certificate bundle)"
                .to_string()
        }
        ServerError::LoginRefused { rds_iam: true, .. } => format!(
            "the server refused Sluice's RDS IAM token for \"{user}\": the role needs GRANT \
             rds_iam TO \"{user}\", Sluice's AWS identity a policy allowing rds-db:connect on \
             dbuser:<resource id>/{user}, and server_host ({}) must be the database's endpoint \
             name, which the token is signed for",
            cfg.server_host
        ),
        ServerError::LoginRefused { error, .. }
            if error.code() == crate::protocol::sqlstate::INVALID_PASSWORD
                && cfg.separate_control_user() == Some(user) =>
        {
            format!(
                "the server refused the password Sluice has for its own login as \"{user}\": \
                 fix control_password or control_password_file"
            )
        }
        ServerError::LoginRefused { error, .. }
            if error.code() == crate::protocol::sqlstate::INVALID_PASSWORD =>
        {
            format!(
                "the server refused the password Sluice has for \"{user}\": fix \
                 users.{user}.server_password or server_password_file (or upstream's password)"
            )
        }
        ServerError::LoginRefused { error, .. } if error.message().contains("no encryption") => {
            "the server accepts only encrypted connections (RDS for PostgreSQL 15 and later by \
             default): set server_tls = \"verify-full\" and server_tls_ca_file"
                .to_string()
        }
        ServerError::LoginRefused { .. } => format!(
            "the server's pg_hba.conf has no entry that lets \"{user}\" connect from this host: \
             add one, or connect as another user"
        ),
        ServerError::Rejected(error) if error.code().class() == "3D" => format!(
            "the server has no database \"{}\": check databases.{database}.dbname (or upstream's path)",
            cfg.server_dbname(database)
        ),
        ServerError::Auth(why) => why.clone(),
        _ if e.is_outage() => format!(
            "{server} is unavailable (restarting, shutting down or a standby): Sluice waits for it"
        ),
        _ => "see the server's log for why it refused".to_string(),
    }
}

fn is_dns(e: &std::io::Error) -> bool {
    // The resolver's failures reach std as "failed to lookup address information: ...".
    e.kind() != std::io::ErrorKind::ConnectionRefused && e.to_string().contains("lookup")
}

/// The outcome of `sluice check`: the report to print and whether anything is wrong.
pub struct Report {
    pub text: String,
    pub problems: usize,
}

/// Logs in to every configured database as every user with a server credential, reads the
/// server's limits and checks the budget against them.
pub async fn run(cfg: &Config) -> Result<Report, crate::tls::TlsError> {
    let tls = crate::tls::TlsState::load(cfg)?;
    let server = format!("{}:{}", cfg.server_host, cfg.server_port);
    let mut text = String::new();
    let mut problems = 0;
    let iam = match server::rds_iam_tokens(cfg, None).await {
        Ok(tokens) => tokens,
        Err(e) => {
            problems += 1;
            let _ = writeln!(text, "  FAIL  server_auth = \"rds_iam\": {e}");
            None
        }
    };
    let passwords: HashMap<String, Arc<ServerPassword>> = ServerPassword::all(cfg, iam.as_ref());
    let _ = writeln!(
        text,
        "server {server} (server_tls = {})",
        cfg.server_tls.as_str()
    );
    let mut limits = None;
    // Sluice's own login first (readiness and the budget depend on it), then every user on
    // every database.
    let mut logins: Vec<(String, String)> = cfg
        .control_user
        .as_ref()
        .and(cfg.first_login())
        .into_iter()
        .collect();
    for database in cfg.databases.keys() {
        for user in cfg.users.keys() {
            let login = (database.clone(), user.clone());
            if !logins.contains(&login) {
                logins.push(login);
            }
        }
    }
    for (database, user) in &logins {
        let (database, user) = (database.as_str(), user.as_str());
        let password = passwords.get(user).cloned();
        match read_limits(cfg, &tls.connector, password, database, user).await {
            Ok((conn, l)) => {
                let how = if conn.info.tls {
                    if conn.info.channel_binding {
                        "TLS, channel binding"
                    } else {
                        "TLS"
                    }
                } else {
                    "no TLS"
                };
                let _ = writeln!(text, "  ok    {user}@{database}: logged in ({how})");
                limits.get_or_insert(l);
            }
            Err(e) => {
                problems += 1;
                let _ = writeln!(text, "  FAIL  {user}@{database}: {e}");
                let _ = writeln!(text, "        fix: {}", advice(&e, cfg, database, user));
            }
        }
    }
    match limits {
        Some(l) => {
            let _ = writeln!(text, "  limit {}", l.describe());
            let budget = match cfg.max_server_connections {
                0 => l.derived_budget(),
                b => Some(b),
            };
            let how = if cfg.max_server_connections == 0 {
                "derived: the usable connections minus 10 %, at least 2"
            } else {
                "configured"
            };
            match budget.map(|b| (b, l.budget_problem(b))) {
                Some((b, None)) => {
                    let _ = writeln!(
                        text,
                        "  ok    max_server_connections {b} ({how}) leaves {} for administrators and other clients",
                        l.usable() - i64::from(b)
                    );
                }
                Some((_, Some(problem))) => {
                    problems += 1;
                    let _ = writeln!(text, "  FAIL  {problem}");
                }
                None => {
                    problems += 1;
                    let _ = writeln!(
                        text,
                        "  FAIL  the server's limit leaves no room for a budget: raise max_connections"
                    );
                }
            }
        }
        None => {
            problems += 1;
            let _ = writeln!(
                text,
                "  FAIL  no login worked, so the server's max_connections is unknown"
            );
        }
    }
    let _ = match problems {
        0 => writeln!(text, "verdict: ok"),
        1 => writeln!(text, "verdict: 1 problem"),
        n => writeln!(text, "verdict: {n} problems"),
    };
    Ok(Report { text, problems })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: i64, reserved: i64) -> ServerLimits {
        ServerLimits {
            max_connections: max,
            reserved,
            connected: 0,
        }
    }

    #[test]
    fn the_budget_is_measured_against_the_connections_ordinary_roles_may_open() {
        // A default db.t4g.micro: max_connections 81 (RDS's formula), 3 reserved.
        let l = limits(81, 3);
        assert_eq!(l.usable(), 78);
        assert_eq!(l.headroom(), 8);
        assert_eq!(l.derived_budget(), Some(70));
        assert_eq!(l.budget_problem(70), None);
        assert_eq!(l.budget_problem(77), None);
        let all = l.budget_problem(78).expect("no room left");
        assert!(all.contains("takes all of the 78"), "{all}");
        let over = l.budget_problem(100).expect("over");
        assert!(
            over.contains("exceeds the 78") && over.contains("lower it to 70"),
            "{over}"
        );
        // Tiny servers: at least 2 kept back, and nothing derived when nothing is left.
        assert_eq!(limits(10, 3).derived_budget(), Some(5));
        assert_eq!(limits(5, 3).derived_budget(), None);
    }
}
