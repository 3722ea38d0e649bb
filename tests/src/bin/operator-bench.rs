//! Benchmark (not a test) of the QuantizedModel controller on the test
//! control plane: creates many QuantizedModels whose Jobs run the simulated
//! worker on the test node, and measures the time from each create to its
//! first Job, the reconciles per second and the operator's memory.
//!
//!   cargo run --release -p quantops-e2e --bin operator-bench -- [--models N] [--stage-seconds S]
//!
//! Prints a Markdown table and writes it as JSON to target/bench/operator.json.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use kube::ResourceExt;
use kube::runtime::{WatchStreamExt, watcher};
use quantops_api::QuantizedModel;
use quantops_e2e::operator::{Operator, OperatorOptions, install_chart, sim_worker_image};
use quantops_e2e::{TestEnv, apply, repo_root};

struct Args {
    models: usize,
    stage_seconds: u32,
    concurrency: usize,
    ready_timeout: Duration,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        models: 1000,
        stage_seconds: 0,
        concurrency: 16,
        ready_timeout: Duration::from_secs(1800),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--models" => args.models = value()?.parse().context("--models")?,
            "--stage-seconds" => {
                args.stage_seconds = value()?.parse().context("--stage-seconds")?
            }
            "--concurrency" => args.concurrency = value()?.parse().context("--concurrency")?,
            "--ready-timeout" => {
                args.ready_timeout =
                    Duration::from_secs(value()?.parse().context("--ready-timeout")?)
            }
            other => anyhow::bail!(
                "unknown flag {other}; flags: --models N --stage-seconds S --concurrency C --ready-timeout SECONDS"
            ),
        }
    }
    Ok(args)
}

