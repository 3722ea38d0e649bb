//! The model's tokenizer (`tokenizer.json`) and its fixed chat format.
//!
//! Text is encoded without special tokens by default: the perplexity
//! reference and the chat prompts carry their specials as literal text, so
//! adding a BOS here would shift every window.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why tokenizing failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// `tokenizer.json` could not be read or parsed; `reason` never quotes
    /// the file.
    #[error("cannot load tokenizer {path}: {reason}")]
    Load {
        /// The file.
        path: PathBuf,
        /// What the tokenizers library reported.
        reason: String,
    },
    /// Encoding or decoding failed.
    #[error("tokenizer failed: {0}")]
    Codec(String),
    /// A special token the caller needs is not in the vocabulary.
    #[error("special token {0:?} is not in the vocabulary")]
    MissingSpecial(String),
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The message text.
    pub content: String,
}

/// The end-of-turn token of the bundled chat format.
pub const END_TOKEN: &str = "<|end|>";

/// Why `tokenizer.json` did not load, without its text: the tokenizers
/// library reports a JSON error (which would quote the file) or an I/O one.
fn load_reason(e: &(dyn std::error::Error + Send + Sync + 'static)) -> String {
    if let Some(json) = e.downcast_ref::<serde_json::Error>() {
        format!(
            "not a valid tokenizer.json: {}",
            crate::content_free::json(json)
        )
    } else if let Some(io) = e.downcast_ref::<std::io::Error>() {
        io.to_string()
    } else {
        "not a tokenizer the tokenizers library can load".to_string()
    }
}

/// Wraps a Hugging Face tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| TokenizerError::Load {
            path: path.to_path_buf(),
            reason: load_reason(e.as_ref()),
        })?;
        Ok(Tokenizer { inner })
    }

    /// Loads `tokenizer.json` from a checkpoint directory.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        Self::from_file(&dir.join("tokenizer.json"))
    }

    /// Encodes text without adding special tokens (specials written in the
    /// text, like `<|end|>`, are still recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.encode_with_specials(text, false)
    }

    /// Encodes text, letting the post-processor add special tokens when
    /// `add_special_tokens` is true.
    pub fn encode_with_specials(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| TokenizerError::Codec(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes ids to text, dropping special tokens when asked.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Codec(e.to_string()))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a (special) token, if present.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The id of a special token the caller requires.
    pub fn require_token_id(&self, token: &str) -> Result<u32, TokenizerError> {
        self.token_id(token)
            .ok_or_else(|| TokenizerError::MissingSpecial(token.to_string()))
    }
}

/// Renders messages in the bundled model's chat format:
/// `<|role|>\ncontent<|end|>\n` per message, then `<|assistant|>\n` when
/// `add_generation_prompt`. This is the only template supported (no Jinja).
pub fn apply_chat_template(messages: &[ChatMessage], add_generation_prompt: bool) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str("<|");
        out.push_str(&m.role);
        out.push_str("|>\n");
        out.push_str(&m.content);
        out.push_str(END_TOKEN);
        out.push('\n');
    }
    if add_generation_prompt {
        out.push_str("<|assistant|>\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_template_matches_the_bundled_format() {
        let messages = [
            ChatMessage {
                role: "system".into(),
                content: "Answer with yes or no.".into(),
            },
            ChatMessage {
                role: "user".into(),
                content: "Is 750 an even number?".into(),
            },
        ];
        assert_eq!(
            apply_chat_template(&messages, true),
            "<|system|>\nAnswer with yes or no.<|end|>\n<|user|>\nIs 750 an even number?<|end|>\n<|assistant|>\n"
        );
        assert!(!apply_chat_template(&messages, false).contains("<|assistant|>"));
    }
}
