//! RDS IAM database authentication: the tokens Sluice presents to the server in place of a
//! password ([`IamTokens`], [`generate`]), and reading the tokens clients present
//! ([`parse_client_token`], [`token_expiry`]).
//!
//! A token is a SigV4 presigned URL, without its `https://` scheme, for the `connect` action
//! of the `rds-db` service, exactly as botocore's `generate_db_auth_token` and the AWS CLI's
//! `aws rds generate-db-auth-token` make it:
//!
//! ```text
//! {host}:{port}/?Action=connect&DBUser={user}&X-Amz-Algorithm=AWS4-HMAC-SHA256
//!   &X-Amz-Credential={key id}%2F{yyyymmdd}%2F{region}%2Frds-db%2Faws4_request
//!   &X-Amz-Date={yyyymmddThhmmssZ}&X-Amz-Expires=900&X-Amz-SignedHeaders=host
//!   [&X-Amz-Security-Token={session token}]&X-Amz-Signature={64 hex digits}
//! ```
//!
//! Parameters are percent-encoded as RFC 3986 asks (everything but `A-Z a-z 0-9 - _ . ~`, so a
//! space is `%20` and `+` is `%2B`); the signed `host` header is the host in lower case with
//! its port (botocore leaves out only 443, the default of the `https` scheme it signs for);
//! the payload hash is that of the empty body; the session token, when there is one, is part
//! of the signed query (see <https://docs.aws.amazon.com/AmazonRDS/latest/UserGuide/UsingWithRDS.IAMDBAuth.Connecting.html>
//! and <https://docs.aws.amazon.com/IAM/latest/UserGuide/create-signed-request.html>).
//! The signature itself is computed by `aws-sigv4`; this module only builds the request it
//! signs and lays the parameters out in botocore's order.
//!
//! Credentials come from the AWS SDK's default chain (`aws-config`): the environment
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), the shared config and
//! credentials files, web identity, ECS/EKS container credentials
//! (`AWS_CONTAINER_CREDENTIALS_FULL_URI` / `_RELATIVE_URI`, with
//! `AWS_CONTAINER_AUTHORIZATION_TOKEN[_FILE]`) and EC2 instance metadata (IMDSv2).
//!
//! Nothing here logs, and no error text quotes a key, a session token or a token: errors
//! that could (an unexpected credentials response) say so instead of showing their details.
//! Time is a parameter ([`Clock`], `now`), so tests fix it.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

#[cfg(feature = "aws-sdk")]
use aws_config::default_provider::credentials::DefaultCredentialsChain;
#[cfg(feature = "aws-sdk")]
use aws_config::provider_config::ProviderConfig;
#[cfg(feature = "aws-sdk")]
use aws_config::Region;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sigv4::http_request::{
    self, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
};
use aws_sigv4::sign::v4;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// AWS credentials (key id, secret key, optional session token and expiry).
pub use aws_credential_types::Credentials as AwsCredentials;

/// How long a token is valid after it is signed: RDS accepts at most 15 minutes, and botocore
/// always asks for that.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(900);

/// How long [`IamTokens`] hands out the same token: until 10 of its 15 minutes are left, so a
/// token used for a login always has minutes to spare for clock skew and a slow handshake.
pub const TOKEN_REUSE: Duration = Duration::from_secs(300);

/// Temporary credentials are fetched anew once they expire within this margin, and a token
/// is not reused past it: a token is only as good as the credentials that signed it.
pub const CREDENTIALS_MARGIN: Duration = Duration::from_secs(60);

/// The SigV4 service name of RDS database logins.
const SERVICE: &str = "rds-db";

/// The longest password [`parse_client_token`] looks at. Tokens with a session token are
/// about 1.5 KB; anything far longer is not a token.
const MAX_TOKEN_LEN: usize = 8192;

/// The longest validity a SigV4 presigned URL may ask for (7 days).
const MAX_EXPIRES: u64 = 604_800;

/// What botocore's `percent_encode` leaves alone: RFC 3986's unreserved characters.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The signing parameters, in the order botocore writes them (the signature last).
const SIGNING_PARAMS: [(&str, bool); 7] = [
    ("X-Amz-Algorithm", true),
    ("X-Amz-Credential", true),
    ("X-Amz-Date", true),
    ("X-Amz-Expires", true),
    ("X-Amz-SignedHeaders", true),
    ("X-Amz-Security-Token", false),
    ("X-Amz-Signature", true),
];

