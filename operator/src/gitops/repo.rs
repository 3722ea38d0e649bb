//! The GitOps writer: lands one promotion (or its revert) as one commit on
//! the repository's branch, exactly once, however often it is asked and
//! however many other writers push to the same branch.
//!
//! It uses git2 (libgit2) rather than running the `git` command line: the
//! operator image needs no git binary, credentials go to libgit2 through
//! callbacks in memory instead of through files, helpers or environment
//! variables that a child process could leak, and errors arrive as typed
//! codes (authentication, non-fast-forward, network) instead of text to
//! parse. The API is blocking, like libgit2; the reconciler calls it
//! through `tokio::task::spawn_blocking`.
//!
//! Each repository URL and branch has its own cache under
//! [`GitWriterConfig::cache_root`], kept between calls so that a fetch only
//! brings new objects. The URL itself never goes to disk (the remote is
//! anonymous, no `FETCH_HEAD` is written, the directory name is derived
//! from the URL without its user-info). It is a bare repository: every attempt starts from
//! the freshly fetched `origin/{branch}` (what a hard reset of a working copy
//! gives), replaces the serving folder in memory and commits the new tree.
//! No checkout means no line-ending or permission filters between the
//! rendered bytes and the committed ones, and no stray files from an
//! interrupted run. A lock file beside the cache serialises writers of the
//! same cache, threads and processes alike.

use std::fs::{self, File};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use git2::build::TreeUpdateBuilder;
use git2::{FileMode, Oid, Repository, RepositoryInitOptions, Signature, Sort, Tree};
use quantops_api::GateResult;
use quantops_api::model_promotion::Environment;
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use super::credentials::GitCredentials;
use super::error::{GitOpsError, redact_url};
use super::message::{
    PromotionId, PromotionMessage, is_promotion_commit, is_revert_of, promotion_message,
    revert_message,
};
use super::render::RenderedFolder;
use super::transport::{self, PushOutcome, tracking_ref};

/// How the writer behaves; the same for every repository.
#[derive(Clone, Debug, PartialEq)]
pub struct GitWriterConfig {
    /// Where the per-repository caches live (an emptyDir in the pod).
    pub cache_root: PathBuf,
    /// Author and committer name of every commit.
    pub author_name: String,
    /// Author and committer e-mail of every commit.
    pub author_email: String,
    /// Push attempts before giving up on a branch other writers keep moving.
    pub max_push_attempts: u32,
    /// How many commits back from the branch's tip an earlier commit of the
    /// same promotion is looked for.
    pub history_limit: usize,
}

impl Default for GitWriterConfig {
    fn default() -> Self {
        GitWriterConfig {
            cache_root: std::env::temp_dir().join("quantops-gitops"),
            author_name: "quantops".to_string(),
            author_email: "quantops@users.noreply".to_string(),
            max_push_attempts: 5,
            history_limit: 500,
        }
    }
}

/// A repository and branch to write to, and how to authenticate.
#[derive(Clone, Debug)]
pub struct GitTarget {
    pub url: String,
    pub branch: String,
    pub credentials: GitCredentials,
}

/// One promotion's commit: the rendered folder and what the message says.
#[derive(Clone, Debug, PartialEq)]
pub struct PromotionCommit {
    pub promotion: PromotionId,
    pub variant: String,
    pub environment: Environment,
    /// Replaces the folder's whole content in the repository.
    pub folder: RenderedFolder,
    /// The gate verdicts that allowed the promotion, for the message.
    pub gates: Vec<GateResult>,
}

/// A rollback: revert `commit` on top of the branch.
#[derive(Clone, Debug, PartialEq)]
pub struct RevertRequest {
    pub promotion: PromotionId,
    /// The full SHA of the commit to revert (the promotion's own commit).
    pub commit: String,
    /// Why, for the message (e.g. the failed analysis).
    pub reason: String,
}

/// What a call left on the branch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitOutcome {
    /// The commit that now stands for the request: new, found, or the tip.
    pub sha: String,
    pub status: CommitStatus,
    /// Fetch-and-push rounds it took (1 unless other writers raced it).
    pub attempts: u32,
}

