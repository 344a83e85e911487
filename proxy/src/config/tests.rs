//! Loading, precedence, `${NAME}` references and errors of the configuration.

use super::*;

fn flags(upstream: &str) -> Overrides {
    Overrides {
        upstream: Some(upstream.into()),
        ..Default::default()
    }
}

#[test]
fn zero_config_from_upstream() {
    let cfg = Config::load(None, &flags("postgres://app:p%40ss@db.local:5433/appdb")).unwrap();
    assert_eq!(
        (cfg.server_host.as_str(), cfg.server_port),
        ("db.local", 5433)
    );
    assert!(cfg.databases.contains_key("appdb"));
    assert_eq!(cfg.users["app"].password.as_deref(), Some("p@ss"));
    assert_eq!(cfg.server_password("app"), Some("p@ss"));
    assert_eq!(cfg.pool_mode_for("appdb"), PoolMode::Transaction);
}

#[test]
fn tls_keys_and_upstream_sslmode() {
    let cfg = Config::load(
        None,
        &flags("postgres://app:pw@db.local/appdb?sslmode=verify-full&sslrootcert=/etc/ca.pem"),
    )
    .unwrap();
    assert_eq!(cfg.server_tls, ServerTls::VerifyFull);
    assert_eq!(
        cfg.server_tls_ca_file.as_deref(),
        Some(Path::new("/etc/ca.pem"))
    );
    assert_eq!(cfg.client_tls_mode(), ClientTls::Disable);
    let err = |url: &str| Config::load(None, &flags(url)).unwrap_err().to_string();
    let no_ca = err("postgres://app:pw@db/appdb?sslmode=verify-ca");
    assert!(no_ca.contains("server_tls_ca_file"), "{no_ca}");
    assert!(err("postgres://app:pw@db/appdb?sslmode=sometimes").contains("sslmode"));
    assert!(err("postgres://app:pw@db/appdb?sslcompression=1").contains("sslcompression"));
    let mut c = Config::load(None, &flags("postgres://app:pw@db/appdb")).unwrap();
    c.client_tls = Some(ClientTls::Require);
    assert!(c
        .validate()
        .unwrap_err()
        .to_string()
        .contains("client_tls_cert_file"));
    c.client_tls = None;
    c.client_tls_cert_file = Some("/c.pem".into());
    assert!(c
        .validate()
        .unwrap_err()
        .to_string()
        .contains("client_tls_key_file"));
    c.client_tls_key_file = Some("/k.pem".into());
    assert_eq!(c.client_tls_mode(), ClientTls::Allow);
}

/// Loads `text` as the configuration file, with `flags`.
fn load_text(text: &str, flags: &Overrides) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(Some(&path), flags)
}

#[test]
fn load_generator_variables_are_not_keys() {
    std::env::set_var("SLUICE_LOADTEST_URL", "postgres://x@y/z");
    assert!(Config::load(None, &flags("postgres://app:pw@db/appdb")).is_ok());
}

#[test]
fn file_keys_and_env_references() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.toml");
    std::env::set_var("CFGTEST_PW_1", "from-env");
    std::env::set_var("CFGTEST_HOST_1", "db.internal");
    std::fs::write(
        &path,
        r#"
        pool_size = 7
        server_host = "${CFGTEST_HOST_1}"
        wait_timeout = "250ms"
        [databases.a]
        pool_mode = "session"
        [users.u]
        password = "${CFGTEST_PW_1}"
        "#,
    )
    .unwrap();
    let cfg = Config::load(Some(&path), &Overrides::default()).unwrap();
    assert_eq!(cfg.pool_size, 7);
    assert_eq!(cfg.wait_timeout, Duration::from_millis(250));
    assert_eq!(cfg.pool_mode_for("a"), PoolMode::Session);
    assert_eq!(cfg.users["u"].password.as_deref(), Some("from-env"));
    assert_eq!(cfg.server_host, "db.internal");
}

