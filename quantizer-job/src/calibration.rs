//! Drawing calibration samples: `N` windows of `L` tokens from a text file,
//! chosen by a seeded RNG so a run is reproducible, never overlapping and
//! never padded (padding would calibrate the quantizer on fake tokens).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use crate::tokenizer::{Tokenizer, TokenizerError};

/// Below this share of distinct tokens the samples are suspiciously
/// repetitive and a warning is logged.
pub const LOW_DIVERSITY_RATIO: f64 = 0.05;

/// Why calibration samples could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    /// The text file could not be read.
    #[error("cannot read calibration text {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A `.json` token file is not `{"input_ids": [[id, ...], ...]}`;
    /// `reason` never quotes the file.
    #[error("calibration token file {path} is not {{\"input_ids\": [[id, ...], ...]}}: {reason}")]
    InvalidTokenFile {
        /// The file.
        path: PathBuf,
        /// What is wrong, without the file's text.
        reason: String,
    },
    /// Tokenizing failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// Samples or sequence length of zero.
    #[error("invalid calibration request: {0}")]
    InvalidRequest(String),
    /// The text is too short for the request.
    #[error(
        "calibration text {path} is too short: asked for {samples} samples of {sequence_length} tokens ({requested} tokens), but it has {available_tokens} tokens, enough for {available_windows} non-overlapping windows"
    )]
    Shortfall {
        /// The text file.
        path: PathBuf,
        /// Samples asked for.
        samples: usize,
        /// Tokens per sample asked for.
        sequence_length: usize,
        /// `samples * sequence_length`.
        requested: usize,
        /// Tokens in the text.
        available_tokens: usize,
        /// Non-overlapping windows the text holds.
        available_windows: usize,
    },
    /// A token id outside the model's vocabulary.
    #[error("calibration sample {sample} holds token id {id}, outside the vocabulary of {vocab}")]
    OutOfVocabulary {
        /// Index of the sample.
        sample: usize,
        /// The id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// A sample of the wrong length.
    #[error("calibration sample {sample} has {found} tokens, expected {expected}")]
    BadLength {
        /// Index of the sample.
        sample: usize,
        /// Expected length.
        expected: usize,
        /// Found length.
        found: usize,
    },
}

/// Figures about the drawn samples, for the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationStats {
    /// Source text file.
    pub path: String,
    /// Number of samples.
    pub samples: usize,
    /// Tokens per sample.
    pub sequence_length: usize,
    /// Seed of the window choice.
    pub seed: u64,
    /// Tokens in the source text.
    pub text_tokens: usize,
    /// Distinct token ids over all samples.
    pub unique_tokens: usize,
    /// `unique_tokens / (samples * sequence_length)`.
    pub unique_token_ratio: f64,
    /// Start offset (in tokens) of each sample in the tokenized text.
    pub offsets: Vec<usize>,
}

/// Calibration samples and their figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationSet {
    /// `samples` sequences of exactly `sequence_length` token ids.
    pub samples: Vec<Vec<u32>>,
    /// Figures for the report.
    pub stats: CalibrationStats,
}

/// Token ids written out by another tool: `{"input_ids": [[id, ...], ...]}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct TokenFile {
    pub input_ids: Vec<Vec<u32>>,
}

