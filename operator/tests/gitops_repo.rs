//! The GitOps writer against real git repositories: local bare repositories
//! (path and `file://` URLs) and git's smart-HTTP server behind nginx basic
//! auth on loopback (`tests/gitserver/up`, started here when it is not up).
//! What landed is checked with the `git` command line, not with git2.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::thread;
use std::time::Duration;

use quantops_api::GateResult;
use quantops_api::model_promotion::{Environment, ServingSpec};
use quantops_operator::gitops::{
    CommitStatus, GitCredentials, GitOpsError, GitTarget, GitWriter, GitWriterConfig,
    PromotionCommit, PromotionId, RenderedFile, RenderedFolder, RevertRequest, ServingInputs,
    ServingSettings, render_serving_folder,
};

// ---------------------------------------------------------------- helpers

fn git(git_dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("--git-dir")
        .arg(git_dir)
        .args(args)
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn init_bare(path: &Path) {
    let out = Command::new("git")
        .args(["init", "--quiet", "--bare", "--initial-branch=main"])
        .arg(path)
        .output()
        .expect("git init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    git(path, &["config", "http.receivepack", "true"]);
}

fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

fn writer(cache: &Path) -> GitWriter {
    GitWriter::new(GitWriterConfig {
        cache_root: cache.to_path_buf(),
        ..GitWriterConfig::default()
    })
}

fn promotion(name: &str, generation: i64) -> PromotionId {
    PromotionId {
        namespace: "experiment".to_string(),
        name: name.to_string(),
        uid: format!("uid-{name}"),
        generation,
    }
}

fn gates() -> Vec<GateResult> {
    vec![
        GateResult {
            name: "perplexity".to_string(),
            metric: "perplexity".to_string(),
            baseline: Some(32.475),
            value: 32.715,
            threshold: 33.45,
            passed: true,
        },
        GateResult {
            name: "greedy-consistency".to_string(),
            metric: "match_rate".to_string(),
            baseline: Some(1.0),
            value: 0.875,
            threshold: 0.5,
            passed: true,
        },
    ]
}

/// A real rendered folder for `model` at `version` in `env`.
fn rendered(model: &str, version: &str, env: Environment) -> (String, RenderedFolder) {
    let variant = format!("{model}-{version}-int4-gptq-g128-asym");
    let quantization =
        serde_yaml::from_str("method: gptq\nbits: 4\ngroupSize: 128\nsymmetric: false\n")
            .expect("quantization");
    let inputs = ServingInputs {
        model: model.to_string(),
        namespace: env.as_str().to_string(),
        environment: env,
        variant: variant.clone(),
        artifact_path: format!("quantized/{model}/{version}-int4-gptq-g128-asym"),
        quantization,
        serving: ServingSpec::default(),
        canary: None,
        card: format!("# {variant}\n\nModel card.\n"),
        quality_threshold: 0.8,
    };
    let folder = render_serving_folder(&inputs, &ServingSettings::default()).expect("render");
    (variant, folder)
}

fn promotion_commit(
    model: &str,
    version: &str,
    env: Environment,
    p: PromotionId,
) -> PromotionCommit {
    let (variant, folder) = rendered(model, version, env);
    PromotionCommit {
        promotion: p,
        variant,
        environment: env,
        folder,
        gates: gates(),
    }
}

fn local_target(url: String) -> GitTarget {
    GitTarget {
        url,
        branch: "main".to_string(),
        credentials: GitCredentials::Anonymous,
    }
}

fn files_under(bare: &Path, rev: &str, dir: &str) -> Vec<String> {
    git(bare, &["ls-tree", "-r", "--name-only", rev, "--", dir])
        .lines()
        .map(str::to_string)
        .collect()
}

fn commit_count(bare: &Path) -> usize {
    git(bare, &["rev-list", "--count", "main"])
        .trim()
        .parse()
        .expect("count")
}

// ---------------------------------------------------- the HTTP git server

struct GitServer {
    url: String,
    repos: PathBuf,
    user: String,
    password: String,
    /// `ssh://user@127.0.0.1:port`; a repository's absolute path follows.
    ssh_url: String,
    ssh_client_key: String,
    ssh_known_hosts: String,
}

/// The git server of `tests/gitserver/up`, started when it is not running.
fn git_server() -> &'static GitServer {
    static SERVER: OnceLock<GitServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let dir = std::env::var_os("QUANTOPS_GITSERVER_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target/gitserver"));
        let out = Command::new(root.join("tests/gitserver/up"))
            .env("QUANTOPS_GITSERVER_DIR", &dir)
            .output()
            .expect("run tests/gitserver/up");
        assert!(
            out.status.success(),
            "tests/gitserver/up failed (nginx or fcgiwrap missing? run `source tests/tools.sh && ensure_gitserver_tools`):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .unwrap_or_else(|e| panic!("{}: {e}", dir.join(f).display()))
                .trim()
                .to_string()
        };
        GitServer {
            url: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            repos: dir.join("repos"),
            user: read("user"),
            password: read("password"),
            ssh_url: read("ssh_url"),
            ssh_client_key: read("ssh/client_ed25519"),
            ssh_known_hosts: read("ssh/known_hosts"),
        }
    })
}

