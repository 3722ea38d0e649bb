//! The GitOps side of the end-to-end tests: a real git server, git
//! inspection through the git CLI, and the parts Argo CD and Argo Rollouts
//! play in a real cluster.
//!
//! The ModelPromotion tests need everything that happens after the operator
//! pushes a commit, without running Argo CD itself (a Go service with Redis,
//! a repo server and a UI, far too heavy for the test machine). So the test
//! plays those parts, faithfully enough that the operator cannot tell:
//!
//! - **The repository** is served by `tests/gitserver/up`: nginx with basic
//!   auth in front of `git http-backend`, which the harness itself reads and
//!   writes through, and an OpenSSH server, through which the operator
//!   writes with a key Secret ([`GitServer::ssh_url`],
//!   [`GitServer::ssh_credentials_secret`]): the operator never sends
//!   credentials over plain HTTP, so a real authenticated remote for it is
//!   SSH, with the same transport and host-key check as against a real host.
//!   [`GitServer`].
//! - **Reading it back** uses the git CLI in throw-away clones ([`log`],
//!   [`files_at`], [`clone_at`]): an implementation independent of the
//!   operator's libgit2, so a test checks what git itself sees.
//! - **Argo CD** is [`argo_sync`]: it checks out the committed revision, runs
//!   `kubectl apply -k` on the environment's folder (the same kustomize
//!   build Argo CD runs), prunes what the revision no longer has, and writes
//!   the `Application`'s status as Argo CD's controller does (`Synced`,
//!   `Healthy`, the revision, the operation's phase, the resource list).
//!   [`set_application_health`] writes any other state.
//! - **Argo Rollouts** is [`set_rollout_status`]: the phase, abort flag,
//!   message and conditions Argo Rollouts' controller would write on the
//!   `Rollout` that [`argo_sync`] applied.
//! - **Environments** are namespaces per test ([`EnvironmentNamespaces`]),
//!   so parallel tests each have their own experiment, test and prod.
//!
//! The Argo CRDs the tests install are the stand-ins in
//! `manifests/argocd/crds/` ([`install_argo_crds`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::{Client, ResourceExt};
use rand::Rng;
use serde_json::{Value, json};
use tokio::sync::OnceCell;

use crate::{E2E_LABEL, FIELD_MANAGER, HarnessError, Result, TestEnv, repo_root};

/// The Argo API group and version of every Argo CD and Argo Rollouts kind.
pub const ARGO_GROUP: &str = "argoproj.io";
/// See [`ARGO_GROUP`].
pub const ARGO_VERSION: &str = "v1alpha1";

/// The field manager [`argo_sync`] applies the folder's objects under, the
/// way Argo CD's application controller does.
pub const ARGO_CD_MANAGER: &str = "argocd-controller";

/// How long git commands may take before the harness gives up (a hung
/// credential prompt or server must fail a test, not stall it).
const GIT_TIMEOUT: Duration = Duration::from_secs(120);

/// The `argoproj.io/v1alpha1` resource of `kind` (`Application`, `Rollout`,
/// `AnalysisRun`, ...), for `Api<DynamicObject>`.
pub fn argo_resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(ARGO_GROUP, ARGO_VERSION, kind))
}

/// An `Api<DynamicObject>` for an Argo kind in `namespace`.
pub fn argo_api(client: &Client, namespace: &str, kind: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), namespace, &argo_resource(kind))
}

// ---------------------------------------------------------------------------
// The git server
// ---------------------------------------------------------------------------

/// The loopback git server of `tests/gitserver/up`: smart HTTP with basic
/// auth, push allowed for the one user it knows.
#[derive(Debug, Clone)]
pub struct GitServer {
    /// Base URL without credentials (`http://127.0.0.1:PORT`); a repository
    /// `x.git` is at `{url}/x.git`.
    pub url: String,
    pub user: String,
    pub password: String,
    /// The server's state directory (`target/gitserver` by default).
    pub dir: PathBuf,
    /// `ssh://user@127.0.0.1:PORT`; a repository's absolute path on disk
    /// follows it.
    pub ssh_base: String,
    /// The private key the SSH server accepts (OpenSSH format).
    pub ssh_client_key: String,
    /// A `known_hosts` line for the SSH server's host key.
    pub ssh_known_hosts: String,
}

static GIT_SERVER: OnceCell<GitServer> = OnceCell::const_new();

/// The state directory `tests/gitserver/up` uses.
pub fn git_server_dir() -> PathBuf {
    std::env::var_os("QUANTOPS_GITSERVER_DIR")
        .map_or_else(|| repo_root().join("target/gitserver"), PathBuf::from)
}

impl GitServer {
    /// Starts the server, or finds it running (`up` is idempotent), once per
    /// test process, and reads its URL and credentials from the files `up`
    /// writes into its state directory. The server is left running after
    /// the tests (like the control plane): `tests/gitserver/down` stops it.
    pub async fn start() -> Result<GitServer> {
        GIT_SERVER.get_or_try_init(start_server).await.cloned()
    }

    /// Where the bare repositories live on disk.
    pub fn repos_dir(&self) -> PathBuf {
        self.dir.join("repos")
    }

    /// `url` (on this server) with the user and password in it, for git
    /// commands that must authenticate (push, or any access: the server asks
    /// for credentials on every request).
    pub fn authenticated_url(&self, url: &str) -> String {
        with_credentials(url, &self.user, &self.password)
    }

