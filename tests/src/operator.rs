//! The operator under test: its chart's objects applied from `helm template`,
//! and the `quantops controller` binary started as a local process that
//! authenticates as the chart's ServiceAccount, so every API call it makes
//! is checked against the chart's RBAC.
//!
//! The operator runs beside the test node rather than in a pod on it: the
//! test node shares the host's network, so two replicas in pods would both
//! bind the metrics port, and a test needs to kill and restart the process
//! at a moment of its choosing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;
use kube::api::PostParams;
use kube::config::Kubeconfig;
use tokio::io::AsyncWriteExt;

use crate::{HarnessError, Result, TestEnv, http_get, repo_root, test_dir};

/// The Helm release of a test namespace: `quantops-{namespace}`. Its objects,
/// the ServiceAccount included, are named after it (the chart's fullname is
/// the release name when that contains the chart's name), so the
/// cluster-scoped ones (the Argo reader ClusterRole and its binding) of
/// tests running side by side do not overwrite each other.
pub fn release(env: &TestEnv) -> String {
    format!("quantops-{}", env.namespace)
}

/// The simulated worker image: the test node runs `tests/cluster/sim-worker`
/// for it, each stage lasting `seconds`.
pub fn sim_worker_image(seconds: u32) -> String {
    format!("quantops/quantizer-job:sim-{seconds}")
}

/// The real worker image (the test node runs target/release/quantizer-job).
pub const REAL_WORKER_IMAGE: &str = "quantops/quantizer-job:e2e";

/// helm: `$HELM`, else on PATH, else where `go install` puts it.
pub fn helm_path() -> PathBuf {
    if let Some(helm) = std::env::var_os("HELM") {
        return PathBuf::from(helm);
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("helm"))
            .find(|candidate| candidate.is_file())
    });
    on_path.unwrap_or_else(|| {
        std::env::var_os("HOME")
            .map_or_else(|| PathBuf::from("/root"), PathBuf::from)
            .join("go/bin/helm")
    })
}

