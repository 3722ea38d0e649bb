//! `quantizer-job probe`: the worker half of the production quality probe.
//! It sends every prompt of a system-tests suite (the validation stage's
//! YAML) to a serving endpoint at temperature 0 and judges each answer with
//! the validation stage's own checks ([`Expectation::check`]), so "passes in
//! production" means what "passed validation" meant.
//!
//! Scoring: `score = passed / total` over every test of the suite. A request
//! that gets no answer (connection refused, error status, timeout) counts
//! as not passed and as a failure. Edge-case tests count like the rest: the
//! probe has no baseline to excuse them (validation counts an edge case only
//! where the baseline passed it).
//!
//! One-shot mode ([`run_once`]) is what a CronJob runs; daemon mode
//! ([`daemon`]) probes on an interval and exports the rolling window
//! ([`window`]) as Prometheus metrics.

pub mod daemon;
pub mod result;
pub mod window;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::eval::EvalError;
use crate::eval::system_tests::{
    Expectation, SystemTestSuite, TestPrompt, load_suite, normalize_answer,
};
use crate::layout::{LayoutError, Links, confine};
use crate::loadtest::stats::percentile;
use crate::openai::{
    ChatCompletionRequest, Client, ClientError, CompletionRequest, GenerationParams,
};
use result::{LatencySummary, ProbeResult, ProbeSummary, TestOutcome};

/// Why the probe could not run (as opposed to a low score).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The suite file is missing or malformed.
    #[error("suite: {0}")]
    Suite(#[from] EvalError),
    /// The suite has no tests, so there is nothing to score.
    #[error("suite {0} has no tests")]
    EmptySuite(PathBuf),
    /// The suite's path is not confined to the model volume.
    #[error(transparent)]
    Confinement(#[from] LayoutError),
    /// The suite's path is not valid UTF-8, so it cannot be checked.
    #[error("--suite: the path is not valid UTF-8")]
    SuitePath,
    /// A flag is out of range.
    #[error("invalid flag: {0}")]
    Flag(String),
}

/// A probe: where, what and under which labels.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The endpoint's client.
    pub client: Client,
    /// Model name sent and reported.
    pub model: String,
    /// The suite.
    pub suite: SystemTestSuite,
    /// Variant label.
    pub variant: Option<String>,
    /// Environment label.
    pub environment: Option<String>,
}

/// A suite's tests, checked up front so that a bad test is a bad suite
/// (exit non-zero) rather than a low score.
struct Checked<'s> {
    name: &'s str,
    prompt: TestPrompt<'s>,
    expectation: Expectation,
}

/// Loads the suite at `path` and checks that every test has one prompt and
/// one expectation. With a `root` (the model volume), `path` must be a
/// relative path confined to it, as a spec path is.
pub fn load_probe_suite(
    path: &Path,
    root: Option<&Path>,
    links: Links,
) -> Result<SystemTestSuite, ProbeError> {
    let path = match root {
        Some(root) => {
            let relative = path.to_str().ok_or(ProbeError::SuitePath)?;
            confine(root, "--suite", relative, links)?
        }
        None => path.to_path_buf(),
    };
    let suite = load_suite(&path)?;
    if suite.tests.is_empty() {
        return Err(ProbeError::EmptySuite(path));
    }
    Ok(suite)
}

impl Probe {
    /// Sends every test once, in order, and scores the answers.
    pub async fn run_once(&self) -> Result<ProbeResult, ProbeError> {
        let checked = self
            .suite
            .tests
            .iter()
            .map(|t| {
                Ok(Checked {
                    name: &t.name,
                    prompt: t.prompt()?,
                    expectation: t.expectation()?,
                })
            })
            .collect::<Result<Vec<_>, EvalError>>()?;
        let max_tokens = u32::try_from(self.suite.max_new_tokens)
            .map_err(|_| ProbeError::Flag("max_new_tokens does not fit in u32".into()))?;
        let mut tests = Vec::with_capacity(checked.len());
        for test in &checked {
            let started = Instant::now();
            let answer = self.ask(&test.prompt, max_tokens).await;
            let latency = started.elapsed().as_secs_f64();
            let outcome = match answer {
                Ok(text) => {
                    let answer = normalize_answer(&text);
                    TestOutcome {
                        name: test.name.to_string(),
                        passed: test.expectation.check(&answer),
                        answer: Some(answer),
                        error: None,
                        latency_seconds: latency,
                    }
                }
                Err(e) => TestOutcome {
                    name: test.name.to_string(),
                    passed: false,
                    answer: None,
                    error: Some(e.to_string()),
                    latency_seconds: latency,
                },
            };
            tracing::debug!(name = %outcome.name, passed = outcome.passed, error = outcome.error.as_deref(), "probe test");
            tests.push(outcome);
        }
        Ok(self.result(tests))
    }

    async fn ask(&self, prompt: &TestPrompt<'_>, max_tokens: u32) -> Result<String, ClientError> {
        let params = GenerationParams {
            model: Some(self.model.clone()),
            max_tokens: Some(max_tokens),
            temperature: Some(0.0),
            ..GenerationParams::default()
        };
        let missing = |what: &str| ClientError::Protocol {
            url: self.client.base().to_string(),
            reason: format!("the response has no {what}"),
        };
        match prompt {
            TestPrompt::Raw(p) => {
                let r = self
                    .client
                    .completion(&CompletionRequest {
                        prompt: (*p).to_string(),
                        params,
                    })
                    .await?;
                r.choices
                    .into_iter()
                    .next()
                    .map(|c| c.text)
                    .ok_or_else(|| missing("choice"))
            }
            TestPrompt::Chat(messages) => {
                let r = self
                    .client
                    .chat(&ChatCompletionRequest {
                        messages: messages.to_vec(),
                        params,
                    })
                    .await?;
                r.choices
                    .into_iter()
                    .next()
                    .and_then(|c| c.message)
                    .map(|m| m.content)
                    .ok_or_else(|| missing("message"))
            }
        }
    }

    fn result(&self, tests: Vec<TestOutcome>) -> ProbeResult {
        let total = tests.len();
        let passed = tests.iter().filter(|t| t.passed).count();
        let failures = tests.iter().filter(|t| t.error.is_some()).count();
        let mut answered: Vec<f64> = tests
            .iter()
            .filter(|t| t.error.is_none())
            .map(|t| t.latency_seconds)
            .collect();
        answered.sort_by(f64::total_cmp);
        let latency = if answered.is_empty() {
            LatencySummary {
                mean: 0.0,
                p50: 0.0,
                p90: 0.0,
                max: 0.0,
            }
        } else {
            LatencySummary {
                mean: answered.iter().sum::<f64>() / answered.len() as f64,
                p50: percentile(&answered, 50.0),
                p90: percentile(&answered, 90.0),
                max: answered[answered.len() - 1],
            }
        };
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        ProbeResult {
            summary: ProbeSummary {
                kind: result::PROBE_KIND.into(),
                model: self.model.clone(),
                variant: self.variant.clone(),
                environment: self.environment.clone(),
                score: if total == 0 {
                    0.0
                } else {
                    passed as f64 / total as f64
                },
                passed: count(passed),
                total: count(total),
                failures: count(failures),
                latency_seconds: latency,
                finished_at: chrono::Utc::now()
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            },
            tests,
        }
    }
}

/// Default per-request timeout of the probe.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
