//! `quantizer-job loadtest`: drives any OpenAI-compatible endpoint (ours or
//! vLLM) with streamed requests of fixed shape and measures, client side,
//! time to first token, inter-token latency, end-to-end latency and
//! throughput.
//!
//! Profiles: `sync` (one request at a time), `concurrency` (N requests in
//! flight, each worker sending its next as soon as one ends) and `rate`
//! (open loop: requests start on a schedule, Poisson arrivals by default —
//! exponential gaps with mean 1/R, seeded — or a fixed interval 1/R, however
//! many are then in flight). Every request asks for `max_tokens` with
//! `ignore_eos: true` and `min_tokens: max_tokens` (vLLM's extensions;
//! quantops' server honours `ignore_eos`), so output lengths are fixed, and
//! for `stream_options.include_usage` so token counts are the server's.

pub mod prompts;
pub mod report;
pub mod stats;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::openai::{
    CHAT_COMPLETIONS, COMPLETIONS, ChatCompletionRequest, Client, ClientError, CompletionRequest,
    GenerationParams, StreamOptions,
};
use crate::tokenizer::ChatMessage;
pub use report::Report;
use report::RequestRecord;
use stats::Distribution;

/// How requests are issued.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Profile {
    /// One at a time.
    Sync,
    /// This many in flight.
    Concurrency(usize),
    /// This many per second, open loop.
    Rate {
        /// Requests per second.
        rate: f64,
        /// The gaps between starts.
        arrival: Arrival,
    },
}

/// Gaps between request starts in the `rate` profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Arrival {
    /// Exponential gaps (a Poisson process), seeded.
    Poisson,
    /// Every 1/R seconds.
    Fixed,
}

/// Which endpoint the requests go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// `/v1/completions` with the prompt as is.
    Completions,
    /// `/v1/chat/completions` with the prompt as one user message.
    Chat,
}

/// When to stop sending.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// After this many requests.
    Requests(usize),
    /// After this long (requests in flight then are awaited).
    Duration(Duration),
}

/// A load test.
#[derive(Debug, Clone)]
pub struct LoadTest {
    /// The endpoint's client.
    pub client: Client,
    /// Model name sent.
    pub model: String,
    /// The profile.
    pub profile: Profile,
    /// When to stop.
    pub budget: Budget,
    /// The prompts, used in turn.
    pub prompts: Vec<String>,
    /// Prompt tokens asked for (for the report).
    pub prompt_tokens: usize,
    /// Output tokens per request.
    pub max_tokens: u32,
    /// Endpoint.
    pub api: Api,
    /// Seed of the Poisson schedule.
    pub seed: u64,
}

/// Why a load test could not run.
#[derive(Debug, thiserror::Error)]
pub enum LoadTestError {
    /// No prompts to send.
    #[error("no prompts to send")]
    NoPrompts,
    /// A profile parameter is out of range.
    #[error("invalid profile: {0}")]
    Profile(String),
}

type Outcome = Result<RequestRecord, ClientError>;

struct Shared {
    test: LoadTest,
    next: AtomicUsize,
    started: Instant,
    outcomes: Mutex<Vec<Outcome>>,
}

impl Shared {
    /// The index of the next request, or `None` when the budget is spent.
    fn take(&self) -> Option<usize> {
        if let Budget::Duration(d) = self.test.budget
            && self.started.elapsed() >= d
        {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::AcqRel);
        match self.test.budget {
            Budget::Requests(n) if i >= n => None,
            _ => Some(i),
        }
    }
}

impl LoadTest {
    /// Runs the test to its budget and reports.
    pub async fn run(self) -> Result<Report, LoadTestError> {
        if self.prompts.is_empty() {
            return Err(LoadTestError::NoPrompts);
        }
        match self.profile {
            Profile::Concurrency(0) => {
                return Err(LoadTestError::Profile("concurrency must be ≥ 1".into()));
            }
            Profile::Rate { rate, .. } if !(rate.is_finite() && rate > 0.0) => {
                return Err(LoadTestError::Profile("rate must be > 0".into()));
            }
            _ => {}
        }
        let shared = Arc::new(Shared {
            test: self,
            next: AtomicUsize::new(0),
            started: Instant::now(),
            outcomes: Mutex::new(Vec::new()),
        });
        match shared.test.profile {
            Profile::Sync => workers(&shared, 1).await,
            Profile::Concurrency(n) => workers(&shared, n).await,
            Profile::Rate { rate, arrival } => open_loop(&shared, rate, arrival).await,
        }
        let duration = shared.started.elapsed();
        let outcomes = std::mem::take(&mut *shared.outcomes.lock().await);
        Ok(summarise(&shared.test, outcomes, duration))
    }
}

async fn workers(shared: &Arc<Shared>, n: usize) {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let shared = Arc::clone(shared);
            tokio::spawn(async move {
                while let Some(i) = shared.take() {
                    let outcome = one_request(&shared.test, i).await;
                    shared.outcomes.lock().await.push(outcome);
                }
            })
        })
        .collect();
    for t in tasks {
        if let Err(e) = t.await {
            tracing::error!(error = %e, "load-test worker failed");
        }
    }
}

