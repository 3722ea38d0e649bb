//! Which repositories and branches the operator talks to, decided before
//! any network access: a `ModelPromotion`'s `spec.gitops` comes from whoever
//! may create one, and the operator holds credentials it must not hand to
//! an arbitrary listener, nor push to its own file system.
//!
//! - `https://host[:port]/path`: TLS, verified by libgit2 against the
//!   system's CAs; credentials (user name and token) from the Secret.
//! - `ssh://[user@]host[:port]/path` and scp-like `user@host:path` (what
//!   hosting services show; libgit2 treats any non-URL with a `:` as SSH):
//!   an SSH key from the Secret, the host key checked against `known_hosts`.
//! - `http://`: refused unless the operator runs with
//!   `--allow-insecure-http-gitops` (a loopback test server), and even then
//!   only anonymously: credentials are never sent over plain HTTP.
//! - Refused always: local paths and `file://` (the operator would write to
//!   its own disk), any other scheme (`git://`, `ftp://`, ...), credentials or
//!   user names inside an http(s) URL (they would end up in logs and on
//!   disk; they belong in the Secret), a password inside an SSH URL, queries,
//!   fragments and white space.
//!
//! The CRD carries the same rules as CEL (api/src/model_promotion.rs), so
//! the API server refuses most of these at admission; these checks also
//! apply the operator's own setting and catch whatever predates the rules.

/// What the operator allows beyond the secure transports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemotePolicy {
    /// Accept `http://` URLs (anonymous access only). For test servers on
    /// loopback; production repositories use https or ssh.
    pub allow_insecure_http: bool,
}

/// Why a repository URL is refused. Messages never repeat the URL: it may
/// carry the very credentials that made it invalid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RemoteError {
    #[error("must not be empty")]
    Empty,
    #[error(
        "must be an https:// or ssh:// URL (or scp-like user@host:path); {scheme}:// is not accepted"
    )]
    UnsupportedScheme { scheme: String },
    #[error(
        "local paths and file:// URLs are refused: the operator only pushes to remote repositories (https:// or ssh://)"
    )]
    LocalPath,
    #[error(
        "plain http:// is refused: use https:// or ssh:// (the operator accepts http:// only when started with --allow-insecure-http-gitops, for test servers)"
    )]
    InsecureHttp,
    #[error(
        "credentials are never sent over plain http://: use an https:// or ssh:// URL with spec.gitops.credentialsSecret, or no Secret"
    )]
    CredentialsOverHttp,
    #[error(
        "must not carry credentials (a password, or a user name in an http(s) URL): put them into spec.gitops.credentialsSecret"
    )]
    InlineCredentials,
    #[error(
        "must name a host (letters, digits, '.' and '-', or [IPv6]) with an optional numeric port"
    )]
    BadHost,
    #[error("must not contain a query, a fragment, white space or control characters")]
    BadCharacters,
    #[error("the path after the host must start with '/'")]
    BadPath,
    #[error("is longer than {max} characters")]
    TooLong { max: usize },
}

/// Why a branch is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("must be a git branch name (not a ref or refspec): {reason}")]
pub struct BranchError {
    pub reason: &'static str,
}

/// The longest URL accepted (the CRD's `maxLength`).
pub const MAX_URL: usize = 2048;
/// The longest branch accepted (the CRD's `maxLength`).
pub const MAX_BRANCH: usize = 255;

