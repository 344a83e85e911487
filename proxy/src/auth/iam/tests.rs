use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::UNIX_EPOCH;

use aws_credential_types::provider::future;

use super::*;

/// 2024-08-26T22:00:00Z.
fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_724_709_600)
}

fn creds(token: Option<&str>) -> AwsCredentials {
    AwsCredentials::new(
        "AKIDEXAMPLE",
        "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        token.map(str::to_string),
        None,
        "test",
    )
}

// The expected tokens are botocore 1.44.5's `generate_db_auth_token` for the same inputs,
// clock fixed at t0 (the integration test `iam` compares against botocore live).

#[test]
fn generates_what_botocore_does() {
    let akid = AwsCredentials::new("akid", "secret", None, None, "test");
    assert_eq!(
        generate(&akid, "us-east-1", "prod-instance.us-east-1.rds.amazonaws.com", 3306, "peccy", t0()).unwrap(),
        "prod-instance.us-east-1.rds.amazonaws.com:3306/?Action=connect&DBUser=peccy\
         &X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=akid%2F20240826%2Fus-east-1%2Frds-db%2Faws4_request\
         &X-Amz-Date=20240826T220000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host\
         &X-Amz-Signature=dd0cba843009474347af724090233265628ace491ea17ce3eb3da098b983ad89"
    );
    let with_token = AwsCredentials::new("akid", "secret", Some("tok+/=abc".into()), None, "test");
    assert_eq!(
        generate(&with_token, "us-east-1", "h.example.com", 5432, "app user+1@x", t0()).unwrap(),
        "h.example.com:5432/?Action=connect&DBUser=app%20user%2B1%40x\
         &X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=akid%2F20240826%2Fus-east-1%2Frds-db%2Faws4_request\
         &X-Amz-Date=20240826T220000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host\
         &X-Amz-Security-Token=tok%2B%2F%3Dabc\
         &X-Amz-Signature=97d9c77e7bde6c0f88c1b8d0f9631144cf8c70e0c725a2352ee256a6d6cfc644"
    );
}

#[test]
fn signs_the_host_as_botocore_does() {
    // The signed host header is lower case and, for port 443, has no port; the token keeps
    // the host as given.
    assert_eq!(
        generate(&creds(None), "eu-west-2", "Mydb.Cluster-ABC.eu-west-2.rds.amazonaws.com", 443, "app", t0()).unwrap(),
        "Mydb.Cluster-ABC.eu-west-2.rds.amazonaws.com:443/?Action=connect&DBUser=app\
         &X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20240826%2Feu-west-2%2Frds-db%2Faws4_request\
         &X-Amz-Date=20240826T220000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host\
         &X-Amz-Signature=0e9a88adeb4aa5decf45409e5ab57513784a63661fdbadc6e81664a8c7aca1a0"
    );
    assert_eq!(
        generate(&creds(Some("FQoGZXIvYXdzE+/x==")), "eu-west-2", "db.local", 6543, "ünï", t0()).unwrap(),
        "db.local:6543/?Action=connect&DBUser=%C3%BCn%C3%AF\
         &X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20240826%2Feu-west-2%2Frds-db%2Faws4_request\
         &X-Amz-Date=20240826T220000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host\
         &X-Amz-Security-Token=FQoGZXIvYXdzE%2B%2Fx%3D%3D\
         &X-Amz-Signature=9b06d992cabc49f8a2ac4ec891ce5c19ac9158e5199b1ac6302e9d08676d7d5d"
    );
}

#[test]
fn refuses_hosts_and_regions_it_cannot_sign_for() {
    let c = creds(None);
    for host in ["", "a b", "h/x", "h?x", "[zz]", "user@h"] {
        assert_eq!(
            generate(&c, "us-east-1", host, 5432, "u", t0()),
            Err(IamError::InvalidHost(host.to_string())),
            "{host:?}"
        );
    }
    assert!(generate(&c, "us-east-1", "[::1]", 5432, "u", t0()).is_ok());
    assert!(generate(&c, "us-east-1", "10.0.0.1", 5432, "u", t0()).is_ok());
    assert_eq!(
        generate(&c, "US East", "h", 5432, "u", t0()),
        Err(IamError::NoRegion)
    );
}

