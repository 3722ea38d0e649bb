//! End-to-end test harness: a real Kubernetes control plane for the quantops
//! tests.
//!
//! The control plane is the Go program in `tests/cluster/` (etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler and a test node that
//! runs pods as local processes). The first test of a test binary starts it
//! with `tests/cluster/up` (which returns at once when it is already up), so
//! `cargo test` works on its own; a CI script may run `up` before. Each test
//! gets its own namespace, deleted at the end, so tests run in parallel
//! without seeing each other's objects.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Namespace, Node, PersistentVolume, PersistentVolumeClaim, ServiceAccount,
};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{Condition, await_condition};
use kube::{Client, Config, Resource};
use rand::Rng;
use serde::de::DeserializeOwned;
use tokio::sync::OnceCell;

pub mod gitops;
pub mod operator;
pub mod prometheus;

/// The field manager of everything the tests create with server-side apply.
pub const FIELD_MANAGER: &str = "quantops-e2e";

/// The node the test node agent registers (see tests/cluster/node.go).
pub const TEST_NODE: &str = "quantops-test-node";

/// Label put on every test namespace, so leftovers are easy to find.
pub const E2E_LABEL: &str = "quantops.dev/e2e";

/// What can go wrong while setting up or using the test cluster.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("running {script}: {source}")]
    Spawn {
        script: PathBuf,
        source: std::io::Error,
    },
    #[error("{script} failed ({status}):\n{output}")]
    Up {
        script: PathBuf,
        status: std::process::ExitStatus,
        output: String,
    },
    #[error("loading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("GET {url}: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("building a client: {0}")]
    Client(#[source] kube::Error),
    #[error("{what}: {source}")]
    Api { what: String, source: kube::Error },
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout { what: String, timeout: Duration },
    #[error("building a service-account kubeconfig user: {0}")]
    Token(#[source] serde_json::Error),
    #[error("{what} failed ({status}):\n{output}")]
    Command {
        what: String,
        status: std::process::ExitStatus,
        output: String,
    },
    #[error("{0}")]
    Unexpected(String),
    #[error("{what}: the watch ended: {source}")]
    Wait {
        what: String,
        source: kube::runtime::wait::Error,
    },
}

/// Result type of the harness.
pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

/// Where the running test cluster is. Only paths: a `kube::Client` is bound to
/// the Tokio runtime it was made in, and every `#[tokio::test]` has its own,
/// so each test builds its client from this.
#[derive(Debug, Clone)]
pub struct ClusterInfo {
    /// The admin kubeconfig (client certificate in system:masters).
    pub kubeconfig: PathBuf,
    /// The directory holding the `kubectl` symlink, when `up` made one.
    pub bin_dir: Option<PathBuf>,
}

static CLUSTER: OnceCell<ClusterInfo> = OnceCell::const_new();

/// The repository root (this crate lives in `<repo>/tests`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from(".."), Path::to_path_buf)
}

/// The state directory `tests/cluster/up` uses.
pub fn test_dir() -> PathBuf {
    std::env::var_os("QUANTOPS_TEST_DIR")
        .map_or_else(|| repo_root().join("target/testcluster"), PathBuf::from)
}

/// Finds or starts the test cluster, once per test process.
///
/// `QUANTOPS_E2E_KUBECONFIG` is used as given. `KUBECONFIG` is used only when
/// it reaches a cluster that has the test node, so a developer's real
/// cluster is never the target by accident. Otherwise `tests/cluster/up` runs.
pub async fn cluster() -> Result<&'static ClusterInfo> {
    CLUSTER.get_or_try_init(find_or_start).await
}

async fn find_or_start() -> Result<ClusterInfo> {
    if let Some(path) = std::env::var_os("QUANTOPS_E2E_KUBECONFIG") {
        tracing::info!(?path, "using QUANTOPS_E2E_KUBECONFIG");
        return Ok(ClusterInfo {
            kubeconfig: path.into(),
            bin_dir: existing_bin_dir(),
        });
    }
    if let Some(path) = std::env::var_os("KUBECONFIG").map(PathBuf::from)
        && has_test_node(&path).await
    {
        tracing::info!(?path, "KUBECONFIG points at a running test cluster");
        return Ok(ClusterInfo {
            kubeconfig: path,
            bin_dir: existing_bin_dir(),
        });
    }
    let script = repo_root().join("tests/cluster/up");
    tracing::info!(?script, "starting the test cluster");
    run_up_script(
        tokio::process::Command::new(&script).env("QUANTOPS_TEST_DIR", test_dir()),
        &script,
    )
    .await?;
    Ok(ClusterInfo {
        kubeconfig: test_dir().join("kubeconfig"),
        bin_dir: existing_bin_dir(),
    })
}

