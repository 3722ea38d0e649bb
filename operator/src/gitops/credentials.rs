//! Credentials for the GitOps repository, from the Kubernetes Secret that
//! `spec.gitops.credentialsSecret` names, in the key layout Argo CD and
//! Flux use for repository Secrets so one Secret can serve both:
//!
//! | key | meaning |
//! | --- | --- |
//! | `ssh-privatekey` | an SSH private key (OpenSSH or PEM), the `kubernetes.io/ssh-auth` Secret type's key |
//! | `ssh-passphrase` | optional, the key's passphrase |
//! | `known_hosts` | optional, OpenSSH `known_hosts` lines the server's host key must match |
//! | `username` + `password` | HTTPS basic auth; the password is usually a token |
//!
//! Without `known_hosts`, SSH falls back to libgit2's own check against the
//! operator's `~/.ssh/known_hosts`, so an unknown host is refused, never
//! trusted on first use. Hashed `known_hosts` entries (`|1|...`, from
//! `ssh-keyscan -H`) are not supported: list the host names in clear.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt;

use base64::Engine;
use git2::{CertificateCheckStatus, Cred, CredentialType, RemoteCallbacks};
use sha2::{Digest, Sha256};
use tracing::debug;

/// The Secret key of an SSH private key.
pub const SSH_PRIVATE_KEY: &str = "ssh-privatekey";
/// The Secret key of the SSH key's passphrase.
pub const SSH_PASSPHRASE: &str = "ssh-passphrase";
/// The Secret key of the trusted SSH host keys.
pub const KNOWN_HOSTS: &str = "known_hosts";
/// The Secret key of the HTTPS user name.
pub const USERNAME: &str = "username";
/// The Secret key of the HTTPS password or token.
pub const PASSWORD: &str = "password";

/// How to authenticate to the repository. `Debug` never prints a secret.
#[derive(Clone, Default)]
pub enum GitCredentials {
    /// No credentials: local paths, `file://` URLs, public HTTPS.
    #[default]
    Anonymous,
    /// An SSH key.
    Ssh(SshKey),
    /// HTTPS basic auth (user name and password or token).
    Basic { username: String, password: String },
}

/// An SSH key from a Secret.
#[derive(Clone)]
pub struct SshKey {
    pub private_key: String,
    pub passphrase: Option<String>,
    /// Trusted host keys; libgit2's default check when `None`.
    pub known_hosts: Option<KnownHosts>,
}

impl fmt::Debug for GitCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GitCredentials::Anonymous => f.write_str("Anonymous"),
            GitCredentials::Ssh(key) => f
                .debug_struct("Ssh")
                .field("private_key", &"<redacted>")
                .field("passphrase", &key.passphrase.as_ref().map(|_| "<redacted>"))
                .field("known_hosts", &key.known_hosts)
                .finish(),
            GitCredentials::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
        }
    }
}

/// Why a Secret's data cannot be used as credentials; names the Secret and
/// the key so that the condition message says what to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialsError {
    #[error(
        "secret {secret}: no credentials: needs key `{SSH_PRIVATE_KEY}`, or keys `{USERNAME}` and `{PASSWORD}`"
    )]
    NoCredentials { secret: String },
    #[error("secret {secret}: key `{key}` is missing (it goes with `{with}`)")]
    MissingKey {
        secret: String,
        key: &'static str,
        with: &'static str,
    },
    #[error("secret {secret}: key `{key}` is invalid: {reason}")]
    InvalidKey {
        secret: String,
        key: &'static str,
        reason: String,
    },
}

