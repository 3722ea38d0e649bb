//! The validation stage's load test: the baseline and the variant each
//! served by the worker's own OpenAI server on loopback and measured with
//! the same fixed-concurrency run, so the report and the model card carry a
//! measured serving speed beside the accuracy figures.
//!
//! The worker's server runs the dequantized weights on the CPU, so on the
//! validate machine the variant is as fast as the baseline per token; the
//! figure says what this machine served, not what vLLM's int4 kernels do.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use quantops_api::LoadtestSpec;
use serde::{Deserialize, Serialize};

use crate::loadtest::{Api, Budget, LoadTest, Profile, Report, prompts};
use crate::openai::Client;
use crate::serve::{LoadedModel, ServeOptions, Server};

/// The name both models are served under during the test.
const SERVED_NAME: &str = "validation";
/// A request that takes longer than this is counted as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// Both load tests and their ratios.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ServingSpeed {
    /// The FP16 checkpoint's run.
    pub baseline: Report,
    /// The artifact's run.
    pub quantized: Report,
    /// Output tokens per second, variant over baseline (above 1: faster).
    pub throughput_ratio: f64,
    /// Median end-to-end latency, baseline over variant (above 1: faster).
    pub latency_speedup: f64,
}

/// Load-tests the checkpoint in `baseline` and the artifact in `quantized`.
pub fn compare(
    baseline: &Path,
    quantized: &Path,
    spec: &LoadtestSpec,
) -> anyhow::Result<ServingSpeed> {
    let base = measure(baseline, spec)
        .with_context(|| format!("load test of the baseline {}", baseline.display()))?;
    let quant = measure(quantized, spec)
        .with_context(|| format!("load test of the artifact {}", quantized.display()))?;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    Ok(ServingSpeed {
        throughput_ratio: ratio(quant.output_tokens_per_s, base.output_tokens_per_s),
        latency_speedup: ratio(base.e2e_s.p50, quant.e2e_s.p50),
        baseline: base,
        quantized: quant,
    })
}

/// Serves `dir` on an ephemeral loopback port and runs the spec's test
/// against it; every request must succeed.
fn measure(dir: &Path, spec: &LoadtestSpec) -> anyhow::Result<Report> {
    let model = Arc::new(LoadedModel::load(dir)?);
    let texts: Vec<String> = prompts::synthetic_prompts(
        &model.tokenizer,
        &[],
        spec.prompt_tokens as usize,
        spec.requests.clamp(1, 1024) as usize,
        0,
    )
    .context("spec.validation.loadtest.promptTokens: cannot make the prompts")?
    .into_iter()
    .map(|p| p.text)
    .collect();
    let concurrency = spec.concurrency.max(1) as usize;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the load test's runtime")?;
    let report = runtime.block_on(async {
        let options = ServeOptions {
            served_model_name: SERVED_NAME.to_string(),
            listen: ([127, 0, 0, 1], 0).into(),
            max_queue: concurrency,
            engine_threads: 1,
        };
        let server = Server::start(model, &options).await?;
        let test = LoadTest {
            client: Client::new(&server.base_url(), REQUEST_TIMEOUT)?,
            model: SERVED_NAME.to_string(),
            profile: Profile::Concurrency(concurrency),
            budget: Budget::Requests(spec.requests as usize),
            prompts: texts,
            prompt_tokens: spec.prompt_tokens as usize,
            max_tokens: spec.max_tokens,
            api: Api::Completions,
            seed: 0,
        };
        let report = test.run().await;
        server.shutdown().await?;
        anyhow::Ok(report?)
    })?;
    if report.errors > 0 {
        anyhow::bail!(
            "{} of {} requests failed: {}",
            report.errors,
            report.requests,
            report.error_samples.join("; ")
        );
    }
    tracing::info!(
        dir = %dir.display(),
        output_tokens_per_s = report.output_tokens_per_s,
        e2e_p50_s = report.e2e_s.p50,
        "load test"
    );
    Ok(report)
}