/// A new empty repository on the HTTP server: (bare path, URL).
fn http_repo(name: &str) -> (PathBuf, String) {
    let server = git_server();
    let name = format!("{}.git", unique(name));
    let path = server.repos.join(&name);
    init_bare(&path);
    (path, format!("{}/{name}", server.url))
}

fn secret_data(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect()
}

fn http_target(url: &str) -> GitTarget {
    let server = git_server();
    let credentials = GitCredentials::from_secret_data(
        "gitops-credentials",
        &secret_data(&[("username", &server.user), ("password", &server.password)]),
    )
    .expect("credentials");
    GitTarget {
        url: url.to_string(),
        branch: "main".to_string(),
        credentials,
    }
}

// ------------------------------------------------------------------ tests

#[test]
fn commit_lands_with_the_rendered_files_and_an_audit_message() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bare = tmp.path().join("gitops.git");
    init_bare(&bare);
    let w = writer(&tmp.path().join("cache"));
    let commit = promotion_commit(
        "tiny-llama",
        "v1.2",
        Environment::Test,
        promotion("to-test", 1),
    );

    let out = w
        .commit_promotion(&local_target(bare.display().to_string()), &commit)
        .expect("commit");
    assert_eq!(out.status, CommitStatus::Created);
    assert_eq!(out.attempts, 1);
    assert_eq!(git(&bare, &["rev-parse", "main"]).trim(), out.sha);

    // Every rendered file, byte for byte, and nothing else.
    let listed = files_under(&bare, "main", "envs");
    let expected: Vec<String> = commit
        .folder
        .files
        .iter()
        .map(|f| format!("envs/test/tiny-llama/{}", f.path))
        .collect();
    assert_eq!(listed, expected);
    for f in &commit.folder.files {
        let shown = git(
            &bare,
            &["show", &format!("main:envs/test/tiny-llama/{}", f.path)],
        );
        assert_eq!(shown, f.content, "{}", f.path);
    }

    let author = git(
        &bare,
        &["log", "-1", "--format=%an <%ae>|%cn <%ce>", "main"],
    );
    assert_eq!(
        author.trim(),
        "quantops <quantops@users.noreply>|quantops <quantops@users.noreply>"
    );
    let subject = git(&bare, &["log", "-1", "--format=%s", "main"]);
    assert_eq!(
        subject.trim(),
        "Promote tiny-llama-v1.2-int4-gptq-g128-asym to test"
    );
    let body = git(&bare, &["log", "-1", "--format=%b", "main"]);
    assert!(
        body.contains("ModelPromotion experiment/to-test (generation 1)"),
        "{body}"
    );
    assert!(
        body.contains(
            "- perplexity (perplexity): value 32.715, threshold 33.45, baseline 32.475: pass"
        ),
        "{body}"
    );
    assert!(
        body.contains(
            "- greedy-consistency (match_rate): value 0.875, threshold 0.5, baseline 1: pass"
        ),
        "{body}"
    );
    let trailers = git(
        &bare,
        &["log", "-1", "--format=%(trailers:only,unfold)", "main"],
    );
    for line in [
        "Quantops-Promotion: experiment/to-test",
        "Quantops-Promotion-Uid: uid-to-test",
        "Quantops-Generation: 1",
    ] {
        assert!(trailers.contains(line), "{line} not in {trailers}");
    }
}

