//! What can go wrong talking to the GitOps repository, sorted by what the
//! reconciler does about it: fix the credentials (auth, host key), wait and
//! retry (unreachable, contention), or fix the spec or repository (the rest).
//!
//! Every variant carries the repository URL with any user-info removed, and
//! none ever carries a secret: messages are built from libgit2's error text,
//! which names the URL but not the credentials.

use std::path::PathBuf;

/// An error of the GitOps writer.
#[derive(Debug, thiserror::Error)]
pub enum GitOpsError {
    /// The server refused the credentials (or asked for some and none were
    /// configured). Retrying with the same Secret will not help.
    #[error("{url}: authentication refused: {detail}")]
    AuthRefused { url: String, detail: String },
    /// The SSH server's host key is not one the credentials' `known_hosts`
    /// (or the operator's `~/.ssh/known_hosts`) lists.
    #[error("{url}: SSH host key of {host} is not trusted: {detail}")]
    HostKeyRejected {
        url: String,
        host: String,
        detail: String,
    },
    /// The server could not be reached or the connection broke (DNS, TCP,
    /// TLS, HTTP errors other than 401/403, a missing local path).
    #[error("{url}: repository unreachable: {detail}")]
    Unreachable { url: String, detail: String },
    /// Every push attempt lost the race against other writers.
    #[error(
        "{url}: push to {branch} was rejected as non-fast-forward {attempts} times; other writers kept moving the branch"
    )]
    NonFastForwardExhausted {
        url: String,
        branch: String,
        attempts: u32,
    },
    /// The server refused the push for another reason (a protected branch,
    /// a hook).
    #[error("{url}: push to {branch} refused by the server: {detail}")]
    PushRejected {
        url: String,
        branch: String,
        detail: String,
    },
    /// The commit to revert is not on the branch.
    #[error("{url}: commit {sha} is not on branch {branch}")]
    CommitNotFound {
        url: String,
        branch: String,
        sha: String,
    },
    /// Later commits changed the same lines; a revert would need a human.
    #[error("{url}: reverting {sha} conflicts with later changes to {}", paths.join(", "))]
    RevertConflict {
        url: String,
        sha: String,
        paths: Vec<String>,
    },
    /// A rendered path would leave its folder or is not a plain relative path.
    #[error("invalid path {path:?} in the rendered folder: {reason}")]
    InvalidPath { path: String, reason: String },
    /// The local cache of the repository could not be prepared.
    #[error("{url}: cache directory {}: {detail}", dir.display())]
    Cache {
        url: String,
        dir: PathBuf,
        detail: String,
    },
    /// Any other libgit2 failure.
    #[error("{url}: git {op} failed: {detail}")]
    Git {
        url: String,
        op: &'static str,
        detail: String,
    },
}

impl GitOpsError {
    /// A short CamelCase reason for a status condition (`AuthRefused`, ...).
    pub fn reason(&self) -> &'static str {
        match self {
            GitOpsError::AuthRefused { .. } => "AuthRefused",
            GitOpsError::HostKeyRejected { .. } => "HostKeyRejected",
            GitOpsError::Unreachable { .. } => "RepositoryUnreachable",
            GitOpsError::NonFastForwardExhausted { .. } => "PushContention",
            GitOpsError::PushRejected { .. } => "PushRejected",
            GitOpsError::CommitNotFound { .. } => "CommitNotFound",
            GitOpsError::RevertConflict { .. } => "RevertConflict",
            GitOpsError::InvalidPath { .. } => "InvalidPath",
            GitOpsError::Cache { .. } => "CacheError",
            GitOpsError::Git { .. } => "GitError",
        }
    }

    /// Whether the same call may succeed later without anyone changing the
    /// spec, the Secret or the repository: the reconciler requeues these
    /// with backoff, and reports the others as they are.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            GitOpsError::Unreachable { .. }
                | GitOpsError::NonFastForwardExhausted { .. }
                | GitOpsError::Cache { .. }
                | GitOpsError::Git { .. }
        )
    }
}

/// `url` without user-info (`https://user:token@host/x` → `https://***@host/x`),
/// so that a token someone put into the URL never reaches a message.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        // scp-like `user@host:path`: the user is not a secret.
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) if rest[..at].contains(':') => {
            format!("{}***@{}", &url[..scheme_end + 3], &rest[at + 1..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_info_with_a_password_is_redacted() {
        assert_eq!(
            redact_url("https://bot:s3cret@git.example/x.git"),
            "https://***@git.example/x.git"
        );
        assert_eq!(
            redact_url("ssh://git@git.example/x.git"),
            "ssh://git@git.example/x.git"
        );
        assert_eq!(redact_url("git@git.example:x.git"), "git@git.example:x.git");
        assert_eq!(redact_url("/srv/git/x.git"), "/srv/git/x.git");
    }
}
