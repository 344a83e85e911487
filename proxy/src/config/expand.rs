//! `${NAME}` references in configuration values, and keeping secrets out of error messages.
//!
//! References are expanded in the parsed string values of every source (the file, `SLUICE_*`
//! variables, flags), once, never in the raw text: a comment may mention `${NAME}`, and a value
//! brought in is used exactly as it is (a `"`, `\n` or `\u0041` in a password does not change how
//! the file reads). In the user name and password of `upstream`, a substituted value is
//! percent-encoded, so the variable holds the password as it is, whatever characters it has.
//!
//! Every value brought in by a reference, and every value of a secret key (a password, the
//! password in `upstream`), is remembered in [`Secrets`], and configuration errors are scrubbed
//! of them before anyone sees them.

use figment::value::Value;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use super::{invalid, ConfigError};

/// What a user name or password may hold unencoded in a URL: RFC 3986's unreserved characters.
const USERINFO: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Shown in place of a secret.
const REDACTED: &str = "[redacted]";

/// Values that no configuration error may print.
#[derive(Debug, Default)]
pub(super) struct Secrets(Vec<String>);

impl Secrets {
    fn add(&mut self, s: &str) {
        // Shorter values would mangle every message they happen to occur in; a password that
        // short is no secret anyway.
        if s.len() >= 3 && !self.0.iter().any(|x| x == s) {
            self.0.push(s.to_string());
        }
    }

    fn add_url_password(&mut self, url: &str) {
        if let Some(p) = url::Url::parse(url)
            .ok()
            .and_then(|u| u.password().map(str::to_string))
        {
            self.add(&super::upstream::decode(&p));
            self.add(&p);
        }
    }

    /// `text` with every secret in it replaced by `[redacted]`.
    pub fn scrub(&self, text: &str) -> String {
        let mut sorted: Vec<&String> = self.0.iter().collect();
        // The longest first, so a secret that contains another is replaced whole.
        sorted.sort_by_key(|s| std::cmp::Reverse(s.len()));
        sorted
            .into_iter()
            .fold(text.to_string(), |t, s| t.replace(s.as_str(), REDACTED))
    }

    /// `e` with every secret in its text replaced.
    pub fn scrub_error(&self, e: ConfigError) -> ConfigError {
        match e {
            ConfigError::Parse(t) => ConfigError::Parse(self.scrub(&t)),
            ConfigError::Invalid { key, why } => ConfigError::Invalid {
                key,
                why: self.scrub(&why),
            },
        }
    }
}

/// Whether the value at `key` (its last segment) is a secret (a path to one is not).
pub(super) fn is_secret_key(key: &str) -> bool {
    !key.ends_with("_file")
        && (key.contains("password") || key.contains("secret") || key.contains("token"))
}

/// The value of the `SLUICE_*` variable for `key` (`users.app.password`): a secret is a string
/// whatever it looks like (`0012345` stays `0012345`); any other value is read as TOML-like data,
/// so numbers, booleans and lists can be given.
pub(super) fn env_value(key: &str, value: String) -> Value {
    let last = key.rsplit('.').next().unwrap_or_default();
    if is_secret_key(last) || key == "upstream" {
        Value::from(value)
    } else {
        read_as_data(&value)
    }
}

fn read_as_data(s: &str) -> Value {
    s.parse()
        .unwrap_or_else(|e: std::convert::Infallible| match e {})
}