/// Checks `url` against the policy; `has_credentials` says whether the
/// promotion names a credentials Secret.
pub fn check_url(
    url: &str,
    policy: RemotePolicy,
    has_credentials: bool,
) -> Result<(), RemoteError> {
    if url.is_empty() {
        return Err(RemoteError::Empty);
    }
    if url.len() > MAX_URL {
        return Err(RemoteError::TooLong { max: MAX_URL });
    }
    if url
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
    {
        return Err(RemoteError::BadCharacters);
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return check_scp_like(url);
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (user, host_port) = match authority.rsplit_once('@') {
        Some((user, host_port)) => (Some(user), host_port),
        None => (None, authority),
    };
    match scheme {
        "https" => {}
        "ssh" => {}
        "http" if !policy.allow_insecure_http => return Err(RemoteError::InsecureHttp),
        "http" if has_credentials => return Err(RemoteError::CredentialsOverHttp),
        "http" => {}
        "file" => return Err(RemoteError::LocalPath),
        other => {
            return Err(RemoteError::UnsupportedScheme {
                scheme: other.chars().take(16).collect(),
            });
        }
    }
    if let Some(user) = user
        && (scheme != "ssh" || !is_user(user))
    {
        return Err(RemoteError::InlineCredentials);
    }
    check_host_port(host_port)?;
    if !path.is_empty() && !path.starts_with('/') {
        return Err(RemoteError::BadPath);
    }
    Ok(())
}

/// `user@host:path`, SSH on port 22. The user is required: without one,
/// `name:thing` reads as a typo more often than as a host.
fn check_scp_like(url: &str) -> Result<(), RemoteError> {
    let Some((user, host_path)) = url.split_once('@') else {
        return Err(RemoteError::LocalPath);
    };
    let Some((host, path)) = host_path.split_once(':') else {
        return Err(RemoteError::LocalPath);
    };
    if !is_user(user) {
        return Err(RemoteError::InlineCredentials);
    }
    if !is_host_name(host) {
        return Err(RemoteError::BadHost);
    }
    if path.is_empty() || path.contains(':') {
        return Err(RemoteError::BadPath);
    }
    Ok(())
}

fn check_host_port(host_port: &str) -> Result<(), RemoteError> {
    let (host_ok, port) = if let Some(v6) = host_port.strip_prefix('[') {
        let Some((addr, after)) = v6.split_once(']') else {
            return Err(RemoteError::BadHost);
        };
        let ok = !addr.is_empty()
            && addr
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.');
        match after {
            "" => (ok, None),
            p => match p.strip_prefix(':') {
                Some(port) => (ok, Some(port)),
                None => return Err(RemoteError::BadHost),
            },
        }
    } else {
        match host_port.split_once(':') {
            Some((host, port)) => (is_host_name(host), Some(port)),
            None => (is_host_name(host_port), None),
        }
    };
    let port_ok = port.is_none_or(|p| {
        (1..=5).contains(&p.len())
            && p.chars().all(|c| c.is_ascii_digit())
            && p.parse::<u32>().is_ok_and(|n| (1..=65535).contains(&n))
    });
    if host_ok && port_ok {
        Ok(())
    } else {
        Err(RemoteError::BadHost)
    }
}

fn is_host_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        && !host.starts_with(['.', '-'])
        && !host.ends_with(['.', '-'])
}

fn is_user(user: &str) -> bool {
    !user.is_empty()
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '~' | '-'))
}