#[test]
fn reads_back_what_it_generates() {
    let token = generate(
        &creds(Some("tok")),
        "eu-west-2",
        "db.example.com",
        6543,
        "app user+1@x",
        t0(),
    )
    .unwrap();
    let parsed = parse_client_token(&token).unwrap();
    assert_eq!(parsed.host, "db.example.com");
    assert_eq!(parsed.port, 6543);
    assert_eq!(parsed.user, "app user+1@x");
    assert_eq!(parsed.region, "eu-west-2");
    assert_eq!(parsed.expires, t0() + TOKEN_LIFETIME);
    assert_eq!(token_expiry(&token), Some(t0() + TOKEN_LIFETIME));
}

/// A token with a long session token, like those of ECS task roles (about 1.5 KB in all).
#[test]
fn reads_tokens_with_a_long_session_token() {
    let session = "IQoJb3JpZ2luX2VjE+/".repeat(60);
    let token = generate(&creds(Some(&session)), "us-east-1", "db", 5432, "u", t0()).unwrap();
    assert!(token.len() > 1500, "{}", token.len());
    assert_eq!(token_expiry(&token), Some(t0() + TOKEN_LIFETIME));
}

#[test]
fn reads_tokens_from_other_sdks() {
    // Sorted parameters (as the Go and Java SDKs send them), `+` for a space, a shorter expiry.
    let token =
        "db.example.com:5432/?Action=connect&DBUser=app+user&X-Amz-Algorithm=AWS4-HMAC-SHA256\
                 &X-Amz-Credential=AKID%2F20240826%2Fus-west-2%2Frds-db%2Faws4_request\
                 &X-Amz-Date=20240826T235959Z&X-Amz-Expires=300\
                 &X-Amz-Security-Token=abc%3D&X-Amz-SignedHeaders=host\
                 &X-Amz-Signature=5a8753ebcfc29a1a2c724e566779721ae6c49d6ec6e3f427191fa41aeb32f0b4";
    let parsed = parse_client_token(token).unwrap();
    assert_eq!(parsed.user, "app user");
    assert_eq!(parsed.region, "us-west-2");
    assert_eq!(
        parsed.expires,
        t0() + Duration::from_secs(2 * 3600 - 1 + 300)
    );
    let reordered =
        "h:5432/?X-Amz-Signature=5a8753ebcfc29a1a2c724e566779721ae6c49d6ec6e3f427191fa41aeb32f0b4\
                     &X-Amz-SignedHeaders=host&X-Amz-Expires=900&X-Amz-Date=20240826T220000Z\
                     &X-Amz-Credential=AKID%2F20240826%2Fus-west-2%2Frds-db%2Faws4_request\
                     &X-Amz-Algorithm=AWS4-HMAC-SHA256&DBUser=u&Action=connect";
    assert_eq!(token_expiry(reordered), Some(t0() + TOKEN_LIFETIME));
}