/// How a call was satisfied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitStatus {
    /// A new commit was pushed.
    Created,
    /// The branch already has this promotion's commit (or revert), found by
    /// its trailers: an earlier call landed it.
    AlreadyPresent,
    /// The branch's tree already is what the commit would make; no empty
    /// commit was made and `sha` is the branch's tip.
    Unchanged,
}

/// Called after a commit is made and before it is pushed. A seam for
/// tests (make the working copy stale on purpose) and fault injection;
/// production writers have none.
pub type BeforePush = Arc<dyn Fn(&PushAttempt<'_>) + Send + Sync>;

/// What a [`BeforePush`] hook is told.
#[derive(Debug)]
pub struct PushAttempt<'a> {
    pub url: &'a str,
    pub branch: &'a str,
    /// 1 for the first push of this call.
    pub attempt: u32,
    pub commit: Oid,
}

/// Writes promotions and reverts to GitOps repositories.
#[derive(Clone)]
pub struct GitWriter {
    config: GitWriterConfig,
    before_push: Option<BeforePush>,
}

impl std::fmt::Debug for GitWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitWriter")
            .field("config", &self.config)
            .field("before_push", &self.before_push.is_some())
            .finish()
    }
}

/// What one attempt decided.
enum Step {
    /// Nothing to push: this commit already stands for the request.
    Settled(Oid, CommitStatus),
    /// A new commit to push.
    Push(Oid),
}

impl GitWriter {
    pub fn new(config: GitWriterConfig) -> GitWriter {
        transport::init_timeouts();
        GitWriter {
            config,
            before_push: None,
        }
    }

    /// Installs a hook run before every push (see [`BeforePush`]).
    pub fn with_before_push(mut self, hook: BeforePush) -> GitWriter {
        self.before_push = Some(hook);
        self
    }

    pub fn config(&self) -> &GitWriterConfig {
        &self.config
    }

    /// Lands `commit` on the target branch: replaces `commit.folder.dir`
    /// with the rendered files and pushes one commit whose message names the
    /// variant, the environment, the gates and the promotion. Idempotent: a
    /// commit of the same promotion UID and generation already on the branch
    /// is returned as [`CommitStatus::AlreadyPresent`]; a tree that already
    /// matches gives [`CommitStatus::Unchanged`]. A push that loses a race
    /// is re-applied on the new tip, up to `max_push_attempts` times.
    pub fn commit_promotion(
        &self,
        target: &GitTarget,
        commit: &PromotionCommit,
    ) -> Result<CommitOutcome, GitOpsError> {
        validate_folder(&commit.folder)?;
        let message = promotion_message(&PromotionMessage {
            promotion: &commit.promotion,
            variant: &commit.variant,
            environment: commit.environment,
            folder: &commit.folder.dir,
            gates: &commit.gates,
        });
        let outcome = self.land(target, "commit", |repo, tip| {
            let git = |op| git_err(&target.url, op);
            if let Some(tip) = tip
                && let Some(found) = self.find_in_history(repo, &target.url, tip, |m| {
                    is_promotion_commit(m, &commit.promotion)
                })?
            {
                return Ok(Step::Settled(found, CommitStatus::AlreadyPresent));
            }
            let parent = match tip {
                Some(tip) => Some(repo.find_commit(tip).map_err(git("read tip"))?),
                None => None,
            };
            let base = match &parent {
                Some(p) => p.tree().map_err(git("read tree"))?,
                None => empty_tree(repo).map_err(git("write tree"))?,
            };
            let tree_id = replace_folder(repo, &base, &commit.folder).map_err(git("write tree"))?;
            if let Some(p) = &parent
                && tree_id == base.id()
            {
                return Ok(Step::Settled(p.id(), CommitStatus::Unchanged));
            }
            let tree = repo.find_tree(tree_id).map_err(git("write tree"))?;
            let sig = self.signature().map_err(git("commit"))?;
            let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
            let oid = repo
                .commit(None, &sig, &sig, &message, &tree, &parents)
                .map_err(git("commit"))?;
            Ok(Step::Push(oid))
        })?;
        info!(
            url = %redact_url(&target.url),
            branch = %target.branch,
            promotion = %format!("{}/{}", commit.promotion.namespace, commit.promotion.name),
            generation = commit.promotion.generation,
            sha = %outcome.sha,
            status = ?outcome.status,
            attempts = outcome.attempts,
            "promotion commit settled"
        );
        Ok(outcome)
    }