/// Renders the chart with `helm template` for this test's namespace (the
/// operator watching only it, so its RBAC is a Role there; `extra_values`,
/// `--set` after it, may change that) and applies every object, CRDs
/// included, with `kubectl apply --server-side`. The Deployment is applied
/// with zero replicas: the API server checks it, and the tests run the
/// operator themselves.
pub async fn install_chart(env: &TestEnv, extra_values: &[&str]) -> Result<()> {
    let chart = repo_root().join("charts/quantops");
    let helm = helm_path();
    let mut args: Vec<String> = vec![
        "template".into(),
        release(env),
        chart.display().to_string(),
        "--namespace".into(),
        env.namespace.clone(),
        "--include-crds".into(),
        "--set".into(),
        format!("watchNamespaces={{{}}}", env.namespace),
        // The Argo reads' Roles need existing namespaces: the test's own,
        // unless a test sets its Argo CD and environment namespaces.
        "--set".into(),
        format!("promotion.argocdNamespace={}", env.namespace),
        "--set".into(),
        format!("promotion.environmentNamespace={}", env.namespace),
        "--set".into(),
        "replicas=0".into(),
    ];
    for value in extra_values {
        args.push("--set".into());
        args.push((*value).to_string());
    }
    let rendered = run_output(env.command(&helm).args(&args), "helm template").await?;
    // Without `-n`: every rendered object names its namespace, and the
    // Roles go to several.
    let mut apply = env.command(env.kubectl_path());
    apply.args([
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager",
        crate::FIELD_MANAGER,
        "-f",
        "-",
    ]);
    apply
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = apply.spawn().map_err(|source| HarnessError::Spawn {
        script: env.kubectl_path(),
        source,
    })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(rendered.as_bytes())
            .await
            .map_err(|source| HarnessError::Io {
                what: "writing the rendered chart to kubectl".into(),
                source,
            })?;
        // Closing stdin ends kubectl's input.
        drop(stdin);
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|source| HarnessError::Spawn {
            script: env.kubectl_path(),
            source,
        })?;
    if !output.status.success() {
        return Err(HarnessError::Up {
            script: env.kubectl_path(),
            status: output.status,
            output: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    // The CRDs may have just been created: wait until they serve writes.
    let crds = Api::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>::all(env.client.clone());
    for name in [
        "quantizedmodels.quantops.dev",
        "modelpromotions.quantops.dev",
    ] {
        crate::wait_for(
            &crds,
            name,
            kube::runtime::wait::conditions::is_crd_established(),
            Duration::from_secs(30),
        )
        .await?;
    }
    Ok(())
}

async fn run_output(cmd: &mut tokio::process::Command, what: &str) -> Result<String> {
    let output = cmd.output().await.map_err(|source| HarnessError::Spawn {
        script: PathBuf::from(what),
        source,
    })?;
    if !output.status.success() {
        return Err(HarnessError::Up {
            script: PathBuf::from(what),
            status: output.status,
            output: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// How an operator process is started.
#[derive(Clone, Debug)]
pub struct OperatorOptions {
    /// The pod name it reports (its leader-election identity).
    pub identity: String,
    pub worker_image: String,
    pub model_claim: String,
    pub leader_election: bool,
    /// Runs of a broken stage before giving up.
    pub max_stage_attempts: u32,
    /// Seconds before the first retry of a broken stage.
    pub stage_retry_delay: u64,
    /// More environment for the process (e.g. the promotion settings).
    pub extra_env: Vec<(String, String)>,
}

impl OperatorOptions {
    pub fn new(identity: &str, worker_image: &str) -> OperatorOptions {
        OperatorOptions {
            identity: identity.to_string(),
            worker_image: worker_image.to_string(),
            model_claim: "quantops-models".to_string(),
            leader_election: true,
            max_stage_attempts: 3,
            stage_retry_delay: 30,
            extra_env: Vec::new(),
        }
    }
}

/// A running `quantops controller` process; killed when dropped.
pub struct Operator {
    child: tokio::process::Child,
    pub options: OperatorOptions,
    /// Its JSON log (stderr and stdout).
    pub log: PathBuf,
    pub metrics_addr: SocketAddr,
    kubeconfig: PathBuf,
    namespace: String,
}

/// A kubeconfig for the chart's ServiceAccount in `env`'s namespace, made
/// from a TokenRequest: the operator process is then exactly as privileged
/// as the chart makes it.
pub async fn service_account_kubeconfig(env: &TestEnv) -> Result<PathBuf> {
    let sas: Api<ServiceAccount> = env.api();
    let account = release(env);
    let request: TokenRequest = serde_json::from_value(serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"expirationSeconds": 7200}
    }))
    .map_err(HarnessError::Token)?;
    let token = sas
        .create_token_request(&account, &PostParams::default(), &request)
        .await
        .map_err(|source| HarnessError::Api {
            what: format!("requesting a token for ServiceAccount {account}"),
            source,
        })?
        .status
        .map(|s| s.token)
        .unwrap_or_default();
    let admin =
        Kubeconfig::read_from(&env.info.kubeconfig).map_err(|source| HarnessError::Kubeconfig {
            path: env.info.kubeconfig.clone(),
            source,
        })?;
    let clusters = serde_json::to_value(&admin.clusters).map_err(HarnessError::Token)?;
    let cluster = admin
        .clusters
        .first()
        .map(|c| c.name.clone())
        .unwrap_or_default();
    // JSON is YAML: kube reads this file like any kubeconfig.
    let config = serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": clusters,
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {
            "cluster": cluster, "user": account, "namespace": env.namespace}}],
        "current-context": "operator",
    });
    let path = operator_dir(&env.namespace).join("kubeconfig");
    write_file(&path, config.to_string().as_bytes())?;
    Ok(path)
}

fn operator_dir(namespace: &str) -> PathBuf {
    test_dir().join("operators").join(namespace)
}

