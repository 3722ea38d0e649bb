//! The server's `/metrics`, under vLLM's names and with its `model_name`
//! label, so the dashboards, alerts and Argo Rollouts analyses written for
//! vLLM read quantops' server unchanged.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Why a request ended, as the `finished_reason` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    /// The OpenAI / vLLM spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// The server's metrics, bound to the served model's name.
#[derive(Clone)]
pub struct ServeMetrics {
    registry: Registry,
    /// Arrival to last token, per request.
    pub e2e_latency: Histogram,
    /// Arrival to first token, per request.
    pub time_to_first_token: Histogram,
    /// Every interval between two consecutive output tokens.
    pub time_per_output_token: Histogram,
    /// Generated tokens of finished requests.
    pub generation_tokens: IntCounter,
    /// Prompt tokens of finished requests.
    pub prompt_tokens: IntCounter,
    success: IntCounterVec,
    model_name: String,
    /// Requests being generated.
    pub running: IntGauge,
    /// Requests admitted and waiting for the engine.
    pub waiting: IntGauge,
}

impl std::fmt::Debug for ServeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeMetrics")
            .field("model_name", &self.model_name)
            .finish()
    }
}

const LABEL: &str = "model_name";

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
    model: &str,
) -> Result<Histogram, prometheus::Error> {
    let vec = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        &[LABEL],
    )?;
    registry.register(Box::new(vec.clone()))?;
    Ok(vec.with_label_values(&[model]))
}

fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
    model: &str,
) -> Result<IntCounter, prometheus::Error> {
    let vec = IntCounterVec::new(Opts::new(name, help), &[LABEL])?;
    registry.register(Box::new(vec.clone()))?;
    Ok(vec.with_label_values(&[model]))
}

fn gauge(
    registry: &Registry,
    name: &str,
    help: &str,
    model: &str,
) -> Result<IntGauge, prometheus::Error> {
    let vec = IntGaugeVec::new(Opts::new(name, help), &[LABEL])?;
    registry.register(Box::new(vec.clone()))?;
    Ok(vec.with_label_values(&[model]))
}

impl ServeMetrics {
    /// Registers every metric for `model_name` (vLLM's default buckets).
    pub fn new(model_name: &str) -> Result<ServeMetrics, prometheus::Error> {
        let registry = Registry::new();
        let m = model_name;
        let e2e_latency = histogram(
            &registry,
            "vllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            &[
                0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
            ],
            m,
        )?;
        let time_to_first_token = histogram(
            &registry,
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            &[
                0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
            ],
            m,
        )?;
        let time_per_output_token = histogram(
            &registry,
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds.",
            &[
                0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0,
            ],
            m,
        )?;
        let generation_tokens = counter(
            &registry,
            "vllm:generation_tokens_total",
            "Number of generation tokens processed.",
            m,
        )?;
        let prompt_tokens = counter(
            &registry,
            "vllm:prompt_tokens_total",
            "Number of prefill tokens processed.",
            m,
        )?;
        let success = IntCounterVec::new(
            Opts::new(
                "vllm:request_success_total",
                "Count of successfully processed requests.",
            ),
            &[LABEL, "finished_reason"],
        )?;
        registry.register(Box::new(success.clone()))?;
        let running = gauge(
            &registry,
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            m,
        )?;
        let waiting = gauge(
            &registry,
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            m,
        )?;
        Ok(ServeMetrics {
            registry,
            e2e_latency,
            time_to_first_token,
            time_per_output_token,
            generation_tokens,
            prompt_tokens,
            success,
            model_name: model_name.to_string(),
            running,
            waiting,
        })
    }

    /// Counts a request that finished with `reason`.
    pub fn record_success(&self, reason: FinishReason) {
        self.success
            .with_label_values(&[self.model_name.as_str(), reason.as_str()])
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_vllm_names_with_the_model_label() -> Result<(), prometheus::Error> {
        let m = ServeMetrics::new("tiny")?;
        m.generation_tokens.inc_by(3);
        m.record_success(FinishReason::Length);
        m.time_to_first_token.observe(0.01);
        let text = m.render()?;
        assert!(
            text.contains(r#"vllm:generation_tokens_total{model_name="tiny"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"vllm:request_success_total{finished_reason="length",model_name="tiny"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains("vllm:time_to_first_token_seconds_count{model_name=\"tiny\"} 1"));
        assert!(text.contains("vllm:num_requests_waiting{model_name=\"tiny\"} 0"));
        Ok(())
    }
}