/// Expands the references in every string of `value` (the merged configuration), remembering
/// secrets; `path` is the key being walked.
pub(super) fn expand_tree(
    value: &mut Value,
    path: &mut Vec<String>,
    secrets: &mut Secrets,
) -> Result<(), ConfigError> {
    match value {
        Value::String(_, s) => {
            let key = path.join(".");
            let last = path.last().map(String::as_str).unwrap_or_default();
            let secret = is_secret_key(last);
            if s.contains("${") {
                let userinfo = if key == "upstream" {
                    userinfo_end(s)
                } else {
                    0
                };
                *s = expand(s, &key, userinfo, secrets)?;
                if !secret && key != "upstream" {
                    // Read as a `SLUICE_*` variable is: `"${WORKERS}"` may be a number.
                    let parsed = read_as_data(s);
                    *value = parsed;
                    return Ok(());
                }
            }
            if secret {
                secrets.add(s);
            }
            if key == "upstream" {
                secrets.add_url_password(s);
            }
        }
        Value::Dict(_, d) => {
            for (k, v) in d.iter_mut() {
                path.push(k.clone());
                let r = expand_tree(v, path, secrets);
                path.pop();
                r?;
            }
        }
        Value::Array(_, a) => {
            for (i, v) in a.iter_mut().enumerate() {
                path.push(i.to_string());
                let r = expand_tree(v, path, secrets);
                path.pop();
                r?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// In a URL template, where its user information (`user:password@`) ends: the last `@` of the
/// authority, or 0 when there is none.
fn userinfo_end(url: &str) -> usize {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return 0;
    };
    // The authority ends at the path, query or fragment; `${...}` may hold any of those
    // characters, so the search skips references.
    let mut end = url.len();
    let mut i = start;
    let bytes = url.as_bytes();
    while i < url.len() {
        if url[i..].starts_with("${") {
            match url[i..].find('}') {
                Some(close) => i += close + 1,
                None => break,
            }
            continue;
        }
        if matches!(bytes[i], b'/' | b'?' | b'#') {
            end = i;
            break;
        }
        i += 1;
    }
    url[start..end].rfind('@').map(|at| start + at).unwrap_or(0)
}

/// Expands `${NAME}` references in `s`, the value of `key`; a value substituted before byte
/// `encode_until` (a URL's user information) is percent-encoded. A missing variable is an error
/// naming the key and the variable, never a value.
pub(super) fn expand(
    s: &str,
    key: &str,
    encode_until: usize,
    secrets: &mut Secrets,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(s.len());
    let mut at = 0;
    while let Some(found) = s[at..].find("${") {
        let start = at + found;
        out.push_str(&s[at..start]);
        let after = start + 2;
        let end = s[after..]
            .find('}')
            .map(|e| after + e)
            .ok_or_else(|| invalid(key, "unterminated ${...} reference"))?;
        let name = &s[after..end];
        let value = std::env::var(name)
            .map_err(|_| invalid(key, format!("environment variable {name} is not set")))?;
        secrets.add(&value);
        if start < encode_until {
            out.extend(utf8_percent_encode(&value, USERINFO));
        } else {
            out.push_str(&value);
        }
        at = end + 1;
    }
    out.push_str(&s[at..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_ends_at_the_last_at_of_the_authority() {
        assert_eq!(userinfo_end("postgres://u:${PW}@h:5432/db"), 18);
        assert_eq!(userinfo_end("postgres://h:5432/db?x=a@b"), 0);
        assert_eq!(userinfo_end("postgres://${U}:${P}@${H}/${D}"), 20);
        assert_eq!(userinfo_end("not a url"), 0);
    }

    #[test]
    fn secrets_from_the_environment_stay_strings() {
        let s = |v: Value| v.into_string();
        assert_eq!(
            s(env_value("users.app.password", "0012345".into())).as_deref(),
            Some("0012345")
        );
        assert_eq!(
            s(env_value("upstream_password", "true".into())).as_deref(),
            Some("true")
        );
        assert_eq!(env_value("max_waiting", "5".into()).to_u128(), Some(5));
        assert_eq!(
            env_value("tls_enabled", "true".into()).to_bool(),
            Some(true)
        );
    }

    #[test]
    fn secrets_are_scrubbed_longest_first_and_short_ones_kept() {
        let mut s = Secrets::default();
        s.add("hunter2");
        s.add("hunter2-long");
        s.add("ab");
        assert_eq!(
            s.scrub("a hunter2-long and a hunter2 in about"),
            "a [redacted] and a [redacted] in about"
        );
    }
}
