//! The small HTTP server every replica runs, leader or not: `/metrics` for
//! Prometheus, `/healthz` (the process is alive) and `/readyz` (it finished
//! starting and can reach the API server).

use crate::metrics::Metrics;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Shared state of the probes.
#[derive(Clone)]
pub struct ServerState {
    pub metrics: Metrics,
    /// Set once the operator has started (client built, elector running).
    pub ready: Arc<AtomicBool>,
}

async fn metrics(State(state): State<ServerState>) -> (StatusCode, String) {
    match state.metrics.render() {
        Ok(text) => (StatusCode::OK, text),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode metrics: {error}"),
        ),
    }
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<ServerState>) -> (StatusCode, &'static str) {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

/// The routes, separate from binding so tests can call them directly.
pub fn router(state: ServerState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Serves the routes on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, state: ServerState) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, router(state)).await
}