impl GitCredentials {
    /// Reads credentials from a Secret's `data` (already base64-decoded, as
    /// `k8s_openapi`'s `ByteString` holds it). An SSH key wins when a Secret
    /// has both kinds.
    pub fn from_secret_data(
        secret: &str,
        data: &BTreeMap<String, Vec<u8>>,
    ) -> Result<GitCredentials, CredentialsError> {
        let text = |key: &'static str| -> Result<Option<String>, CredentialsError> {
            let Some(bytes) = data.get(key) else {
                return Ok(None);
            };
            let s = String::from_utf8(bytes.clone()).map_err(|_| CredentialsError::InvalidKey {
                secret: secret.to_string(),
                key,
                reason: "not UTF-8 text".to_string(),
            })?;
            if s.contains('\0') {
                return Err(CredentialsError::InvalidKey {
                    secret: secret.to_string(),
                    key,
                    reason: "contains a NUL byte".to_string(),
                });
            }
            Ok(Some(s))
        };
        let invalid = |key: &'static str, reason: &str| CredentialsError::InvalidKey {
            secret: secret.to_string(),
            key,
            reason: reason.to_string(),
        };

        if let Some(private_key) = text(SSH_PRIVATE_KEY)? {
            let trimmed = private_key.trim();
            if !(trimmed.starts_with("-----BEGIN ") && trimmed.ends_with("PRIVATE KEY-----")) {
                return Err(invalid(
                    SSH_PRIVATE_KEY,
                    "not a PEM or OpenSSH private key (-----BEGIN ... PRIVATE KEY-----)",
                ));
            }
            let passphrase = text(SSH_PASSPHRASE)?.filter(|p| !p.is_empty());
            let known_hosts = match text(KNOWN_HOSTS)? {
                Some(lines) => Some(KnownHosts::parse(&lines).map_err(|reason| {
                    CredentialsError::InvalidKey {
                        secret: secret.to_string(),
                        key: KNOWN_HOSTS,
                        reason,
                    }
                })?),
                None => None,
            };
            return Ok(GitCredentials::Ssh(SshKey {
                private_key: format!("{trimmed}\n"),
                passphrase,
                known_hosts,
            }));
        }

        match (text(USERNAME)?, text(PASSWORD)?) {
            (Some(username), Some(password)) => {
                if username.trim().is_empty() {
                    return Err(invalid(USERNAME, "empty"));
                }
                if password.is_empty() {
                    return Err(invalid(PASSWORD, "empty"));
                }
                Ok(GitCredentials::Basic {
                    username: username.trim().to_string(),
                    password: password.trim_end_matches(['\n', '\r']).to_string(),
                })
            }
            (Some(_), None) => Err(CredentialsError::MissingKey {
                secret: secret.to_string(),
                key: PASSWORD,
                with: USERNAME,
            }),
            (None, Some(_)) => Err(CredentialsError::MissingKey {
                secret: secret.to_string(),
                key: USERNAME,
                with: PASSWORD,
            }),
            (None, None) => Err(CredentialsError::NoCredentials {
                secret: secret.to_string(),
            }),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            GitCredentials::Anonymous => "no credentials",
            GitCredentials::Ssh(_) => "an SSH key",
            GitCredentials::Basic { .. } => "a user name and password",
        }
    }

    /// The libgit2 callbacks that answer the server's credential request
    /// and check an SSH host key, recording in `state` what happened so that
    /// a failed operation can be classified.
    pub(crate) fn callbacks<'a>(
        &'a self,
        url: &'a str,
        state: &'a AuthState,
    ) -> RemoteCallbacks<'a> {
        let mut cb = RemoteCallbacks::new();
        cb.credentials(move |_url, user_from_url, allowed| {
            let user = user_from_url.unwrap_or("git");
            if allowed.contains(CredentialType::USERNAME) {
                return Cred::username(user);
            }
            // libgit2 asks again when the server refused what it was given:
            // answering twice would loop, so the second ask is the refusal.
            let asked = state.asked.get() + 1;
            state.asked.set(asked);
            if asked > 1 {
                state.refused.set(true);
                return Err(git2::Error::from_str("the server refused the credentials"));
            }
            match self {
                GitCredentials::Ssh(key) if allowed.contains(CredentialType::SSH_KEY) => {
                    Cred::ssh_key_from_memory(
                        user,
                        None,
                        &key.private_key,
                        key.passphrase.as_deref(),
                    )
                }
                GitCredentials::Basic { username, password }
                    if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) =>
                {
                    Cred::userpass_plaintext(username, password)
                }
                other => {
                    state.refused.set(true);
                    Err(git2::Error::from_str(&format!(
                        "the server asks for credentials of kind {allowed:?}, the secret has {}",
                        other.kind()
                    )))
                }
            }
        });
        cb.certificate_check(move |cert, host| {
            let Some(hostkey) = cert.as_hostkey() else {
                // TLS: libgit2 verifies against the system's CAs.
                return Ok(CertificateCheckStatus::CertificatePassthrough);
            };
            let GitCredentials::Ssh(SshKey {
                known_hosts: Some(known),
                ..
            }) = self
            else {
                return Ok(CertificateCheckStatus::CertificatePassthrough);
            };
            let port = ssh_port(url);
            let trusted = match (hostkey.hostkey(), hostkey.hash_sha256()) {
                (Some(raw), _) => known.trusts(host, port, |k| k == raw),
                (None, Some(sha)) => {
                    known.trusts(host, port, |k| Sha256::digest(k).as_slice() == sha)
                }
                (None, None) => false,
            };
            if trusted {
                debug!(host, "SSH host key matches known_hosts");
                Ok(CertificateCheckStatus::CertificateOk)
            } else {
                *state.host_key_rejected.borrow_mut() = Some(host.to_string());
                Err(git2::Error::from_str(&format!(
                    "host key of {host} matches no entry of {KNOWN_HOSTS}"
                )))
            }
        });
        cb
    }
}

