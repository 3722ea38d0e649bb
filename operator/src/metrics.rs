//! Prometheus metrics of the operator, served on `/metrics`.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric the operator exports, registered in its own registry so that
/// tests can build as many as they like.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub reconciles: IntCounterVec,
    pub reconcile_errors: IntCounterVec,
    pub reconcile_duration: HistogramVec,
    pub stage_duration: HistogramVec,
    pub stage_results: IntCounterVec,
    pub gate_results: IntCounterVec,
    pub promotions: IntCounterVec,
    pub objects_by_phase: IntGaugeVec,
    pub leader: IntGauge,
    /// Rolling quality-probe score per served model, from each promotion's
    /// `status.quality` (labels `model`, `variant`, `environment`, the same
    /// as `quantizer-job probe --listen` uses).
    pub quality_score: GaugeVec,
    /// The threshold that score is held to.
    pub quality_threshold: GaugeVec,
    /// `QualityDegraded` turning True (the window score falling below the
    /// threshold), counted once per transition.
    pub quality_regressions: IntCounterVec,
    /// ModelPromotions known to this replica, by phase.
    pub promotions_by_phase: IntGaugeVec,
    /// Seconds since a promotion that is not (yet) serving was created or
    /// stopped serving, by phase: what `QuantopsPromotionStuck` watches.
    pub promotion_unpromoted_seconds: GaugeVec,
    /// Requests to the API server, by verb and resource
    /// ([`crate::api_requests`]).
    pub api_requests: IntCounterVec,
}

/// The labels of the quality metrics.
pub const QUALITY_LABELS: [&str; 3] = ["model", "variant", "environment"];
/// The labels of `quantops_modelpromotion_unpromoted_seconds`.
pub const PROMOTION_LABELS: [&str; 4] = ["namespace", "promotion", "environment", "phase"];

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new_custom(Some("quantops".to_string()), None)?;
        let reconciles = IntCounterVec::new(
            Opts::new("reconciles_total", "Reconciliations, per controller"),
            &["controller"],
        )?;
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "reconcile_errors_total",
                "Failed reconciliations, per controller and error kind",
            ),
            &["controller", "error"],
        )?;
        let reconcile_duration = HistogramVec::new(
            HistogramOpts::new(
                "reconcile_duration_seconds",
                "Time spent in one reconciliation",
            )
            .buckets(vec![0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]),
            &["controller"],
        )?;
        let stage_duration = HistogramVec::new(
            HistogramOpts::new(
                "stage_duration_seconds",
                "Run time of a pipeline stage, as the worker measured it",
            )
            .buckets(vec![
                1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0,
            ]),
            &["stage"],
        )?;
        let stage_results = IntCounterVec::new(
            Opts::new(
                "stage_results_total",
                "Finished stage runs, by stage and result (succeeded, broken)",
            ),
            &["stage", "result"],
        )?;
        let gate_results = IntCounterVec::new(
            Opts::new(
                "gate_results_total",
                "Quality gate verdicts, by gate and result (passed, failed)",
            ),
            &["gate", "result"],
        )?;
        let promotions = IntCounterVec::new(
            Opts::new(
                "promotions_total",
                "ModelPromotion outcomes, by environment and result (refused, committed, promoted, rolled_back)",
            ),
            &["environment", "result"],
        )?;
        let objects_by_phase = IntGaugeVec::new(
            Opts::new(
                "quantizedmodels",
                "QuantizedModels known to this replica, by phase",
            ),
            &["phase"],
        )?;
        let api_requests = IntCounterVec::new(
            Opts::new(
                "api_requests_total",
                "Requests this replica sent to the Kubernetes API server, by verb and resource",
            ),
            &crate::api_requests::LABELS,
        )?;
        let leader = IntGauge::new("leader", "1 while this replica holds the leader lease")?;
        let quality_score = GaugeVec::new(
            Opts::new(
                "quality_score",
                "Rolling quality-probe score (0..1) of a promotion's served variant, from its status",
            ),
            &QUALITY_LABELS,
        )?;
        let quality_threshold = GaugeVec::new(
            Opts::new(
                "quality_threshold",
                "The threshold a promotion's rolling quality score is held to",
            ),
            &QUALITY_LABELS,
        )?;
        let quality_regressions = IntCounterVec::new(
            Opts::new(
                "quality_regression_alerts_total",
                "Times a promotion's rolling quality score fell below its threshold (QualityDegraded turned True)",
            ),
            &QUALITY_LABELS,
        )?;
        let promotions_by_phase = IntGaugeVec::new(
            Opts::new(
                "modelpromotions",
                "ModelPromotions known to this replica, by phase",
            ),
            &["phase"],
        )?;
        let promotion_unpromoted_seconds = GaugeVec::new(
            Opts::new(
                "modelpromotion_unpromoted_seconds",
                "Seconds since a promotion that is not serving was created or stopped serving",
            ),
            &PROMOTION_LABELS,
        )?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(stage_duration.clone()))?;
        registry.register(Box::new(stage_results.clone()))?;
        registry.register(Box::new(gate_results.clone()))?;
        registry.register(Box::new(promotions.clone()))?;
        registry.register(Box::new(objects_by_phase.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(api_requests.clone()))?;
        registry.register(Box::new(quality_score.clone()))?;
        registry.register(Box::new(quality_threshold.clone()))?;
        registry.register(Box::new(quality_regressions.clone()))?;
        registry.register(Box::new(promotions_by_phase.clone()))?;
        registry.register(Box::new(promotion_unpromoted_seconds.clone()))?;
        Ok(Metrics {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            stage_duration,
            stage_results,
            gate_results,
            promotions,
            objects_by_phase,
            leader,
            quality_score,
            quality_threshold,
            quality_regressions,
            promotions_by_phase,
            promotion_unpromoted_seconds,
            api_requests,
        })
    }

    /// Runs one reconciliation of `controller`, counting it and timing it,
    /// so that every controller reports the same way.
    pub async fn reconcile<T>(
        &self,
        controller: &str,
        reconciliation: impl Future<Output = T>,
    ) -> T {
        let started = std::time::Instant::now();
        self.reconciles.with_label_values(&[controller]).inc();
        let result = reconciliation.await;
        self.reconcile_duration
            .with_label_values(&[controller])
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// The text exposition format of every metric.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer)?;
        Ok(String::from_utf8_lossy(&buffer).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_registered_metrics() -> Result<(), prometheus::Error> {
        let metrics = Metrics::new()?;
        metrics
            .reconciles
            .with_label_values(&["quantizedmodel"])
            .inc();
        metrics
            .gate_results
            .with_label_values(&["perplexity", "failed"])
            .inc();
        metrics.leader.set(1);
        let text = metrics.render()?;
        assert!(
            text.contains("quantops_reconciles_total{controller=\"quantizedmodel\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("quantops_gate_results_total{gate=\"perplexity\",result=\"failed\"} 1")
        );
        assert!(text.contains("quantops_leader 1"));
        Ok(())
    }
}