    /// Creates a bare repository with one commit on `main` (a README), so
    /// that the branch exists as on a hosted repository, and returns its URL
    /// (without credentials). The name gets a random suffix
    /// (`{name}-{6 hex}.git`): parallel tests and reruns never share a
    /// repository.
    pub async fn create_repo(&self, name: &str) -> Result<String> {
        let suffix: u32 = rand::rng().random_range(0..0x100_0000);
        let repo = format!("{name}-{suffix:06x}.git");
        let path = self.repos_dir().join(&repo);
        if path.exists() {
            return Err(HarnessError::Unexpected(format!(
                "repository {} already exists",
                path.display()
            )));
        }
        git(
            None,
            &["init", "--quiet", "--bare", "--initial-branch=main"],
        )
        .arg(&path)
        .run("creating the bare repository")
        .await?;
        let url = format!("{}/{repo}", self.url);
        commit_files(
            &self.authenticated_url(&url),
            "main",
            &[(
                "README.md",
                "# models-gitops\n\nServing manifests committed by quantops, synced by Argo CD.\n",
            )],
            &[],
            "Initial commit",
        )
        .await?;
        tracing::info!(%url, "created git repository");
        Ok(url)
    }

    /// The SSH URL of a repository [`GitServer::create_repo`] made (given by
    /// its HTTP URL).
    pub fn ssh_url(&self, url: &str) -> Result<String> {
        let name = self.repo_name(url)?;
        Ok(format!(
            "{}{}",
            self.ssh_base,
            self.repos_dir().join(name).display()
        ))
    }

    /// The bare repository on disk behind a URL of [`GitServer::create_repo`].
    pub fn repo_path(&self, url: &str) -> Result<PathBuf> {
        Ok(self.repos_dir().join(self.repo_name(url)?))
    }

    fn repo_name(&self, url: &str) -> Result<String> {
        let url = without_credentials(url);
        url.strip_prefix(&format!("{}/", self.url))
            .filter(|n| !n.is_empty() && !n.contains('/') && n.ends_with(".git"))
            .map(str::to_string)
            .ok_or_else(|| {
                HarnessError::Unexpected(format!("{url} is not a repository of {}", self.url))
            })
    }

    /// Applies a Secret `name` with the `ssh-privatekey` and `known_hosts`
    /// keys the operator reads; `key_override` puts another key in it (one
    /// the server does not know) for the credential-failure tests.
    pub async fn ssh_credentials_secret(
        &self,
        env: &TestEnv,
        name: &str,
        key_override: Option<&str>,
    ) -> Result<Secret> {
        let secret: Secret = from_json(json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": { "name": name, "labels": { E2E_LABEL: "true" } },
            "type": "kubernetes.io/ssh-auth",
            "stringData": {
                "ssh-privatekey": key_override.unwrap_or(&self.ssh_client_key),
                "known_hosts": self.ssh_known_hosts,
            },
        }))?;
        crate::apply(&env.api::<Secret>(), name, &secret).await
    }

    /// Deletes a repository [`GitServer::create_repo`] made (its URL, with
    /// or without credentials), so finished tests leave nothing behind.
    pub fn remove_repo(&self, url: &str) -> Result<()> {
        let path = self.repo_path(url)?;
        std::fs::remove_dir_all(&path).map_err(|source| HarnessError::Io {
            what: format!("removing {}", path.display()),
            source,
        })
    }

    /// Applies a Secret `name` in the test's namespace with the `username`
    /// and `password` keys the operator reads (operator/src/gitops/
    /// credentials.rs); `password_override` puts a wrong password in it for
    /// the credential-failure tests.
    pub async fn credentials_secret(
        &self,
        env: &TestEnv,
        name: &str,
        password_override: Option<&str>,
    ) -> Result<Secret> {
        let secret: Secret = from_json(json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": { "name": name, "labels": { E2E_LABEL: "true" } },
            "type": "Opaque",
            "stringData": {
                "username": self.user,
                "password": password_override.unwrap_or(&self.password),
            },
        }))?;
        crate::apply(&env.api::<Secret>(), name, &secret).await
    }
}

async fn start_server() -> Result<GitServer> {
    let script = repo_root().join("tests/gitserver/up");
    let dir = git_server_dir();
    crate::run_up_script(
        tokio::process::Command::new(&script)
            .env("QUANTOPS_GITSERVER_DIR", &dir)
            .stdin(Stdio::null()),
        &script,
    )
    .await?;
    let read = |file: &str| -> Result<String> {
        let path = dir.join(file);
        std::fs::read_to_string(&path)
            .map(|s| s.trim().to_string())
            .map_err(|source| HarnessError::Io {
                what: format!("reading {}", path.display()),
                source,
            })
    };
    let server = GitServer {
        url: read("url")?,
        user: read("user")?,
        password: read("password")?,
        ssh_base: read("ssh_url")?,
        ssh_client_key: format!("{}\n", read("ssh/client_ed25519")?),
        ssh_known_hosts: format!("{}\n", read("ssh/known_hosts")?),
        dir: dir.clone(),
    };
    tracing::info!(url = %server.url, "git server up");
    Ok(server)
}

/// `url` with `user:password@` after the scheme (replacing any there).
pub fn with_credentials(url: &str, user: &str, password: &str) -> String {
    let bare = without_credentials(url);
    match bare.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{user}:{password}@{rest}"),
        None => bare,
    }
}

