//! Opening connections with tokio-postgres (no TLS), and turning connection
//! failures at the edge (preflight, setup, verify) into clear messages.

use std::time::Duration;

use tokio_postgres::{Client, Config, NoTls};

use crate::retry::{classify, full_message};
use crate::LoadtestError;

/// Parse a URL or key=value string, tagging connections so they are easy
/// to spot in `pg_stat_activity` and the proxy's logs.
pub fn parse_config(url: &str) -> Result<Config, LoadtestError> {
    let mut cfg: Config = url.parse().map_err(|e| {
        LoadtestError::Config(format!(
            "invalid connection URL {}: {}",
            redact_url(url),
            crate::retry::full_message(&e)
        ))
    })?;
    if cfg.get_application_name().is_none() {
        cfg.application_name("sluice-loadtest");
    }
    Ok(cfg)
}

/// Connect and drive the connection on its own task. Dropping the returned
/// client closes the connection (tokio-postgres sends Terminate).
pub async fn connect(cfg: &Config) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = cfg.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("connection ended with error: {e}");
        }
    });
    Ok(client)
}

/// One connection for administrative work (preflight, setup, verification),
/// failing with a message that says what to fix.
pub async fn connect_admin(url: &str, timeout: Duration) -> Result<Client, LoadtestError> {
    let cfg = parse_config(url)?;
    let target = redact_url(url);
    match tokio::time::timeout(timeout, connect(&cfg)).await {
        Err(_) => Err(LoadtestError::Connect {
            target,
            reason: format!("no answer within {}s", timeout.as_secs_f64()),
        }),
        Ok(Err(e)) => Err(LoadtestError::Connect {
            target,
            reason: explain_connect_error(&e),
        }),
        Ok(Ok(c)) => Ok(c),
    }
}

fn explain_connect_error(e: &tokio_postgres::Error) -> String {
    let class = classify(e);
    let hint = match class.key.as_str() {
        "connect_refused" => " (is the server running and listening on that host/port?)",
        "28P01" | "28000" | "auth_error" => " (check the user name and password in the URL)",
        "3D000" => " (the database does not exist)",
        "config_error" if class.detail.contains("password missing") => {
            " (the server asks for a password: put it in the URL)"
        }
        "53300" => " (the server is out of connection slots)",
        "tls_error" | "08P01" => " (sluice-loadtest connects without TLS)",
        _ => "",
    };
    format!("{}{hint}", full_message(e))
}

/// Hide the password in a `postgres://user:pass@host` URL or a
/// `password=...` key so URLs can be printed in reports and errors.
pub fn redact_url(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if let Some(at) = rest[..auth_end].rfind('@') {
            if let Some(colon) = rest[..at].find(':') {
                return format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &rest[..colon],
                    &rest[at..]
                );
            }
        }
        return url.to_string();
    }
    url.split_whitespace()
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k.trim() == "password" => "password=***".to_string(),
            _ => kv.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://app:s3cr@t@db:5432/x?sslmode=disable"),
            "postgres://app:***@db:5432/x?sslmode=disable"
        );
        assert_eq!(redact_url("postgres://app@db/x"), "postgres://app@db/x");
        assert_eq!(
            redact_url("host=db user=app password=hunter2 dbname=x"),
            "host=db user=app password=*** dbname=x"
        );
    }
}
