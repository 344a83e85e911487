//! Passwords kept in files: `users.NAME.password_file`, `users.NAME.server_password_file` and
//! `upstream_password_file` name a file whose content, without its trailing newline(s), is the
//! password. Files are read whenever the configuration is loaded (start-up, RELOAD, SIGHUP);
//! the server side reads the server password's file once more after a refused login (see
//! `server::password`). A file is for secrets mounted or written by the platform (a Kubernetes
//! Secret volume, a rotation hook); secrets injected into the environment (ECS, systemd
//! `EnvironmentFile`) are `${NAME}` references instead.
//!
//! Errors name the key and the path, never the content.

use std::path::Path;

use super::{invalid, Config, ConfigError};

/// The secret in `path`, for the configuration key `key`: the file's content without trailing
/// newlines (`\n` or `\r\n`, as editors and `echo` leave them). An unreadable or empty file is
/// an error naming `key` and `path`.
pub fn read_secret_file(key: &str, path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
    let secret = text.trim_end_matches(['\n', '\r']);
    if secret.is_empty() {
        return Err(invalid(key, format!("{} is empty", path.display())));
    }
    Ok(secret.to_string())
}

impl Config {
    /// Reads every `*_file` secret into its value (`password_file` into `password`, ...);
    /// a value and a file for the same secret is an error. Runs once per load, after
    /// `apply_upstream` (which may hand `upstream_password_file` to a user).
    pub(super) fn read_secret_files(&mut self) -> Result<(), ConfigError> {
        if let Some(path) = &self.control_password_file {
            if self.control_password.is_some() {
                return Err(invalid(
                    "control_password_file",
                    "`control_password` is set too: give one or the other",
                ));
            }
            self.control_password = Some(read_secret_file("control_password_file", path)?);
        }
        for (name, user) in &mut self.users {
            for (field, value, file) in [
                ("password", &mut user.password, &user.password_file),
                (
                    "server_password",
                    &mut user.server_password,
                    &user.server_password_file,
                ),
            ] {
                let Some(path) = file else { continue };
                let key = format!("users.{name}.{field}_file");
                if value.is_some() {
                    return Err(invalid(
                        key,
                        format!("`users.{name}.{field}` is set too: give one or the other"),
                    ));
                }
                *value = Some(read_secret_file(&key, path)?);
            }
        }
        Ok(())
    }

    /// The password Sluice presents to the server for `user`.
    pub fn server_password(&self, user: &str) -> Option<&str> {
        if self.separate_control_user() == Some(user) {
            return self.control_password.as_deref();
        }
        let u = self.users.get(user)?;
        if let Some(p) = &u.server_password {
            return Some(p);
        }
        let p = u.password.as_deref()?;
        let hashed = p.starts_with("SCRAM-SHA-256$")
            || (p.len() == 35
                && p.starts_with("md5")
                && p[3..].bytes().all(|b| b.is_ascii_hexdigit()));
        (!hashed).then_some(p)
    }

    /// The file the password Sluice presents to the server for `user` comes from, with its
    /// key: `server_password_file`, or `password_file` when the server password is the
    /// client-facing one.
    pub fn server_password_file(&self, user: &str) -> Option<(String, &Path)> {
        if self.separate_control_user() == Some(user) {
            let path = self.control_password_file.as_deref()?;
            return Some(("control_password_file".to_string(), path));
        }
        let u = self.users.get(user)?;
        if let Some(path) = &u.server_password_file {
            return Some((format!("users.{user}.server_password_file"), path));
        }
        match (&u.server_password, &u.password_file) {
            (None, Some(path)) if self.server_password(user).is_some() => {
                Some((format!("users.{user}.password_file"), path))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;

    /// Loads `toml` (with `[databases.d]` added) from a file in `dir`.
    fn load(dir: &Path, toml: &str) -> Result<Config, String> {
        let path = dir.join("sluice.toml");
        std::fs::write(&path, format!("[databases.d]\n{toml}")).unwrap();
        Config::load(Some(&path), &Overrides::default()).map_err(|e| e.to_string())
    }

    fn toml_path(p: &Path) -> String {
        toml::Value::String(p.display().to_string()).to_string()
    }

    #[test]
    fn password_files_are_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let (client, server) = (dir.path().join("client"), dir.path().join("server"));
        std::fs::write(&client, "client pw \n\n").unwrap();
        std::fs::write(&server, "server-pw\r\n").unwrap();
        let cfg = load(
            dir.path(),
            &format!(
                "[users.u]\npassword_file = {}\nserver_password_file = {}\n",
                toml_path(&client),
                toml_path(&server)
            ),
        )
        .unwrap();
        // Only newlines are trimmed: a trailing space is part of the password.
        assert_eq!(cfg.users["u"].password.as_deref(), Some("client pw "));
        assert_eq!(cfg.server_password("u"), Some("server-pw"));
        let (key, path) = cfg.server_password_file("u").unwrap();
        assert_eq!(
            (key.as_str(), path),
            ("users.u.server_password_file", &*server)
        );
    }

    #[test]
    fn the_password_file_serves_the_server_too() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "shared\n").unwrap();
        let cfg = load(
            dir.path(),
            &format!("[users.u]\npassword_file = {}\n", toml_path(&file)),
        )
        .unwrap();
        assert_eq!(cfg.server_password("u"), Some("shared"));
        assert_eq!(
            cfg.server_password_file("u").unwrap().0,
            "users.u.password_file"
        );
        // A value (not a file) for the server password: nothing to read again.
        let cfg = load(
            dir.path(),
            &format!(
                "[users.u]\npassword_file = {}\nserver_password = \"other\"\n",
                toml_path(&file)
            ),
        )
        .unwrap();
        assert_eq!(cfg.server_password("u"), Some("other"));
        assert!(cfg.server_password_file("u").is_none());
        // A verifier in the file is no server password.
        std::fs::write(&file, "md5aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n").unwrap();
        let err = load(
            dir.path(),
            &format!("[users.u]\npassword_file = {}\n", toml_path(&file)),
        )
        .unwrap_err();
        assert!(err.contains("users.u.server_password"), "{err}");
    }

