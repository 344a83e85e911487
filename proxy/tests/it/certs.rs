//! A throw-away PKI for TLS tests, made with rcgen.
//!
//! A [`TestCa`] is three self-signed roots that share a name prefix: one ECDSA P-256 root, one
//! ECDSA P-384 root and one RSA 2048 root. [`TestCa::cert_pem`] is the bundle of all three, so
//! whoever trusts "the CA" trusts every certificate it issues. [`TestCa::issue`] signs a leaf
//! with the root of the leaf's own key kind, so the leaf's *signature algorithm* follows its key:
//!
//! | [`KeyKind`]  | leaf key        | leaf signature    | channel binding hash |
//! |--------------|-----------------|-------------------|----------------------|
//! | `EcdsaP256`  | ECDSA P-256     | ECDSA-SHA256      | SHA-256              |
//! | `EcdsaP384`  | ECDSA P-384     | ECDSA-SHA384      | SHA-384              |
//! | `Rsa2048`    | RSA 2048        | RSA-SHA256 (PKCS#1 v1.5) | SHA-256       |
//!
//! (SCRAM's `tls-server-end-point` channel binding hashes the server certificate with the hash
//! of its signature algorithm, which is why that matters.)
//!
//! ring, rcgen's backend here, cannot generate RSA keys: RSA keys come from the `openssl` CLI
//! (`openssl genpkey`, PKCS#8) and are loaded with [`rcgen::KeyPair::from_pem_and_sign_algo`].
//! `bash .ci/run` installs the `openssl` package.
//!
//! Names in [`IssueOpts::hosts`] that parse as IP addresses become IP SANs, the others DNS SANs.
//! An `expired` leaf was valid from 2020-01-01 to 2021-01-01.
#![allow(dead_code)]

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, CertifiedIssuer, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SignatureAlgorithm,
};

/// Key (and with it signature) kind of a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA P-256, signed ECDSA-SHA256.
    EcdsaP256,
    /// ECDSA P-384, signed ECDSA-SHA384.
    EcdsaP384,
    /// RSA 2048, signed RSA-SHA256.
    Rsa2048,
}

impl KeyKind {
    pub const ALL: [KeyKind; 3] = [KeyKind::EcdsaP256, KeyKind::EcdsaP384, KeyKind::Rsa2048];

    fn algorithm(self) -> &'static SignatureAlgorithm {
        match self {
            KeyKind::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyKind::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyKind::Rsa2048 => &rcgen::PKCS_RSA_SHA256,
        }
    }

    fn label(self) -> &'static str {
        match self {
            KeyKind::EcdsaP256 => "ECDSA P-256",
            KeyKind::EcdsaP384 => "ECDSA P-384",
            KeyKind::Rsa2048 => "RSA 2048",
        }
    }

    fn generate(self) -> KeyPair {
        match self {
            KeyKind::Rsa2048 => {
                let pem = openssl_rsa_2048();
                KeyPair::from_pem_and_sign_algo(&pem, self.algorithm())
                    .unwrap_or_else(|e| panic!("load the RSA key made by openssl: {e}"))
            }
            _ => KeyPair::generate_for(self.algorithm())
                .unwrap_or_else(|e| panic!("generate a {} key: {e}", self.label())),
        }
    }
}

/// An RSA 2048 private key in PKCS#8 PEM, from `openssl genpkey`.
fn openssl_rsa_2048() -> String {
    let out = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ])
        .args(["-outform", "PEM"])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "TLS tests make RSA keys with the `openssl` CLI, which cannot be run ({e}): \
                 install it with `apt-get install -y openssl` (`bash .ci/run` does)"
            )
        });
    assert!(
        out.status.success(),
        "openssl genpkey failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let pem = String::from_utf8(out.stdout).expect("openssl writes PEM text");
    assert!(
        pem.contains("-----BEGIN PRIVATE KEY-----"),
        "openssl genpkey did not write a PKCS#8 key: {pem}"
    );
    pem
}

/// What [`TestCa::issue`] makes.
#[derive(Debug, Clone)]
pub struct IssueOpts<'a> {
    /// Subject alternative names: IP addresses become IP SANs, the rest DNS SANs. The first is
    /// also the common name.
    pub hosts: &'a [&'a str],
    pub key: KeyKind,
    /// Valid from 2020-01-01 to 2021-01-01 (long expired) instead of until 2099.
    pub expired: bool,
}

impl Default for IssueOpts<'static> {
    fn default() -> Self {
        IssueOpts {
            hosts: &["localhost", "127.0.0.1"],
            key: KeyKind::EcdsaP256,
            expired: false,
        }
    }
}