/// Why no token could be made. No variant carries a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IamError {
    #[error("no AWS region for RDS IAM authentication: set aws_region, AWS_REGION or AWS_DEFAULT_REGION")]
    NoRegion,
    #[error("cannot sign an RDS IAM token for host \"{0}\": not a host name or address")]
    InvalidHost(String),
    /// The credential chain gave no credentials; `detail` is its account of why.
    #[error("no AWS credentials for RDS IAM authentication ({what}): {detail}")]
    Credentials { what: &'static str, detail: String },
    #[error("signing the RDS IAM token failed: {0}")]
    Signing(String),
}

impl IamError {
    /// A short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            IamError::NoRegion => "no_region",
            IamError::InvalidHost(_) => "invalid_host",
            IamError::Credentials { .. } => "credentials",
            IamError::Signing(_) => "signing",
        }
    }

    fn from_credentials(e: &CredentialsError) -> IamError {
        let what = match e {
            CredentialsError::CredentialsNotLoaded(_) => "none found",
            CredentialsError::ProviderTimedOut(_) => "timed out",
            CredentialsError::InvalidConfiguration(_) => "invalid configuration",
            CredentialsError::ProviderError(_) => "provider error",
            _ => "unexpected response",
        };
        let detail = if what == "unexpected response" {
            // Unhandled errors are malformed responses and unreadable variables, whose texts
            // may quote what was read (a key in a non-UTF-8 variable, a JSON token).
            "details withheld, as they may quote credential material".to_string()
        } else {
            error_chain(e)
        };
        IamError::Credentials { what, detail }
    }
}

/// An error and its sources, `: `-separated.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A token to present as the password. Its `Debug` leaves the token out.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    text: String,
    expires: SystemTime,
}