#[test]
fn errors_name_the_key() {
    let err = |toml: &str| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(&path, toml).unwrap();
        Config::load(Some(&path), &Overrides::default())
            .unwrap_err()
            .to_string()
    };
    let base = "[databases.d]\n[users.u]\npassword = \"x\"\n";
    assert!(err(&format!("pool_size = 0\n{base}")).contains("pool_size"));
    assert!(err(&format!("bogus = 1\n{base}")).contains("bogus"));
    assert!(err(&format!("wait_timeout = \"soon\"\n{base}")).contains("wait_timeout"));
    let unset = err("[databases.d]\n[users.u]\npassword = \"${CFGTEST_UNSET_X}\"\n");
    assert!(
        unset.contains("`users.u.password`") && unset.contains("CFGTEST_UNSET_X is not set"),
        "{unset}"
    );
    assert!(
        err("[databases.d]\n[users.u]\npassword = \"md5aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"\n")
            .contains("server_password")
    );
    assert!(err(&format!(
        "max_server_connections = 5\n{base}[groups.a]\nreserved_connections = 4\n[groups.b]\nreserved_connections = 2\n"
    ))
    .contains("reserved_connections add up to 6"));
    assert!(Config::load(None, &flags("mysql://a@b/c"))
        .unwrap_err()
        .to_string()
        .contains("upstream"));
    assert!(Config::load(None, &Overrides::default()).is_err());
}

#[test]
fn kubernetes_service_links_are_not_keys() {
    // What Kubernetes injects into every pod when a Service named `sluice` exists.
    for (k, v) in [
        ("SLUICE_PORT", "tcp://10.0.0.7:6432"),
        ("SLUICE_PORT_6432_TCP", "tcp://10.0.0.7:6432"),
        ("SLUICE_PORT_6432_TCP_PROTO", "tcp"),
        ("SLUICE_PORT_6432_TCP_PORT", "6432"),
        ("SLUICE_PORT_6432_TCP_ADDR", "10.0.0.7"),
        ("SLUICE_SERVICE_HOST", "10.0.0.7"),
        ("SLUICE_SERVICE_PORT", "6432"),
        ("SLUICE_SERVICE_PORT_POSTGRES", "6432"),
    ] {
        std::env::set_var(k, v);
    }
    assert!(Config::load(None, &flags("postgres://app:pw@db/appdb")).is_ok());
    for key in ["port", "PORT_5432_TCP", "service_host", "SERVICE_PORT_X"] {
        assert!(super::is_service_link(key), "{key}");
    }
    // Anything else unknown still stops start-up (checked with the binary, whose environment
    // is its own, in the integration tests).
    for key in ["server_tsl", "ports", "servicehost", "pool_size"] {
        assert!(!super::is_service_link(key), "{key}");
    }
}

