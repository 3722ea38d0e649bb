//! Checkpoint formats: the compressed-tensors writer and reader, and the int32
//! bit packing they share.

pub mod compressed_tensors;
mod error;
pub mod fused;
pub mod pack;
pub mod reader;
mod tensors;

pub use compressed_tensors::{
    CheckpointOptions, WrittenCheckpoint, quantization_config, write_checkpoint, write_model_config,
};
pub use error::FormatError;
pub use reader::{LoadedCheckpoint, read_checkpoint};
pub use tensors::{DenseInput, DenseTensor};