/// `url` without any `user[:password]@` part: what may go into logs, error
/// messages and objects.
pub fn without_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let host_end = rest.find('/').unwrap_or(rest.len());
    match rest[..host_end].rfind('@') {
        Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

// ---------------------------------------------------------------------------
// git CLI
// ---------------------------------------------------------------------------

/// A git command with a deterministic environment: no prompts (a wrong
/// password fails instead of waiting for a terminal), no system or user
/// configuration, a fixed identity for commits.
struct GitCommand {
    cmd: tokio::process::Command,
    /// The command line as shown in errors, credentials removed.
    shown: Vec<String>,
}

fn git(dir: Option<&Path>, args: &[&str]) -> GitCommand {
    let mut cmd = tokio::process::Command::new("git");
    if let Some(dir) = dir {
        cmd.arg("-C").arg(dir);
    }
    cmd.args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "quantops e2e")
        .env("GIT_AUTHOR_EMAIL", "e2e@quantops.dev")
        .env("GIT_COMMITTER_NAME", "quantops e2e")
        .env("GIT_COMMITTER_EMAIL", "e2e@quantops.dev")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let mut shown = vec!["git".to_string()];
    shown.extend(args.iter().map(|a| without_credentials(a)));
    GitCommand { cmd, shown }
}

impl GitCommand {
    fn arg(mut self, arg: impl AsRef<std::ffi::OsStr>) -> Self {
        let arg = arg.as_ref();
        self.shown.push(without_credentials(&arg.to_string_lossy()));
        self.cmd.arg(arg);
        self
    }

    /// Runs it; stdout on success, else an error with the command line
    /// (credentials removed) and its output.
    async fn run(self, what: &str) -> Result<String> {
        let bytes = self.run_bytes(what).await?;
        String::from_utf8(bytes).map_err(|_| {
            HarnessError::Unexpected(format!("{what}: git printed something that is not UTF-8"))
        })
    }

    async fn run_bytes(mut self, what: &str) -> Result<Vec<u8>> {
        let shown = self.shown.join(" ");
        let out = tokio::time::timeout(GIT_TIMEOUT, self.cmd.output())
            .await
            .map_err(|_| HarnessError::Timeout {
                what: format!("{what} ({shown})"),
                timeout: GIT_TIMEOUT,
            })?
            .map_err(|source| HarnessError::Io {
                what: format!("{what}: running {shown}"),
                source,
            })?;
        if !out.status.success() {
            return Err(HarnessError::Command {
                what: format!("{what}: {shown}"),
                status: out.status,
                output: scrub(&format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )),
            });
        }
        Ok(out.stdout)
    }
}

/// Removes `user:password@` from every URL in a text (git echoes remote
/// URLs in its messages).
fn scrub(text: &str) -> String {
    text.split_inclusive(char::is_whitespace)
        .map(|word| {
            if word.contains("://") {
                let trimmed = word.trim_end();
                format!("{}{}", without_credentials(trimmed), &word[trimmed.len()..])
            } else {
                word.to_string()
            }
        })
        .collect()
}

/// A directory under the system temp dir, removed when dropped.
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Makes `{tmp}/quantops-e2e-{prefix}-{random}`.
    pub fn new(prefix: &str) -> Result<ScratchDir> {
        let suffix: u64 = rand::rng().random();
        let path = std::env::temp_dir().join(format!("quantops-e2e-{prefix}-{suffix:016x}"));
        std::fs::create_dir_all(&path).map_err(|source| HarnessError::Io {
            what: format!("creating {}", path.display()),
            source,
        })?;
        Ok(ScratchDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(path = %self.0.display(), "removing a scratch directory: {e}");
        }
    }
}

/// One commit as `git log` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitInfo {
    /// Full SHA-1.
    pub sha: String,
    /// The first line of the message.
    pub subject: String,
    /// The rest of the message (after the blank line), trailing newlines
    /// removed.
    pub body: String,
    /// Parent SHAs (none for the root commit).
    pub parents: Vec<String>,
}

/// Clones `url` (credentials in the URL where the server needs them) into
/// `dest` (which must not exist or be empty) and checks out `revision` (a
/// branch, tag or SHA) detached. Returns the full SHA checked out.
pub async fn clone_at(url: &str, revision: &str, dest: &Path) -> Result<String> {
    git(None, &["clone", "--quiet", "--no-checkout", url])
        .arg(dest)
        .run("cloning the GitOps repository")
        .await?;
    let sha = rev_parse(dest, revision).await?;
    git(Some(dest), &["checkout", "--quiet", "--detach", &sha])
        .run(&format!("checking out {revision}"))
        .await?;
    Ok(sha)
}

/// The full SHA `revision` names in the repository at `dir` (a branch is
/// looked up as the remote's branch first, as after a clone).
async fn rev_parse(dir: &Path, revision: &str) -> Result<String> {
    let remote = format!("refs/remotes/origin/{revision}^{{commit}}");
    if let Ok(sha) = git(Some(dir), &["rev-parse", "--verify", "--quiet", &remote])
        .run("resolving a remote branch")
        .await
    {
        return Ok(sha.trim().to_string());
    }
    let sha = git(
        Some(dir),
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("{revision}^{{commit}}"),
        ],
    )
    .run(&format!("resolving revision {revision}"))
    .await?;
    Ok(sha.trim().to_string())
}