#[test]
fn durations_are_text_or_seconds() {
    let c = load_text(
        "client_idle_timeout = 0\nidle_transaction_timeout = \"0\"\nwait_timeout = \"250ms\"\nserver_lifetime = 90\n",
        &flags("postgres://app:pw@db/appdb"),
    )
    .unwrap();
    assert_eq!(c.client_idle_timeout, Duration::ZERO);
    assert_eq!(c.idle_transaction_timeout, Duration::ZERO);
    assert_eq!(c.wait_timeout, Duration::from_millis(250));
    assert_eq!(c.server_lifetime, Duration::from_secs(90));
    let err = load_text(
        "wait_timeout = \"soon\"\n",
        &flags("postgres://app:pw@db/appdb"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("\"soon\" is not a duration"), "{err}");
    // What a client's slot can hold, and no more: refused, not quietly shortened.
    let c = load_text(
        "client_idle_timeout = \"49d\"\n",
        &flags("postgres://app:pw@db/appdb"),
    )
    .unwrap();
    assert_eq!(c.client_idle_timeout, Duration::from_secs(49 * 86_400));
    let err = load_text(
        "client_idle_timeout = \"50d\"\n",
        &flags("postgres://app:pw@db/appdb"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("client_idle_timeout") && err.contains("at most"),
        "{err}"
    );
}

#[test]
fn client_auth_is_spelled_as_postgresql_spells_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.toml");
    for (text, want) in [
        ("scram-sha-256", ClientAuth::ScramSha256),
        ("scram-sha256", ClientAuth::ScramSha256),
        ("md5", ClientAuth::Md5),
    ] {
        std::fs::write(&path, format!("client_auth = \"{text}\"\n")).unwrap();
        let c = Config::load(Some(&path), &flags("postgres://app:pw@db/appdb")).unwrap();
        assert_eq!(c.client_auth, want, "{text}");
    }
}

#[test]
fn passwords_written_out_in_an_upstream_are_noticed() {
    assert!(literal_password("postgres://app:pw@db/appdb"));
    assert!(!literal_password("postgres://app:${DB_PASSWORD}@db/appdb"));
    assert!(!literal_password("postgres://app@db/appdb"));
    assert!(!literal_password("postgres://app:@db/appdb"));
    assert!(!literal_password("${DATABASE_URL}"));
    assert!(!literal_password("not a url"));
}

#[test]
fn outage_hold_and_target_session_attrs() {
    let up = "postgres://app:pw@db/appdb";
    let c = Config::load(None, &flags(up)).unwrap();
    assert_eq!(c.server_unavailable_timeout(), c.wait_timeout);
    assert_eq!(c.target_session_attrs, TargetSessionAttrs::ReadWrite);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.toml");
    std::fs::write(
        &path,
        "server_unavailable_timeout = \"90s\"\ntarget_session_attrs = \"any\"\n",
    )
    .unwrap();
    let c = Config::load(Some(&path), &flags(up)).unwrap();
    assert_eq!(c.server_unavailable_timeout(), Duration::from_secs(90));
    assert_eq!(c.target_session_attrs, TargetSessionAttrs::Any);
    std::fs::write(&path, "server_unavailable_timeout = 0\n").unwrap();
    let c = Config::load(Some(&path), &flags(up)).unwrap();
    assert_eq!(c.server_unavailable_timeout(), Duration::ZERO);
    let c = Config::load(None, &flags(&format!("{up}?target_session_attrs=any"))).unwrap();
    assert_eq!(c.target_session_attrs, TargetSessionAttrs::Any);
    let err = Config::load(None, &flags(&format!("{up}?target_session_attrs=standby")))
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not one of read-write, any"), "{err}");
}

/// The configurations shipped for operators load as they are: `deploy/systemd/sluice.toml` with
/// the variables of `deploy/systemd/env.example` (whose comments mention `${NAME}` too), and
/// the README's example `sluice.toml`.
#[test]
fn shipped_example_configurations_load() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let env = std::fs::read_to_string(root.join("deploy/systemd/env.example")).unwrap();
    for line in env.lines().map(str::trim) {
        if let Some((k, v)) = line.split_once('=').filter(|_| !line.starts_with('#')) {
            if !k.starts_with("SLUICE_") {
                std::env::set_var(k, v.trim_matches('\''));
            }
        }
    }
    let shipped = root.join("deploy/systemd/sluice.toml");
    let cfg = Config::load(Some(&shipped), &Overrides::default())
        .unwrap_or_else(|e| panic!("{}: {e}", shipped.display()));
    assert_eq!(cfg.users["app"].password.as_deref(), Some("change-me"));

    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let example = readme
        .split_once("Example `sluice.toml`:\n\n```toml\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(block, _)| block)
        .expect("the README's example sluice.toml");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, example).unwrap();
    let cfg = Config::load(Some(&path), &Overrides::default())
        .unwrap_or_else(|e| panic!("the README's example: {e}"));
    assert_eq!(cfg.users["app"].password.as_deref(), Some("change-me"));
}

