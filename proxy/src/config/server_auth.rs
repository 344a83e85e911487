//! Who judges a client's password (`auth`: the configured users, or the server itself through
//! passthrough), how Sluice authenticates to the server (`server_auth`, `aws_region`): with the
//! users' passwords, or with RDS IAM tokens ([`crate::auth::iam`]); and as whom it logs in for
//! itself (`control_user`).

use serde::{Deserialize, Serialize};

use super::{invalid, Config, ConfigError, ServerTls};
use crate::auth::iam;

/// What Sluice presents to the server as a user's password.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerAuth {
    /// `users.NAME.server_password` (or the user's plaintext `password`).
    Password,
    /// An RDS IAM authentication token for the user, signed with the AWS credentials Sluice
    /// finds (environment, container credentials, instance metadata).
    RdsIam,
}

impl ServerAuth {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerAuth::Password => "password",
            ServerAuth::RdsIam => "rds_iam",
        }
    }
}

/// Who verifies the password of a client that logs in to a database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Only the configured `users`, against their configured secrets.
    Users,
    /// The configured users as with `users`; any other user is verified by logging in to the
    /// server as that user with the password the client gives ([`crate::passthrough`]).
    Passthrough,
    /// The configured users as with `users`; any other user's SCRAM verifier or md5 hash is
    /// fetched from the server with `auth_query`, as `auth_user` ([`crate::auth_query`]).
    AuthQuery,
}

impl Config {
    /// `auth` for `database`: its own setting, else the global one.
    pub fn auth_for(&self, database: &str) -> AuthMode {
        self.databases
            .get(database)
            .and_then(|d| d.auth)
            .unwrap_or(self.auth)
    }

    /// Whether any database verifies unlisted users through the server.
    pub fn any_passthrough(&self) -> bool {
        self.any_auth(AuthMode::Passthrough) || self.any_auth(AuthMode::AuthQuery)
    }

    /// Whether any database has `auth = mode`.
    pub fn any_auth(&self, mode: AuthMode) -> bool {
        self.auth == mode || self.databases.values().any(|d| d.auth == Some(mode))
    }

    /// The role `auth_query` runs as: `auth_user`, else `control_user`.
    pub fn resolved_auth_user(&self) -> Option<&str> {
        self.auth_user.as_deref().or(self.control_user.as_deref())
    }

    pub(super) fn validate_auth_query(&self) -> Result<(), ConfigError> {
        if !self.any_auth(AuthMode::AuthQuery) {
            return Ok(());
        }
        let Some(user) = self.resolved_auth_user() else {
            return Err(invalid(
                "auth_user",
                "auth = \"auth_query\" needs the role that runs auth_query: set auth_user (one of users) or control_user",
            ));
        };
        if !self.users.contains_key(user) && self.control_user.as_deref() != Some(user) {
            return Err(invalid(
                "auth_user",
                format!("\"{user}\" is neither one of users nor control_user, so Sluice has no password to log in as it"),
            ));
        }
        if !self.auth_query.contains("$1") {
            return Err(invalid("auth_query", "must take the user name as $1"));
        }
        Ok(())
    }

    /// The (database, user) Sluice logs in as for its own purposes (the server's limit,
    /// readiness): `control_user` on `control_database` (else the first database), or the
    /// first configured of each.
    pub fn first_login(&self) -> Option<(String, String)> {
        let database = || self.databases.keys().next().cloned();
        if let Some(user) = &self.control_user {
            return Some((
                self.control_database.clone().or_else(database)?,
                user.clone(),
            ));
        }
        database().zip(self.users.keys().next().cloned())
    }

    /// `control_user` when it is not one of `users` (its credential is `control_password`).
    pub fn separate_control_user(&self) -> Option<&str> {
        self.control_user
            .as_deref()
            .filter(|u| !self.users.contains_key(*u))
    }

    /// The AWS region RDS IAM tokens are signed for: `aws_region`, else `AWS_REGION`, else
    /// `AWS_DEFAULT_REGION`.
    pub fn resolved_aws_region(&self) -> Option<String> {
        iam::resolve_region(self.aws_region.as_deref(), |name| std::env::var(name).ok())
    }