/// A leaf certificate and its private key (PKCS#8), both PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Issued {
    /// Writes `<stem>.crt` (0644) and `<stem>.key` (0600) into `dir`, owned by us; returns
    /// (certificate path, key path).
    pub fn write(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        self.write_owned(dir, stem, None)
    }

    /// Like [`Issued::write`], the files owned by `owner` (uid, gid) when given.
    pub fn write_owned(
        &self,
        dir: &Path,
        stem: &str,
        owner: Option<(u32, u32)>,
    ) -> (PathBuf, PathBuf) {
        (
            write_pem(dir, &format!("{stem}.crt"), &self.cert_pem, owner, 0o644),
            write_pem(dir, &format!("{stem}.key"), &self.key_pem, owner, 0o600),
        )
    }
}

/// A test certificate authority: one root per [`KeyKind`].
pub struct TestCa {
    name: String,
    roots: Vec<(KeyKind, CertifiedIssuer<'static, KeyPair>)>,
}

impl TestCa {
    /// A new CA (fresh keys) whose roots are named `<common_name> (<key kind>)`.
    pub fn new(common_name: &str) -> TestCa {
        let roots = KeyKind::ALL
            .iter()
            .map(|&kind| {
                let mut params = CertificateParams::default();
                params.distinguished_name = rcgen::DistinguishedName::new();
                params.distinguished_name.push(
                    DnType::CommonName,
                    format!("{common_name} ({})", kind.label()),
                );
                params
                    .distinguished_name
                    .push(DnType::OrganizationName, "Sluice tests");
                params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
                params.key_usages = vec![
                    KeyUsagePurpose::KeyCertSign,
                    KeyUsagePurpose::CrlSign,
                    KeyUsagePurpose::DigitalSignature,
                ];
                params.not_before = date_time_ymd(2019, 1, 1);
                params.not_after = date_time_ymd(2099, 12, 31);
                let issuer = CertifiedIssuer::self_signed(params, kind.generate())
                    .unwrap_or_else(|e| panic!("self-sign the {} root: {e}", kind.label()));
                (kind, issuer)
            })
            .collect();
        TestCa {
            name: common_name.to_owned(),
            roots,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The three root certificates, one PEM bundle.
    pub fn cert_pem(&self) -> String {
        self.roots.iter().map(|(_, r)| r.pem()).collect()
    }

    /// Writes [`TestCa::cert_pem`] to `<dir>/<name>` (0644, ours) and returns its path.
    pub fn write_cert(&self, dir: &Path, name: &str) -> PathBuf {
        write_pem(dir, name, &self.cert_pem(), None, 0o644)
    }

    /// A leaf certificate for `opts.hosts`, usable by servers and clients, signed by the root
    /// of `opts.key`'s kind.
    pub fn issue(&self, opts: &IssueOpts<'_>) -> Issued {
        assert!(!opts.hosts.is_empty(), "a certificate needs a host name");
        let hosts: Vec<String> = opts.hosts.iter().map(|h| h.to_string()).collect();
        let mut params = CertificateParams::new(hosts)
            .unwrap_or_else(|e| panic!("certificate names {:?}: {e}", opts.hosts));
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, opts.hosts[0]);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = match opts.key {
            KeyKind::Rsa2048 => vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ],
            _ => vec![KeyUsagePurpose::DigitalSignature],
        };
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        if opts.expired {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2021, 1, 1);
        } else {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2099, 1, 1);
        }
        let root = &self
            .roots
            .iter()
            .find(|(k, _)| *k == opts.key)
            .expect("a root per key kind")
            .1;
        let key = opts.key.generate();
        let cert = params
            .signed_by(&key, &**root)
            .unwrap_or_else(|e| panic!("sign a {} leaf: {e}", opts.key.label()));
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// [`TestCa::issue`] with the defaults but for the key kind.
    pub fn issue_kind(&self, key: KeyKind) -> Issued {
        self.issue(&IssueOpts {
            key,
            ..IssueOpts::default()
        })
    }
}

/// Writes `contents` to `<dir>/<name>` with `mode`, then hands it to `owner` (uid, gid) when
/// given (PostgreSQL wants its key owned by its OS user, mode 0600). Replaces an existing file
/// atomically (write to a temporary name, rename), as a certificate rotation on disk would.
pub fn write_pem(
    dir: &Path,
    name: &str,
    contents: &str,
    owner: Option<(u32, u32)>,
    mode: u32,
) -> PathBuf {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .unwrap_or_else(|e| panic!("create {}: {e}", tmp.display()));
    f.write_all(contents.as_bytes())
        .unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    drop(f);
    // The umask may have cleared bits of `mode`.
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", tmp.display()));
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", tmp.display()));
    }
    fs::rename(&tmp, &path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
    path
}