/// A bare clone of `url` in a scratch directory, for reading history.
async fn bare_clone(url: &str) -> Result<ScratchDir> {
    let scratch = ScratchDir::new("git")?;
    let dest = scratch.path().join("repo.git");
    git(None, &["clone", "--quiet", "--bare", url])
        .arg(&dest)
        .run("cloning the GitOps repository")
        .await?;
    Ok(scratch)
}

/// The history of `branch` at `url`, newest first (`git log`, first parents
/// and merges alike).
pub async fn log(url: &str, branch: &str) -> Result<Vec<CommitInfo>> {
    let scratch = bare_clone(url).await?;
    let dir = scratch.path().join("repo.git");
    // Records end with RS (0x1e), fields with US (0x1f): neither occurs in
    // commit messages in practice.
    let out = git(
        Some(&dir),
        &[
            "log",
            "--format=%H%x1f%P%x1f%s%x1f%b%x1e",
            &format!("refs/heads/{branch}"),
            "--",
        ],
    )
    .run(&format!("reading the history of {branch}"))
    .await?;
    let mut commits = Vec::new();
    for record in out.split('\x1e') {
        let record = record.trim_start_matches('\n');
        if record.is_empty() {
            continue;
        }
        let fields: Vec<&str> = record.splitn(4, '\x1f').collect();
        let [sha, parents, subject, body] = fields[..] else {
            return Err(HarnessError::Unexpected(format!(
                "unexpected git log record {record:?}"
            )));
        };
        commits.push(CommitInfo {
            sha: sha.to_string(),
            subject: subject.to_string(),
            body: body.trim_end_matches('\n').to_string(),
            parents: parents.split_whitespace().map(str::to_string).collect(),
        });
    }
    Ok(commits)
}

/// The SHA of `branch` on the server (`git ls-remote`), `None` when the
/// branch does not exist.
pub async fn branch_head(url: &str, branch: &str) -> Result<Option<String>> {
    let out = git(None, &["ls-remote", "--heads", url, branch])
        .run("listing the remote's branches")
        .await?;
    let wanted = format!("refs/heads/{branch}");
    Ok(out.lines().find_map(|line| {
        let (sha, name) = line.split_once('\t')?;
        (name == wanted).then(|| sha.to_string())
    }))
}

/// Every file under `path` (a folder, `""` for the whole tree) at
/// `revision`, keyed by its path relative to `path`. Empty when the folder
/// does not exist at that revision (as after the revert of the commit that
/// created it). File contents must be UTF-8 (the serving folders are).
pub async fn files_at(url: &str, revision: &str, path: &str) -> Result<BTreeMap<String, String>> {
    let scratch = bare_clone(url).await?;
    let dir = scratch.path().join("repo.git");
    let sha = rev_parse(&dir, revision).await?;
    let prefix = path.trim_matches('/');
    let mut args = vec!["ls-tree", "-r", "-z", "--name-only", sha.as_str()];
    let pathspec = format!("{prefix}/");
    if !prefix.is_empty() {
        args.extend(["--", pathspec.as_str()]);
    }
    let listing = git(Some(&dir), &args)
        .run(&format!("listing {path} at {revision}"))
        .await?;
    let mut files = BTreeMap::new();
    for name in listing.split('\0').filter(|n| !n.is_empty()) {
        let bytes = git(Some(&dir), &["show", &format!("{sha}:{name}")])
            .run_bytes(&format!("reading {name} at {revision}"))
            .await?;
        let content = String::from_utf8(bytes).map_err(|_| {
            HarnessError::Unexpected(format!("{name} at {revision} is not UTF-8 text"))
        })?;
        let relative = if prefix.is_empty() {
            name
        } else {
            name.strip_prefix(&pathspec).unwrap_or(name)
        };
        files.insert(relative.to_string(), content);
    }
    Ok(files)
}

/// Commits `files` (path, content) and removes `remove` on `branch` of
/// `url` as one commit, and pushes it; creates the branch when the remote
/// has none (an empty repository). Returns the new commit's SHA. For tests
/// that need commits the operator did not make: the initial README, another
/// team's change racing the operator's push.
pub async fn commit_files(
    url: &str,
    branch: &str,
    files: &[(&str, &str)],
    remove: &[&str],
    message: &str,
) -> Result<String> {
    let scratch = ScratchDir::new("commit")?;
    let dir = scratch.path().join("work");
    let exists = branch_head(url, branch).await?.is_some();
    if exists {
        git(
            None,
            &[
                "clone",
                "--quiet",
                "--single-branch",
                "--branch",
                branch,
                url,
            ],
        )
        .arg(&dir)
        .run("cloning the GitOps repository")
        .await?;
    } else {
        git(
            None,
            &["init", "--quiet", &format!("--initial-branch={branch}")],
        )
        .arg(&dir)
        .run("initialising a repository")
        .await?;
        git(Some(&dir), &["remote", "add", "origin", url])
            .run("adding the remote")
            .await?;
    }
    for (path, content) in files {
        let file = dir.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent).map_err(|source| HarnessError::Io {
                what: format!("creating {}", parent.display()),
                source,
            })?;
        }
        std::fs::write(&file, content).map_err(|source| HarnessError::Io {
            what: format!("writing {}", file.display()),
            source,
        })?;
        git(Some(&dir), &["add", "--", path])
            .run(&format!("adding {path}"))
            .await?;
    }
    for path in remove {
        git(Some(&dir), &["rm", "-r", "--quiet", "--", path])
            .run(&format!("removing {path}"))
            .await?;
    }
    git(Some(&dir), &["commit", "--quiet", "-m", message])
        .run("committing")
        .await?;
    git(
        Some(&dir),
        &[
            "push",
            "--quiet",
            "origin",
            &format!("HEAD:refs/heads/{branch}"),
        ],
    )
    .run("pushing")
    .await?;
    let sha = git(Some(&dir), &["rev-parse", "HEAD"])
        .run("reading the new commit")
        .await?;
    Ok(sha.trim().to_string())
}

