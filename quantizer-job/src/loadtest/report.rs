//! The load test's result: throughput, latency distributions and errors, as
//! JSON (for files and tools) and as a table (for people).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::stats::Distribution;

/// What one successful request measured, client side.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRecord {
    /// Send to first text chunk, seconds.
    pub ttft: f64,
    /// Gaps between consecutive text chunks, seconds.
    pub itl: Vec<f64>,
    /// Send to `[DONE]`, seconds.
    pub e2e: f64,
    /// Output tokens: the server's usage when it sent one, else text chunks.
    pub output_tokens: u64,
    /// Prompt tokens by the server's usage (0 when it sent none).
    pub prompt_tokens: u64,
}

/// The whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Base URL of the endpoint.
    pub endpoint: String,
    /// Model name sent.
    pub model: String,
    /// `sync`, `concurrency` or `rate`.
    pub profile: String,
    /// Requests in flight at most (`concurrency`; 1 for `sync`; null for `rate`).
    pub concurrency: Option<usize>,
    /// Requests per second asked for (`rate` only).
    pub rate: Option<f64>,
    /// `poisson` or `fixed` (`rate` only).
    pub arrival: Option<String>,
    /// Prompt tokens asked for, and the mean the server counted.
    pub prompt_tokens_target: usize,
    /// Mean prompt tokens by the server's usage.
    pub prompt_tokens_mean: f64,
    /// Output tokens asked for per request.
    pub max_tokens: u32,
    /// Requests sent.
    pub requests: usize,
    /// Requests answered completely.
    pub completed: usize,
    /// Requests that failed (refused, broken, timed out).
    pub errors: usize,
    /// First send to last answer, seconds.
    pub duration_s: f64,
    /// Completed requests per second.
    pub requests_per_s: f64,
    /// Output tokens of the completed requests.
    pub output_tokens: u64,
    /// Output tokens per second.
    pub output_tokens_per_s: f64,
    /// Time to first token, seconds.
    pub ttft_s: Distribution,
    /// Inter-token latency, seconds (every gap of every request).
    pub itl_s: Distribution,
    /// End-to-end latency, seconds.
    pub e2e_s: Distribution,
    /// Up to ten error messages, for diagnosis.
    pub error_samples: Vec<String>,
}

impl Report {
    /// The table printed on stdout.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let shape = match (self.profile.as_str(), self.concurrency, self.rate) {
            ("rate", _, Some(r)) => format!(
                "rate {r}/s ({})",
                self.arrival.as_deref().unwrap_or("poisson")
            ),
            (p, Some(c), _) => format!("{p} {c}"),
            (p, _, _) => p.to_string(),
        };
        let _ = writeln!(
            out,
            "load test of {} ({}), {shape}",
            self.endpoint, self.model
        );
        let _ = writeln!(
            out,
            "prompt tokens {} (server counted {:.1} on average), max tokens {}",
            self.prompt_tokens_target, self.prompt_tokens_mean, self.max_tokens
        );
        let _ = writeln!(
            out,
            "requests {} completed {} errors {} in {:.2} s",
            self.requests, self.completed, self.errors, self.duration_s
        );
        let _ = writeln!(
            out,
            "throughput {:.2} req/s, {:.1} output tok/s ({} output tokens)",
            self.requests_per_s, self.output_tokens_per_s, self.output_tokens
        );
        let _ = writeln!(
            out,
            "{:<14}{:>10}{:>10}{:>10}{:>10}{:>10}",
            "latency (ms)", "mean", "p50", "p90", "p99", "max"
        );
        for (name, d) in [
            ("TTFT", self.ttft_s),
            ("ITL", self.itl_s),
            ("e2e", self.e2e_s),
        ] {
            let _ = writeln!(
                out,
                "{name:<14}{:>10.1}{:>10.1}{:>10.1}{:>10.1}{:>10.1}",
                d.mean * 1e3,
                d.p50 * 1e3,
                d.p90 * 1e3,
                d.p99 * 1e3,
                d.max * 1e3
            );
        }
        for e in &self.error_samples {
            let _ = writeln!(out, "error: {e}");
        }
        out
    }
}