    #[test]
    fn a_value_and_a_file_for_one_secret_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file").unwrap();
        let err = load(
            dir.path(),
            &format!(
                "[users.u]\npassword = \"x\"\nserver_password = \"hunter2\"\nserver_password_file = {}\n",
                toml_path(&file)
            ),
        )
        .unwrap_err();
        assert!(
            err.contains("`users.u.server_password_file`") && err.contains("one or the other"),
            "{err}"
        );
        assert!(
            !err.contains("hunter2") && !err.contains("from-file"),
            "{err}"
        );
        let err = load(
            dir.path(),
            &format!(
                "[users.u]\npassword = \"x\"\npassword_file = {}\n",
                toml_path(&file)
            ),
        )
        .unwrap_err();
        assert!(err.contains("`users.u.password_file`"), "{err}");
    }

    #[test]
    fn missing_and_empty_files_name_key_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = load(
            dir.path(),
            &format!(
                "[users.u]\npassword = \"x\"\nserver_password_file = {}\n",
                toml_path(&missing)
            ),
        )
        .unwrap_err();
        assert!(
            err.contains("`users.u.server_password_file`")
                && err.contains(&missing.display().to_string())
                && err.contains("cannot read"),
            "{err}"
        );
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let err = load(
            dir.path(),
            &format!("[users.u]\npassword_file = {}\n", toml_path(&empty)),
        )
        .unwrap_err();
        assert!(
            err.contains("`users.u.password_file`") && err.contains("is empty"),
            "{err}"
        );
    }

    #[test]
    fn upstream_password_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "p@ss\n").unwrap();
        let flags = |url: &str| Overrides {
            upstream: Some(url.into()),
            ..Default::default()
        };
        let path = dir.path().join("sluice.toml");
        std::fs::write(
            &path,
            format!("upstream_password_file = {}\n", toml_path(&file)),
        )
        .unwrap();
        let cfg = Config::load(Some(&path), &flags("postgres://app@db/appdb")).unwrap();
        assert_eq!(cfg.users["app"].password.as_deref(), Some("p@ss"));
        assert_eq!(cfg.server_password("app"), Some("p@ss"));
        assert_eq!(
            cfg.server_password_file("app").unwrap().0,
            "users.app.server_password_file"
        );
        let err = Config::load(Some(&path), &flags("postgres://app:secret@db/appdb"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`upstream_password_file`") && !err.contains("secret"),
            "{err}"
        );
        std::fs::write(
            &path,
            format!(
                "upstream_password_file = {}\n[databases.d]\n[users.u]\npassword = \"x\"\n",
                toml_path(&file)
            ),
        )
        .unwrap();
        let err = Config::load(Some(&path), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`upstream_password_file`: needs `upstream`"),
            "{err}"
        );
    }

    #[test]
    fn the_control_user_has_a_password_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ctl"), "ctl-pw\n").unwrap();
        // Top-level keys first, before the `[databases.d]` table `load` adds.
        let load = |dir: &Path, text: &str| {
            let (top, users) = text.split_once("[users").unwrap();
            let path = dir.join("top.toml");
            std::fs::write(&path, format!("{top}[databases.d]\n[users{users}")).unwrap();
            Config::load(Some(&path), &Overrides::default()).map_err(|e| e.to_string())
        };
        let cfg = load(
            dir.path(),
            &format!(
                "control_user = \"mon\"\ncontrol_password_file = \"{}\"\n[users.app]\npassword = \"app-pw\"\n",
                dir.path().join("ctl").display()
            ),
        )
        .unwrap();
        assert_eq!(cfg.first_login(), Some(("d".into(), "mon".into())));
        assert_eq!(cfg.server_password("mon"), Some("ctl-pw"));
        assert_eq!(
            cfg.server_password_file("mon")
                .map(|(key, _)| key)
                .as_deref(),
            Some("control_password_file")
        );
        assert_eq!(cfg.server_password("app"), Some("app-pw"));
        // A control user that is one of the users is that user, with its password.
        let cfg = load(
            dir.path(),
            "control_user = \"app\"\ncontrol_database = \"postgres\"\n[users.app]\npassword = \"app-pw\"\n",
        )
        .unwrap();
        assert_eq!(cfg.first_login(), Some(("postgres".into(), "app".into())));
        assert_eq!(cfg.server_password("app"), Some("app-pw"));
        let e = load(
            dir.path(),
            "control_password = \"x\"\n[users.app]\npassword = \"p\"\n",
        )
        .unwrap_err();
        assert!(
            e.contains("`control_password`") && e.contains("needs control_user"),
            "{e}"
        );
        assert!(!e.contains("\"x\""), "{e}");
    }
}