/// Checks that `branch` names a branch: what `git check-ref-format --branch`
/// accepts (libgit2's own check of `refs/heads/{branch}`), narrowed to the
/// characters the CRD allows, and nothing a refspec or rev-parse could read
/// as something else (`main:refs/heads/evil`, `-x`, `refs/...`, `HEAD`).
pub fn check_branch(branch: &str) -> Result<(), BranchError> {
    let refuse = |reason| Err(BranchError { reason });
    if branch.is_empty() {
        return refuse("empty");
    }
    if branch.len() > MAX_BRANCH {
        return refuse("longer than 255 characters");
    }
    if !branch
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
    {
        return refuse("only letters, digits, '.', '_', '-' and '/' are allowed");
    }
    if branch.starts_with(['-', '.', '/']) {
        return refuse("must not start with '-', '.' or '/'");
    }
    if branch == "HEAD" || branch.starts_with("refs/") {
        return refuse("must not be HEAD or start with refs/ (give the branch's short name)");
    }
    if branch.contains("..") || branch.contains("//") || branch.contains("/.") {
        return refuse("must not contain '..', '//' or '/.'");
    }
    if branch.ends_with(['/', '.']) || branch.split('/').any(|c| c.ends_with(".lock")) {
        return refuse("must not end in '/' or '.', nor have a component ending in .lock");
    }
    if !git2::Reference::is_valid_name(&format!("refs/heads/{branch}")) {
        return refuse("git does not accept it as a branch name");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: RemotePolicy = RemotePolicy {
        allow_insecure_http: false,
    };
    const TESTS: RemotePolicy = RemotePolicy {
        allow_insecure_http: true,
    };

    #[test]
    fn secure_urls_are_accepted() {
        for url in [
            "https://git.example/models-gitops.git",
            "https://git.example:8443/org/models.git",
            "https://10.0.0.7/x.git",
            "https://[fd00::1]:443/x.git",
            "ssh://git@git.example/models-gitops.git",
            "ssh://git@git.example:2222/srv/models.git",
            "ssh://git.example/models.git",
            "git@github.com:org/models-gitops.git",
            "deploy-bot@git.example:/srv/git/models.git",
        ] {
            assert_eq!(check_url(url, STRICT, true), Ok(()), "{url}");
        }
    }

    #[test]
    fn plain_http_needs_the_opt_in_and_no_credentials() {
        let url = "http://127.0.0.1:18999/models.git";
        assert_eq!(
            check_url(url, STRICT, false),
            Err(RemoteError::InsecureHttp)
        );
        assert_eq!(check_url(url, STRICT, true), Err(RemoteError::InsecureHttp));
        assert_eq!(check_url(url, TESTS, false), Ok(()));
        assert_eq!(
            check_url(url, TESTS, true),
            Err(RemoteError::CredentialsOverHttp)
        );
    }

    #[test]
    fn local_paths_and_other_schemes_are_refused() {
        for url in [
            "/srv/gitops.git",
            "./gitops",
            "../gitops.git",
            "gitops.git",
            "~/gitops.git",
            "file:///srv/gitops.git",
        ] {
            assert_eq!(
                check_url(url, TESTS, false),
                Err(RemoteError::LocalPath),
                "{url}"
            );
        }
        for (url, scheme) in [
            ("ftp://git.example/x.git", "ftp"),
            ("git://git.example/x.git", "git"),
            ("HTTPS://git.example/x.git", "HTTPS"),
            ("ssh+git://git.example/x.git", "ssh+git"),
        ] {
            assert_eq!(
                check_url(url, TESTS, false),
                Err(RemoteError::UnsupportedScheme {
                    scheme: scheme.to_string()
                }),
                "{url}"
            );
        }
    }

    #[test]
    fn inline_credentials_are_refused_without_echoing_them() {
        for url in [
            "https://bot:s3cret@git.example/x.git",
            "https://ghp_token@git.example/x.git",
            "http://bot:s3cret@127.0.0.1:18999/x.git",
            "ssh://git:s3cret@git.example/x.git",
        ] {
            let err = check_url(url, TESTS, false).expect_err(url);
            assert_eq!(err, RemoteError::InlineCredentials, "{url}");
            assert!(!err.to_string().contains("s3cret"), "{err}");
        }
        assert_eq!(
            check_url("git:s3cret@git.example:x.git", STRICT, false),
            Err(RemoteError::InlineCredentials)
        );
    }

    #[test]
    fn hosts_ports_and_characters_are_checked() {
        for url in [
            "https:///x.git",
            "https://-evil/x.git",
            "https://git.example:0/x.git",
            "https://git.example:99999/x.git",
            "https://git.example:22a/x.git",
            "https://[zz]/x.git",
            "ssh://@git.example/x.git",
        ] {
            assert!(
                matches!(
                    check_url(url, STRICT, false),
                    Err(RemoteError::BadHost | RemoteError::InlineCredentials)
                ),
                "{url}"
            );
        }
        for url in [
            "https://git.example/x.git?token=abc",
            "https://git.example/x.git#main",
            "https://git.example/x .git",
            "https://git.example/x\n.git",
        ] {
            assert_eq!(
                check_url(url, STRICT, false),
                Err(RemoteError::BadCharacters),
                "{url}"
            );
        }
        assert_eq!(check_url("", STRICT, false), Err(RemoteError::Empty));
        let long = format!("https://git.example/{}", "a".repeat(MAX_URL));
        assert_eq!(
            check_url(&long, STRICT, false),
            Err(RemoteError::TooLong { max: MAX_URL })
        );
    }

    #[test]
    fn branches_are_branch_names() {
        for ok in ["main", "release/1.2", "env_prod", "feature-x", "v1.0"] {
            assert_eq!(check_branch(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "main:refs/heads/evil",
            "+main",
            "-main",
            ".hidden",
            "refs/heads/main",
            "HEAD",
            "a..b",
            "a//b",
            "a/.b",
            "main/",
            "main.",
            "main.lock",
            "x.lock/y",
            "ma in",
            "main^",
            "main~1",
            "main@{1}",
            "ma*in",
            "mäin",
        ] {
            assert!(check_branch(bad).is_err(), "{bad:?}");
        }
        assert!(check_branch(&"a".repeat(256)).is_err());
    }
}
