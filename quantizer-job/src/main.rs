//! `quantizer-job`: the worker that the pipeline's Jobs run.
//!
//! `quantizer-job <stage> --spec FILE [--root DIR]`, stage one of `baseline`,
//! `quantize`, `validate`, `card`, `all`. Exit code 0 means the stage ran (a
//! failed quality gate is a result, not a crash); non-zero means the stage
//! itself broke. Either way a compact JSON summary goes to the termination
//! message, and the full result to `report.json` beside the artifact.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use quantizer_job::gpu::{DeviceChoice, Gpu};
use quantizer_job::layout::{Layout, Links};
use quantizer_job::stages::{self, Stage, StageInput};
use quantizer_job::termination::TerminationLog;
use quantops_api::StageSummary;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(version, about = "Quantize, evaluate and document an LLM checkpoint")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "QUANTOPS_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
struct StageArgs {
    /// The QuantizedModel YAML.
    #[arg(long)]
    spec: PathBuf,
    /// Base of the spec's relative paths (in a Job: the model volume). Default: the spec's directory.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Base of `spec.output.path` when it must differ from --root (e.g. a read-only data tree).
    #[arg(long)]
    output_root: Option<PathBuf>,
    /// Follow symbolic links that lead out of --root (and --output-root).
    /// Off in a Job, where nothing outside the model volume is the spec's to
    /// read; local mode turns it on for a data tree that links elsewhere.
    /// Spec paths are checked (relative, no '..') either way.
    #[arg(long, env = "QUANTOPS_ALLOW_LINKS_OUT_OF_ROOT")]
    allow_links_out_of_root: bool,
    /// Where to write the compact summary. Default: /dev/termination-log when it exists.
    #[arg(long, env = "QUANTOPS_TERMINATION_LOG")]
    termination_log: Option<PathBuf>,
    /// Where to compute: `auto` takes the GPU when one is visible.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto, env = "QUANTOPS_DEVICE")]
    device: DeviceChoice,
}

