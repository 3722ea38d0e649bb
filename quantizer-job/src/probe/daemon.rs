//! Daemon mode: probe every interval, keep the rolling window of the last
//! runs, and export it on `/metrics` with labels `model`, `variant`,
//! `environment` (empty when not given):
//!
//! - `quantops_quality_score` (gauge): the window's mean score (absent until
//!   the first run);
//! - `quantops_quality_last_score` (gauge): the last run's score;
//! - `quantops_quality_threshold` (gauge);
//! - `quantops_quality_probe_latency_seconds` (histogram): every answered
//!   request's latency;
//! - `quantops_quality_probe_failures_total` (counter): requests without an
//!   answer;
//! - `quantops_quality_probe_runs_total` (counter);
//! - `quantops_quality_regression_alerts_total` (counter): +1 on each
//!   crossing below the threshold, see [`super::window`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;

use super::Probe;
use super::window::QualityWindow;

/// The daemon's metrics, bound to one probe's labels.
#[derive(Clone)]
pub struct ProbeMetrics {
    registry: Registry,
    labels: [String; 3],
    score: GaugeVec,
    last_score: GaugeVec,
    latency: Histogram,
    failures: IntCounter,
    runs: IntCounter,
    alerts: IntCounter,
}

impl std::fmt::Debug for ProbeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeMetrics").finish_non_exhaustive()
    }
}

const LABELS: [&str; 3] = ["model", "variant", "environment"];

impl ProbeMetrics {
    /// Registers the metrics for these label values. The two score gauges
    /// have no series until the first run, so "no data" never reads as a
    /// score of 0.
    pub fn new(labels: [&str; 3], threshold: f64) -> Result<ProbeMetrics, prometheus::Error> {
        let registry = Registry::new();
        let gauge_vec = |name: &str, help: &str| -> Result<GaugeVec, prometheus::Error> {
            let v = GaugeVec::new(Opts::new(name, help), &LABELS)?;
            registry.register(Box::new(v.clone()))?;
            Ok(v)
        };
        let gauge = |name: &str, help: &str| -> Result<Gauge, prometheus::Error> {
            Ok(gauge_vec(name, help)?.with_label_values(&labels))
        };
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let v = IntCounterVec::new(Opts::new(name, help), &LABELS)?;
            registry.register(Box::new(v.clone()))?;
            Ok(v.with_label_values(&labels))
        };
        let score = gauge_vec(
            "quantops_quality_score",
            "Mean probe score over the rolling window of the last runs.",
        )?;
        let last_score = gauge_vec(
            "quantops_quality_last_score",
            "Score of the last probe run (passed / total).",
        )?;
        let threshold_gauge = gauge(
            "quantops_quality_threshold",
            "Window score below which a regression alert fires.",
        )?;
        threshold_gauge.set(threshold);
        let failures = counter(
            "quantops_quality_probe_failures_total",
            "Probe requests that got no answer.",
        )?;
        let runs = counter("quantops_quality_probe_runs_total", "Probe runs.")?;
        let alerts = counter(
            "quantops_quality_regression_alerts_total",
            "Times the window score fell below the threshold.",
        )?;
        let latency_vec = HistogramVec::new(
            HistogramOpts::new(
                "quantops_quality_probe_latency_seconds",
                "Latency of the answered probe requests.",
            )
            .buckets(vec![
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
            ]),
            &LABELS,
        )?;
        registry.register(Box::new(latency_vec.clone()))?;
        Ok(ProbeMetrics {
            registry,
            labels: labels.map(str::to_string),
            score,
            last_score,
            latency: latency_vec.with_label_values(&labels),
            failures,
            runs,
            alerts,
        })
    }

    fn set_scores(&self, window: f64, last: f64) {
        let labels = [
            self.labels[0].as_str(),
            self.labels[1].as_str(),
            self.labels[2].as_str(),
        ];
        self.score.with_label_values(&labels).set(window);
        self.last_score.with_label_values(&labels).set(last);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Between the starts of two runs.
    pub interval: Duration,
    /// Runs in the rolling window.
    pub window: usize,
    /// Window score below which an alert fires.
    pub threshold: f64,
}

/// Probes forever (until `shutdown`), serving `/metrics` and `/health` on
/// `listener`. A run that cannot happen (a bad suite) is logged and
/// retried at the next interval; it does not stop the daemon.
pub async fn run(
    probe: Probe,
    options: DaemonOptions,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), std::io::Error> {
    let labels = [
        probe.model.as_str(),
        probe.variant.as_deref().unwrap_or(""),
        probe.environment.as_deref().unwrap_or(""),
    ];
    let metrics =
        Arc::new(ProbeMetrics::new(labels, options.threshold).map_err(std::io::Error::other)?);
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/health", get(|| async { StatusCode::OK }))
        .with_state(Arc::clone(&metrics));
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(
        ?addr,
        interval_s = options.interval.as_secs_f64(),
        window = options.window,
        threshold = options.threshold,
        "probe daemon started"
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                // A dropped sender stops the server as well.
                let _ = stop_rx.await;
            })
            .await
    });
    let probing = async {
        let mut window = QualityWindow::new(options.window, options.threshold);
        let mut ticks = tokio::time::interval(options.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            run_and_record(&probe, &mut window, &metrics).await;
        }
    };
    tokio::select! {
        () = probing => {},
        () = shutdown => {},
    }
    // The server may have stopped on its own already; then nobody listens.
    let _ = stop_tx.send(());
    match server.await {
        Ok(result) => result,
        Err(e) => Err(std::io::Error::other(e)),
    }
}

async fn run_and_record(probe: &Probe, window: &mut QualityWindow, metrics: &ProbeMetrics) {
    match probe.run_once().await {
        Ok(result) => {
            let s = &result.summary;
            let o = window.push(s.score);
            metrics.set_scores(o.window_score, o.last_score);
            metrics.failures.inc_by(u64::from(s.failures));
            for t in result.tests.iter().filter(|t| t.error.is_none()) {
                metrics.latency.observe(t.latency_seconds);
            }
            if o.alert {
                metrics.alerts.inc();
                tracing::warn!(
                    window_score = o.window_score,
                    threshold = window.threshold(),
                    "quality regression: the window score fell below the threshold"
                );
            }
            // Counted last, so a scrape that sees N runs sees all of their effects.
            metrics.runs.inc();
            tracing::info!(
                score = s.score,
                passed = s.passed,
                total = s.total,
                failures = s.failures,
                window_score = o.window_score,
                "probe run"
            );
        }
        Err(error) => tracing::error!(%error, "probe run could not happen"),
    }
}

async fn render(State(metrics): State<Arc<ProbeMetrics>>) -> Response {
    match metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
