//! Output consistency: greedy generations of the quantized model against
//! the baseline's. The baseline's generations are computed once (before
//! quantization), saved as JSON and compared later.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{EvalError, Greedy, read_jsonl};
use crate::model::LlamaModel;
use crate::tokenizer::Tokenizer;

#[derive(Deserialize)]
struct PromptRecord {
    prompt: String,
}

/// Reads up to `max_prompts` prompts from a JSONL file of `{"prompt": …}`
/// records (extra fields such as `answer` are ignored).
pub fn load_prompts(path: &Path, max_prompts: usize) -> Result<Vec<String>, EvalError> {
    let records: Vec<PromptRecord> = read_jsonl(path)?;
    if records.is_empty() {
        return Err(EvalError::Insufficient(format!(
            "prompt file {} holds no prompts",
            path.display()
        )));
    }
    Ok(records
        .into_iter()
        .take(max_prompts)
        .map(|r| r.prompt)
        .collect())
}

/// Greedy generations of one model for a prompt set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generations {
    /// Most tokens generated per prompt.
    pub max_new_tokens: usize,
    /// The prompts, in order.
    pub prompts: Vec<String>,
    /// Generated token ids per prompt (stopping after EOS, which is kept).
    pub outputs: Vec<Vec<u32>>,
}

/// Agreement between baseline and candidate generations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsistencyResult {
    /// Prompts compared.
    pub prompts: usize,
    /// Prompts whose generations are identical.
    pub matched: usize,
    /// `matched / prompts`.
    pub match_rate: f64,
    /// Share of aligned positions holding the same token, over the longer
    /// of the two generations per prompt.
    pub token_agreement: f64,
}

/// Greedily decodes every prompt (encoded without added specials).
pub fn generate(
    model: &LlamaModel,
    tokenizer: &Tokenizer,
    prompts: &[String],
    max_new_tokens: usize,
    eos: Option<u32>,
) -> Result<Generations, EvalError> {
    generate_with(
        &mut |ids, max_new_tokens, eos| Ok(model.generate_greedy(ids, max_new_tokens, eos)?),
        tokenizer,
        prompts,
        max_new_tokens,
        eos,
    )
}

/// [`generate`] with any greedy decoder (the GPU model's, say): the prompts'
/// encoding and the record stay the same whatever decodes.
pub fn generate_with<E: From<EvalError>>(
    decode: Greedy<'_, E>,
    tokenizer: &Tokenizer,
    prompts: &[String],
    max_new_tokens: usize,
    eos: Option<u32>,
) -> Result<Generations, E> {
    let outputs = prompts
        .iter()
        .map(|p| {
            let ids = tokenizer.encode(p).map_err(EvalError::from)?;
            decode(&ids, max_new_tokens, eos)
        })
        .collect::<Result<Vec<_>, E>>()?;
    Ok(Generations {
        max_new_tokens,
        prompts: prompts.to_vec(),
        outputs,
    })
}

/// Compares candidate generations with the baseline's; both must cover the
/// same prompts with the same token budget.
pub fn compare(
    baseline: &Generations,
    candidate: &Generations,
) -> Result<ConsistencyResult, EvalError> {
    if baseline.prompts != candidate.prompts {
        return Err(EvalError::Mismatch(format!(
            "baseline has {} prompts, candidate {} (or they differ)",
            baseline.prompts.len(),
            candidate.prompts.len()
        )));
    }
    if baseline.max_new_tokens != candidate.max_new_tokens {
        return Err(EvalError::Mismatch(format!(
            "baseline generated up to {} tokens, candidate up to {}",
            baseline.max_new_tokens, candidate.max_new_tokens
        )));
    }
    let (mut matched, mut same, mut positions) = (0usize, 0usize, 0usize);
    for (a, b) in baseline.outputs.iter().zip(&candidate.outputs) {
        matched += usize::from(a == b);
        same += a.iter().zip(b).filter(|(x, y)| x == y).count();
        positions += a.len().max(b.len());
    }
    let prompts = baseline.prompts.len();
    Ok(ConsistencyResult {
        prompts,
        matched,
        match_rate: matched as f64 / prompts.max(1) as f64,
        token_agreement: if positions == 0 {
            1.0
        } else {
            same as f64 / positions as f64
        },
    })
}
