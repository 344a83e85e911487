//! Validation of a loaded configuration: every error names the offending key and never quotes
//! a secret.

use std::time::Duration;

use super::{invalid, ClientTls, Config, ConfigError, ServerAuth, ServerTls};

impl Config {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.databases.is_empty() {
            return Err(invalid(
                "databases",
                "no database configured: give --upstream or [databases.NAME]",
            ));
        }
        if self.users.is_empty() && !(self.any_passthrough() && self.control_user.is_some()) {
            return Err(invalid(
                "users",
                "no user configured: give --upstream or [users.NAME] (or auth = \"passthrough\" with a control_user)",
            ));
        }
        if self.control_user.is_none() {
            for (key, set) in [
                ("control_password", self.control_password.is_some()),
                ("control_database", self.control_database.is_some()),
            ] {
                if set {
                    return Err(invalid(key, "needs control_user"));
                }
            }
        }
        if let Some(fleet) = &self.fleet {
            if fleet.is_empty() {
                return Err(invalid(
                    "fleet",
                    "must not be empty (unset it for a lone instance)",
                ));
            }
            if self.fleet_interval.is_zero() || self.fleet_dead_after < Duration::from_secs(2) {
                return Err(invalid(
                    "fleet_interval",
                    "fleet_interval must be above 0 and fleet_dead_after at least 2s",
                ));
            }
        }
        if self.control_user.as_deref() == Some("") {
            return Err(invalid("control_user", "must not be empty"));
        }
        for (key, v) in [
            ("pool_size", self.pool_size),
            ("max_client_connections", self.max_client_connections),
            ("max_connecting", self.max_connecting),
            ("max_message_bytes", self.max_message_bytes),
            ("max_prepared_statements", self.max_prepared_statements),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.max_message_bytes < 1024 {
            return Err(invalid("max_message_bytes", "must be at least 1024"));
        }
        if self.wait_timeout.is_zero() {
            return Err(invalid("wait_timeout", "must be above zero"));
        }
        // Each client's registry slot keeps its idle timeout in 32-bit milliseconds.
        if self.client_idle_timeout.as_millis() > u128::from(u32::MAX) {
            return Err(invalid(
                "client_idle_timeout",
                "must be at most 49d 17h (4294967295ms); 0 disables it",
            ));
        }
        for (key, n, idle) in [
            (
                "server_tcp_keepalive_count",
                self.server_tcp_keepalive_count,
                self.server_tcp_keepalive,
            ),
            (
                "client_tcp_keepalive_count",
                self.client_tcp_keepalive_count,
                self.client_tcp_keepalive,
            ),
        ] {
            if !idle.is_zero() && n == 0 {
                return Err(invalid(key, "must be at least 1 while keepalive is on"));
            }
        }
        for (key, d, idle) in [
            (
                "server_tcp_keepalive_interval",
                self.server_tcp_keepalive_interval,
                self.server_tcp_keepalive,
            ),
            (
                "client_tcp_keepalive_interval",
                self.client_tcp_keepalive_interval,
                self.client_tcp_keepalive,
            ),
        ] {
            if !idle.is_zero() && d < Duration::from_secs(1) {
                return Err(invalid(key, "must be at least 1s while keepalive is on"));
            }
        }
        if self.server_connect_timeout.is_zero() {
            return Err(invalid("server_connect_timeout", "must be above zero"));
        }
        if self.min_pool_size > self.pool_size {
            return Err(invalid("min_pool_size", "must not exceed pool_size"));
        }
        for (name, db) in &self.databases {
            if db.pool_size == Some(0) {
                return Err(invalid(
                    format!("databases.{name}.pool_size"),
                    "must be at least 1",
                ));
            }
            if db.min_pool_size.unwrap_or(self.min_pool_size)
                > db.pool_size.unwrap_or(self.pool_size)
            {
                return Err(invalid(
                    format!("databases.{name}.min_pool_size"),
                    "must not exceed pool_size",
                ));
            }
        }
        for (name, user) in &self.users {
            if user.password.is_none() {
                return Err(invalid(
                    format!("users.{name}.password"),
                    "missing (set password or password_file)",
                ));
            }
            if self.server_auth == ServerAuth::Password && self.server_password(name).is_none() {
                return Err(invalid(
                    format!("users.{name}.server_password"),
                    "needed (or server_password_file) when `password` is a SCRAM verifier or md5 hash",
                ));
            }
        }
        for admin in &self.admin_users {
            if !self.users.contains_key(admin) {
                return Err(invalid(
                    "admin_users",
                    format!("\"{admin}\" is not in users"),
                ));
            }
        }
        self.validate_tls()?;
        self.validate_server_auth()?;
        self.validate_auth_query()?;
        if self.databases.contains_key("sluice") {
            return Err(invalid(
                "databases.sluice",
                "the name is reserved for the admin console",
            ));
        }
        let mut reserved = 0u64;
        for (name, g) in &self.groups {
            let r = g.reserved_connections.unwrap_or(0);
            if let Some(max) = g.max_connections {
                if max == 0 {
                    return Err(invalid(
                        format!("groups.{name}.max_connections"),
                        "must be at least 1",
                    ));
                }
                if r > max {
                    return Err(invalid(
                        format!("groups.{name}.reserved_connections"),
                        "must not exceed the group's max_connections",
                    ));
                }
            }
            reserved += u64::from(r);
        }
        if self.max_server_connections > 0 && reserved > u64::from(self.max_server_connections) {
            return Err(invalid(
                "groups",
                format!(
                    "reserved_connections add up to {reserved}, over max_server_connections ({})",
                    self.max_server_connections
                ),
            ));
        }
        Ok(())
    }

    fn validate_tls(&self) -> Result<(), ConfigError> {
        if matches!(self.server_tls, ServerTls::VerifyCa | ServerTls::VerifyFull)
            && self.server_tls_ca_file.is_none()
        {
            return Err(invalid(
                "server_tls_ca_file",
                format!(
                    "server_tls = \"{}\" needs the certificate authorities to verify against (a PEM file, e.g. the RDS global bundle)",
                    self.server_tls.as_str()
                ),
            ));
        }
        if self.server_tls_cert_file.is_some() != self.server_tls_key_file.is_some() {
            return Err(invalid(
                "server_tls_key_file",
                "server_tls_cert_file and server_tls_key_file go together",
            ));
        }
        if self.client_tls_cert_file.is_some() != self.client_tls_key_file.is_some() {
            return Err(invalid(
                "client_tls_key_file",
                "client_tls_cert_file and client_tls_key_file go together",
            ));
        }
        if self.client_tls_mode() != ClientTls::Disable && self.client_tls_cert_file.is_none() {
            return Err(invalid(
                "client_tls_cert_file",
                "client_tls needs a certificate and key (client_tls_cert_file, client_tls_key_file)",
            ));
        }
        Ok(())
    }
}