/// The calibration set of `path`: a JSON token file (`.json`, see
/// [`TokenFile`]) is used as given — the first `samples` rows cut to
/// `sequence_length`, checked against the model's vocabulary — so that two
/// tools can be compared on identical inputs; any other file is text that is
/// tokenized and sampled (see [`sample_from_file`]).
pub fn load(
    path: &Path,
    tokenizer: &Tokenizer,
    model_vocab: usize,
    samples: usize,
    sequence_length: usize,
    seed: u64,
) -> Result<CalibrationSet, CalibrationError> {
    if path.extension().is_none_or(|e| e != "json") {
        return sample_from_file(path, tokenizer, samples, sequence_length, seed);
    }
    let read = |source| CalibrationError::Read {
        path: path.to_path_buf(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(read)?;
    let file: TokenFile =
        serde_json::from_str(&text).map_err(|e| CalibrationError::InvalidTokenFile {
            path: path.to_path_buf(),
            reason: crate::content_free::json(&e),
        })?;
    let usable = file
        .input_ids
        .iter()
        .filter(|row| row.len() >= sequence_length)
        .count();
    if samples == 0 || sequence_length == 0 || usable < samples {
        return Err(CalibrationError::Shortfall {
            path: path.to_path_buf(),
            samples,
            sequence_length,
            requested: samples * sequence_length,
            available_tokens: file.input_ids.iter().map(Vec::len).sum(),
            available_windows: usable,
        });
    }
    let drawn: Vec<Vec<u32>> = file
        .input_ids
        .into_iter()
        .filter(|row| row.len() >= sequence_length)
        .take(samples)
        .map(|mut row| {
            row.truncate(sequence_length);
            row
        })
        .collect();
    validate(&drawn, sequence_length, model_vocab)?;
    let total = drawn.len() * sequence_length;
    Ok(CalibrationSet {
        stats: stats_for(&drawn, path, sequence_length, seed, total, Vec::new()),
        samples: drawn,
    })
}

/// Tokenizes `path` and draws samples from it (see [`draw_samples`]).
pub fn sample_from_file(
    path: &Path,
    tokenizer: &Tokenizer,
    samples: usize,
    sequence_length: usize,
    seed: u64,
) -> Result<CalibrationSet, CalibrationError> {
    let text = std::fs::read_to_string(path).map_err(|source| CalibrationError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let tokens = tokenizer.encode(&text)?;
    draw_samples(
        &tokens,
        path,
        tokenizer.vocab_size(),
        samples,
        sequence_length,
        seed,
    )
}

/// Draws `samples` non-overlapping windows of `sequence_length` tokens from
/// `tokens`: the text is cut into consecutive windows starting at a random
/// offset, and `samples` of them are chosen at random without replacement.
/// `path` only names the source in errors and stats.
pub fn draw_samples(
    tokens: &[u32],
    path: &Path,
    vocab_size: usize,
    samples: usize,
    sequence_length: usize,
    seed: u64,
) -> Result<CalibrationSet, CalibrationError> {
    if samples == 0 || sequence_length == 0 {
        return Err(CalibrationError::InvalidRequest(format!(
            "samples ({samples}) and sequence length ({sequence_length}) must be positive"
        )));
    }
    let available_windows = tokens.len() / sequence_length;
    if available_windows < samples {
        return Err(CalibrationError::Shortfall {
            path: path.to_path_buf(),
            samples,
            sequence_length,
            requested: samples * sequence_length,
            available_tokens: tokens.len(),
            available_windows,
        });
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let slack = tokens.len() - available_windows * sequence_length;
    let start = rand::Rng::random_range(&mut rng, 0..=slack);
    let mut chosen = rand::seq::index::sample(&mut rng, available_windows, samples).into_vec();
    chosen.sort_unstable();
    let offsets: Vec<usize> = chosen.iter().map(|w| start + w * sequence_length).collect();
    let drawn: Vec<Vec<u32>> = offsets
        .iter()
        .map(|&o| tokens[o..o + sequence_length].to_vec())
        .collect();
    let set = CalibrationSet {
        stats: stats_for(&drawn, path, sequence_length, seed, tokens.len(), offsets),
        samples: drawn,
    };
    validate(&set.samples, sequence_length, vocab_size)?;
    if set.stats.unique_token_ratio < LOW_DIVERSITY_RATIO {
        tracing::warn!(
            ratio = set.stats.unique_token_ratio,
            unique = set.stats.unique_tokens,
            "calibration samples have low token diversity"
        );
    }
    tracing::info!(
        samples,
        sequence_length,
        seed,
        unique_ratio = set.stats.unique_token_ratio,
        "drew calibration samples"
    );
    Ok(set)
}

/// Checks every sample has `sequence_length` ids, all inside the vocabulary.
pub fn validate(
    samples: &[Vec<u32>],
    sequence_length: usize,
    vocab_size: usize,
) -> Result<(), CalibrationError> {
    for (i, s) in samples.iter().enumerate() {
        if s.len() != sequence_length {
            return Err(CalibrationError::BadLength {
                sample: i,
                expected: sequence_length,
                found: s.len(),
            });
        }
        if let Some(&id) = s.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(CalibrationError::OutOfVocabulary {
                sample: i,
                id,
                vocab: vocab_size,
            });
        }
    }
    Ok(())
}

fn stats_for(
    samples: &[Vec<u32>],
    path: &Path,
    sequence_length: usize,
    seed: u64,
    text_tokens: usize,
    offsets: Vec<usize>,
) -> CalibrationStats {
    let unique: HashSet<u32> = samples.iter().flatten().copied().collect();
    let total = samples.len() * sequence_length;
    CalibrationStats {
        path: path.display().to_string(),
        samples: samples.len(),
        sequence_length,
        seed,
        text_tokens,
        unique_tokens: unique.len(),
        unique_token_ratio: unique.len() as f64 / total.max(1) as f64,
        offsets,
    }
}