fn write_file(path: &Path, contents: &[u8]) -> Result<()> {
    let io = |source| HarnessError::Io {
        what: format!("writing {}", path.display()),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    std::fs::write(path, contents).map_err(io)
}

/// A loopback port free at the time of asking.
pub fn free_port() -> Result<u16> {
    let io = |source| HarnessError::Io {
        what: "finding a free loopback port".into(),
        source,
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(io)?;
    listener.local_addr().map(|a| a.port()).map_err(io)
}

impl Operator {
    /// Starts `target/release/quantops controller` for `env`'s namespace
    /// with the chart's identity (call [`install_chart`] first) and waits
    /// until it answers `/readyz`.
    pub async fn start(env: &TestEnv, options: OperatorOptions) -> Result<Operator> {
        let kubeconfig = service_account_kubeconfig(env).await?;
        Operator::spawn(kubeconfig, env.namespace.clone(), options).await
    }

    async fn spawn(
        kubeconfig: PathBuf,
        namespace: String,
        options: OperatorOptions,
    ) -> Result<Operator> {
        let binary = repo_root().join("target/release/quantops");
        let log = operator_dir(&namespace).join(format!("{}.log", options.identity));
        let io = |source| HarnessError::Spawn {
            script: binary.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io)?;
        let file2 = file.try_clone().map_err(io)?;
        let metrics_addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut cmd = tokio::process::Command::new(&binary);
        cmd.arg("controller")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAME", &options.identity)
            .env("POD_NAMESPACE", &namespace)
            .env("QUANTOPS_WATCH_NAMESPACE", &namespace)
            .env("QUANTOPS_WORKER_IMAGE", &options.worker_image)
            .env("QUANTOPS_MODEL_CLAIM", &options.model_claim)
            .env(
                "QUANTOPS_MAX_STAGE_ATTEMPTS",
                options.max_stage_attempts.to_string(),
            )
            .env(
                "QUANTOPS_STAGE_RETRY_DELAY",
                options.stage_retry_delay.to_string(),
            )
            .env("QUANTOPS_METRICS_ADDR", metrics_addr.to_string())
            .env("QUANTOPS_LOG_FORMAT", "json")
            .env("RUST_LOG", "info,kube=warn")
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(file2)
            .kill_on_drop(true);
        cmd.env(
            "QUANTOPS_GIT_CACHE",
            operator_dir(&namespace).join(format!("git-{}", options.identity)),
        );
        for (key, value) in &options.extra_env {
            cmd.env(key, value);
        }
        if !options.leader_election {
            cmd.env("QUANTOPS_NO_LEADER_ELECTION", "true");
        }
        let child = cmd.spawn().map_err(io)?;
        let operator = Operator {
            child,
            options,
            log,
            metrics_addr,
            kubeconfig,
            namespace,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if operator.get("/readyz").await.is_ok() {
                return Ok(operator);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(HarnessError::Timeout {
                    what: format!(
                        "operator {} to answer /readyz (log: {})",
                        operator.options.identity,
                        operator.log.display()
                    ),
                    timeout: Duration::from_secs(30),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits up to `timeout` for the process to exit by itself; its status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.map_err(|source| HarnessError::Io {
                what: format!("waiting for operator {}", self.options.identity),
                source,
            }),
            Err(_) => Err(HarnessError::Timeout {
                what: format!("operator {} to exit", self.options.identity),
                timeout,
            }),
        }
    }

    /// The process id (for RSS readings).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Kills the process with SIGKILL, like a crashed container: no graceful
    /// shutdown, no Lease release.
    pub async fn kill(&mut self) -> Result<()> {
        self.child.kill().await.map_err(|source| HarnessError::Io {
            what: format!("killing operator {}", self.options.identity),
            source,
        })
    }

    /// Starts the same replica again (same identity, like the kubelet
    /// restarting a crashed container in its pod), after killing it if it
    /// still runs.
    pub async fn restart(mut self) -> Result<Operator> {
        self.kill().await?;
        let Operator {
            kubeconfig,
            namespace,
            options,
            ..
        } = self;
        Operator::spawn(kubeconfig, namespace, options).await
    }

    /// `GET path` on the metrics server; the body.
    pub async fn get(&self, path: &str) -> Result<String> {
        let url = format!("http://{}{path}", self.metrics_addr);
        let parsed = reqwest::Url::parse(&url)
            .map_err(|e| HarnessError::Unexpected(format!("{url}: {e}")))?;
        match http_get(parsed).await? {
            (200, body) => Ok(body),
            (code, body) => Err(HarnessError::Unexpected(format!(
                "GET {url}: HTTP {code}: {body}"
            ))),
        }
    }

    /// The value of one sample of `/metrics` (`name{labels}` as printed),
    /// or None when absent.
    pub async fn metric(&self, sample: &str) -> Result<Option<f64>> {
        let text = self.get("/metrics").await?;
        Ok(text.lines().find_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            (key == sample).then(|| value.parse().ok()).flatten()
        }))
    }

    /// Every series of a metric family: its labels (`{verb="get",...}`, or
    /// empty) and value.
    pub async fn metric_series(&self, family: &str) -> Result<Vec<(String, f64)>> {
        let text = self.get("/metrics").await?;
        Ok(text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (key, value) = line.rsplit_once(' ')?;
                let labels = key.strip_prefix(family)?;
                if !(labels.is_empty() || labels.starts_with('{')) {
                    return None;
                }
                Some((labels.to_string(), value.parse().ok()?))
            })
            .collect())
    }

    /// The operator's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