/// Runs a start-up script (`tests/cluster/up`, `tests/gitserver/up`) to its
/// end; a failure carries everything it printed.
pub(crate) async fn run_up_script(
    command: &mut tokio::process::Command,
    script: &Path,
) -> Result<std::process::Output> {
    let out = command
        .output()
        .await
        .map_err(|source| HarnessError::Spawn {
            script: script.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(HarnessError::Up {
            script: script.to_path_buf(),
            status: out.status,
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(out)
}

fn existing_bin_dir() -> Option<PathBuf> {
    let dir = test_dir().join("bin");
    dir.join("kubectl").exists().then_some(dir)
}

async fn has_test_node(kubeconfig: &Path) -> bool {
    let Ok(client) = client_from(kubeconfig, None).await else {
        return false;
    };
    Api::<Node>::all(client)
        .get_opt(TEST_NODE)
        .await
        .ok()
        .flatten()
        .is_some()
}

/// Builds a client from a kubeconfig file; with `token`, the file's user is
/// replaced by that bearer token (to act as a service account).
pub async fn client_from(kubeconfig: &Path, token: Option<&str>) -> Result<Client> {
    let err = |source| HarnessError::Kubeconfig {
        path: kubeconfig.to_path_buf(),
        source,
    };
    let mut kc = Kubeconfig::read_from(kubeconfig).map_err(err)?;
    if let Some(token) = token {
        // AuthInfo's token field is a secrecy type; going through serde keeps
        // this crate off that dependency.
        let auth: AuthInfo = serde_json::from_value(serde_json::json!({ "token": token }))
            .map_err(HarnessError::Token)?;
        for named in &mut kc.auth_infos {
            named.auth_info = Some(auth.clone());
        }
    }
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(err)?;
    Client::try_from(config).map_err(HarnessError::Client)
}

/// One test's view of the cluster: an admin client and its own namespace.
pub struct TestEnv {
    pub client: Client,
    pub namespace: String,
    pub info: &'static ClusterInfo,
    /// Cluster-scoped PersistentVolumes made by [`TestEnv::host_path_pvc`],
    /// deleted with the namespace.
    volumes: Vec<String>,
    deleted: bool,
}

impl TestEnv {
    /// Starts (or finds) the cluster and creates a namespace
    /// `e2e-{prefix}-{random}` with its `default` ServiceAccount ready.
    pub async fn new(prefix: &str) -> Result<Self> {
        let info = cluster().await?;
        let client = client_from(&info.kubeconfig, None).await?;
        let suffix: u32 = rand::rng().random_range(0..0x100_0000);
        let namespace = format!("e2e-{prefix}-{suffix:06x}");
        let ns: Namespace = from_json(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": namespace, "labels": { E2E_LABEL: "true" } },
        }))?;
        apply(&Api::<Namespace>::all(client.clone()), &namespace, &ns).await?;
        let env = Self {
            client,
            namespace,
            info,
            volumes: Vec::new(),
            deleted: false,
        };
        // Pods are refused until the service-account controller has made
        // the namespace's `default` ServiceAccount.
        let sas: Api<ServiceAccount> = env.api();
        wait_for(
            &sas,
            "default",
            |sa: Option<&ServiceAccount>| sa.is_some(),
            Duration::from_secs(30),
        )
        .await?;
        tracing::info!(namespace = %env.namespace, "test namespace ready");
        Ok(env)
    }

    /// A namespaced API in this test's namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The kubectl to run: the test cluster's own (same version as the
    /// server) when `up` made it, else whatever `kubectl` is on PATH.
    pub fn kubectl_path(&self) -> PathBuf {
        self.info
            .bin_dir
            .as_ref()
            .map_or_else(|| PathBuf::from("kubectl"), |d| d.join("kubectl"))
    }

    /// A command for a child process (the operator, kubectl, ...) with
    /// KUBECONFIG set and the cluster's bin directory first on PATH.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(program);
        cmd.env("KUBECONFIG", &self.info.kubeconfig);
        if let Some(bin) = &self.info.bin_dir {
            let path = std::env::var_os("PATH").unwrap_or_default();
            let mut dirs = vec![bin.clone()];
            dirs.extend(std::env::split_paths(&path));
            if let Ok(joined) = std::env::join_paths(dirs) {
                cmd.env("PATH", joined);
            }
        }
        cmd
    }

    /// `kubectl ARGS -n <namespace>`, ready to run.
    pub fn kubectl<I, S>(&self, args: I) -> tokio::process::Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = self.command(self.kubectl_path());
        cmd.args(args).arg("-n").arg(&self.namespace);
        cmd
    }

    /// Makes a PersistentVolumeClaim `name` bound to a hostPath
    /// PersistentVolume whose directory is returned. The test node mounts a
    /// claim at its PV's hostPath; the scheduler refuses pods with unbound
    /// claims, and nothing provisions volumes here, so this is how tests
    /// (and the operator's Jobs) get a model volume.
    pub async fn host_path_pvc(&mut self, name: &str) -> Result<PathBuf> {
        let dir = test_dir().join("volumes").join(&self.namespace).join(name);
        let pv_name = format!("{}-{name}", self.namespace);
        let pv: PersistentVolume = from_json(serde_json::json!({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": { "name": pv_name, "labels": { E2E_LABEL: "true" } },
            "spec": {
                "capacity": { "storage": "10Gi" },
                "accessModes": ["ReadWriteOnce", "ReadWriteMany"],
                "storageClassName": "",
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": { "path": dir, "type": "DirectoryOrCreate" },
                "claimRef": { "namespace": self.namespace, "name": name }
            }
        }))?;
        apply(
            &Api::<PersistentVolume>::all(self.client.clone()),
            &pv_name,
            &pv,
        )
        .await?;
        self.volumes.push(pv_name.clone());
        let pvc: PersistentVolumeClaim = from_json(serde_json::json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": { "name": name },
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "",
                "volumeName": pv_name,
                "resources": { "requests": { "storage": "10Gi" } }
            }
        }))?;
        let pvcs: Api<PersistentVolumeClaim> = self.api();
        apply(&pvcs, name, &pvc).await?;
        let bound = |c: Option<&PersistentVolumeClaim>| {
            c.and_then(|c| c.status.as_ref())
                .and_then(|s| s.phase.as_deref())
                == Some("Bound")
        };
        wait_for(&pvcs, name, bound, Duration::from_secs(60)).await?;
        Ok(dir)
    }

    /// Deletes the namespace (its contents go with it) and waits until it is
    /// gone, so the next test starts from a quiet cluster.
    pub async fn cleanup(mut self) -> Result<()> {
        self.deleted = true;
        delete_namespace(&self.client, &self.namespace).await?;
        delete_volumes(&self.client, &self.volumes).await
    }
}

