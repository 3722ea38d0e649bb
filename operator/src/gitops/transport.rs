//! Fetch and push over libgit2's transports (local paths, `file://`,
//! HTTPS, SSH), with the credentials callbacks, and the translation of
//! libgit2's errors into [`GitOpsError`]s the reconciler can act on.

use std::cell::RefCell;
use std::sync::Once;

use git2::{ErrorClass, ErrorCode, FetchOptions, Oid, PushOptions, Repository};
use tracing::debug;

use super::credentials::{AuthState, GitCredentials};
use super::error::{GitOpsError, redact_url};

/// The name under which the cache keeps the remote's branches
/// (`refs/remotes/origin/...`). The remote itself is anonymous, made from
/// the URL in memory for each operation: the URL is never written into the
/// cache's `config`.
pub(crate) const REMOTE: &str = "origin";

/// Connect and read timeouts for every libgit2 network operation, so a
/// dead server fails the call instead of blocking its thread forever.
const CONNECT_TIMEOUT_MS: i32 = 15_000;
const SERVER_TIMEOUT_MS: i32 = 60_000;

/// Sets libgit2's global network timeouts, once per process.
pub(crate) fn init_timeouts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: these set process-global libgit2 options; `Once` makes
        // this the only call, before any network operation of this module.
        let results = unsafe {
            [
                git2::opts::set_server_connect_timeout_in_milliseconds(CONNECT_TIMEOUT_MS),
                git2::opts::set_server_timeout_in_milliseconds(SERVER_TIMEOUT_MS),
            ]
        };
        for r in results {
            if let Err(e) = r {
                tracing::warn!(error = %e, "cannot set libgit2 network timeouts");
            }
        }
    });
}

/// The remote-tracking ref of `branch`.
pub(crate) fn tracking_ref(branch: &str) -> String {
    format!("refs/remotes/{REMOTE}/{branch}")
}

/// Fetches `branch` into its remote-tracking ref and returns the remote's
/// tip, or `None` when the remote has no such branch yet (a new repository).
pub(crate) fn fetch(
    repo: &Repository,
    url: &str,
    branch: &str,
    credentials: &GitCredentials,
) -> Result<Option<Oid>, GitOpsError> {
    let state = AuthState::default();
    let result = (|| -> Result<Option<Oid>, git2::Error> {
        let mut remote = repo.remote_anonymous(url)?;
        let mut options = FetchOptions::new();
        options.remote_callbacks(credentials.callbacks(url, &state));
        // FETCH_HEAD would be the one file that names the URL on disk.
        options.update_fetchhead(false);
        let refspec = format!("+refs/heads/{branch}:{}", tracking_ref(branch));
        remote.fetch(
            &[refspec.as_str()],
            Some(&mut options),
            Some("quantops fetch"),
        )?;
        // The advertisement stays readable after the fetch disconnected.
        let wanted = format!("refs/heads/{branch}");
        let tip = remote
            .list()?
            .iter()
            .find(|head| head.name() == wanted)
            .map(|head| head.oid());
        if tip.is_none()
            && let Ok(mut stale) = repo.find_reference(&tracking_ref(branch))
        {
            stale.delete()?;
        }
        Ok(tip)
    })();
    let tip = result.map_err(|e| classify(e, url, &state, "fetch"))?;
    debug!(url = %redact_url(url), branch, tip = ?tip, "fetched");
    Ok(tip)
}

/// How a push ended when libgit2 itself did not fail.
#[derive(Debug)]
pub(crate) enum PushOutcome {
    Pushed,
    /// The branch moved under us: fetch, re-apply, try again.
    NonFastForward(String),
}

/// Pushes the local `refs/heads/{branch}` to the remote's branch.
pub(crate) fn push(
    repo: &Repository,
    url: &str,
    branch: &str,
    credentials: &GitCredentials,
) -> Result<PushOutcome, GitOpsError> {
    let state = AuthState::default();
    let rejected: RefCell<Option<String>> = RefCell::new(None);
    let result = (|| -> Result<(), git2::Error> {
        let mut remote = repo.remote_anonymous(url)?;
        let mut callbacks = credentials.callbacks(url, &state);
        callbacks.push_update_reference(|_refname, status| {
            if let Some(status) = status {
                *rejected.borrow_mut() = Some(status.to_string());
            }
            Ok(())
        });
        let mut options = PushOptions::new();
        options.remote_callbacks(callbacks);
        let refspec = format!("refs/heads/{branch}:refs/heads/{branch}");
        remote.push(&[refspec.as_str()], Some(&mut options))
    })();
    match result {
        Err(e) if e.code() == ErrorCode::NotFastForward => {
            Ok(PushOutcome::NonFastForward(e.message().to_string()))
        }
        Err(e) => Err(classify(e, url, &state, "push")),
        Ok(()) => match rejected.into_inner() {
            None => Ok(PushOutcome::Pushed),
            Some(status) if is_contention(&status) => Ok(PushOutcome::NonFastForward(status)),
            Some(status) => Err(GitOpsError::PushRejected {
                url: redact_url(url),
                branch: branch.to_string(),
                detail: status,
            }),
        },
    }
}

/// Server-side ref update statuses that mean another writer got there first.
fn is_contention(status: &str) -> bool {
    let s = status.to_ascii_lowercase();
    [
        "non-fast-forward",
        "fetch first",
        "stale info",
        "failed to lock",
        "cannot lock ref",
        "failed to update ref",
    ]
    .iter()
    .any(|needle| s.contains(needle))
}

/// Sorts a libgit2 error into the variant the reconciler acts on.
pub(crate) fn classify(
    e: git2::Error,
    url: &str,
    state: &AuthState,
    op: &'static str,
) -> GitOpsError {
    let url_shown = redact_url(url);
    let detail = e.message().replace(url, &url_shown);
    if let Some(host) = state.host_key_rejected.borrow().clone() {
        return GitOpsError::HostKeyRejected {
            url: url_shown,
            host,
            detail,
        };
    }
    if state.refused.get() || e.code() == ErrorCode::Auth {
        return GitOpsError::AuthRefused {
            url: url_shown,
            detail,
        };
    }
    if e.code() == ErrorCode::Certificate && e.class() == ErrorClass::Ssh {
        return GitOpsError::HostKeyRejected {
            url: url_shown,
            host: host_of(url),
            detail,
        };
    }
    let network = matches!(
        e.class(),
        ErrorClass::Net | ErrorClass::Os | ErrorClass::Ssl | ErrorClass::Http | ErrorClass::Ssh
    ) || e.code() == ErrorCode::Certificate
        // A local path that is not (or no longer) a repository.
        || (e.class() == ErrorClass::Repository && e.code() == ErrorCode::NotFound);
    if network {
        GitOpsError::Unreachable {
            url: url_shown,
            detail,
        }
    } else {
        GitOpsError::Git {
            url: url_shown,
            op,
            detail,
        }
    }
}

fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', ':']).next().unwrap_or(rest);
    authority
        .rsplit('@')
        .next()
        .unwrap_or(authority)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contention_statuses() {
        assert!(is_contention("failed to update ref"));
        assert!(is_contention("non-fast-forward"));
        assert!(is_contention(
            "cannot lock ref 'refs/heads/main': is at 1234 but expected 5678"
        ));
        assert!(!is_contention("pre-receive hook declined"));
    }

    #[test]
    fn hosts() {
        assert_eq!(host_of("ssh://git@git.example:2222/x.git"), "git.example");
        assert_eq!(host_of("git@git.example:x.git"), "git.example");
        assert_eq!(host_of("https://git.example/x.git"), "git.example");
    }
}