#[test]
fn file_urls_work_and_a_new_folder_keeps_the_others() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bare = tmp.path().join("gitops.git");
    init_bare(&bare);
    let target = local_target(format!("file://{}", bare.display()));
    let w = writer(&tmp.path().join("cache"));
    w.commit_promotion(
        &target,
        &promotion_commit("tiny-llama", "v1", Environment::Test, promotion("a", 1)),
    )
    .expect("first");
    w.commit_promotion(
        &target,
        &promotion_commit("tiny-llama", "v1", Environment::Prod, promotion("b", 1)),
    )
    .expect("second");
    let prod = files_under(&bare, "main", "envs/prod/tiny-llama");
    assert!(
        prod.contains(&"envs/prod/tiny-llama/rollout.yaml".to_string()),
        "{prod:?}"
    );
    assert!(
        !prod.iter().any(|p| p.ends_with("deployment.yaml")),
        "{prod:?}"
    );
    assert_eq!(files_under(&bare, "main", "envs/test/tiny-llama").len(), 4);
    assert_eq!(commit_count(&bare), 2);
}

#[test]
fn the_same_promotion_is_committed_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bare = tmp.path().join("gitops.git");
    init_bare(&bare);
    let target = local_target(bare.display().to_string());
    let w = writer(&tmp.path().join("cache"));
    let commit = promotion_commit(
        "tiny-llama",
        "v1.2",
        Environment::Test,
        promotion("to-test", 4),
    );

    let first = w.commit_promotion(&target, &commit).expect("first");
    assert_eq!(first.status, CommitStatus::Created);
    let again = w.commit_promotion(&target, &commit).expect("again");
    assert_eq!(
        (again.status, &again.sha),
        (CommitStatus::AlreadyPresent, &first.sha)
    );

    // Another commit on top, then a restarted operator (empty cache): the
    // promotion's commit is still found by its trailers.
    let other = promotion_commit(
        "other-model",
        "v1",
        Environment::Test,
        promotion("other", 1),
    );
    w.commit_promotion(&target, &other).expect("other");
    let restarted = writer(&tmp.path().join("cache-after-restart"));
    let found = restarted
        .commit_promotion(&target, &commit)
        .expect("after restart");
    assert_eq!(
        (found.status, &found.sha),
        (CommitStatus::AlreadyPresent, &first.sha)
    );
    assert_eq!(commit_count(&bare), 2);

    // A new generation whose files are the same: no empty commit.
    let mut same_files = commit.clone();
    same_files.promotion.generation = 5;
    let unchanged = w.commit_promotion(&target, &same_files).expect("unchanged");
    assert_eq!(unchanged.status, CommitStatus::Unchanged);
    assert_eq!(unchanged.sha, git(&bare, &["rev-parse", "main"]).trim());
    assert_eq!(commit_count(&bare), 2);
}

#[test]
fn a_folder_is_replaced_wholly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bare = tmp.path().join("gitops.git");
    init_bare(&bare);
    let target = local_target(bare.display().to_string());
    let w = writer(&tmp.path().join("cache"));
    let folder = |files: &[(&str, &str)]| RenderedFolder {
        dir: "envs/test/m".to_string(),
        files: files
            .iter()
            .map(|(p, c)| RenderedFile {
                path: p.to_string(),
                content: c.to_string(),
            })
            .collect(),
    };
    let mut commit = PromotionCommit {
        promotion: promotion("m", 1),
        variant: "m-v1".to_string(),
        environment: Environment::Test,
        folder: folder(&[("a.yaml", "a: 1\n"), ("old.yaml", "old: true\n")]),
        gates: vec![],
    };
    w.commit_promotion(&target, &commit).expect("first");
    commit.promotion.generation = 2;
    commit.folder = folder(&[("a.yaml", "a: 2\n")]);
    let out = w.commit_promotion(&target, &commit).expect("second");
    assert_eq!(out.status, CommitStatus::Created);
    assert_eq!(files_under(&bare, "main", "envs"), ["envs/test/m/a.yaml"]);
    assert_eq!(git(&bare, &["show", "main:envs/test/m/a.yaml"]), "a: 2\n");
    let body = git(&bare, &["log", "-1", "--format=%b", "main"]);
    assert!(body.contains("Gates: none recorded."), "{body}");
}

