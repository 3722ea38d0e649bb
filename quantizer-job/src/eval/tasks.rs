//! Multiple-choice task sets: each item is scored by the log-likelihood of
//! every choice given the prompt; the model "answers" with the most likely
//! choice. Both raw (summed log-likelihood) and length-normalised accuracy
//! (log-likelihood per byte of the choice, as lm-evaluation-harness's
//! `acc_norm`) are reported.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::perplexity::continuation_logprob;
use super::{EvalError, read_jsonl};
use crate::model::LlamaModel;
use crate::tokenizer::Tokenizer;

/// One multiple-choice item, a line of the task file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChoiceTask {
    /// The context, already in the model's prompt format.
    pub prompt: String,
    /// Candidate continuations.
    pub choices: Vec<String>,
    /// Index of the correct choice.
    pub answer: usize,
}

/// Accuracy on one task set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSetResult {
    /// The task set's name.
    pub name: String,
    /// Items scored.
    pub tasks: usize,
    /// Items whose highest summed log-likelihood is the answer.
    pub correct: usize,
    /// `correct / tasks`.
    pub accuracy: f64,
    /// Items whose highest per-byte log-likelihood is the answer.
    pub correct_norm: usize,
    /// `correct_norm / tasks`.
    pub accuracy_norm: f64,
}

/// Reads a JSONL task file, checking every item has choices and a valid
/// answer index.
pub fn load_tasks(path: &Path) -> Result<Vec<ChoiceTask>, EvalError> {
    let tasks: Vec<ChoiceTask> = read_jsonl(path)?;
    for (i, t) in tasks.iter().enumerate() {
        if t.choices.len() < 2 || t.answer >= t.choices.len() {
            return Err(EvalError::Parse {
                path: path.to_path_buf(),
                line: Some(i + 1),
                reason: format!(
                    "needs at least 2 choices and an answer index below their count; has {} choices, answer {}",
                    t.choices.len(),
                    t.answer
                ),
            });
        }
    }
    if tasks.is_empty() {
        return Err(EvalError::Insufficient(format!(
            "task file {} holds no tasks",
            path.display()
        )));
    }
    Ok(tasks)
}

/// Scores at most `max_tasks` items of a task file.
pub fn evaluate_task_file(
    model: &LlamaModel,
    tokenizer: &Tokenizer,
    name: &str,
    path: &Path,
    max_tasks: Option<usize>,
) -> Result<TaskSetResult, EvalError> {
    let mut tasks = load_tasks(path)?;
    if let Some(max) = max_tasks {
        tasks.truncate(max);
    }
    evaluate_tasks(model, tokenizer, name, &tasks)
}

/// Scores the given items.
pub fn evaluate_tasks(
    model: &LlamaModel,
    tokenizer: &Tokenizer,
    name: &str,
    tasks: &[ChoiceTask],
) -> Result<TaskSetResult, EvalError> {
    let (mut correct, mut correct_norm) = (0, 0);
    for task in tasks {
        let context = tokenizer.encode(&task.prompt)?;
        let mut raw = Vec::with_capacity(task.choices.len());
        let mut norm = Vec::with_capacity(task.choices.len());
        for choice in &task.choices {
            let ids = tokenizer.encode(choice)?;
            let lp = continuation_logprob(model, &context, &ids)?;
            raw.push(lp);
            norm.push(lp / choice.len().max(1) as f64);
        }
        correct += usize::from(best(&raw) == task.answer);
        correct_norm += usize::from(best(&norm) == task.answer);
    }
    let n = tasks.len().max(1) as f64;
    let result = TaskSetResult {
        name: name.to_string(),
        tasks: tasks.len(),
        correct,
        accuracy: correct as f64 / n,
        correct_norm,
        accuracy_norm: correct_norm as f64 / n,
    };
    tracing::info!(name, accuracy = result.accuracy, "task set scored");
    Ok(result)
}

fn best(scores: &[f64]) -> usize {
    scores
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}
