//! Errors of checkpoint writing and reading, naming the file, tensor and field.

use std::path::PathBuf;

use thiserror::Error;

/// Why a checkpoint could not be written or read.
#[derive(Debug, Error)]
pub enum FormatError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid safetensors: {source}")]
    SafeTensors {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: field {field}: expected {expected}")]
    Config {
        path: PathBuf,
        field: String,
        expected: String,
    },
    #[error("tensor {name}: missing (needed by {needed_by})")]
    MissingTensor { name: String, needed_by: String },
    #[error("tensor {name}: dtype {got}, expected {expected}")]
    Dtype {
        name: String,
        expected: String,
        got: String,
    },
    #[error("tensor {name}: shape {got:?}, expected {expected}")]
    Shape {
        name: String,
        expected: String,
        got: Vec<usize>,
    },
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl FormatError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| FormatError::Io { path, source }
    }
}