impl Token {
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// When the token stops working: 15 minutes after signing, or when the credentials that
    /// signed it expire, whichever is first.
    pub fn expires(&self) -> SystemTime {
        self.expires
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

/// The time [`IamTokens`] signs with and checks expiry against.
pub trait Clock: Send + Sync {
    fn now(&self) -> SystemTime;
}

/// The system's wall clock (SigV4 dates are wall-clock time).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// The region to sign for: `configured` (the `aws_region` key), else `AWS_REGION`, else
/// `AWS_DEFAULT_REGION`, as `env` reads them; empty values count as unset.
pub fn resolve_region(
    configured: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> Option<String> {
    configured
        .map(str::to_string)
        .into_iter()
        .chain(env("AWS_REGION"))
        .chain(env("AWS_DEFAULT_REGION"))
        .map(|r| r.trim().to_string())
        .find(|r| !r.is_empty())
}

/// Whether `region` looks like an AWS region name (`us-east-1`, `eu-west-2`, `us-gov-west-1`).
pub fn valid_region(region: &str) -> bool {
    !region.is_empty()
        && region.len() <= 64
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !region.starts_with('-')
        && !region.ends_with('-')
}

/// Signs a token for `user` on `host:port` in `region`, at `now`, valid [`TOKEN_LIFETIME`].
/// The same inputs always give the same token.
pub fn generate(
    creds: &AwsCredentials,
    region: &str,
    host: &str,
    port: u16,
    user: &str,
    now: SystemTime,
) -> Result<String, IamError> {
    if !valid_host(host) {
        return Err(IamError::InvalidHost(host.to_string()));
    }
    if !valid_region(region) {
        return Err(IamError::NoRegion);
    }
    let operation = format!(
        "Action=connect&DBUser={}",
        utf8_percent_encode(user, UNRESERVED)
    );
    // botocore signs for https://host:port, taking the host header from the URL: lower case,
    // and without the port when it is https' default.
    let lower = host.to_ascii_lowercase();
    let signed_host = if port == 443 {
        lower.clone()
    } else {
        format!("{lower}:{port}")
    };
    let url = format!("https://{signed_host}/?{operation}");

    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(TOKEN_LIFETIME);
    let identity = creds.clone().into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(SERVICE)
        .time(now)
        .settings(settings)
        .build()
        .map_err(|e| IamError::Signing(e.to_string()))?
        .into();
    let request = SignableRequest::new(
        "GET",
        url,
        std::iter::once(("host", signed_host.as_str())),
        SignableBody::empty(),
    )
    .map_err(|e| IamError::Signing(error_chain(&e)))?;
    let (instructions, _) = http_request::sign(request, &params)
        .map_err(|e| IamError::Signing(error_chain(&e)))?
        .into_parts();
    let (_, signed) = instructions.into_parts();

    if let Some((name, _)) = signed
        .iter()
        .find(|(name, _)| !SIGNING_PARAMS.iter().any(|(known, _)| known == name))
    {
        return Err(IamError::Signing(format!(
            "the signer added an unexpected parameter {name}"
        )));
    }
    let mut token = format!("{host}:{port}/?{operation}");
    for (name, required) in SIGNING_PARAMS {
        match signed.iter().find(|(n, _)| *n == name) {
            Some((_, value)) => {
                token.push('&');
                token.push_str(name);
                token.push('=');
                token.extend(utf8_percent_encode(value, UNRESERVED));
            }
            None if required => {
                return Err(IamError::Signing(format!("the signer gave no {name}")));
            }
            None => {}
        }
    }
    Ok(token)
}

/// A DNS name, an IPv4 address, or an IPv6 address in brackets.
fn valid_host(host: &str) -> bool {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// What one cached token is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TokenKey {
    host: String,
    port: u16,
    user: String,
}

#[derive(Debug, Clone)]
struct Cached {
    token: Token,
    signed: SystemTime,
    /// Past this the token is signed anew.
    renew: SystemTime,
}

/// Makes and caches server-side tokens: one per (host, port, user), reused for
/// [`TOKEN_REUSE`] and never past [`CREDENTIALS_MARGIN`] before its credentials expire.
/// Credentials are cached too, and fetched again shortly before they expire.
pub struct IamTokens {
    region: String,
    provider: SharedCredentialsProvider,
    clock: Arc<dyn Clock>,
    /// Held across a fetch, so concurrent logins wait for one request to the credential
    /// source rather than each making their own.
    credentials: tokio::sync::Mutex<Option<AwsCredentials>>,
    tokens: parking_lot::Mutex<HashMap<TokenKey, Cached>>,
}

impl fmt::Debug for IamTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IamTokens")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl IamTokens {
    /// Tokens signed with credentials from the AWS SDK's default chain, for `region`, else
    /// the region [`resolve_region`] finds in the environment. The chain is only built here;
    /// credentials are first fetched by the first [`IamTokens::token`].
    #[cfg(feature = "aws-sdk")]
    pub async fn from_environment(region: Option<&str>) -> Result<IamTokens, IamError> {
        let region =
            resolve_region(region, |name| std::env::var(name).ok()).ok_or(IamError::NoRegion)?;
        if !valid_region(&region) {
            return Err(IamError::NoRegion);
        }
        // The region is given, so the chain does not look for one (in profiles or in
        // instance metadata).
        let config = ProviderConfig::default().with_region(Some(Region::new(region.clone())));
        let chain = DefaultCredentialsChain::builder()
            .configure(config)
            .region(Region::new(region.clone()))
            .build()
            .await;
        Ok(IamTokens::with_provider(
            &region,
            chain,
            Arc::new(SystemClock),
        ))
    }

    /// Tokens signed with credentials from `provider`, at the times `clock` tells.
    pub fn with_provider(
        region: &str,
        provider: impl ProvideCredentials + 'static,
        clock: Arc<dyn Clock>,
    ) -> IamTokens {
        IamTokens {
            region: region.to_string(),
            provider: SharedCredentialsProvider::new(provider),
            clock,
            credentials: tokio::sync::Mutex::new(None),
            tokens: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// A token for `user` on `host:port`: the cached one while it is fresh, else a new one.
    pub async fn token(&self, host: &str, port: u16, user: &str) -> Result<Token, IamError> {
        let key = TokenKey {
            host: host.to_string(),
            port,
            user: user.to_string(),
        };
        let now = self.clock.now();
        if let Some(c) = self.tokens.lock().get(&key) {
            // A clock that went back (`now < signed`) would give a token dated in the future.
            if c.signed <= now && now < c.renew {
                return Ok(c.token.clone());
            }
        }
        let creds = self.credentials().await?;
        let now = self.clock.now();
        let text = generate(&creds, &self.region, host, port, user, now)?;
        let mut expires = now + TOKEN_LIFETIME;
        let mut renew = now + TOKEN_REUSE;
        if let Some(creds_expire) = creds.expiry() {
            expires = expires.min(creds_expire);
            renew = renew.min(creds_expire.checked_sub(CREDENTIALS_MARGIN).unwrap_or(now));
        }
        let token = Token { text, expires };
        self.tokens.lock().insert(
            key,
            Cached {
                token: token.clone(),
                signed: now,
                renew,
            },
        );
        Ok(token)
    }

    /// The cached credentials, or new ones when they are missing or about to expire.
    async fn credentials(&self) -> Result<AwsCredentials, IamError> {
        let mut slot = self.credentials.lock().await;
        let now = self.clock.now();
        if let Some(c) = slot.as_ref() {
            if c.expiry().is_none_or(|e| e > now + CREDENTIALS_MARGIN) {
                return Ok(c.clone());
            }
        }
        let creds = self
            .provider
            .provide_credentials()
            .await
            .map_err(|e| IamError::from_credentials(&e))?;
        *slot = Some(creds.clone());
        Ok(creds)
    }
}

/// What a client-presented RDS IAM token says about itself. Nothing here is verified: only
/// AWS can check the signature.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientToken {
    /// The host and port the token was signed for.
    pub host: String,
    pub port: u16,
    /// `DBUser`, decoded.
    pub user: String,
    /// The region of its credential scope.
    pub region: String,
    /// `X-Amz-Date` + `X-Amz-Expires`.
    pub expires: SystemTime,
}

impl fmt::Debug for ClientToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientToken")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("region", &self.region)
            .field("expires", &self.expires)
            .finish()
    }
}

/// When an RDS IAM token presented as a password expires; `None` when it is not one.
pub fn token_expiry(password: &str) -> Option<SystemTime> {
    parse_client_token(password).map(|t| t.expires)
}

/// Recognises an RDS IAM token (the shape [`generate`] makes, its parameters in any order, as
/// other SDKs order them differently) and reads what it was signed for. `None` when
/// `password` is not one.
pub fn parse_client_token(password: &str) -> Option<ClientToken> {
    if password.len() > MAX_TOKEN_LEN {
        return None;
    }
    let (authority, query) = password.split_once("/?")?;
    let (host, port) = authority.rsplit_once(':')?;
    if host.is_empty() || host.contains(['/', '?', '&', '=']) {
        return None;
    }
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok()?;

    let mut fields: [Option<String>; 9] = Default::default();
    const NAMES: [&str; 9] = [
        "Action",
        "DBUser",
        "X-Amz-Algorithm",
        "X-Amz-Credential",
        "X-Amz-Date",
        "X-Amz-Expires",
        "X-Amz-SignedHeaders",
        "X-Amz-Signature",
        "X-Amz-Security-Token",
    ];
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=')?;
        let i = NAMES.iter().position(|n| *n == name)?;
        if fields[i].is_some() {
            return None;
        }
        fields[i] = Some(query_decode(value)?);
    }
    let [action, user, algorithm, credential, date, expires, signed_headers, signature, _token] =
        fields;
    if action? != "connect" || algorithm? != "AWS4-HMAC-SHA256" {
        return None;
    }
    let user = user.filter(|u| !u.is_empty())?;
    let signed_headers = signed_headers?;
    if !signed_headers.split(';').any(|h| h == "host") {
        return None;
    }
    let signature = signature?;
    if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    // key id / yyyymmdd / region / rds-db / aws4_request
    let credential = credential?;
    let scope: Vec<&str> = credential.split('/').collect();
    let [key_id, day, region, SERVICE, "aws4_request"] = scope[..] else {
        return None;
    };
    if key_id.is_empty() || !valid_region(region) {
        return None;
    }
    let date = date?;
    if !date.starts_with(day) {
        return None;
    }
    let signed = parse_amz_date(&date)?;
    let expires: u64 = expires?.parse().ok()?;
    if expires > MAX_EXPIRES {
        return None;
    }
    Some(ClientToken {
        host: host.to_string(),
        port,
        user,
        region: region.to_string(),
        expires: signed + Duration::from_secs(expires),
    })
}

/// Decodes one query value: `%XX` escapes, and `+` as a space (Go's SDK encodes spaces so;
/// every SDK encodes a literal `+` as `%2B`).
fn query_decode(value: &str) -> Option<String> {
    let spaced = value.replace('+', " ");
    percent_decode_str(&spaced)
        .decode_utf8()
        .ok()
        .map(|v| v.into_owned())
}

/// `yyyymmddThhmmssZ` (SigV4's basic ISO 8601 form) as a time.
fn parse_amz_date(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 16
        || b[8] != b'T'
        || b[15] != b'Z'
        || !b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit)
    {
        return None;
    }
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[9..11],
        &s[11..13],
        &s[13..15]
    );
    humantime::parse_rfc3339(&rfc3339).ok()
}

#[cfg(test)]
mod tests;
