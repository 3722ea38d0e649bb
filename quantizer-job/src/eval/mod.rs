//! Evaluation checks, one per file. Each returns a serde-serialisable result
//! for the report; none prints.

pub mod consistency;
pub mod perplexity;
pub mod system_tests;
pub mod tasks;

use std::path::{Path, PathBuf};

use crate::model::ModelError;

/// A greedy decoder: prompt ids, most new tokens and EOS to the generated
/// ids, with the rules of [`crate::model::LlamaModel::generate_greedy`]. The
/// checks that generate take one, so the CPU and the GPU model run them alike.
pub type Greedy<'g, E> = &'g mut dyn FnMut(&[u32], usize, Option<u32>) -> Result<Vec<u32>, E>;
use crate::tokenizer::TokenizerError;

/// Why an evaluation could not run.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// An input file could not be read.
    #[error("cannot read evaluation input {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An input file is malformed; `reason` never quotes the file
    /// ([`crate::content_free`]).
    #[error("invalid evaluation input {path}{}: {reason}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line, for line-oriented formats.
        line: Option<usize>,
        /// What is wrong.
        reason: String,
    },
    /// A system test is malformed (no or several expectations, bad regex).
    #[error("invalid system test {name:?}: {reason}")]
    InvalidSystemTest {
        /// The test's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The input does not hold enough data for the check.
    #[error("not enough evaluation data: {0}")]
    Insufficient(String),
    /// Two generation sets cannot be compared.
    #[error("generation sets do not match: {0}")]
    Mismatch(String),
    /// Running the model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Tokenizing failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

pub(crate) fn read_text(path: &Path) -> Result<String, EvalError> {
    std::fs::read_to_string(path).map_err(|source| EvalError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Parses a JSON-lines file into records, skipping blank lines.
pub(crate) fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>, EvalError> {
    read_text(path)?
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| EvalError::Parse {
                path: path.to_path_buf(),
                line: Some(i + 1),
                reason: crate::content_free::json(&e),
            })
        })
        .collect()
}