#[test]
fn revert_restores_the_previous_tree_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bare = tmp.path().join("gitops.git");
    init_bare(&bare);
    let target = local_target(bare.display().to_string());
    let w = writer(&tmp.path().join("cache"));

    let v1 = promotion_commit(
        "tiny-llama",
        "v1.1",
        Environment::Prod,
        promotion("v1-to-prod", 1),
    );
    let v1_sha = w.commit_promotion(&target, &v1).expect("v1").sha;
    let v2 = promotion_commit(
        "tiny-llama",
        "v1.2",
        Environment::Prod,
        promotion("v2-to-prod", 1),
    );
    let v2_sha = w.commit_promotion(&target, &v2).expect("v2").sha;
    // An unrelated change lands after the one that will be reverted.
    let other = promotion_commit(
        "other-model",
        "v1",
        Environment::Prod,
        promotion("other", 1),
    );
    w.commit_promotion(&target, &other).expect("other");

    let request = RevertRequest {
        promotion: promotion("v2-to-prod", 1),
        commit: v2_sha.clone(),
        reason: "canary analysis failed: error-rate 0.2 > 0.01".to_string(),
    };
    let reverted = w.revert(&target, &request).expect("revert");
    assert_eq!(reverted.status, CommitStatus::Created);
    assert_eq!(git(&bare, &["rev-parse", "main"]).trim(), reverted.sha);
    // tiny-llama's prod folder is v1's again, the other model's stays.
    assert_eq!(
        git(&bare, &["rev-parse", "main:envs/prod/tiny-llama"]),
        git(
            &bare,
            &["rev-parse", &format!("{v1_sha}:envs/prod/tiny-llama")]
        )
    );
    assert_eq!(files_under(&bare, "main", "envs/prod/other-model").len(), 5);
    let subject = git(&bare, &["log", "-1", "--format=%s", "main"]);
    assert_eq!(
        subject.trim(),
        "Revert \"Promote tiny-llama-v1.2-int4-gptq-g128-asym to prod\""
    );
    let body = git(&bare, &["log", "-1", "--format=%B", "main"]);
    assert!(
        body.contains(&format!("This reverts commit {v2_sha}.")),
        "{body}"
    );
    assert!(
        body.contains("Reason: canary analysis failed: error-rate 0.2 > 0.01"),
        "{body}"
    );
    assert!(
        body.contains(&format!("Quantops-Revert-Of: {v2_sha}")),
        "{body}"
    );
    assert!(
        body.contains("Quantops-Promotion: experiment/v2-to-prod"),
        "{body}"
    );

    // Asked again, also by a restarted operator: found, not made twice.
    let again = w.revert(&target, &request).expect("again");
    assert_eq!(
        (again.status, &again.sha),
        (CommitStatus::AlreadyPresent, &reverted.sha)
    );
    let restarted = writer(&tmp.path().join("cache2"))
        .revert(&target, &request)
        .expect("restarted");
    assert_eq!(restarted.status, CommitStatus::AlreadyPresent);
    assert_eq!(commit_count(&bare), 4);
    // The promotion's own commit is still recognised as made (not re-made).
    let v2_again = w.commit_promotion(&target, &v2).expect("v2 again");
    assert_eq!(
        (v2_again.status, v2_again.sha),
        (CommitStatus::AlreadyPresent, v2_sha)
    );

    // A commit that is not on the branch.
    let missing = w.revert(
        &target,
        &RevertRequest {
            commit: "0123456789abcdef0123456789abcdef01234567".to_string(),
            ..request
        },
    );
    assert!(
        matches!(missing, Err(GitOpsError::CommitNotFound { .. })),
        "{missing:?}"
    );
}

