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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok(response)
    }

    #[tokio::test]
    async fn probes_and_metrics_answer() -> Result<(), Box<dyn std::error::Error>> {
        let state = ServerState {
            metrics: Metrics::new()?,
            ready: Arc::new(AtomicBool::new(false)),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let ready = state.ready.clone();
        let metrics = state.metrics.clone();
        let server = tokio::spawn(async move { axum::serve(listener, router(state)).await });

        assert!(get(addr, "/healthz").await?.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await?.starts_with("HTTP/1.1 503"));
        ready.store(true, Ordering::Relaxed);
        assert!(get(addr, "/readyz").await?.starts_with("HTTP/1.1 200"));
        metrics.leader.set(1);
        let body = get(addr, "/metrics").await?;
        assert!(body.contains("quantops_leader 1"), "{body}");
        server.abort();
        Ok(())
    }
}