    /// Lands a `git revert` of `request.commit` on top of the branch: the
    /// inverse of that commit's diff applied to the current tip (libgit2's
    /// revert, so later unrelated changes stay), with message
    /// `Revert "<subject>"`, the reason and trailers. Idempotent like
    /// [`GitWriter::commit_promotion`]: a revert of the same commit by the
    /// same promotion is found, not made twice; a tip whose tree already
    /// lacks the commit's changes gives [`CommitStatus::Unchanged`].
    pub fn revert(
        &self,
        target: &GitTarget,
        request: &RevertRequest,
    ) -> Result<CommitOutcome, GitOpsError> {
        let not_found = || GitOpsError::CommitNotFound {
            url: redact_url(&target.url),
            branch: target.branch.clone(),
            sha: request.commit.clone(),
        };
        let reverted = Oid::from_str(request.commit.trim()).map_err(|_| not_found())?;
        let sha = reverted.to_string();
        let outcome = self.land(target, "revert", |repo, tip| {
            let git = |op| git_err(&target.url, op);
            let Some(tip) = tip else {
                return Err(not_found());
            };
            if let Some(found) = self.find_in_history(repo, &target.url, tip, |m| {
                is_revert_of(m, &sha, &request.promotion)
            })? {
                return Ok(Step::Settled(found, CommitStatus::AlreadyPresent));
            }
            // Unknown after a fetch of the branch means: not on it.
            let Ok(reverted_commit) = repo.find_commit(reverted) else {
                return Err(not_found());
            };
            let on_branch = tip == reverted
                || repo
                    .graph_descendant_of(tip, reverted)
                    .map_err(git("walk history"))?;
            if !on_branch {
                return Err(not_found());
            }
            let tip_commit = repo.find_commit(tip).map_err(git("read tip"))?;
            let mainline = if reverted_commit.parent_count() > 1 {
                1
            } else {
                0
            };
            let mut index = repo
                .revert_commit(&reverted_commit, &tip_commit, mainline, None)
                .map_err(git("revert"))?;
            if index.has_conflicts() {
                let mut paths: Vec<String> = index
                    .conflicts()
                    .map_err(git("revert"))?
                    .filter_map(Result::ok)
                    .filter_map(|c| c.our.or(c.their).or(c.ancestor))
                    .map(|e| String::from_utf8_lossy(&e.path).into_owned())
                    .collect();
                paths.sort();
                paths.dedup();
                return Err(GitOpsError::RevertConflict {
                    url: redact_url(&target.url),
                    sha: sha.clone(),
                    paths,
                });
            }
            let tree_id = index.write_tree_to(repo).map_err(git("write tree"))?;
            if tree_id == tip_commit.tree_id() {
                return Ok(Step::Settled(tip, CommitStatus::Unchanged));
            }
            let tree = repo.find_tree(tree_id).map_err(git("write tree"))?;
            let message = revert_message(
                reverted_commit.summary().unwrap_or(""),
                &sha,
                &request.reason,
                &request.promotion,
            );
            let sig = self.signature().map_err(git("commit"))?;
            let oid = repo
                .commit(None, &sig, &sig, &message, &tree, &[&tip_commit])
                .map_err(git("commit"))?;
            Ok(Step::Push(oid))
        })?;
        info!(
            url = %redact_url(&target.url),
            branch = %target.branch,
            reverted = %sha,
            sha = %outcome.sha,
            status = ?outcome.status,
            attempts = outcome.attempts,
            "revert settled"
        );
        Ok(outcome)
    }