#[test]
fn over_http_with_basic_auth_a_commit_lands() {
    let (bare, url) = http_repo("http-basic");
    let target = http_target(&url);
    let tmp = tempfile::tempdir().expect("tempdir");
    let w = writer(tmp.path());
    let commit = promotion_commit(
        "tiny-llama",
        "v1.2",
        Environment::Test,
        promotion("http", 1),
    );
    let out = w
        .commit_promotion(&target, &commit)
        .expect("commit over http");
    assert_eq!(out.status, CommitStatus::Created);
    assert_eq!(git(&bare, &["rev-parse", "main"]).trim(), out.sha);
    let again = w
        .commit_promotion(&target, &commit)
        .expect("again over http");
    assert_eq!(again.status, CommitStatus::AlreadyPresent);
}

#[test]
fn a_stale_writer_goes_through_the_non_fast_forward_retry() {
    let (bare, url) = http_repo("stale-writer");
    let target = http_target(&url);
    let tmp = tempfile::tempdir().expect("tempdir");
    // Seed the branch so that both writers start from a commit.
    writer(&tmp.path().join("seed"))
        .commit_promotion(
            &target,
            &promotion_commit("seed", "v1", Environment::Test, promotion("seed", 1)),
        )
        .expect("seed");

    // Writer B stops before its first push until writer A has landed, so
    // B's commit is built on a tip that is no longer the branch's.
    let (b_ready_tx, b_ready_rx) = mpsc::channel::<()>();
    let (a_done_tx, a_done_rx) = mpsc::channel::<()>();
    let b_ready_tx = Mutex::new(b_ready_tx);
    let a_done_rx = Mutex::new(a_done_rx);
    let attempts_seen = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&attempts_seen);
    let b = writer(&tmp.path().join("b")).with_before_push(Arc::new(move |push| {
        seen.lock().expect("lock").push(push.attempt);
        if push.attempt == 1 {
            b_ready_tx.lock().expect("lock").send(()).expect("signal");
            a_done_rx
                .lock()
                .expect("lock")
                .recv_timeout(Duration::from_secs(60))
                .expect("writer A finished");
        }
    }));
    let b_target = target.clone();
    let b_thread = thread::spawn(move || {
        b.commit_promotion(
            &b_target,
            &promotion_commit("model-b", "v1", Environment::Test, promotion("b", 1)),
        )
    });
    b_ready_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("B ready to push");
    let a = writer(&tmp.path().join("a"))
        .commit_promotion(
            &target,
            &promotion_commit("model-a", "v1", Environment::Test, promotion("a", 1)),
        )
        .expect("A");
    assert_eq!((a.status, a.attempts), (CommitStatus::Created, 1));
    a_done_tx.send(()).expect("release B");
    let b = b_thread.join().expect("B thread").expect("B");

    assert_eq!(b.status, CommitStatus::Created);
    assert!(b.attempts >= 2, "B should have retried: {b:?}");
    assert_eq!(attempts_seen.lock().expect("lock").first(), Some(&1));
    assert_eq!(git(&bare, &["rev-parse", "main"]).trim(), b.sha);
    assert_eq!(git(&bare, &["rev-parse", "main^"]).trim(), a.sha);
    for model in ["seed", "model-a", "model-b"] {
        assert_eq!(
            files_under(&bare, "main", &format!("envs/test/{model}")).len(),
            4,
            "{model}"
        );
    }
    assert_eq!(commit_count(&bare), 3);
}

#[test]
fn concurrent_writers_to_one_repository_all_land() {
    let (bare, url) = http_repo("concurrent");
    let target = http_target(&url);
    let tmp = tempfile::tempdir().expect("tempdir");
    let shared_cache = tmp.path().join("shared");
    // Four writers at once: two with caches of their own (two operators),
    // two sharing one cache (one operator, two reconciles).
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let target = target.clone();
            let cache = if i < 2 {
                tmp.path().join(format!("own-{i}"))
            } else {
                shared_cache.clone()
            };
            thread::spawn(move || {
                writer(&cache).commit_promotion(
                    &target,
                    &promotion_commit(
                        &format!("model-{i}"),
                        "v1",
                        Environment::Test,
                        promotion(&format!("p{i}"), 1),
                    ),
                )
            })
        })
        .collect();
    let outcomes: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("thread").expect("commit"))
        .collect();
    assert!(
        outcomes.iter().all(|o| o.status == CommitStatus::Created),
        "{outcomes:?}"
    );
    assert_eq!(commit_count(&bare), 4);
    for i in 0..4 {
        assert_eq!(
            files_under(&bare, "main", &format!("envs/test/model-{i}")).len(),
            4,
            "model-{i}"
        );
    }
}