fn model(name: &str) -> anyhow::Result<QuantizedModel> {
    // Each model its own artifact directory: two in one are an OutputConflict.
    // No GPU and no memory request: the test node's 8 GPUs would otherwise
    // limit how many simulated stages run at once, which is not what is measured.
    serde_json::from_value(serde_json::json!({
        "apiVersion": "quantops.dev/v1alpha1",
        "kind": "QuantizedModel",
        "metadata": { "name": name },
        "spec": {
            "baseModel": { "name": "example/tiny-llama", "path": "tiny-llama" },
            "version": "v1",
            "quantization": { "method": "rtn", "bits": 4, "groupSize": 128 },
            "validation": { "evalText": { "path": "text/eval.txt" } },
            "output": { "path": format!("out/{name}") },
            "resources": { "gpus": 0 }
        }
    }))
    .context("building a QuantizedModel")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The operator's `quantops_api_requests_total`, by `verb/resource`.
async fn api_requests(operator: &Operator) -> anyhow::Result<HashMap<String, f64>> {
    let series = operator
        .metric_series("quantops_api_requests_total")
        .await
        .context("reading the operator's API request counts")?;
    Ok(series
        .into_iter()
        .map(|(labels, count)| {
            let label = |name: &str| {
                labels
                    .split(&format!("{name}=\""))
                    .nth(1)
                    .and_then(|rest| rest.split('"').next())
                    .unwrap_or("?")
                    .to_string()
            };
            (format!("{} {}", label("verb"), label("resource")), count)
        })
        .collect())
}

/// VmRSS and VmHWM of a process, in MiB.
fn memory_mib(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    quantops_e2e::init_tracing();
    let args = parse_args()?;
    let mut env = TestEnv::new("bench").await?;
    install_chart(&env, &[]).await?;
    env.host_path_pvc("quantops-models").await?;
    let operator = Operator::start(
        &env,
        OperatorOptions::new("quantops-bench", &sim_worker_image(args.stage_seconds)),
    )
    .await?;
    let pid = operator.pid().context("the operator has no pid")?;
    let (rss_idle, _) = memory_mib(pid).unwrap_or((f64::NAN, f64::NAN));
    let requests_idle = api_requests(&operator).await?;

    // First sighting of a Job per model, through a watch like any client's.
    let first_job: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let seen = first_job.clone();
    let jobs = env.api::<Job>();
    let watch = tokio::spawn(async move {
        // A watch error (an expired resource version, say) is retried by the
        // backoff; the stream itself goes on.
        let stream = watcher(jobs, watcher::Config::default())
            .default_backoff()
            .applied_objects();
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            let Ok(job) = event else { continue };
            if let Some(model) = job.labels().get("quantops.dev/model")
                && let Ok(mut map) = seen.lock()
            {
                map.entry(model.clone()).or_insert_with(Instant::now);
            }
        }
    });

    let qms = env.api::<QuantizedModel>();
    let started = Instant::now();
    let created: Vec<(String, Instant)> = futures::stream::iter(0..args.models)
        .map(|i| {
            let qms = qms.clone();
            async move {
                let name = format!("bench-{i:04}");
                apply(&qms, &name, &model(&name)?).await?;
                anyhow::Ok((name, Instant::now()))
            }
        })
        .buffer_unordered(args.concurrency)
        .try_collect()
        .await?;
    let create_seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "created {} QuantizedModels in {create_seconds:.1}s",
        args.models
    );

    // Wait for every model's first Job, then for every model to be Ready.
    let mut peak_rss: f64 = 0.0;
    let deadline = Instant::now() + args.ready_timeout;
    let mut all_jobs_at = None;
    let ready_at = loop {
        if let Some((rss, _)) = memory_mib(pid) {
            peak_rss = peak_rss.max(rss);
        }
        let with_job = first_job.lock().map(|m| m.len()).unwrap_or(0);
        if all_jobs_at.is_none() && with_job >= args.models {
            all_jobs_at = Some(started.elapsed().as_secs_f64());
        }
        let list = qms.list(&Default::default()).await?;
        let ready = list
            .items
            .iter()
            .filter(|qm| qm.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Ready"))
            .count();
        if ready >= args.models {
            break Some(started.elapsed().as_secs_f64());
        }
        if Instant::now() > deadline {
            eprintln!("{ready}/{} Ready when the timeout struck", args.models);
            break None;
        }
        eprintln!(
            "{:>6.1}s: {with_job} with a Job, {ready} Ready",
            started.elapsed().as_secs_f64()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    watch.abort();

    let seen = first_job.lock().map(|m| m.clone()).unwrap_or_default();
    let mut latencies: Vec<f64> = created
        .iter()
        .filter_map(|(name, at)| {
            seen.get(name)
                .map(|job| job.saturating_duration_since(*at).as_secs_f64())
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let reconciles = operator
        .metric(r#"quantops_reconciles_total{controller="quantizedmodel"}"#)
        .await?
        .unwrap_or(0.0);
    let (rss_end, hwm) = memory_mib(pid).unwrap_or((f64::NAN, f64::NAN));
    // What the models cost in API requests: the counts at the end less those
    // of the idle operator (its initial lists, watches and lease renewals).
    let requests_end = api_requests(&operator).await?;
    let mut per_model = serde_json::Map::new();
    let mut total = 0.0;
    for (series, count) in &requests_end {
        let spent = count - requests_idle.get(series).copied().unwrap_or(0.0);
        total += spent;
        if spent > 0.0 {
            per_model.insert(
                series.clone(),
                serde_json::json!(spent / args.models as f64),
            );
        }
    }
    let elapsed = ready_at.unwrap_or_else(|| started.elapsed().as_secs_f64());
    let result = serde_json::json!({
        "models": args.models,
        "stage_seconds": args.stage_seconds,
        "create_seconds": create_seconds,
        "first_job_p50_s": percentile(&latencies, 50.0),
        "first_job_p99_s": percentile(&latencies, 99.0),
        "first_job_max_s": latencies.last().copied().unwrap_or(f64::NAN),
        "models_with_a_job": latencies.len(),
        "all_first_jobs_s": all_jobs_at,
        "all_ready_s": ready_at,
        "reconciles": reconciles,
        "reconciles_per_s": reconciles / elapsed,
        "reconciles_per_model": reconciles / args.models as f64,
        "api_requests_per_model": total / args.models as f64,
        "api_requests_per_model_by_series": per_model,
        "rss_idle_mib": rss_idle,
        "rss_peak_sampled_mib": peak_rss,
        "rss_end_mib": rss_end,
        "rss_high_water_mib": hwm,
    });
    println!("| figure | value |\n|---|---|");
    if let Some(map) = result.as_object() {
        for (key, value) in map {
            println!("| {key} | {value} |");
        }
    }
    let out = repo_root().join("target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("operator.json"),
        serde_json::to_string_pretty(&result)?,
    )?;
    drop(operator);
    // Deleting thousands of objects can outlast the harness's wait; the
    // figures are written already, so that is worth a line, not a failure.
    if let Err(error) = env.cleanup().await {
        eprintln!("the benchmark's namespace is still being deleted: {error}");
    }
    Ok(())
}