#[test]
fn other_passwords_are_not_tokens() {
    let good = generate(&creds(None), "us-east-1", "h", 5432, "u", t0()).unwrap();
    assert!(parse_client_token(&good).is_some());
    let variants = [
        String::new(),
        "hunter2".to_string(),
        "SCRAM-SHA-256$4096:abc".to_string(),
        "http://h:5432/?Action=connect".to_string(),
        good.replace("Action=connect", "Action=download"),
        good.replace("AWS4-HMAC-SHA256", "AWS4-ECDSA-P256-SHA256"),
        good.replace("%2Frds-db%2F", "%2Fs3%2F"),
        good.replace("20240826T220000Z", "20240826T220000"),
        good.replace("20240826T220000Z", "20240827T220000Z"), // not the scope's day
        good.replace("20240826T220000Z", "20241326T220000Z"),
        good.replace("X-Amz-Expires=900", "X-Amz-Expires=soon"),
        good.replace("X-Amz-Expires=900", "X-Amz-Expires=9999999"),
        good.replace("X-Amz-SignedHeaders=host", "X-Amz-SignedHeaders=x-amz-date"),
        good.replace("DBUser=u", "DBUser="),
        good.replace("h:5432", "h:65536"),
        good.replace("h:5432", "h:"),
        good.replace("h:5432", ":5432"),
        good.replace("h:5432", "h"),
        format!("{good}&Extra=1"),
        format!("{good}&DBUser=v"),
        format!("{good}&"),
        good[..good.len() - 1].to_string(),
        good.replace("DBUser=u", "DBUser=%FF"),
        format!("{good}{}", "a".repeat(MAX_TOKEN_LEN)),
    ];
    for v in &variants {
        assert_eq!(parse_client_token(v), None, "{v}");
    }
}

#[test]
fn secrets_stay_out_of_debug_and_errors() {
    let token = Token {
        text: "h:5432/?Action=connect&X-Amz-Security-Token=SECRET".into(),
        expires: t0(),
    };
    assert!(!format!("{token:?}").contains("SECRET"));
    let unhandled = CredentialsError::unhandled("expected object key, found: SECRETKEY");
    let e = IamError::from_credentials(&unhandled);
    assert!(!e.to_string().contains("SECRETKEY"), "{e}");
    assert_eq!(e.kind(), "credentials");
    let not_loaded = CredentialsError::not_loaded("no providers in chain provided credentials");
    let e = IamError::from_credentials(&not_loaded);
    assert!(e.to_string().contains("none found"), "{e}");
    assert!(e.to_string().contains("no providers in chain"), "{e}");
}

#[test]
fn region_from_config_then_environment() {
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }
    };
    let both = env(&[
        ("AWS_REGION", "eu-west-2"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ]);
    assert_eq!(
        resolve_region(Some("ap-south-1"), both).as_deref(),
        Some("ap-south-1")
    );
    assert_eq!(resolve_region(None, both).as_deref(), Some("eu-west-2"));
    let default_only = env(&[("AWS_REGION", ""), ("AWS_DEFAULT_REGION", "us-east-1")]);
    assert_eq!(
        resolve_region(None, default_only).as_deref(),
        Some("us-east-1")
    );
    assert_eq!(resolve_region(None, env(&[])), None);
    assert!(valid_region("us-gov-west-1"));
    for bad in ["", "US-EAST-1", "us east", "-us", "us-"] {
        assert!(!valid_region(bad), "{bad}");
    }
}

/// A clock the test moves.
struct FakeClock(parking_lot::Mutex<SystemTime>);

impl FakeClock {
    fn new() -> Arc<FakeClock> {
        Arc::new(FakeClock(parking_lot::Mutex::new(t0())))
    }
    fn advance(&self, by: Duration) {
        *self.0.lock() += by;
    }
}

impl Clock for FakeClock {
    fn now(&self) -> SystemTime {
        *self.0.lock()
    }
}

/// Hands out credentials numbered by call (`AKID1`, `AKID2`, ...), each expiring `lifetime`
/// after the fake clock's now (never, for `None`), after `delay` of (tokio) time.
#[derive(Clone)]
struct Counting {
    calls: Arc<AtomicUsize>,
    clock: Arc<FakeClock>,
    lifetime: Option<Duration>,
    delay: Duration,
}

impl fmt::Debug for Counting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Counting")
    }
}

impl ProvideCredentials for Counting {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(async move {
            tokio::time::sleep(self.delay).await;
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            let expiry = self.lifetime.map(|l| self.clock.now() + l);
            Ok(AwsCredentials::new(
                format!("AKID{n}"),
                "secret",
                Some("session".into()),
                expiry,
                "counting",
            ))
        })
    }
}