#[test]
fn a_wrong_password_is_an_auth_error_without_the_password() {
    let (_bare, url) = http_repo("wrong-password");
    let server = git_server();
    let wrong = "not-the-password-4711";
    let credentials = GitCredentials::from_secret_data(
        "gitops-credentials",
        &secret_data(&[("username", &server.user), ("password", wrong)]),
    )
    .expect("credentials");
    let target = GitTarget {
        url: url.clone(),
        branch: "main".to_string(),
        credentials,
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let commit = promotion_commit("tiny-llama", "v1", Environment::Test, promotion("auth", 1));
    let err = writer(tmp.path())
        .commit_promotion(&target, &commit)
        .expect_err("wrong password");
    assert!(matches!(err, GitOpsError::AuthRefused { .. }), "{err:?}");
    assert_eq!(err.reason(), "AuthRefused");
    assert!(!err.is_transient());
    let text = format!("{err} {err:?}");
    assert!(text.contains(&url), "{text}");
    assert!(!text.contains(wrong), "{text}");

    // No credentials at all against a server that wants them.
    let anonymous = GitTarget {
        credentials: GitCredentials::Anonymous,
        ..target
    };
    let err = writer(tmp.path())
        .commit_promotion(&anonymous, &commit)
        .expect_err("anonymous");
    assert!(matches!(err, GitOpsError::AuthRefused { .. }), "{err:?}");
}

#[test]
fn a_secret_missing_a_key_names_it() {
    let err = GitCredentials::from_secret_data(
        "gitops-credentials",
        &secret_data(&[("username", "bot")]),
    )
    .expect_err("missing password");
    assert_eq!(
        err.to_string(),
        "secret gitops-credentials: key `password` is missing (it goes with `username`)"
    );
    let err =
        GitCredentials::from_secret_data("gitops-credentials", &secret_data(&[("token", "x")]))
            .expect_err("nothing usable");
    assert!(err.to_string().contains("`ssh-privatekey`"), "{err}");
    assert!(
        err.to_string().contains("`username` and `password`"),
        "{err}"
    );
}

#[test]
fn unreachable_servers_and_paths_are_network_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let commit = promotion_commit("tiny-llama", "v1", Environment::Test, promotion("down", 1));
    // Port 9 (discard) on loopback: nothing listens there.
    let err = writer(tmp.path())
        .commit_promotion(
            &local_target("http://127.0.0.1:9/x.git".to_string()),
            &commit,
        )
        .expect_err("closed port");
    assert!(matches!(err, GitOpsError::Unreachable { .. }), "{err:?}");
    assert!(err.is_transient());
    let missing = tmp.path().join("no-such-repo.git");
    let err = writer(tmp.path())
        .commit_promotion(&local_target(missing.display().to_string()), &commit)
        .expect_err("missing path");
    assert!(matches!(err, GitOpsError::Unreachable { .. }), "{err:?}");
}

/// SSH credentials as a Secret would hold them.
fn ssh_target(bare: &Path, key: &str, known_hosts: &str) -> GitTarget {
    let server = git_server();
    let credentials = GitCredentials::from_secret_data(
        "gitops-ssh",
        &secret_data(&[("ssh-privatekey", key), ("known_hosts", known_hosts)]),
    )
    .expect("ssh credentials");
    GitTarget {
        url: format!("{}{}", server.ssh_url, bare.display()),
        branch: "main".to_string(),
        credentials,
    }
}