    /// Whether `revision` (what Argo CD reports it synced) includes
    /// `commit`: the same commit, or a descendant of it on the branch, as
    /// when other promotions landed after ours before the sync. Fetches the
    /// branch first; a revision the fetch does not bring is `false`.
    pub fn contains(
        &self,
        target: &GitTarget,
        revision: &str,
        commit: &str,
    ) -> Result<bool, GitOpsError> {
        let (Ok(revision), Ok(commit)) =
            (Oid::from_str(revision.trim()), Oid::from_str(commit.trim()))
        else {
            return Ok(false);
        };
        if revision == commit {
            return Ok(true);
        }
        let (repo, _lock) = self.open_cache(target)?;
        transport::fetch(&repo, &target.url, &target.branch, &target.credentials)?;
        if repo.find_commit(revision).is_err() || repo.find_commit(commit).is_err() {
            return Ok(false);
        }
        repo.graph_descendant_of(revision, commit)
            .map_err(|e| git_error(&target.url, "walk history", e))
    }

    fn signature(&self) -> Result<Signature<'static>, git2::Error> {
        Signature::now(&self.config.author_name, &self.config.author_email)
    }

    /// Fetch, decide, push; again on a lost race.
    fn land(
        &self,
        target: &GitTarget,
        what: &'static str,
        mut decide: impl FnMut(&Repository, Option<Oid>) -> Result<Step, GitOpsError>,
    ) -> Result<CommitOutcome, GitOpsError> {
        let (repo, _lock) = self.open_cache(target)?;
        let branch_ref = format!("refs/heads/{}", target.branch);
        let attempts = self.config.max_push_attempts.max(1);
        for attempt in 1..=attempts {
            let tip = transport::fetch(&repo, &target.url, &target.branch, &target.credentials)?;
            let oid = match decide(&repo, tip)? {
                Step::Settled(oid, status) => {
                    return Ok(CommitOutcome {
                        sha: oid.to_string(),
                        status,
                        attempts: attempt,
                    });
                }
                Step::Push(oid) => oid,
            };
            repo.reference(&branch_ref, oid, true, what)
                .map_err(|e| git_error(&target.url, "update branch", e))?;
            if let Some(hook) = &self.before_push {
                hook(&PushAttempt {
                    url: &target.url,
                    branch: &target.branch,
                    attempt,
                    commit: oid,
                });
            }
            match transport::push(&repo, &target.url, &target.branch, &target.credentials)? {
                PushOutcome::Pushed => {
                    if let Err(e) = repo.reference(&tracking_ref(&target.branch), oid, true, what) {
                        debug!(error = %e, "cannot update the remote-tracking ref after a push");
                    }
                    return Ok(CommitOutcome {
                        sha: oid.to_string(),
                        status: CommitStatus::Created,
                        attempts: attempt,
                    });
                }
                PushOutcome::NonFastForward(detail) => {
                    warn!(
                        url = %redact_url(&target.url),
                        branch = %target.branch,
                        attempt,
                        detail,
                        "push lost a race with another writer; fetching and re-applying"
                    );
                    if attempt < attempts {
                        std::thread::sleep(backoff(attempt));
                    }
                }
            }
        }
        Err(GitOpsError::NonFastForwardExhausted {
            url: redact_url(&target.url),
            branch: target.branch.clone(),
            attempts,
        })
    }

    /// The newest of the last `history_limit` commits from `tip` whose
    /// message satisfies `wanted`.
    fn find_in_history(
        &self,
        repo: &Repository,
        url: &str,
        tip: Oid,
        wanted: impl Fn(&str) -> bool,
    ) -> Result<Option<Oid>, GitOpsError> {
        let git = |e| git_error(url, "walk history", e);
        let mut walk = repo.revwalk().map_err(git)?;
        walk.set_sorting(Sort::TOPOLOGICAL | Sort::TIME)
            .map_err(git)?;
        walk.push(tip).map_err(git)?;
        for oid in walk.take(self.config.history_limit) {
            let oid = oid.map_err(git)?;
            let commit = repo.find_commit(oid).map_err(git)?;
            if commit.message().is_some_and(&wanted) {
                return Ok(Some(oid));
            }
        }
        Ok(None)
    }

    /// The cache directory of a target: readable, and unique per URL and
    /// branch.
    pub fn cache_dir(&self, target: &GitTarget) -> PathBuf {
        let shown = redact_url(&target.url).to_ascii_lowercase();
        let readable: String = shown
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let readable = readable.trim_matches('-');
        let tail: String = readable
            .chars()
            .skip(readable.len().saturating_sub(40))
            .collect();
        let digest = Sha256::digest(format!("{}\0{}", target.url, target.branch).as_bytes());
        self.config.cache_root.join(format!(
            "{}-{}",
            tail.trim_matches('-'),
            &hex::encode(digest)[..16]
        ))
    }

    /// Opens (or creates) the target's cache, holding its lock file.
    fn open_cache(&self, target: &GitTarget) -> Result<(Repository, File), GitOpsError> {
        let dir = self.cache_dir(target);
        let cache_err = |detail: String| GitOpsError::Cache {
            url: redact_url(&target.url),
            dir: dir.clone(),
            detail,
        };
        fs::create_dir_all(&self.config.cache_root)
            .map_err(|e| cache_err(format!("cannot create the cache root: {e}")))?;
        let lock_path = dir.with_extension("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| cache_err(format!("cannot open {}: {e}", lock_path.display())))?;
        lock.lock()
            .map_err(|e| cache_err(format!("cannot lock {}: {e}", lock_path.display())))?;

        let repo = match Repository::open_bare(&dir) {
            Ok(repo) => repo,
            Err(open_error) => {
                if dir.exists() {
                    warn!(dir = %dir.display(), error = %open_error, "cache is not a repository; recreating it");
                    fs::remove_dir_all(&dir)
                        .map_err(|e| cache_err(format!("cannot remove a broken cache: {e}")))?;
                }
                let mut options = RepositoryInitOptions::new();
                options.bare(true).initial_head(&target.branch);
                Repository::init_opts(&dir, &options)
                    .map_err(|e| cache_err(format!("cannot create the cache: {}", e.message())))?
            }
        };
        Ok((repo, lock))
    }
}