/// Whether `ancestor` is `descendant` or one of its ancestors in the
/// repository at `url` (what "a revision containing the commit" means).
pub async fn is_ancestor(url: &str, ancestor: &str, descendant: &str) -> Result<bool> {
    let scratch = bare_clone(url).await?;
    let dir = scratch.path().join("repo.git");
    let a = rev_parse(&dir, ancestor).await?;
    let d = rev_parse(&dir, descendant).await?;
    match git(Some(&dir), &["merge-base", "--is-ancestor", &a, &d])
        .run("comparing revisions")
        .await
    {
        Ok(_) => Ok(true),
        Err(HarnessError::Command { status, .. }) if status.code() == Some(1) => Ok(false),
        Err(e) => Err(e),
    }
}

// ---------------------------------------------------------------------------
// Argo CD's part
// ---------------------------------------------------------------------------

/// Applies the stand-in Argo CRDs (`manifests/argocd/crds/`) with
/// server-side apply and waits until each is Established. Several tests
/// may do this at once: server-side apply of identical objects is
/// idempotent, and a lost create race (AlreadyExists, a conflict) is
/// retried.
pub async fn install_argo_crds(env: &TestEnv) -> Result<()> {
    let dir = repo_root().join("manifests/argocd/crds");
    let mut last = None;
    for attempt in 0..5u64 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500 * attempt)).await;
        }
        let result = kubectl_run(
            env.command(env.kubectl_path())
                .args([
                    "apply",
                    "--server-side",
                    "--force-conflicts",
                    "--field-manager",
                    FIELD_MANAGER,
                    "-f",
                ])
                .arg(&dir),
            "applying the Argo CRDs",
        )
        .await;
        match result {
            Ok(_) => {
                last = None;
                break;
            }
            Err(e) => {
                tracing::info!("applying the Argo CRDs, attempt {attempt}: {e}");
                last = Some(e);
            }
        }
    }
    if let Some(e) = last {
        return Err(e);
    }
    kubectl_run(
        env.command(env.kubectl_path())
            .args(["wait", "--for=condition=Established", "--timeout=60s", "-f"])
            .arg(&dir),
        "waiting for the Argo CRDs to be Established",
    )
    .await?;
    Ok(())
}