#[test]
fn over_ssh_with_a_key_and_known_hosts_a_commit_and_its_revert_land() {
    let server = git_server();
    let (bare, _) = http_repo("ssh");
    let target = ssh_target(&bare, &server.ssh_client_key, &server.ssh_known_hosts);
    let tmp = tempfile::tempdir().expect("tempdir");
    let w = writer(tmp.path());
    let commit = promotion_commit("tiny-llama", "v1.2", Environment::Test, promotion("ssh", 1));
    let out = w
        .commit_promotion(&target, &commit)
        .expect("commit over ssh");
    assert_eq!(out.status, CommitStatus::Created);
    assert_eq!(git(&bare, &["rev-parse", "main"]).trim(), out.sha);
    let again = w
        .commit_promotion(&target, &commit)
        .expect("again over ssh");
    assert_eq!(again.status, CommitStatus::AlreadyPresent);
    let reverted = w
        .revert(
            &target,
            &RevertRequest {
                promotion: promotion("ssh", 1),
                commit: out.sha.clone(),
                reason: "test".to_string(),
            },
        )
        .expect("revert over ssh");
    assert_eq!(reverted.status, CommitStatus::Created);
    assert!(files_under(&bare, "main", "envs").is_empty());
}

#[test]
fn over_ssh_an_unknown_key_or_host_is_refused() {
    let server = git_server();
    let (bare, _) = http_repo("ssh-refused");
    let tmp = tempfile::tempdir().expect("tempdir");
    let commit = promotion_commit(
        "tiny-llama",
        "v1",
        Environment::Test,
        promotion("ssh-bad", 1),
    );

    // A key the server does not know.
    let key_path = tmp.path().join("other_ed25519");
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key_path)
        .output()
        .expect("ssh-keygen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let other_key = std::fs::read_to_string(&key_path).expect("key");
    let target = ssh_target(&bare, &other_key, &server.ssh_known_hosts);
    let err = writer(&tmp.path().join("a"))
        .commit_promotion(&target, &commit)
        .expect_err("unknown key");
    assert!(matches!(err, GitOpsError::AuthRefused { .. }), "{err:?}");

    // A server whose host key is not the one known_hosts lists.
    let other_pub = std::fs::read_to_string(key_path.with_extension("pub")).expect("pub");
    let port = server.ssh_url.rsplit(':').next().expect("port");
    let fields: Vec<&str> = other_pub.split_whitespace().take(2).collect();
    let wrong_hosts = format!("[127.0.0.1]:{port} {}\n", fields.join(" "));
    let target = ssh_target(&bare, &server.ssh_client_key, &wrong_hosts);
    let err = writer(&tmp.path().join("b"))
        .commit_promotion(&target, &commit)
        .expect_err("unknown host key");
    assert!(
        matches!(err, GitOpsError::HostKeyRejected { .. }),
        "{err:?}"
    );
    assert_eq!(commit_count_or_zero(&bare), 0);
}

fn commit_count_or_zero(bare: &Path) -> usize {
    let out = Command::new("git")
        .arg("--git-dir")
        .arg(bare)
        .args(["rev-list", "--count", "main"])
        .output()
        .expect("git");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Every file under `dir`, recursively.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

#[test]
fn the_url_never_reaches_the_cache_on_disk() {
    // The controller refuses URLs with inline credentials before the writer
    // sees them; the writer keeps no URL on disk anyway (anonymous remote,
    // no FETCH_HEAD), so not even an older object's URL can leak there.
    let server = git_server();
    let (bare, url) = http_repo("no-url-on-disk");
    let with_password = url.replacen(
        "http://",
        &format!("http://{}:{}@", server.user, server.password),
        1,
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let w = writer(tmp.path());
    let target = local_target(with_password);
    let commit = promotion_commit("tiny-llama", "v1", Environment::Test, promotion("disk", 1));
    let out = w.commit_promotion(&target, &commit).expect("commit");
    assert_eq!(git(&bare, &["rev-parse", "main"]).trim(), out.sha);
    let files = files_in(tmp.path());
    assert!(
        files.iter().any(|f| f.ends_with("config")),
        "the cache exists: {files:?}"
    );
    for file in files {
        let bytes = std::fs::read(&file).expect("read");
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains(&server.password) && !text.contains("127.0.0.1"),
            "{} names the URL",
            file.display()
        );
        assert!(
            !file.to_string_lossy().contains(&server.password),
            "{}",
            file.display()
        );
    }
}