/// `map_err` adapter naming the operation.
fn git_err<'a>(url: &'a str, op: &'static str) -> impl Fn(git2::Error) -> GitOpsError + 'a {
    move |e| git_error(url, op, e)
}

fn git_error(url: &str, op: &'static str, e: git2::Error) -> GitOpsError {
    let shown = redact_url(url);
    GitOpsError::Git {
        detail: e.message().replace(url, &shown),
        url: shown,
        op,
    }
}

/// 100 ms, 200 ms, 400 ms, ... up to 2 s, plus up to 100 ms of jitter so
/// two racing writers do not collide again in step.
fn backoff(attempt: u32) -> Duration {
    let base = 100u64
        .saturating_mul(1 << attempt.saturating_sub(1).min(5))
        .min(2000);
    let jitter = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::from(d.subsec_nanos() % 100))
        .unwrap_or(0);
    Duration::from_millis(base + jitter)
}

fn empty_tree(repo: &Repository) -> Result<Tree<'_>, git2::Error> {
    let oid = repo.treebuilder(None)?.write()?;
    repo.find_tree(oid)
}

/// Checks that the folder and its files are plain relative paths that
/// stay inside the folder (and never touch `.git`).
fn validate_folder(folder: &RenderedFolder) -> Result<(), GitOpsError> {
    let check = |path: &str| -> Result<(), GitOpsError> {
        let bad = |reason: &str| GitOpsError::InvalidPath {
            path: path.to_string(),
            reason: reason.to_string(),
        };
        if path.is_empty() {
            return Err(bad("empty"));
        }
        if path.contains('\\') || path.contains('\0') {
            return Err(bad("contains a backslash or NUL"));
        }
        for c in Path::new(path).components() {
            match c {
                Component::Normal(s) if s.eq_ignore_ascii_case(".git") => {
                    return Err(bad("names .git"));
                }
                Component::Normal(_) => {}
                _ => return Err(bad("must be relative, without . or .. segments")),
            }
        }
        if path.split('/').any(str::is_empty) {
            return Err(bad("has an empty segment"));
        }
        Ok(())
    };
    check(&folder.dir)?;
    let mut seen = std::collections::BTreeSet::new();
    for f in &folder.files {
        check(&f.path)?;
        if !seen.insert(f.path.as_str()) {
            return Err(GitOpsError::InvalidPath {
                path: f.path.clone(),
                reason: "listed twice".to_string(),
            });
        }
    }
    Ok(())
}

