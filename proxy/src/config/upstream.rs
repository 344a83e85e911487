//! `upstream`: a PostgreSQL URL folded into the server's host and port, a database and a user.

use super::*;

impl Config {
    /// Folds the `upstream` URL into host, port, users and databases.
    pub(super) fn apply_upstream(&mut self) -> Result<(), ConfigError> {
        let Some(raw) = self.upstream.clone() else {
            if self.upstream_password_file.is_some() {
                return Err(invalid("upstream_password_file", "needs `upstream`"));
            }
            return Ok(());
        };
        let url = url::Url::parse(&raw).map_err(|e| {
            invalid(
                "upstream",
                format!("not a URL ({e}); in the user name and password, characters such as @ : / # ? % must be percent-encoded (@ as %40, # as %23, % as %25), or give the password as ${{NAME}} (substituted encoded) or in upstream_password_file"),
            )
        })?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(invalid(
                "upstream",
                "scheme must be postgres:// or postgresql://",
            ));
        }
        let host = url
            .host_str()
            .ok_or_else(|| invalid("upstream", "no host"))?;
        self.server_host = host.trim_matches(['[', ']']).to_string();
        self.server_port = url.port().unwrap_or(5432);
        let user = decode(url.username());
        if user.is_empty() {
            return Err(invalid("upstream", "no user name"));
        }
        let db = decode(url.path().trim_start_matches('/'));
        let db = if db.is_empty() { user.clone() } else { db };
        self.databases.entry(db).or_default();
        for (key, value) in url.query_pairs() {
            match key.as_ref() {
                "sslmode" => {
                    self.server_tls = ServerTls::parse(&value).ok_or_else(|| {
                        invalid(
                            "upstream",
                            format!("sslmode \"{value}\" is not one of disable, allow, prefer, require, verify-ca, verify-full"),
                        )
                    })?;
                }
                "sslrootcert" => self.server_tls_ca_file = Some(PathBuf::from(value.as_ref())),
                "sslcert" => self.server_tls_cert_file = Some(PathBuf::from(value.as_ref())),
                "sslkey" => self.server_tls_key_file = Some(PathBuf::from(value.as_ref())),
                "target_session_attrs" => {
                    self.target_session_attrs = TargetSessionAttrs::parse(&value).ok_or_else(|| {
                        invalid(
                            "upstream",
                            format!("target_session_attrs \"{value}\" is not one of read-write, any"),
                        )
                    })?;
                }
                other => {
                    return Err(invalid(
                        "upstream",
                        format!("unsupported parameter \"{other}\" (Sluice reads sslmode, sslrootcert, sslcert, sslkey and target_session_attrs)"),
                    ))
                }
            }
        }
        let password = url.password().map(decode);
        let file = self.upstream_password_file.clone();
        if password.is_some() && file.is_some() {
            return Err(invalid(
                "upstream_password_file",
                "`upstream` has a password too: give one or the other",
            ));
        }
        // The URL's password (or file) is the user's unless the user has one of its own.
        let entry = self.users.entry(user).or_default();
        if entry.password.is_none() && entry.password_file.is_none() {
            entry.password = password.clone();
            entry.password_file = file.clone();
        }
        if entry.server_password.is_none() && entry.server_password_file.is_none() {
            entry.server_password = password;
            entry.server_password_file = file;
        }
        Ok(())
    }
}

/// Whether `url` (an `upstream` as given, before `${NAME}` references are expanded) carries a
/// password written out: on a command line, anyone on the host can read it (`ps`).
pub fn literal_password(url: &str) -> bool {
    !url.contains("${")
        && url::Url::parse(url)
            .ok()
            .and_then(|u| u.password().map(|p| !p.is_empty()))
            .unwrap_or(false)
}

/// A percent-encoded URL component, decoded (`+` stays `+`: this is not a form).
pub(super) fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}