/// What the callbacks saw during one libgit2 operation.
#[derive(Default)]
pub(crate) struct AuthState {
    asked: Cell<u32>,
    pub(crate) refused: Cell<bool>,
    pub(crate) host_key_rejected: RefCell<Option<String>>,
}

/// Parsed OpenSSH `known_hosts` lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownHosts {
    entries: Vec<KnownHost>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct KnownHost {
    patterns: Vec<String>,
    key_type: String,
    /// The key blob (the base64 field, decoded): what the server sends.
    key: Vec<u8>,
}

impl KnownHosts {
    /// Parses `known_hosts` text: `patterns key-type base64-key [comment]`
    /// per line; comments, blank lines and `@cert-authority`/`@revoked`
    /// lines are skipped.
    pub fn parse(text: &str) -> Result<KnownHosts, String> {
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with('@') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(hosts), Some(key_type), Some(key)) =
                (fields.next(), fields.next(), fields.next())
            else {
                return Err(format!(
                    "line {}: expected `hosts key-type base64-key`",
                    n + 1
                ));
            };
            if hosts.starts_with('|') {
                return Err(format!(
                    "line {}: hashed host names are not supported; list the host in clear",
                    n + 1
                ));
            }
            let key = base64::engine::general_purpose::STANDARD
                .decode(key)
                .map_err(|e| format!("line {}: key is not base64: {e}", n + 1))?;
            entries.push(KnownHost {
                patterns: hosts.split(',').map(str::to_string).collect(),
                key_type: key_type.to_string(),
                key,
            });
        }
        if entries.is_empty() {
            return Err("no host keys".to_string());
        }
        Ok(KnownHosts { entries })
    }

    /// Whether a key that `matches` is listed for `host` on `port`
    /// (`[host]:port` entries for ports other than 22).
    fn trusts(&self, host: &str, port: Option<u16>, matches: impl Fn(&[u8]) -> bool) -> bool {
        let name = match port {
            Some(p) if p != 22 => format!("[{host}]:{p}"),
            _ => host.to_string(),
        };
        self.entries.iter().any(|e| {
            let listed = e
                .patterns
                .iter()
                .any(|p| !p.starts_with('!') && glob(p, &name));
            let negated = e
                .patterns
                .iter()
                .any(|p| p.strip_prefix('!').is_some_and(|p| glob(p, &name)));
            listed && !negated && matches(&e.key)
        })
    }

    /// The key types listed, for messages.
    pub fn key_types(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.key_type.as_str()).collect()
    }
}