/// `base` with `folder.dir` replaced wholly by the rendered files. Two
/// passes, so that no file of the old folder survives into the new one.
fn replace_folder(
    repo: &Repository,
    base: &Tree<'_>,
    folder: &RenderedFolder,
) -> Result<Oid, git2::Error> {
    let cleared = if base.get_path(Path::new(&folder.dir)).is_ok() {
        let mut removal = TreeUpdateBuilder::new();
        removal.remove(folder.dir.as_str());
        removal.create_updated(repo, base)?
    } else {
        base.id()
    };
    let cleared = repo.find_tree(cleared)?;
    let mut update = TreeUpdateBuilder::new();
    for file in &folder.files {
        let blob = repo.blob(file.content.as_bytes())?;
        update.upsert(
            format!("{}/{}", folder.dir, file.path),
            blob,
            FileMode::Blob,
        );
    }
    update.create_updated(repo, &cleared)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gitops::render::RenderedFile;

    fn folder(files: &[(&str, &str)]) -> RenderedFolder {
        RenderedFolder {
            dir: "envs/test/m".to_string(),
            files: files
                .iter()
                .map(|(p, c)| RenderedFile {
                    path: p.to_string(),
                    content: c.to_string(),
                })
                .collect(),
        }
    }

    #[test]
    fn paths_must_stay_inside_the_folder() {
        assert!(validate_folder(&folder(&[("a.yaml", "x"), ("sub/b.yaml", "y")])).is_ok());
        for bad in ["../x", "/etc/passwd", "a//b", ".git/config", "./a", ""] {
            assert!(
                matches!(
                    validate_folder(&folder(&[(bad, "x")])),
                    Err(GitOpsError::InvalidPath { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(validate_folder(&folder(&[("a", "x"), ("a", "y")])).is_err());
    }

    #[test]
    fn replacing_a_folder_drops_files_it_no_longer_has() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = Repository::init_bare(dir.path()).expect("init");
        let empty = empty_tree(&repo).expect("empty");
        let first = replace_folder(&repo, &empty, &folder(&[("a", "1"), ("b", "2")])).expect("a");
        let first = repo.find_tree(first).expect("tree");
        let second = replace_folder(&repo, &first, &folder(&[("b", "3")])).expect("b");
        let second = repo.find_tree(second).expect("tree");
        assert!(second.get_path(Path::new("envs/test/m/a")).is_err());
        let b = second.get_path(Path::new("envs/test/m/b")).expect("b");
        let blob = repo.find_blob(b.id()).expect("blob");
        assert_eq!(blob.content(), b"3");
        // Same content again: same tree.
        let again = replace_folder(&repo, &second, &folder(&[("b", "3")])).expect("c");
        assert_eq!(again, second.id());
    }

    #[test]
    fn cache_dirs_differ_per_url_and_branch() {
        let w = GitWriter::new(GitWriterConfig {
            cache_root: PathBuf::from("/cache"),
            ..GitWriterConfig::default()
        });
        let t = |url: &str, branch: &str| GitTarget {
            url: url.to_string(),
            branch: branch.to_string(),
            credentials: GitCredentials::Anonymous,
        };
        let a = w.cache_dir(&t("https://u:secret@git.example/x.git", "main"));
        let b = w.cache_dir(&t("https://u:secret@git.example/x.git", "prod"));
        assert_ne!(a, b);
        assert!(!a.to_string_lossy().contains("secret"), "{}", a.display());
        assert!(a.starts_with("/cache"));
    }
}