/// `${NAME}` is expanded in parsed values, not in the text: comments may mention references,
/// and a value is used exactly as the variable holds it, characters TOML would read as quotes
/// or escapes included.
#[test]
fn references_are_expanded_in_values_and_used_verbatim() {
    let secret = r#"a"b\tc\nd\u0041e'f${g}"#;
    std::env::set_var("CFGTEST_VERBATIM_PW", secret);
    let cfg = load_text(
        "# The password comes from ${CFGTEST_NEVER_SET}, see below.\n\
         [databases.d]\n[users.u]\npassword = \"${CFGTEST_VERBATIM_PW}\" # ${CFGTEST_NEVER_SET_2}\n",
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!(cfg.users["u"].password.as_deref(), Some(secret));
}

/// A password substituted into `upstream`'s user information is percent-encoded, so it may hold
/// any character; a `+` written out in the URL is a `+` (this is not a form).
#[test]
fn a_referenced_upstream_password_may_hold_any_character() {
    let secret = "p@ss:w/o#r?d%2B+ é";
    std::env::set_var("CFGTEST_UPSTREAM_PW", secret);
    let cfg = Config::load(
        None,
        &flags("postgres://app:${CFGTEST_UPSTREAM_PW}@db.internal:5433/appdb"),
    )
    .unwrap();
    assert_eq!(cfg.server_host, "db.internal");
    assert_eq!(cfg.server_port, 5433);
    assert_eq!(cfg.users["app"].password.as_deref(), Some(secret));
    let cfg = Config::load(None, &flags("postgres://app:a+b%2Bc@db/appdb")).unwrap();
    assert_eq!(cfg.users["app"].password.as_deref(), Some("a+b+c"));
    let err = Config::load(None, &flags("postgres://app:pa#ss@db/appdb"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("percent-encoded") && err.contains("%23"),
        "{err}"
    );
    assert!(!err.contains("pa#ss"), "the password is not quoted: {err}");
}

/// No configuration error quotes a secret: not TOML's (which quotes the offending line), not
/// one about a value brought in by a reference, not one about a password.
#[test]
fn errors_never_quote_a_secret() {
    let load = |text: &str| {
        load_text(text, &Overrides::default())
            .unwrap_err()
            .to_string()
    };
    let err = load("[databases.d]\n[users.u]\npassword = \"hunter2-in-the-file\n");
    assert!(err.contains("line 3") && !err.contains("hunter2"), "{err}");

    std::env::set_var("CFGTEST_MISPLACED_SECRET", "hunter2-from-env");
    let err = load("max_waiting = \"${CFGTEST_MISPLACED_SECRET}\"\n[databases.d]\n[users.u]\npassword = \"x\"\n");
    assert!(
        err.contains("max_waiting") && !err.contains("hunter2"),
        "{err}"
    );
    let err = load("client_auth = \"${CFGTEST_MISPLACED_SECRET}\"\n[databases.d]\n[users.u]\npassword = \"x\"\n");
    assert!(
        err.contains("client_auth") && !err.contains("hunter2"),
        "{err}"
    );
    let err = load("[databases.d]\n[users.u]\npassword = [\"hunter2-in-an-array\"]\n");
    assert!(!err.contains("hunter2"), "{err}");
}

/// A reference in a value other than a secret is read as a `SLUICE_*` variable is (`"${N}"`
/// may be a number); a secret is a string whatever it looks like, from the file, a reference or
/// the environment (`expand::tests`).
#[test]
fn references_give_numbers_and_secrets_stay_strings() {
    std::env::set_var("CFGTEST_NUMERIC", "123");
    let cfg = load_text(
        "max_waiting = \"${CFGTEST_NUMERIC}\"\n[databases.d]\n[users.u]\npassword = \"${CFGTEST_NUMERIC}\"\n",
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!(cfg.max_waiting, 123);
    assert_eq!(cfg.users["u"].password.as_deref(), Some("123"));

    let err = load_text(
        "[databases.d]\n[users.u]\npassword = 987654321\n",
        &Overrides::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("users.u.password") && !err.contains("987654321"),
        "{err}"
    );
}