fn from_json<K: DeserializeOwned>(v: serde_json::Value) -> Result<K> {
    serde_json::from_value(v).map_err(|source| HarnessError::Api {
        what: "building an object".into(),
        source: kube::Error::SerdeError(source),
    })
}

async fn delete_volumes(client: &Client, names: &[String]) -> Result<()> {
    let api = Api::<PersistentVolume>::all(client.clone());
    for name in names {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => {
                return Err(HarnessError::Api {
                    what: format!("deleting PersistentVolume {name}"),
                    source,
                });
            }
        }
    }
    Ok(())
}

impl Drop for TestEnv {
    /// A failed test still removes its namespace: a thread with its own
    /// runtime deletes it (a Drop cannot await, and the test's runtime may be
    /// single-threaded).
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        let ns = self.namespace.clone();
        let volumes = std::mem::take(&mut self.volumes);
        let kubeconfig = self.info.kubeconfig.clone();
        let joined = std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return tracing::warn!(%ns, "no runtime to delete the namespace: {e}"),
            };
            rt.block_on(async {
                let result = match client_from(&kubeconfig, None).await {
                    Ok(client) => match delete_namespace(&client, &ns).await {
                        Ok(()) => delete_volumes(&client, &volumes).await,
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                };
                if let Err(e) = result {
                    tracing::warn!(%ns, "deleting the test namespace: {e}");
                }
            });
        })
        .join();
        if joined.is_err() {
            tracing::warn!(namespace = %self.namespace, "namespace cleanup thread panicked");
        }
    }
}

pub(crate) async fn delete_namespace(client: &Client, name: &str) -> Result<()> {
    let api = Api::<Namespace>::all(client.clone());
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
        Err(source) => {
            return Err(HarnessError::Api {
                what: format!("deleting namespace {name}"),
                source,
            });
        }
    }
    wait_for(
        &api,
        name,
        |ns: Option<&Namespace>| ns.is_none(),
        Duration::from_secs(60),
    )
    .await
    .map(|_| ())
}

/// Server-side apply of `obj` under [`FIELD_MANAGER`], forcing ownership:
/// the tests own what they create.
pub async fn apply<K>(api: &Api<K>, name: &str, obj: &K) -> Result<K>
where
    K: Resource + Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug,
    <K as Resource>::DynamicType: Default,
{
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .map_err(|source| HarnessError::Api {
        what: format!("applying {} {name}", K::kind(&Default::default())),
        source,
    })
}

/// Waits until `cond` holds for the object `name` (None: it does not
/// exist), at most `timeout`; the error says what was awaited.
pub async fn wait_for<K, C>(
    api: &Api<K>,
    name: &str,
    cond: C,
    timeout: Duration,
) -> Result<Option<K>>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    C: Condition<K> + Send,
    <K as Resource>::DynamicType: Default,
{
    let what = format!(
        "{} {name} to reach the expected state",
        K::kind(&Default::default())
    );
    match tokio::time::timeout(timeout, await_condition(api.clone(), name, cond)).await {
        Ok(Ok(obj)) => Ok(obj),
        Ok(Err(source)) => Err(HarnessError::Wait { what, source }),
        Err(_) => Err(HarnessError::Timeout { what, timeout }),
    }
}

/// Installs a `tracing` subscriber for test output (RUST_LOG filters it);
/// safe to call from every test.
/// `GET url` (plain HTTP on loopback): the status code and the body.
pub async fn http_get(url: reqwest::Url) -> Result<(u16, String)> {
    let error = |source| HarnessError::Http {
        url: url.to_string(),
        source,
    };
    let response = reqwest::get(url.clone()).await.map_err(error)?;
    let code = response.status().as_u16();
    let body = response.text().await.map_err(error)?;
    Ok((code, body))
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}
