//! `quantizer-job serve`: an OpenAI-compatible server (the subset vLLM
//! serves: completions, chat completions, models, health, vLLM's metrics) for
//! an FP16 Hugging Face checkpoint or a compressed-tensors artifact written by
//! `quantize`, on the CPU model. It exists so that the quality probe, the
//! load generator and the serving manifests can be exercised end to end
//! without a GPU or vLLM; what it answers is what validation measured
//! (temperature 0 is exactly `generate_greedy`).
//!
//! `routes` parses and validates, `engine` generates on its own threads,
//! `text` turns ids into streamed text, `sse` writes chunks, `metrics`
//! counts.

pub mod engine;
pub mod metrics;
pub mod routes;
pub mod sse;
pub mod text;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::config::{ConfigError, LlamaConfig};
use crate::format::{FormatError, read_checkpoint};
use crate::model::{LlamaModel, ModelError};
use crate::tokenizer::{END_TOKEN, Tokenizer, TokenizerError};

pub use engine::Engine;
pub use metrics::ServeMetrics;

/// Why the server could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// config.json is missing or malformed.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The FP16 checkpoint could not be read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The compressed-tensors artifact could not be read.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The weights do not make a model.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The tokenizer could not be loaded.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// A weight could not become a tensor.
    #[error("tensor {name}: {source}")]
    Tensor {
        /// The tensor.
        name: String,
        /// candle's error.
        source: candle_core::Error,
    },
    /// The metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// Binding, serving or starting a thread failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The server task ended abnormally.
    #[error("the server task failed: {0}")]
    Task(String),
}

/// A model ready to serve: weights, tokenizer, end-of-sequence token.
#[derive(Debug)]
pub struct LoadedModel {
    /// The model (dequantized weights for a quantized artifact).
    pub model: LlamaModel,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Where generation stops: the config's `eos_token_id`, else `<|end|>`.
    pub eos: Option<u32>,
    /// Whether the weights came from a compressed-tensors artifact.
    pub quantized: bool,
}

impl LoadedModel {
    /// Loads `dir`: a compressed-tensors artifact (config.json with
    /// `quantization_config`) through the artifact reader the validate
    /// stage uses, otherwise a plain Hugging Face checkpoint.
    pub fn load(dir: &Path) -> Result<LoadedModel, ServeError> {
        let config_path = dir.join("config.json");
        let config = LlamaConfig::from_file(&config_path)?;
        let quantized = has_quantization_config(&config_path);
        let model = if quantized {
            let loaded = read_checkpoint(dir)?;
            let mut tensors = HashMap::with_capacity(loaded.tensors.len());
            for (name, dense) in loaded.tensors {
                let t = Tensor::from_vec(dense.data, dense.shape.as_slice(), &Device::Cpu)
                    .map_err(|source| ServeError::Tensor {
                        name: name.clone(),
                        source,
                    })?;
                tensors.insert(name, t);
            }
            LlamaModel::from_tensors(config.clone(), tensors)?
        } else {
            LlamaModel::from_checkpoint(&Checkpoint::open(dir)?)?
        };
        let tokenizer = Tokenizer::from_dir(dir)?;
        let eos = config
            .eos_token_id
            .or_else(|| tokenizer.token_id(END_TOKEN));
        Ok(LoadedModel {
            model,
            tokenizer,
            eos,
            quantized,
        })
    }

    /// The context length (prompt plus output), `max_position_embeddings`.
    pub fn context_len(&self) -> usize {
        self.model.config().max_position_embeddings
    }
}

/// Whether config.json declares a `quantization_config` (an unreadable file
/// counts as no: `LlamaConfig::from_file` has already reported it).
fn has_quantization_config(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .is_some_and(|v| v.get("quantization_config").is_some())
}

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The name clients use; the model directory's name by default.
    pub served_model_name: String,
    /// Where to listen (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Most requests admitted at once (waiting plus running); more get 429.
    pub max_queue: usize,
    /// Engine threads decoding in parallel (each one request at a time).
    pub engine_threads: usize,
}

/// The served-model name a directory gets by default: its last component.
pub fn default_model_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "model".to_string())
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
    state: Arc<routes::AppState>,
}

impl Server {
    /// Binds and starts serving `model` on the current tokio runtime.
    pub async fn start(
        model: Arc<LoadedModel>,
        options: &ServeOptions,
    ) -> Result<Server, ServeError> {
        let metrics = ServeMetrics::new(&options.served_model_name)?;
        let engine = Engine::start(
            Arc::clone(&model),
            metrics.clone(),
            options.max_queue,
            options.engine_threads,
        )
        .map_err(|source| ServeError::Io {
            what: "cannot start the engine threads".into(),
            source,
        })?;
        let state = Arc::new(routes::AppState {
            model_name: options.served_model_name.clone(),
            model,
            engine,
            metrics,
            created: routes::unix_now(),
        });
        let listener = tokio::net::TcpListener::bind(options.listen)
            .await
            .map_err(|source| ServeError::Io {
                what: format!("cannot listen on {}", options.listen),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ServeError::Io {
            what: "cannot read the listening address".into(),
            source,
        })?;
        let (stop, stopped) = oneshot::channel::<()>();
        let app = routes::router(Arc::clone(&state));
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    // A dropped sender stops the server as well.
                    let _ = stopped.await;
                })
                .await
        });
        tracing::info!(%addr, model = %options.served_model_name, max_queue = options.max_queue, "serving");
        Ok(Server {
            addr,
            stop: Some(stop),
            task,
            state,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its base URL, `http://{addr}`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its metrics (the same registry `/metrics` renders).
    pub fn metrics(&self) -> &ServeMetrics {
        &self.state.metrics
    }

    /// Stops accepting connections, lets in-flight requests finish, and
    /// waits for the server task.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        if let Some(stop) = self.stop.take() {
            // The task may have ended already; then there is nobody to tell.
            let _ = stop.send(());
        }
        match (&mut self.task).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(ServeError::Io {
                what: "serving failed".into(),
                source,
            }),
            Err(e) => Err(ServeError::Task(e.to_string())),
        }
    }
}

/// What `quantizer-job serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The checkpoint or artifact directory.
    pub model_dir: PathBuf,
    /// How to serve it.
    pub options: ServeOptions,
}

/// Loads the model, serves until `shutdown` resolves, then drains.
pub async fn run(
    config: ServeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    let dir = config.model_dir.clone();
    let started = std::time::Instant::now();
    let model = tokio::task::spawn_blocking(move || LoadedModel::load(&dir))
        .await
        .map_err(|e| ServeError::Task(e.to_string()))??;
    tracing::info!(
        dir = %config.model_dir.display(),
        quantized = model.quantized,
        load_s = started.elapsed().as_secs_f64(),
        "model loaded"
    );
    let server = Server::start(Arc::new(model), &config.options).await?;
    shutdown.await;
    tracing::info!("shutting down; finishing in-flight requests");
    server.shutdown().await
}