#[derive(Subcommand)]
enum Command {
    /// Evaluate the FP16 baseline.
    Baseline(StageArgs),
    /// Calibrate and quantize, writing the compressed-tensors artifact.
    Quantize(StageArgs),
    /// Evaluate the artifact against the baseline and judge the gates.
    Validate(StageArgs),
    /// Write the model card from the validation report.
    Card(StageArgs),
    /// Every stage in order.
    All(StageArgs),
    /// Write the spec's calibration token ids as JSON (`{"input_ids": [...]}`),
    /// so another tool can calibrate on exactly the same sequences.
    CalibrationSet {
        #[command(flatten)]
        stage: StageArgs,
        /// The JSON file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Check the GPU backend against the CPU twin and time both (needs a GPU).
    GpuCheck(quantizer_job::gpu::check::CheckArgs),
    /// Serve a checkpoint or artifact over the OpenAI API subset vLLM serves.
    Serve(ServeArgs),
    /// Measure an OpenAI-compatible endpoint's throughput and latency.
    Loadtest(LoadtestArgs),
    /// Score a serving endpoint on a system-tests suite (once, or as a daemon with --interval).
    Probe(ProbeArgs),
}

#[derive(clap::Args)]
struct ProbeArgs {
    /// Base URL of the endpoint, e.g. http://model.test.svc:8000.
    #[arg(long)]
    endpoint: String,
    /// Model name to send and report.
    #[arg(long)]
    model: String,
    /// The system-tests YAML (the validation stage's format).
    #[arg(long)]
    suite: PathBuf,
    /// Base of --suite (e.g. the model volume's mount); with it, --suite
    /// must be a relative path confined to this directory.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Follow symbolic links that lead out of --root (see the stages' flag).
    #[arg(long, env = "QUANTOPS_ALLOW_LINKS_OUT_OF_ROOT")]
    allow_links_out_of_root: bool,
    /// Variant label of the result and the metrics.
    #[arg(long)]
    variant: Option<String>,
    /// Environment label of the result and the metrics.
    #[arg(long)]
    environment: Option<String>,
    /// Window score below which a regression alert fires (daemon mode).
    #[arg(long, default_value_t = 0.8)]
    threshold: f64,
    /// Runs in the rolling window (daemon mode).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    window: u32,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
    /// Where to write the compact summary (one-shot mode). Default: /dev/termination-log when it exists.
    #[arg(long, env = "QUANTOPS_TERMINATION_LOG")]
    termination_log: Option<PathBuf>,
    /// Probe every this many seconds, forever, serving /metrics on --listen (daemon mode).
    #[arg(long)]
    interval: Option<f64>,
    /// Address of the daemon's /metrics.
    #[arg(long, default_value = "0.0.0.0:9090", requires = "interval")]
    listen: std::net::SocketAddr,
}

#[derive(Clone, Copy, ValueEnum)]
enum ProfileKind {
    Sync,
    Concurrency,
    Rate,
}

#[derive(clap::Args)]
struct LoadtestArgs {
    /// Base URL of the endpoint, e.g. http://127.0.0.1:8000.
    #[arg(long)]
    endpoint: String,
    /// Model name to send.
    #[arg(long)]
    model: String,
    /// `sync` (one at a time), `concurrency` (--concurrency in flight) or `rate` (--rate per second, open loop).
    #[arg(long, value_enum, default_value_t = ProfileKind::Concurrency)]
    profile: ProfileKind,
    /// Requests in flight for `concurrency`.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: u32,
    /// Requests per second for `rate`.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Gaps between starts for `rate`: Poisson (exponential, seeded) or fixed 1/rate.
    #[arg(long, value_enum, default_value_t = quantizer_job::loadtest::Arrival::Poisson)]
    arrival: quantizer_job::loadtest::Arrival,
    /// Requests to send (default 32 unless --duration is given).
    #[arg(long, conflicts_with = "duration")]
    requests: Option<u32>,
    /// Send for this many seconds instead of a request count.
    #[arg(long)]
    duration: Option<f64>,
    /// Prompt length in tokens of --tokenizer.
    #[arg(long, default_value_t = 64)]
    prompt_tokens: u32,
    /// Output tokens per request (sent with ignore_eos so every answer has this length).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    max_tokens: u32,
    /// Directory with the model's tokenizer.json, to size the prompts exactly.
    #[arg(long)]
    tokenizer: PathBuf,
    /// Draw the prompts' words from this text file instead of the built-in list.
    #[arg(long)]
    text: Option<PathBuf>,
    /// `completions` or `chat`.
    #[arg(long, value_enum, default_value_t = quantizer_job::loadtest::Api::Completions)]
    api: quantizer_job::loadtest::Api,
    /// Seed of the prompts and of the Poisson schedule.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 600.0)]
    timeout: f64,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The FP16 checkpoint or compressed-tensors artifact directory.
    #[arg(long)]
    model: PathBuf,
    /// The model name clients use. Default: the directory's name.
    #[arg(long)]
    served_model_name: Option<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: std::net::SocketAddr,
    /// Requests admitted at once (waiting plus running); more get 429.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    max_queue: u32,
    /// Engine threads, each decoding one request at a time.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    engine_threads: u32,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let (stage, args) = match cli.command {
        Command::CalibrationSet { stage, out } => {
            return exit_code(write_calibration_set(&stage, &out));
        }
        Command::GpuCheck(args) => return exit_code(quantizer_job::gpu::check::run(&args)),
        Command::Serve(args) => return exit_code(serve(args)),
        Command::Loadtest(args) => return exit_code(loadtest(&args)),
        Command::Probe(args) => return exit_code(probe(args)),
        Command::Baseline(a) => (Stage::Baseline, a),
        Command::Quantize(a) => (Stage::Quantize, a),
        Command::Validate(a) => (Stage::Validate, a),
        Command::Card(a) => (Stage::Card, a),
        Command::All(a) => (Stage::All, a),
    };
    let termination = TerminationLog::new(args.termination_log.clone());
    match run(stage, &args) {
        Ok(summary) => {
            termination.write(&summary);
            println!(
                "{}",
                serde_json::to_string_pretty(&summary).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(
                stage = stage.name(),
                error = format!("{error:#}"),
                "stage failed"
            );
            eprintln!("error: {error:#}");
            termination.write(&StageSummary {
                stage: stage.name().to_string(),
                error: Some(format!("{error:#}")),
                ..StageSummary::default()
            });
            ExitCode::FAILURE
        }
    }
}

/// The exit code of a command that is not a stage (no termination message).
fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    use quantizer_job::serve::{ServeConfig, ServeOptions, default_model_name};
    let config = ServeConfig {
        options: ServeOptions {
            served_model_name: args
                .served_model_name
                .unwrap_or_else(|| default_model_name(&args.model)),
            listen: args.listen,
            max_queue: args.max_queue as usize,
            engine_threads: args.engine_threads as usize,
        },
        model_dir: args.model,
    };
    let dir = config.model_dir.display().to_string();
    runtime()?
        .block_on(quantizer_job::serve::run(config, shutdown_signal()))
        .with_context(|| format!("serving {dir}"))
}

