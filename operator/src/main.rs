//! `quantops`: the operator (`quantops controller`), its CRDs (`quantops
//! crds`) and local mode (`quantops run FILE.yaml`).

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use k8s_openapi::api::coordination::v1::Lease;
use quantops_operator::config::{JobSettings, OperatorConfig};
use quantops_operator::leader::{self, ApiLease, ElectorConfig, Timings};
use quantops_operator::local::{self, LocalOptions, Outcome};
use quantops_operator::metrics::Metrics;
use quantops_operator::promotion::PromotionSettings;
use quantops_operator::scope::WatchScope;
use quantops_operator::server::{self, ServerState};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::watch;

#[derive(Parser)]
#[command(version, about = "Quantize LLM checkpoints on Kubernetes, or locally")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format: `json` for log pipelines, `text` for people.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Json, env = "QUANTOPS_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Print both CustomResourceDefinitions as YAML.
    Crds,
    /// Run the operator against the cluster of the current kubeconfig or service account.
    Controller(Box<ControllerArgs>),
    /// Run the pipeline locally, with no cluster, as child processes of the worker.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct ControllerArgs {
    /// Serve only these namespaces, comma-separated (default: every namespace).
    #[arg(long, env = "QUANTOPS_WATCH_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// One more namespace to serve (the one-namespace form of --namespaces).
    #[arg(long, env = "QUANTOPS_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// The worker image the Jobs run.
    #[arg(long, env = "QUANTOPS_WORKER_IMAGE", default_value = concat!("quantops/quantizer-job:", env!("CARGO_PKG_VERSION")))]
    worker_image: String,
    /// The PVC holding checkpoints, data and artifacts, mounted at /models in the Jobs.
    #[arg(long, env = "QUANTOPS_MODEL_CLAIM", default_value = "quantops-models")]
    model_claim: String,
    /// Node selector of the Jobs, `key=value[,key=value]`; empty for none.
    #[arg(
        long,
        env = "QUANTOPS_NODE_SELECTOR",
        default_value = "quantops.dev/gpu-node=true"
    )]
    node_selector: String,
    /// Service account of the Jobs' pods.
    #[arg(long, env = "QUANTOPS_WORKER_SERVICE_ACCOUNT")]
    worker_service_account: Option<String>,
    /// Runs of a broken stage before the model is Failed.
    #[arg(long, env = "QUANTOPS_MAX_STAGE_ATTEMPTS", default_value_t = 3)]
    max_stage_attempts: u32,
    /// Seconds before the first retry of a broken stage; doubled for each further one.
    #[arg(long, env = "QUANTOPS_STAGE_RETRY_DELAY", default_value_t = 30)]
    stage_retry_delay: u64,
    /// Seconds a stage's pod may stay unschedulable before the stage counts
    /// as broken (and is retried or given up); 0 waits indefinitely.
    #[arg(long, env = "QUANTOPS_UNSCHEDULABLE_TIMEOUT", default_value_t = 1800)]
    unschedulable_timeout: u64,
    /// Reconciliations running at once.
    #[arg(long, env = "QUANTOPS_MAX_CONCURRENT_RECONCILES", default_value_t = 16)]
    max_concurrent_reconciles: u16,
    /// Namespace of the Argo CD Applications that ModelPromotions follow.
    #[arg(long, env = "QUANTOPS_ARGOCD_NAMESPACE", default_value = "argocd")]
    argocd_namespace: String,
    /// Name of an environment's Application for a model (`{env}`, `{model}` replaced).
    #[arg(
        long,
        env = "QUANTOPS_ARGOCD_APPLICATION",
        default_value = "{env}-{model}"
    )]
    argocd_application: String,
    /// Namespace of an environment (`{env}` replaced): where the Rollout runs.
    #[arg(long, env = "QUANTOPS_ENVIRONMENT_NAMESPACE", default_value = "{env}")]
    environment_namespace: String,
    /// Where the GitOps repositories are cached (an emptyDir in the pod).
    #[arg(
        long,
        env = "QUANTOPS_GIT_CACHE",
        default_value = "/var/cache/quantops/git"
    )]
    git_cache: PathBuf,
    /// Accept plain `http://` GitOps URLs, anonymous access only (a
    /// credentials Secret is still refused over http): for test servers.
    #[arg(long, env = "QUANTOPS_ALLOW_INSECURE_HTTP_GITOPS")]
    allow_insecure_http_gitops: bool,
    /// Failed git writes (commit or revert) before a promotion is Failed.
    #[arg(long, env = "QUANTOPS_MAX_GIT_ATTEMPTS", default_value_t = 6)]
    max_git_attempts: u32,
    /// Seconds before the first retry of a failed git write; doubled for each further one, at most 5 min.
    #[arg(long, env = "QUANTOPS_GIT_RETRY_DELAY", default_value_t = 10)]
    git_retry_delay: u64,
    /// The vLLM OpenAI-server image of the serving manifests.
    #[arg(long, env = "QUANTOPS_VLLM_IMAGE")]
    vllm_image: Option<String>,
    /// The Prometheus the prod canary's analysis queries.
    #[arg(long, env = "QUANTOPS_PROMETHEUS_ADDRESS")]
    prometheus_address: Option<String>,
    /// Name of the leader-election Lease.
    #[arg(long, env = "QUANTOPS_LEASE_NAME", default_value = "quantops-operator")]
    lease_name: String,
    /// Namespace of the Lease (default: the pod's namespace, from POD_NAMESPACE).
    #[arg(long, env = "QUANTOPS_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Seconds a Lease stays valid after its last renewal.
    #[arg(long, env = "QUANTOPS_LEASE_DURATION", default_value_t = 15)]
    lease_duration: u64,
    /// Seconds a leader keeps failing to renew before it steps down (below --lease-duration).
    #[arg(long, env = "QUANTOPS_RENEW_DEADLINE", default_value_t = 10)]
    renew_deadline: u64,
    /// Seconds between attempts to acquire or renew the Lease (below --renew-deadline).
    #[arg(long, env = "QUANTOPS_RETRY_PERIOD", default_value_t = 2)]
    retry_period: u64,
    /// Skip leader election (a single replica, or a test).
    #[arg(long, env = "QUANTOPS_NO_LEADER_ELECTION")]
    no_leader_election: bool,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "QUANTOPS_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The QuantizedModel YAML.
    spec: PathBuf,
    /// Base of the spec's relative paths (default: the spec's directory).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Base of spec.output.path when it must differ from --root.
    #[arg(long)]
    output_root: Option<PathBuf>,
    /// The worker binary (default: quantizer-job beside this binary).
    #[arg(long)]
    worker: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let result = match cli.command {
        Command::Crds => print_crds(),
        Command::Run(args) => run_local(args),
        Command::Controller(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")
            .and_then(|rt| {
                let result = rt.block_on(run_controller(*args));
                // Do not wait for blocking tasks (a git push) of controllers
                // that were abandoned when leadership was lost.
                rt.shutdown_background();
                result
            }),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "quantops failed");
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_crds() -> anyhow::Result<ExitCode> {
    let yaml = quantops_operator::crds::render_all().context("cannot render the CRDs")?;
    print!("{yaml}");
    Ok(ExitCode::SUCCESS)
}

fn run_local(args: RunArgs) -> anyhow::Result<ExitCode> {
    let worker = local::find_worker(args.worker)?;
    let options = LocalOptions {
        spec: args.spec.clone(),
        root: args.root,
        output_root: args.output_root,
        worker,
        scratch: std::env::temp_dir(),
    };
    let mut stdout = std::io::stdout();
    let (_, outcome) = local::run_pipeline(&options, &mut stdout)
        .with_context(|| format!("cannot run the pipeline of {}", args.spec.display()))?;
    Ok(match outcome {
        Outcome::Ready => ExitCode::SUCCESS,
        Outcome::GatesFailed(_) => ExitCode::from(2),
        Outcome::Broken(_) => ExitCode::FAILURE,
    })
}

/// Parses `key=value[,key=value]`.
fn parse_selector(text: &str) -> anyhow::Result<BTreeMap<String, String>> {
    text.split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .with_context(|| format!("node selector entry {pair:?} is not key=value"))
        })
        .collect()
}