fn tokens(lifetime: Option<Duration>) -> (IamTokens, Arc<FakeClock>, Arc<AtomicUsize>) {
    let clock = FakeClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let provider = Counting {
        calls: calls.clone(),
        clock: clock.clone(),
        lifetime,
        delay: Duration::ZERO,
    };
    let t = IamTokens::with_provider("us-east-1", provider, clock.clone());
    (t, clock, calls)
}

#[tokio::test]
async fn reuses_a_token_until_ten_minutes_are_left() {
    let (t, clock, calls) = tokens(None);
    let first = t.token("db", 5432, "app").await.unwrap();
    assert_eq!(first.expires(), t0() + TOKEN_LIFETIME);
    assert_eq!(token_expiry(first.as_str()), Some(first.expires()));
    clock.advance(TOKEN_REUSE - Duration::from_secs(1));
    assert_eq!(t.token("db", 5432, "app").await.unwrap(), first);
    // Another user, port or host has a token of its own.
    let other = t.token("db", 5432, "reporting").await.unwrap();
    assert_ne!(other, first);
    assert_ne!(t.token("db", 6543, "app").await.unwrap(), first);
    assert_ne!(t.token("db2", 5432, "app").await.unwrap(), first);
    clock.advance(Duration::from_secs(1));
    let second = t.token("db", 5432, "app").await.unwrap();
    assert_ne!(second, first);
    assert_eq!(second.expires(), t0() + TOKEN_REUSE + TOKEN_LIFETIME);
    // Credentials without an expiry are fetched once.
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn refreshes_before_the_credentials_expire() {
    // Credentials that expire in 3 minutes: a token signed with them is reused only until a
    // minute before that, then both are renewed.
    let (t, clock, calls) = tokens(Some(Duration::from_secs(180)));
    let first = t.token("db", 5432, "app").await.unwrap();
    assert_eq!(first.expires(), t0() + Duration::from_secs(180));
    assert!(first.as_str().contains("AKID1%2F"));
    clock.advance(Duration::from_secs(119));
    assert_eq!(t.token("db", 5432, "app").await.unwrap(), first);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    clock.advance(Duration::from_secs(1));
    let second = t.token("db", 5432, "app").await.unwrap();
    assert!(second.as_str().contains("AKID2%2F"));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_clock_that_went_back_gets_a_new_token() {
    let (t, clock, _) = tokens(None);
    clock.advance(Duration::from_secs(60));
    let first = t.token("db", 5432, "app").await.unwrap();
    *clock.0.lock() = t0();
    let again = t.token("db", 5432, "app").await.unwrap();
    assert_ne!(again, first);
    assert_eq!(again.expires(), t0() + TOKEN_LIFETIME);
}

#[tokio::test(start_paused = true)]
async fn concurrent_logins_fetch_credentials_once() {
    let clock = FakeClock::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let provider = Counting {
        calls: calls.clone(),
        clock: clock.clone(),
        lifetime: Some(Duration::from_secs(3600)),
        delay: Duration::from_millis(500),
    };
    let t = Arc::new(IamTokens::with_provider("us-east-1", provider, clock));
    let logins: Vec<_> = (0..10)
        .map(|i| {
            let t = t.clone();
            tokio::spawn(async move { t.token("db", 5432, &format!("user{i}")).await })
        })
        .collect();
    for login in logins {
        login.await.unwrap().unwrap();
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn credential_errors_reach_the_caller() {
    #[derive(Debug)]
    struct Failing;
    impl ProvideCredentials for Failing {
        fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            future::ProvideCredentials::ready(Err(CredentialsError::provider_error(
                "Non-success status from HTTP credential provider: 500",
            )))
        }
    }
    let t = IamTokens::with_provider("us-east-1", Failing, FakeClock::new());
    let e = t.token("db", 5432, "app").await.unwrap_err();
    assert!(
        matches!(
            e,
            IamError::Credentials {
                what: "provider error",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("500"), "{e}");
}