async fn kubectl_run(cmd: &mut tokio::process::Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| HarnessError::Io {
            what: format!("{what}: running kubectl"),
            source,
        })?;
    if !out.status.success() {
        return Err(HarnessError::Command {
            what: what.to_string(),
            status: out.status,
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    String::from_utf8(out.stdout)
        .map_err(|_| HarnessError::Unexpected(format!("{what}: kubectl printed non-UTF-8")))
}

/// One object a sync applied, as Argo CD lists it in
/// `Application.status.resources`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SyncedResource {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl SyncedResource {
    /// `kind.version.group/name`, a kubectl resource argument.
    fn kubectl_ref(&self) -> String {
        if self.group.is_empty() {
            // The trailing dot names the core group (empty); without it
            // kubectl reads the version as a group.
            format!("{}.{}./{}", self.kind, self.version, self.name)
        } else {
            format!(
                "{}.{}.{}/{}",
                self.kind, self.version, self.group, self.name
            )
        }
    }

    fn from_object(obj: &Value, default_namespace: &str) -> Option<SyncedResource> {
        let api_version = obj.get("apiVersion")?.as_str()?;
        let (group, version) = match api_version.split_once('/') {
            Some((g, v)) => (g.to_string(), v.to_string()),
            None => (String::new(), api_version.to_string()),
        };
        let meta = obj.get("metadata")?;
        Some(SyncedResource {
            group,
            version,
            kind: obj.get("kind")?.as_str()?.to_string(),
            namespace: meta
                .get("namespace")
                .and_then(Value::as_str)
                .unwrap_or(default_namespace)
                .to_string(),
            name: meta.get("name")?.as_str()?.to_string(),
        })
    }

    fn to_status(&self) -> Value {
        json!({
            "group": self.group, "version": self.version, "kind": self.kind,
            "namespace": self.namespace, "name": self.name,
            "status": "Synced", "health": { "status": "Healthy" },
        })
    }

    fn from_status(v: &Value) -> Option<SyncedResource> {
        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        Some(SyncedResource {
            group: text("group").unwrap_or_default(),
            version: text("version")?,
            kind: text("kind")?,
            namespace: text("namespace").unwrap_or_default(),
            name: text("name")?,
        })
    }
}

/// What one [`argo_sync`] did.
#[derive(Debug, Clone)]
pub struct SyncResult {
    /// The full SHA synced (what `status.sync.revision` now says).
    pub revision: String,
    /// Every object the folder has at that revision, applied.
    pub applied: Vec<SyncedResource>,
    /// Objects of an earlier sync the revision no longer has, deleted.
    pub pruned: Vec<SyncedResource>,
}

/// Plays one Argo CD sync of the Application `app_name` in `app_namespace`:
///
/// 1. clones `repo_url` (credentials in the URL) at `revision` (a branch or
///    SHA; resolved to the full SHA as Argo CD does);
/// 2. `kubectl apply -k {clone}/{folder} -n {dest_namespace}` with the test
///    cluster's kubectl (kustomize built in): the kustomization's own
///    `namespace:` must equal `dest_namespace`, else kubectl refuses, which
///    shows a mismatch between the operator's environment namespaces and
///    the test's;
/// 3. prunes (deletes) the objects the previous sync applied that this
///    revision no longer has (automated sync with `prune: true`); when the
///    folder is gone at this revision (the revert of the first promotion
///    into an environment), everything is pruned;
/// 4. creates or updates the Application (its spec as the ApplicationSet in
///    `manifests/argocd/` generates it, the repository URL without
///    credentials) and writes its status through the status subresource:
///    `sync.status: Synced`, `sync.revision`, `health.status: Healthy`,
///    `operationState.phase: Succeeded`, and the `resources` list.
#[allow(clippy::too_many_arguments)]
pub async fn argo_sync(
    env: &TestEnv,
    app_namespace: &str,
    app_name: &str,
    repo_url: &str,
    revision: &str,
    folder: &str,
    dest_namespace: &str,
) -> Result<SyncResult> {
    let scratch = ScratchDir::new("sync")?;
    let checkout = scratch.path().join("repo");
    let sha = clone_at(repo_url, revision, &checkout).await?;
    let folder = folder.trim_matches('/');
    let dir = checkout.join(folder);

    let mut applied = Vec::new();
    if dir.join("kustomization.yaml").is_file() || dir.join("kustomization.yml").is_file() {
        let out = kubectl_run(
            env.command(env.kubectl_path())
                .args([
                    "apply",
                    "-o",
                    "json",
                    "--field-manager",
                    ARGO_CD_MANAGER,
                    "-k",
                ])
                .arg(&dir)
                .args(["-n", dest_namespace]),
            &format!("kubectl apply -k {folder} at {sha} into {dest_namespace}"),
        )
        .await?;
        let value: Value = serde_json::from_str(&out).map_err(|e| {
            HarnessError::Unexpected(format!("kubectl apply -o json printed no JSON: {e}"))
        })?;
        let objects = match value.get("kind").and_then(Value::as_str) {
            Some("List") => value
                .get("items")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
            _ => vec![value],
        };
        applied = objects
            .iter()
            .filter_map(|o| SyncedResource::from_object(o, dest_namespace))
            .collect();
        applied.sort();
    } else if dir.exists() {
        return Err(HarnessError::Unexpected(format!(
            "{folder} at {sha} has no kustomization.yaml"
        )));
    }

    // Prune what the previous sync applied and this revision lacks.
    let apps = argo_api(&env.client, app_namespace, "Application");
    let previous: BTreeSet<SyncedResource> = apps
        .get_opt(app_name)
        .await
        .map_err(|source| HarnessError::Api {
            what: format!("reading Application {app_name}"),
            source,
        })?
        .and_then(|app| {
            app.data
                .pointer("/status/resources")
                .and_then(Value::as_array)
                .cloned()
        })
        .unwrap_or_default()
        .iter()
        .filter_map(SyncedResource::from_status)
        .collect();
    let keep: BTreeSet<&SyncedResource> = applied.iter().collect();
    let pruned: Vec<SyncedResource> = previous
        .iter()
        .filter(|r| !keep.contains(r))
        .cloned()
        .collect();
    for r in &pruned {
        kubectl_run(
            env.command(env.kubectl_path()).args([
                "delete",
                "--ignore-not-found",
                "--wait=false",
                "-n",
                &r.namespace,
                &r.kubectl_ref(),
            ]),
            &format!("pruning {}", r.kubectl_ref()),
        )
        .await?;
    }

    let clean_url = without_credentials(repo_url);
    let source = json!({ "repoURL": clean_url, "path": folder, "targetRevision": revision });
    let destination =
        json!({ "server": "https://kubernetes.default.svc", "namespace": dest_namespace });
    let app: DynamicObject = from_json(json!({
        "apiVersion": format!("{ARGO_GROUP}/{ARGO_VERSION}"),
        "kind": "Application",
        "metadata": { "name": app_name, "namespace": app_namespace, "labels": { E2E_LABEL: "true" } },
        "spec": {
            "project": "default",
            "source": source,
            "destination": destination,
            "syncPolicy": {
                "automated": { "prune": true, "selfHeal": true },
                "syncOptions": ["CreateNamespace=false"],
            },
        },
    }))?;
    apps.patch(
        app_name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&app),
    )
    .await
    .map_err(|source| HarnessError::Api {
        what: format!("applying Application {app_name}"),
        source,
    })?;

    let now = now();
    let status = json!({
        "sync": {
            "status": "Synced",
            "revision": sha,
            "comparedTo": { "source": source, "destination": destination },
        },
        "health": { "status": "Healthy" },
        "operationState": {
            "phase": "Succeeded",
            "message": "successfully synced (all tasks run)",
            "operation": { "sync": { "revision": sha, "prune": true } },
            "syncResult": { "revision": sha, "source": source },
            "startedAt": now,
            "finishedAt": now,
        },
        "resources": applied.iter().map(SyncedResource::to_status).collect::<Vec<_>>(),
        "sourceType": "Kustomize",
        "reconciledAt": now,
    });
    patch_status(&apps, app_name, status).await?;
    tracing::info!(app = app_name, revision = %sha, applied = applied.len(), pruned = pruned.len(), "argo_sync");
    Ok(SyncResult {
        revision: sha,
        applied,
        pruned,
    })
}