async fn open_loop(shared: &Arc<Shared>, rate: f64, arrival: Arrival) {
    let mut rng = StdRng::seed_from_u64(shared.test.seed);
    let mut tasks = Vec::new();
    let mut due = Duration::ZERO;
    while let Some(i) = shared.take() {
        if let Budget::Duration(d) = shared.test.budget
            && due >= d
        {
            break;
        }
        tokio::time::sleep_until((shared.started + due).into()).await;
        let s = Arc::clone(shared);
        tasks.push(tokio::spawn(async move {
            let outcome = one_request(&s.test, i).await;
            s.outcomes.lock().await.push(outcome);
        }));
        let gap = match arrival {
            Arrival::Fixed => 1.0 / rate,
            Arrival::Poisson => exponential_gap(&mut rng, rate),
        };
        due += Duration::from_secs_f64(gap);
    }
    for t in tasks {
        if let Err(e) = t.await {
            tracing::error!(error = %e, "load-test request task failed");
        }
    }
}

async fn one_request(test: &LoadTest, i: usize) -> Outcome {
    let prompt = &test.prompts[i % test.prompts.len()];
    let params = GenerationParams {
        model: Some(test.model.clone()),
        max_tokens: Some(test.max_tokens),
        temperature: Some(0.0),
        stream: true,
        stream_options: Some(StreamOptions {
            include_usage: true,
        }),
        ignore_eos: true,
        min_tokens: Some(test.max_tokens),
        ..GenerationParams::default()
    };
    let record = match test.api {
        Api::Completions => {
            let request = CompletionRequest {
                prompt: prompt.clone(),
                params,
            };
            test.client.stream(COMPLETIONS, &request).await?
        }
        Api::Chat => {
            let request = ChatCompletionRequest {
                messages: vec![ChatMessage {
                    role: "user".into(),
                    content: prompt.clone(),
                }],
                params,
            };
            test.client.stream(CHAT_COMPLETIONS, &request).await?
        }
    };
    let times: Vec<f64> = record
        .token_times
        .iter()
        .map(Duration::as_secs_f64)
        .collect();
    let ttft = times.first().copied().unwrap_or(record.total.as_secs_f64());
    Ok(RequestRecord {
        ttft,
        itl: times.windows(2).map(|w| w[1] - w[0]).collect(),
        e2e: record.total.as_secs_f64(),
        output_tokens: record
            .usage
            .map_or(times.len() as u64, |u| u64::from(u.completion_tokens)),
        prompt_tokens: record.usage.map_or(0, |u| u64::from(u.prompt_tokens)),
    })
}

fn summarise(test: &LoadTest, outcomes: Vec<Outcome>, duration: Duration) -> Report {
    let requests = outcomes.len();
    let mut ok = Vec::new();
    let mut error_samples = Vec::new();
    let mut errors = 0;
    for o in outcomes {
        match o {
            Ok(r) => ok.push(r),
            Err(e) => {
                errors += 1;
                if error_samples.len() < 10 {
                    error_samples.push(e.to_string());
                }
            }
        }
    }
    let secs = duration.as_secs_f64().max(f64::MIN_POSITIVE);
    let output_tokens: u64 = ok.iter().map(|r| r.output_tokens).sum();
    let itl: Vec<f64> = ok.iter().flat_map(|r| r.itl.iter().copied()).collect();
    let ttft: Vec<f64> = ok.iter().map(|r| r.ttft).collect();
    let e2e: Vec<f64> = ok.iter().map(|r| r.e2e).collect();
    let (profile, concurrency, rate, arrival) = match test.profile {
        Profile::Sync => ("sync", Some(1), None, None),
        Profile::Concurrency(n) => ("concurrency", Some(n), None, None),
        Profile::Rate { rate, arrival } => (
            "rate",
            None,
            Some(rate),
            Some(
                match arrival {
                    Arrival::Poisson => "poisson",
                    Arrival::Fixed => "fixed",
                }
                .to_string(),
            ),
        ),
    };
    Report {
        endpoint: test.client.base().to_string(),
        model: test.model.clone(),
        profile: profile.to_string(),
        concurrency,
        rate,
        arrival,
        prompt_tokens_target: test.prompt_tokens,
        prompt_tokens_mean: if ok.is_empty() {
            0.0
        } else {
            ok.iter().map(|r| r.prompt_tokens as f64).sum::<f64>() / ok.len() as f64
        },
        max_tokens: test.max_tokens,
        requests,
        completed: ok.len(),
        errors,
        duration_s: secs,
        requests_per_s: ok.len() as f64 / secs,
        output_tokens,
        output_tokens_per_s: output_tokens as f64 / secs,
        ttft_s: Distribution::of(&ttft),
        itl_s: Distribution::of(&itl),
        e2e_s: Distribution::of(&e2e),
        error_samples,
    }
}

/// A gap of a Poisson process of `rate` per second: an exponential draw by
/// inverse transform of a uniform in (0, 1] (no distributions crate needed).
fn exponential_gap(rng: &mut impl rand::Rng, rate: f64) -> f64 {
    let u: f64 = 1.0 - rng.random::<f64>();
    -u.ln() / rate
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_gaps_have_mean_one_over_rate() {
        let mut rng = StdRng::seed_from_u64(1);
        let n = 20_000;
        let mean = (0..n).map(|_| exponential_gap(&mut rng, 4.0)).sum::<f64>() / f64::from(n);
        assert!((mean - 0.25).abs() < 0.01, "{mean}");
    }
}