fn loadtest(args: &LoadtestArgs) -> anyhow::Result<()> {
    use quantizer_job::loadtest::{Budget, LoadTest, Profile, prompts};
    let tokenizer = quantizer_job::Tokenizer::from_dir(&args.tokenizer)
        .with_context(|| format!("--tokenizer {}", args.tokenizer.display()))?;
    let words = match &args.text {
        Some(path) => prompts::words_of(
            &std::fs::read_to_string(path).with_context(|| format!("--text {}", path.display()))?,
        ),
        None => Vec::new(),
    };
    let budget = match (args.requests, args.duration) {
        (_, Some(d)) if d.is_finite() && d > 0.0 => Budget::Duration(Duration::from_secs_f64(d)),
        (_, Some(d)) => anyhow::bail!("--duration must be > 0 seconds, got {d}"),
        (Some(n), None) => Budget::Requests(n as usize),
        (None, None) => Budget::Requests(32),
    };
    let distinct = match budget {
        Budget::Requests(n) => n.clamp(1, 1024),
        Budget::Duration(_) => 1024,
    };
    let made = prompts::synthetic_prompts(
        &tokenizer,
        &words,
        args.prompt_tokens as usize,
        distinct,
        args.seed,
    )
    .context("cannot make the prompts")?;
    let exact = made
        .iter()
        .filter(|p| p.tokens == args.prompt_tokens as usize)
        .count();
    tracing::info!(
        prompts = made.len(),
        exact,
        target = args.prompt_tokens,
        "prompts ready"
    );
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        anyhow::bail!("--timeout must be > 0 seconds");
    }
    let client =
        quantizer_job::openai::Client::new(&args.endpoint, Duration::from_secs_f64(args.timeout))
            .with_context(|| format!("--endpoint {}", args.endpoint))?;
    let test = LoadTest {
        client,
        model: args.model.clone(),
        profile: match args.profile {
            ProfileKind::Sync => Profile::Sync,
            ProfileKind::Concurrency => Profile::Concurrency(args.concurrency as usize),
            ProfileKind::Rate => Profile::Rate {
                rate: args.rate,
                arrival: args.arrival,
            },
        },
        budget,
        prompts: made.into_iter().map(|p| p.text).collect(),
        prompt_tokens: args.prompt_tokens as usize,
        max_tokens: args.max_tokens,
        api: args.api,
        seed: args.seed,
    };
    let report = runtime()?.block_on(test.run()).context("load test")?;
    print!("{}", report.table());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn probe(args: ProbeArgs) -> anyhow::Result<()> {
    use quantizer_job::probe::{Probe, daemon, load_probe_suite};
    let suite = load_probe_suite(
        &args.suite,
        args.root.as_deref(),
        links(args.allow_links_out_of_root),
    )
    .with_context(|| format!("--suite {}", args.suite.display()))?;
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        anyhow::bail!("--timeout must be > 0 seconds");
    }
    if !args.threshold.is_finite() {
        anyhow::bail!("--threshold must be a number");
    }
    let client =
        quantizer_job::openai::Client::new(&args.endpoint, Duration::from_secs_f64(args.timeout))
            .with_context(|| format!("--endpoint {}", args.endpoint))?;
    let probe = Probe {
        client,
        model: args.model,
        suite,
        variant: args.variant,
        environment: args.environment,
    };
    let rt = runtime()?;
    match args.interval {
        None => {
            let result = rt.block_on(probe.run_once()).context("probe")?;
            TerminationLog::new(args.termination_log).write_text(
                &quantizer_job::probe::result::termination_message(&result.summary),
            );
            println!("{}", serde_json::to_string_pretty(&result)?);
            Ok(())
        }
        Some(secs) => {
            if !(secs.is_finite() && secs > 0.0) {
                anyhow::bail!("--interval must be > 0 seconds, got {secs}");
            }
            let options = daemon::DaemonOptions {
                interval: Duration::from_secs_f64(secs),
                window: args.window as usize,
                threshold: args.threshold,
            };
            rt.block_on(async {
                let listener = tokio::net::TcpListener::bind(args.listen)
                    .await
                    .with_context(|| format!("cannot listen on {}", args.listen))?;
                daemon::run(probe, options, listener, shutdown_signal())
                    .await
                    .context("probe daemon")
            })
        }
    }
}

/// The tokio runtime of the network commands.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
}

/// Resolves on ctrl-c or SIGTERM (what Kubernetes sends before killing).
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

fn write_calibration_set(args: &StageArgs, out: &std::path::Path) -> anyhow::Result<()> {
    let (qm, layout) = load(args)?;
    let set = stages::calibration_set(&qm.spec, &layout)?;
    let file = quantizer_job::calibration::TokenFile { input_ids: set };
    std::fs::write(out, serde_json::to_string(&file)?)
        .with_context(|| format!("cannot write {}", out.display()))
}

/// Base of the spec's relative paths: --root, else the spec's directory.
fn spec_root(args: &StageArgs) -> anyhow::Result<PathBuf> {
    Ok(match &args.root {
        Some(root) => root.clone(),
        None => args
            .spec
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    p.to_path_buf()
                }
            })
            .context("the spec path has no directory")?,
    })
}

/// The spec and where its paths lead, every one of them confined.
fn load(args: &StageArgs) -> anyhow::Result<(quantops_api::QuantizedModel, Layout)> {
    let qm = quantops_api::spec_file::load_quantized_model(&args.spec)?;
    let layout = Layout::new(
        &qm.spec,
        &spec_root(args)?,
        args.output_root.as_deref(),
        links(args.allow_links_out_of_root),
    )?;
    Ok((qm, layout))
}

fn links(allow_out_of_root: bool) -> Links {
    if allow_out_of_root {
        Links::AllowOutOfRoot
    } else {
        Links::Confined
    }
}

fn run(stage: Stage, args: &StageArgs) -> anyhow::Result<StageSummary> {
    let (qm, layout) = load(args)?;
    let gpu = Gpu::for_choice(args.device).context("--device")?;
    stages::run(
        stage,
        &StageInput {
            spec: &qm.spec,
            layout: &layout,
            gpu: gpu.as_ref(),
        },
    )
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