/// Writes an Application's sync and health as Argo CD would for a state
/// other than a clean sync: `health` one of `Healthy`, `Progressing`,
/// `Degraded`, `Suspended`, `Missing`, `Unknown`; `sync` one of `Synced`,
/// `OutOfSync`, `Unknown`; `message` goes to `status.health.message` (and
/// the operation's message) when not empty. The Application must exist
/// (after an [`argo_sync`]); the other status fields are kept.
#[allow(clippy::too_many_arguments)]
pub async fn set_application_health(
    env: &TestEnv,
    namespace: &str,
    name: &str,
    health: &str,
    sync: &str,
    revision: &str,
    message: &str,
) -> Result<()> {
    let apps = argo_api(&env.client, namespace, "Application");
    let phase = match health {
        "Degraded" | "Missing" => "Failed",
        "Progressing" => "Running",
        _ => "Succeeded",
    };
    let mut health_status = json!({ "status": health });
    let mut operation = json!({ "phase": phase, "syncResult": { "revision": revision } });
    if !message.is_empty() {
        health_status["message"] = json!(message);
        operation["message"] = json!(message);
    }
    let status = json!({
        "sync": { "status": sync, "revision": revision },
        "health": health_status,
        "operationState": operation,
        "reconciledAt": now(),
    });
    patch_status(&apps, name, status).await
}

/// Merges `status` into the object's status through the status subresource
/// (a JSON merge patch: lists are replaced, maps merged, `null` removes).
pub async fn patch_status(api: &Api<DynamicObject>, name: &str, status: Value) -> Result<()> {
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await
    .map_err(|source| HarnessError::Api {
        what: format!("writing the status of {name}"),
        source,
    })?;
    Ok(())
}

/// The current time as Kubernetes writes it (RFC 3339, seconds, UTC).
fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

// ---------------------------------------------------------------------------
// Argo Rollouts' part
// ---------------------------------------------------------------------------

/// Writes a Rollout's status as Argo Rollouts' controller would:
/// `status.phase` (`Healthy`, `Progressing`, `Paused` or `Degraded`),
/// `status.abort`, `status.message`, `status.observedGeneration` (a string,
/// as Argo Rollouts writes it) and conditions:
///
/// | state | conditions (type=status, reason) |
/// | --- | --- |
/// | aborted (any phase) | Progressing=False RolloutAborted, Available=True, Healthy=False |
/// | Healthy | Progressing=True NewReplicaSetAvailable, Available=True, Healthy=True, Completed=True |
/// | Progressing | Progressing=True ReplicaSetUpdated, Available=True, Healthy=False |
/// | Paused | Progressing=Unknown RolloutPaused, Paused=True CanaryPauseStep, Available=True |
/// | Degraded | Progressing=False ProgressDeadlineExceeded, Available=False, Healthy=False |
///
/// An aborted Rollout is reported `Degraded` by Argo Rollouts whatever the
/// phase passed here; this writes the phase given, so a test can also
/// produce the inconsistent states a real controller goes through.
pub async fn set_rollout_status(
    env: &TestEnv,
    namespace: &str,
    name: &str,
    phase: &str,
    aborted: bool,
    message: &str,
) -> Result<()> {
    let rollouts = argo_api(&env.client, namespace, "Rollout");
    let rollout = rollouts
        .get(name)
        .await
        .map_err(|source| HarnessError::Api {
            what: format!("reading Rollout {name}"),
            source,
        })?;
    let generation = rollout.metadata.generation.unwrap_or(0);
    let now = now();
    let condition = |kind: &str, status: &str, reason: &str, text: &str| {
        json!({
            "type": kind, "status": status, "reason": reason, "message": text,
            "lastTransitionTime": now, "lastUpdateTime": now,
        })
    };
    let text = if message.is_empty() {
        format!("Rollout is {phase}")
    } else {
        message.to_string()
    };
    let mut conditions = Vec::new();
    let mut pause_conditions = Value::Null;
    if aborted {
        conditions.push(condition("Progressing", "False", "RolloutAborted", &text));
        conditions.push(condition(
            "Available",
            "True",
            "AvailableReason",
            "Rollout has minimum availability",
        ));
        conditions.push(condition("Healthy", "False", "RolloutHealthy", &text));
    } else {
        match phase {
            "Healthy" => {
                conditions.push(condition(
                    "Progressing",
                    "True",
                    "NewReplicaSetAvailable",
                    &text,
                ));
                conditions.push(condition(
                    "Available",
                    "True",
                    "AvailableReason",
                    "Rollout has minimum availability",
                ));
                conditions.push(condition("Healthy", "True", "RolloutHealthy", &text));
                conditions.push(condition(
                    "Completed",
                    "True",
                    "RolloutCompleted",
                    "Rollout completed update to revision",
                ));
            }
            "Paused" => {
                conditions.push(condition("Progressing", "Unknown", "RolloutPaused", &text));
                conditions.push(condition("Paused", "True", "CanaryPauseStep", &text));
                conditions.push(condition(
                    "Available",
                    "True",
                    "AvailableReason",
                    "Rollout has minimum availability",
                ));
                pause_conditions = json!([{ "reason": "CanaryPauseStep", "startTime": now }]);
            }
            "Degraded" => {
                conditions.push(condition(
                    "Progressing",
                    "False",
                    "ProgressDeadlineExceeded",
                    &text,
                ));
                conditions.push(condition(
                    "Available",
                    "False",
                    "MinimumReplicasUnavailable",
                    "Rollout does not have minimum availability",
                ));
                conditions.push(condition("Healthy", "False", "RolloutHealthy", &text));
            }
            _ => {
                conditions.push(condition("Progressing", "True", "ReplicaSetUpdated", &text));
                conditions.push(condition(
                    "Available",
                    "True",
                    "AvailableReason",
                    "Rollout has minimum availability",
                ));
                conditions.push(condition("Healthy", "False", "RolloutHealthy", &text));
            }
        }
    }
    let status = json!({
        "phase": phase,
        "abort": aborted,
        "message": message,
        "observedGeneration": generation.to_string(),
        "conditions": conditions,
        "pauseConditions": pause_conditions,
        "controllerPause": phase == "Paused",
        "abortedAt": if aborted { json!(now) } else { Value::Null },
    });
    patch_status(&rollouts, name, status).await?;
    tracing::info!(rollout = %rollout.name_any(), phase, aborted, "set_rollout_status");
    Ok(())
}

