//! The model side of the quantops worker's CPU path: checkpoint loading, the
//! tokenizer, a layer-by-layer Llama forward pass on candle, calibration
//! sampling and evaluation.

pub mod calibration;
pub mod checkpoint;
pub mod config;
pub mod eval;
pub mod model;
pub mod tokenizer;

pub use checkpoint::{Checkpoint, CheckpointError, CheckpointInfo};
pub use config::{Architecture, ConfigError, LlamaConfig};
pub use model::{LinearId, LinearKind, LlamaModel, ModelError};
pub use tokenizer::{ChatMessage, Tokenizer, TokenizerError};
