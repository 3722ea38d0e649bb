//! The quantops worker: the stages the operator's Jobs run. The model side
//! (checkpoint, tokenizer, a layer-by-layer Llama forward on candle,
//! calibration, evaluation), the algorithms (`quant`) and the checkpoint
//! format (`format`) meet in `sequential` and `stages`; the algorithms work on
//! plain matrices so that a GPU backend plugs into the same pipeline.

pub mod artifact;
pub mod calibration;
pub mod card;
pub mod checkpoint;
pub mod config;
pub mod content_free;
pub mod eval;
pub mod family;
pub mod format;
pub mod gates;
pub mod gpu;
pub mod layout;
pub mod llama_layers;
pub mod loadtest;
pub mod model;
pub mod openai;
pub mod probe;
pub mod progress;
pub mod quant;
pub mod report_sections;
pub mod rope;
pub mod sequential;
pub mod serve;
pub mod stages;
pub mod termination;
pub mod tokenizer;

pub use checkpoint::{Checkpoint, CheckpointError, CheckpointInfo};
pub use config::{Architecture, ConfigError, LlamaConfig};
pub use model::{LinearId, LinearKind, LlamaModel, ModelError};
pub use tokenizer::{ChatMessage, Tokenizer, TokenizerError};