// ---------------------------------------------------------------------------
// Environment namespaces
// ---------------------------------------------------------------------------

/// Namespaces standing for the environments of one test:
/// `{test namespace}-{environment}` (e.g. `e2e-promo-1a2b3c-prod`), labelled
/// with [`E2E_LABEL`] and `quantops.dev/environment`, deleted by
/// [`EnvironmentNamespaces::cleanup`] or, when a test fails first, on drop.
/// The operator is told the pattern ([`EnvironmentNamespaces::pattern`])
/// where it would use `{env}` in a real cluster.
pub struct EnvironmentNamespaces {
    client: Client,
    kubeconfig: PathBuf,
    prefix: String,
    names: Vec<String>,
    deleted: bool,
}

impl EnvironmentNamespaces {
    /// Creates `{test namespace}-{e}` for each of `environments` (any names:
    /// `experiment`, `test`, `prod`, or `argocd` for the Applications).
    pub async fn create(env: &TestEnv, environments: &[&str]) -> Result<EnvironmentNamespaces> {
        let mut made = EnvironmentNamespaces {
            client: env.client.clone(),
            kubeconfig: env.info.kubeconfig.clone(),
            prefix: env.namespace.clone(),
            names: Vec::new(),
            deleted: false,
        };
        let api = Api::<Namespace>::all(env.client.clone());
        for e in environments {
            let name = made.name(e);
            let ns: Namespace = from_json(json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": name,
                    "labels": { E2E_LABEL: "true", "quantops.dev/environment": e },
                },
            }))?;
            match api.create(&PostParams::default(), &ns).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(source) => {
                    return Err(HarnessError::Api {
                        what: format!("creating namespace {name}"),
                        source,
                    });
                }
            }
            made.names.push(name);
        }
        Ok(made)
    }

    /// The namespace of `environment`.
    pub fn name(&self, environment: &str) -> String {
        format!("{}-{environment}", self.prefix)
    }

    /// The namespace pattern with `{env}` in it, for the operator's
    /// environment-namespace setting.
    pub fn pattern(&self) -> String {
        format!("{}-{{env}}", self.prefix)
    }

    /// Every namespace made.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Deletes the namespaces and waits until they are gone.
    pub async fn cleanup(mut self) -> Result<()> {
        self.deleted = true;
        for name in &self.names {
            crate::delete_namespace(&self.client, name).await?;
        }
        Ok(())
    }
}

impl Drop for EnvironmentNamespaces {
    /// Like [`TestEnv`]'s drop: a thread with its own runtime deletes the
    /// namespaces of a test that failed before its cleanup.
    fn drop(&mut self) {
        if self.deleted || self.names.is_empty() {
            return;
        }
        let names = std::mem::take(&mut self.names);
        let kubeconfig = self.kubeconfig.clone();
        let joined = std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return tracing::warn!("no runtime to delete namespaces: {e}"),
            };
            rt.block_on(async {
                let client = match crate::client_from(&kubeconfig, None).await {
                    Ok(client) => client,
                    Err(e) => return tracing::warn!("deleting environment namespaces: {e}"),
                };
                for name in &names {
                    if let Err(e) = crate::delete_namespace(&client, name).await {
                        tracing::warn!(%name, "deleting an environment namespace: {e}");
                    }
                }
            });
        })
        .join();
        if joined.is_err() {
            tracing::warn!("environment namespace cleanup thread panicked");
        }
    }
}

fn from_json<K: serde::de::DeserializeOwned>(v: Value) -> Result<K> {
    serde_json::from_value(v).map_err(|source| HarnessError::Api {
        what: "building an object".into(),
        source: kube::Error::SerdeError(source),
    })
}