/// OpenSSH host pattern matching: `*` any run, `?` one character.
fn glob(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a.eq_ignore_ascii_case(b) => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

/// The port of an `ssh://host:port/...` URL; scp-like URLs have none.
fn ssh_port(url: &str) -> Option<u16> {
    let rest = url.strip_prefix("ssh://")?;
    let authority = rest.split('/').next()?;
    let host_port = authority.rsplit('@').next()?;
    let (_, port) = host_port.rsplit_once(':')?;
    port.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    const KEY: &str =
        "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n";

    #[test]
    fn basic_auth_from_username_and_password() {
        let c = GitCredentials::from_secret_data(
            "gitops",
            &data(&[("username", "bot"), ("password", "tok\n")]),
        )
        .expect("valid");
        match &c {
            GitCredentials::Basic { username, password } => {
                assert_eq!((username.as_str(), password.as_str()), ("bot", "tok"));
            }
            other => panic!("{other:?}"),
        }
        assert!(!format!("{c:?}").contains("tok"));
    }

    #[test]
    fn missing_keys_are_named() {
        let err = GitCredentials::from_secret_data("gitops", &data(&[("username", "bot")]))
            .expect_err("no password");
        assert_eq!(
            err.to_string(),
            "secret gitops: key `password` is missing (it goes with `username`)"
        );
        let err = GitCredentials::from_secret_data("gitops", &data(&[("password", "x")]))
            .expect_err("no user");
        assert!(
            err.to_string().contains("key `username` is missing"),
            "{err}"
        );
        let err = GitCredentials::from_secret_data("gitops", &data(&[])).expect_err("empty");
        assert!(err.to_string().contains("`ssh-privatekey`"), "{err}");
    }

    #[test]
    fn ssh_key_with_known_hosts() {
        let blob = base64::engine::general_purpose::STANDARD.encode(b"\0\0\0\x0bssh-ed25519key");
        let known = format!(
            "# comment\ngit.example,10.0.0.1 ssh-ed25519 {blob}\n[git.example]:2222 ssh-ed25519 {blob}\n"
        );
        let c = GitCredentials::from_secret_data(
            "gitops",
            &data(&[
                ("ssh-privatekey", KEY),
                ("known_hosts", &known),
                ("ssh-passphrase", "pw"),
            ]),
        )
        .expect("valid");
        let GitCredentials::Ssh(key) = &c else {
            panic!("{c:?}")
        };
        assert_eq!(key.passphrase.as_deref(), Some("pw"));
        let hosts = key.known_hosts.as_ref().expect("known hosts");
        let raw = b"\0\0\0\x0bssh-ed25519key";
        assert!(hosts.trusts("git.example", None, |k| k == raw));
        assert!(hosts.trusts("10.0.0.1", Some(22), |k| k == raw));
        assert!(hosts.trusts("git.example", Some(2222), |k| k == raw));
        assert!(!hosts.trusts("git.example", Some(2200), |k| k == raw));
        assert!(!hosts.trusts("other.example", None, |k| k == raw));
        assert!(!hosts.trusts("git.example", None, |k| k == b"other"));
        let printed = format!("{c:?}");
        assert!(
            !printed.contains("AAAA") && !printed.contains("pw"),
            "{printed}"
        );
    }

    #[test]
    fn invalid_ssh_material_is_named() {
        let err = GitCredentials::from_secret_data("gitops", &data(&[("ssh-privatekey", "nope")]))
            .expect_err("bad key");
        assert!(
            err.to_string().contains("key `ssh-privatekey` is invalid"),
            "{err}"
        );
        let err = GitCredentials::from_secret_data(
            "gitops",
            &data(&[("ssh-privatekey", KEY), ("known_hosts", "host ssh-rsa !!!")]),
        )
        .expect_err("bad known_hosts");
        assert!(
            err.to_string().contains("key `known_hosts` is invalid"),
            "{err}"
        );
        let mut d = data(&[("username", "bot")]);
        d.insert("password".to_string(), vec![0xff, 0xfe]);
        let err = GitCredentials::from_secret_data("gitops", &d).expect_err("not utf-8");
        assert!(
            err.to_string().contains("key `password` is invalid"),
            "{err}"
        );
    }

    #[test]
    fn globs_and_ports() {
        assert!(glob("*.example", "git.example"));
        assert!(glob("git?.example", "git1.example"));
        assert!(!glob("*.example", "git.example.org"));
        assert_eq!(ssh_port("ssh://git@h:2222/x.git"), Some(2222));
        assert_eq!(ssh_port("ssh://git@h/x.git"), None);
        assert_eq!(ssh_port("git@h:x.git"), None);
    }
}