fn promotion_settings(args: &ControllerArgs) -> PromotionSettings {
    let mut settings = PromotionSettings {
        argocd_namespace: args.argocd_namespace.clone(),
        application_name: args.argocd_application.clone(),
        environment_namespace: args.environment_namespace.clone(),
        ..PromotionSettings::default()
    };
    settings.git.cache_root = args.git_cache.clone();
    settings.remote.allow_insecure_http = args.allow_insecure_http_gitops;
    settings.git_retry.max_attempts = args.max_git_attempts.max(1);
    settings.git_retry.base_delay = std::time::Duration::from_secs(args.git_retry_delay);
    if let Some(image) = &args.vllm_image {
        settings.serving.vllm_image = image.clone();
    }
    if let Some(address) = &args.prometheus_address {
        settings.serving.prometheus_address = address.clone();
    }
    settings.serving.model_claim = args.model_claim.clone();
    settings
}

async fn run_controller(args: ControllerArgs) -> anyhow::Result<ExitCode> {
    let metrics = Metrics::new().context("cannot register the metrics")?;
    let ready = Arc::new(AtomicBool::new(false));
    let server_state = ServerState {
        metrics: metrics.clone(),
        ready: ready.clone(),
    };
    let addr = args.metrics_addr;
    let server = tokio::spawn(async move {
        if let Err(error) = server::serve(addr, server_state).await {
            tracing::error!(%error, %addr, "the metrics server stopped");
        }
    });

    if args.allow_insecure_http_gitops {
        tracing::warn!(
            "--allow-insecure-http-gitops: ModelPromotions may use plain http:// repositories (anonymously only); meant for test servers"
        );
    }
    let scope = WatchScope::from_names(args.namespaces.iter().chain(&args.namespace))
        .context("--namespaces / --namespace")?;
    let timings = Timings {
        lease_duration: std::time::Duration::from_secs(args.lease_duration),
        renew_deadline: std::time::Duration::from_secs(args.renew_deadline),
        retry_period: std::time::Duration::from_secs(args.retry_period),
    }
    .validate()
    .context("--lease-duration, --renew-deadline, --retry-period")?;
    tracing::info!(namespaces = %scope, "serving");
    let config = OperatorConfig {
        watch: scope,
        jobs: JobSettings {
            image: args.worker_image.clone(),
            model_claim: args.model_claim.clone(),
            node_selector: parse_selector(&args.node_selector)?,
            service_account: args.worker_service_account.clone(),
        },
        retry: quantops_operator::pipeline::RetryPolicy {
            max_attempts: args.max_stage_attempts.max(1),
            base_delay: std::time::Duration::from_secs(args.stage_retry_delay),
        },
        max_concurrent_reconciles: args.max_concurrent_reconciles.max(1),
        promotion: promotion_settings(&args),
        unschedulable_timeout: (args.unschedulable_timeout > 0)
            .then(|| std::time::Duration::from_secs(args.unschedulable_timeout)),
        ..OperatorConfig::default()
    };
    let kube_config = kube::Config::infer()
        .await
        .context("cannot read the kubeconfig or the service account's credentials")?;
    // Every request goes through the counting layer, so that
    // `quantops_api_requests_total` is what this replica really sent.
    let client = kube::client::ClientBuilder::try_from(kube_config)
        .context("cannot build a Kubernetes client from the kubeconfig or service account")?
        .with_layer(&quantops_operator::api_requests::counting_layer(
            metrics.api_requests.clone(),
        ))
        .build();
    client
        .apiserver_version()
        .await
        .context("cannot reach the Kubernetes API server")?;

    let (leader_tx, mut leader_rx) = watch::channel(args.no_leader_election);
    // Without election this replica leads for good; the sender is kept alive
    // here so that the "lost leadership" watch below never fires.
    let _always_leader = if args.no_leader_election {
        Some(leader_tx)
    } else {
        let namespace = args
            .lease_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| client.default_namespace().to_string());
        let identity = std::env::var("POD_NAME")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| format!("quantops-{}", std::process::id()));
        let leases: kube::Api<Lease> = kube::Api::namespaced(client.clone(), &namespace);
        tracing::info!(lease = %args.lease_name, %namespace, %identity, "joining leader election");
        tokio::spawn(leader::run(
            ApiLease(leases),
            ElectorConfig {
                lease_name: args.lease_name.clone(),
                identity,
                timings,
            },
            leader_tx,
        ));
        None
    };
    ready.store(true, Ordering::Relaxed);

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    // Passive: keep serving probes and wait to become leader (or for a signal).
    metrics.leader.set(0);
    tokio::select! {
        changed = leader_rx.wait_for(|leader| *leader) => {
            changed.context("the leader elector stopped")?;
        }
        _ = tokio::signal::ctrl_c() => return Ok(shut_down(server)),
        _ = terminate.recv() => return Ok(shut_down(server)),
    }
    metrics.leader.set(1);
    tracing::info!("leading: starting the controllers");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let controller = quantops_operator::run(client.clone(), config, metrics.clone(), async {
        let _ = stop_rx.await;
    });
    tokio::pin!(controller);
    let lost = async {
        // An error means the elector is gone: no renewals from now on either.
        let _ = leader_rx.wait_for(|leader| !*leader).await;
    };
    tokio::pin!(lost);
    tokio::select! {
        _ = &mut controller => {
            metrics.leader.set(0);
            anyhow::bail!("the controllers stopped on their own");
        }
        _ = &mut lost => return Ok(step_down(&metrics)),
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    // Signalled: let in-flight reconciliations finish, unless the Lease is
    // lost meanwhile.
    let _ = stop_tx.send(());
    tokio::select! {
        _ = &mut controller => {}
        _ = &mut lost => return Ok(step_down(&metrics)),
    }
    metrics.leader.set(0);
    Ok(shut_down(server))
}

/// Leadership is gone (renew deadline passed, or another replica holds the
/// Lease): stop at once, abandoning in-flight reconciliations, so that
/// nothing is done after the Lease may have expired. Exiting, like
/// controller-runtime, is the one way to be sure every task has stopped;
/// the Deployment restarts the container as a follower.
fn step_down(metrics: &Metrics) -> ExitCode {
    metrics.leader.set(0);
    tracing::error!("lost leadership: exiting so that no controller acts without the Lease");
    ExitCode::FAILURE
}

fn shut_down(server: tokio::task::JoinHandle<()>) -> ExitCode {
    tracing::info!("shutting down");
    server.abort();
    ExitCode::SUCCESS
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_parses() -> anyhow::Result<()> {
        let selector = parse_selector("quantops.dev/gpu-node=true, zone = a")?;
        assert_eq!(selector.get("zone").map(String::as_str), Some("a"));
        assert!(parse_selector("")?.is_empty());
        assert!(parse_selector("novalue").is_err());
        Ok(())
    }
}