    pub(super) fn validate_server_auth(&self) -> Result<(), ConfigError> {
        if let Some(region) = &self.aws_region {
            if !iam::valid_region(region) {
                return Err(invalid(
                    "aws_region",
                    format!("\"{region}\" is not an AWS region name (like us-east-1)"),
                ));
            }
        }
        if self.server_auth != ServerAuth::RdsIam {
            return Ok(());
        }
        // The token is sent as a cleartext password and is good for 15 minutes to whoever
        // holds it: only to a server whose certificate and name are checked.
        if self.server_tls != ServerTls::VerifyFull {
            return Err(invalid(
                "server_tls",
                format!(
                    "server_auth = \"rds_iam\" sends the IAM token as a cleartext password, which needs server_tls = \"verify-full\" (with the RDS CA bundle in server_tls_ca_file), not \"{}\"",
                    self.server_tls.as_str()
                ),
            ));
        }
        match self.resolved_aws_region() {
            None => Err(invalid(
                "aws_region",
                "server_auth = \"rds_iam\" needs a region: set aws_region, AWS_REGION or AWS_DEFAULT_REGION",
            )),
            Some(region) if !iam::valid_region(&region) => Err(invalid(
                "aws_region",
                format!("\"{region}\" (from the environment) is not an AWS region name"),
            )),
            Some(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;

    fn load(toml: &str) -> Result<Config, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(&path, toml).unwrap();
        Config::load(Some(&path), &Overrides::default()).map_err(|e| e.to_string())
    }

    const BASE: &str =
        "[databases.d]\n[users.u]\npassword = \"SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk:c2VydmVy\"\n";
    const VERIFIED: &str =
        "server_tls = \"verify-full\"\nserver_tls_ca_file = \"/etc/rds-ca.pem\"\n";

    #[test]
    fn password_by_default() {
        let cfg = load(&format!("{BASE}server_password = \"pw\"\n")).unwrap();
        assert_eq!(cfg.server_auth, ServerAuth::Password);
        assert_eq!(cfg.aws_region, None);
    }

    #[test]
    fn rds_iam_needs_verify_full_and_no_server_password() {
        let cfg = load(&format!(
            "server_auth = \"rds_iam\"\naws_region = \"eu-west-2\"\n{VERIFIED}{BASE}"
        ))
        .unwrap();
        assert_eq!(cfg.server_auth, ServerAuth::RdsIam);
        assert_eq!(cfg.resolved_aws_region().as_deref(), Some("eu-west-2"));
        assert_eq!(cfg.server_password("u"), None);
        for tls in ["require", "verify-ca", "prefer", "disable"] {
            let e = load(&format!(
                "server_auth = \"rds_iam\"\naws_region = \"eu-west-2\"\nserver_tls = \"{tls}\"\nserver_tls_ca_file = \"/ca.pem\"\n{BASE}"
            ))
            .unwrap_err();
            assert!(
                e.contains("`server_tls`") && e.contains("verify-full"),
                "{e}"
            );
        }
    }

    #[test]
    fn passthrough_per_database_and_without_users() {
        let cfg = load(&format!(
            "auth = \"passthrough\"\npassthrough_ttl = \"10m\"\n[databases.other]\nauth = \"users\"\n{BASE}server_password = \"pw\"\n"
        ))
        .unwrap();
        assert_eq!(cfg.auth_for("d"), AuthMode::Passthrough);
        assert_eq!(cfg.auth_for("other"), AuthMode::Users);
        assert_eq!(cfg.passthrough_ttl, std::time::Duration::from_secs(600));
        assert!(!cfg.allow_cleartext_without_tls);
        let cfg =
            load("[databases.d]\nauth = \"passthrough\"\n[users.u]\npassword = \"pw\"\n").unwrap();
        assert!(cfg.any_passthrough() && cfg.auth_for("d") == AuthMode::Passthrough);
        assert_eq!(cfg.auth_for("elsewhere"), AuthMode::Users);
        // No users: passthrough with a control user (Sluice's own logins) only.
        let cfg = load("auth = \"passthrough\"\ncontrol_user = \"mon\"\ncontrol_password = \"pw\"\n[databases.d]\n").unwrap();
        assert!(cfg.users.is_empty());
        assert_eq!(cfg.first_login(), Some(("d".into(), "mon".into())));
        for toml in [
            "auth = \"passthrough\"\n[databases.d]\n",
            "control_user = \"mon\"\n[databases.d]\n",
        ] {
            let e = load(toml).unwrap_err();
            assert!(e.contains("`users`") && e.contains("control_user"), "{e}");
        }
        let e = load(&format!(
            "auth = \"server\"\n{BASE}server_password = \"pw\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("auth"), "{e}");
    }

    #[test]
    fn region_is_checked() {
        let e = load(&format!(
            "server_auth = \"rds_iam\"\naws_region = \"EU West\"\n{VERIFIED}{BASE}"
        ))
        .unwrap_err();
        assert!(e.contains("`aws_region`"), "{e}");
        // Checked even when unused.
        let e = load(&format!(
            "aws_region = \"x y\"\n{BASE}server_password = \"pw\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("`aws_region`"), "{e}");
        let e = load(&format!("server_auth = \"iam\"\n{BASE}")).unwrap_err();
        assert!(e.contains("server_auth"), "{e}");
    }
}
