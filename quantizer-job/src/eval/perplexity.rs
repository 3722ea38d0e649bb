//! Token-level perplexity over fixed, non-overlapping windows — defined
//! once here so baseline and quantized models are measured identically.
//!
//! The eval text is tokenized as one string without special tokens and cut
//! into consecutive windows of `window_tokens` ids from the start (a partial
//! tail is dropped). Each window predicts `window_tokens - 1` tokens;
//! perplexity = exp(sum NLL / predictions). No BOS is prepended: with the
//! whole file tokenized as one string and no BOS, the bundled model measures
//! 29.0037 over all 241 windows of 512 tokens of `eval.txt`, the reference
//! PyTorch fp32 figure (29.004).

use std::path::Path;
use std::time::Instant;

use candle_core::{D, Tensor};
use serde::{Deserialize, Serialize};

use super::{EvalError, read_text};
use crate::model::{LlamaModel, log_softmax_last};
use crate::tokenizer::Tokenizer;

/// Windows run through the model per forward pass; bounds memory (logits
/// are `batch * window * vocab` f32) while keeping matmuls large.
pub const DEFAULT_BATCH_WINDOWS: usize = 4;

/// Perplexity figures for the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerplexityResult {
    /// exp(mean NLL).
    pub perplexity: f64,
    /// Mean negative log-likelihood per predicted token (nats).
    pub mean_nll: f64,
    /// Windows evaluated.
    pub windows: usize,
    /// Tokens per window.
    pub window_tokens: usize,
    /// Predicted tokens (`windows * (window_tokens - 1)`).
    pub predicted_tokens: usize,
    /// Tokens in the whole tokenized text.
    pub text_tokens: usize,
    /// Wall time of the forward passes.
    pub seconds: f64,
    /// Window tokens processed per second.
    pub tokens_per_second: f64,
}

/// Tokenizes `path` and measures perplexity (see [`perplexity_of_tokens`]).
pub fn perplexity_of_file(
    model: &LlamaModel,
    tokenizer: &Tokenizer,
    path: &Path,
    window_tokens: usize,
    max_windows: usize,
) -> Result<PerplexityResult, EvalError> {
    let tokens = tokenizer.encode(&read_text(path)?)?;
    perplexity_of_tokens(model, &tokens, window_tokens, max_windows)
}

/// Perplexity over the first `max_windows` non-overlapping windows of
/// `window_tokens` ids of `tokens`.
pub fn perplexity_of_tokens(
    model: &LlamaModel,
    tokens: &[u32],
    window_tokens: usize,
    max_windows: usize,
) -> Result<PerplexityResult, EvalError> {
    windowed_perplexity(
        tokens,
        window_tokens,
        max_windows,
        DEFAULT_BATCH_WINDOWS,
        |batch| batch_nll(model, batch),
    )
}

/// The one definition of perplexity every backend uses: the first
/// `max_windows` non-overlapping windows of `window_tokens` ids, `exp` of
/// the mean NLL over the `window_tokens − 1` predictions of each window.
/// `batch_nll` sums the NLL of a batch of at most `per_batch` windows; how
/// windows are batched does not change the sum.
pub fn windowed_perplexity<E: From<EvalError>>(
    tokens: &[u32],
    window_tokens: usize,
    max_windows: usize,
    per_batch: usize,
    mut batch_nll: impl FnMut(&[Vec<u32>]) -> Result<f64, E>,
) -> Result<PerplexityResult, E> {
    if window_tokens < 2 {
        return Err(EvalError::Insufficient(format!(
            "window_tokens must be at least 2, got {window_tokens}"
        ))
        .into());
    }
    let windows = (tokens.len() / window_tokens).min(max_windows);
    if windows == 0 {
        return Err(EvalError::Insufficient(format!(
            "the text has {} tokens, fewer than one window of {window_tokens}",
            tokens.len()
        ))
        .into());
    }
    let start = Instant::now();
    let mut total_nll = 0.0f64;
    let all: Vec<Vec<u32>> = tokens
        .chunks_exact(window_tokens)
        .take(windows)
        .map(<[u32]>::to_vec)
        .collect();
    for batch in all.chunks(per_batch.max(1)) {
        total_nll += batch_nll(batch)?;
        tracing::debug!(windows = batch.len(), "perplexity batch done");
    }
    let seconds = start.elapsed().as_secs_f64();
    let predicted_tokens = windows * (window_tokens - 1);
    let mean_nll = total_nll / predicted_tokens as f64;
    let result = PerplexityResult {
        perplexity: mean_nll.exp(),
        mean_nll,
        windows,
        window_tokens,
        predicted_tokens,
        text_tokens: tokens.len(),
        seconds,
        tokens_per_second: (windows * window_tokens) as f64 / seconds.max(1e-9),
    };
    tracing::info!(
        perplexity = result.perplexity,
        windows,
        seconds,
        "perplexity measured"
    );
    Ok(result)
}

/// Summed NLL of every next-token prediction in equal-length `windows`.
fn batch_nll(model: &LlamaModel, windows: &[Vec<u32>]) -> Result<f64, EvalError> {
    let t = windows[0].len();
    let input = model.token_tensor(windows)?;
    let logits = model.forward(&input)?.narrow(1, 0, t - 1)?;
    let targets = input
        .narrow(1, 1, t - 1)?
        .contiguous()?
        .unsqueeze(D::Minus1)?;
    let logp = log_softmax_last(&logits)?.gather(&targets, D::Minus1)?;
    let sum = logp
        .to_dtype(candle_core::DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?;
    Ok(-sum)
}

/// Summed log-probability of `continuation` given `context` (one forward
/// pass); shared by the multiple-choice task scorer.
pub fn continuation_logprob(
    model: &LlamaModel,
    context: &[u32],
    continuation: &[u32],
) -> Result<f64, EvalError> {
    if context.is_empty() || continuation.is_empty() {
        return Err(EvalError::Insufficient(
            "context and continuation must both be non-empty".into(),
        ));
    }
    let seq: Vec<u32> = context.iter().chain(continuation).copied().collect();
    let input = model.token_tensor(&[seq])?;
    let n = continuation.len();
    let logits = model.forward(&input)?.narrow(1, context.len() - 1, n)?;
    let targets = Tensor::new(continuation, input.device())?.reshape((1, n, 1))?;
    let logp = log_softmax_last(&logits)?.gather(&targets, D::Minus1)?;
    Ok(logp
        .to_dtype(candle_core::DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?)
}
