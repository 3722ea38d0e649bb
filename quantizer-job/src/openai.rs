//! The subset of the OpenAI API that vLLM serves and quantops speaks: the
//! request and response types of `/v1/completions`, `/v1/chat/completions`
//! and `/v1/models`, the error body, and a small client. One definition is
//! shared by the server (`serve`), the load generator (`loadtest`) and the
//! quality probe (`probe`), so the three cannot drift apart.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::tokenizer::ChatMessage;

/// `stop`: one string or a list of strings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// A single stop string.
    One(String),
    /// Several stop strings.
    Many(Vec<String>),
}

impl Stop {
    /// The stop strings as a list (empty strings dropped: they would stop at once).
    pub fn strings(&self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s.clone()],
            Stop::Many(v) => v.clone(),
        }
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect()
    }
}

/// `stream_options`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` (and no choices) before `[DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

/// The generation parameters both endpoints take.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerationParams {
    /// The served model's name; optional, but when given it must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Most tokens to generate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Softmax temperature; 0 is greedy. Default 1 (OpenAI's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus mass in (0, 1]. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Seed of the sampler: the same seed gives the same sampled text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Stop strings (not part of the returned text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    /// Stream Server-Sent Events, one chunk per generated token.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// vLLM's extension: keep generating past the end-of-sequence token, so
    /// the output length is `max_tokens` (load tests need fixed lengths).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_eos: bool,
    /// vLLM's extension: generate at least this many tokens. Accepted for
    /// compatibility; quantops honours `ignore_eos` and stop strings only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_tokens: Option<u32>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionRequest {
    /// The prompt, used as is (a single string).
    pub prompt: String,
    /// Everything else.
    #[serde(flatten)]
    pub params: GenerationParams,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionRequest {
    /// The conversation, rendered with the model's chat template.
    pub messages: Vec<ChatMessage>,
    /// Everything else.
    #[serde(flatten)]
    pub params: GenerationParams,
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens of the (rendered) prompt.
    pub prompt_tokens: u32,
    /// Generated tokens, the end-of-sequence token included.
    pub completion_tokens: u32,
    /// Their sum.
    pub total_tokens: u32,
}

impl Usage {
    /// Usage from the two counts.
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// One choice of a completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChoice {
    /// Always 0 (one choice per request).
    pub index: u32,
    /// Generated text (a delta in a streamed chunk).
    pub text: String,
    /// `stop` or `length` on the last chunk / the full answer, else null.
    pub finish_reason: Option<String>,
}

/// A completion response, or one streamed chunk of it (`object` tells).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionResponse {
    /// Request id, shared by all chunks of a stream.
    pub id: String,
    /// `text_completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// One choice (none in a stream's usage chunk).
    pub choices: Vec<CompletionChoice>,
    /// Token counts (always in a full response; in a stream only its usage chunk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// A chat message delta in a streamed chunk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatDelta {
    /// `assistant` on the first chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The new text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice of a chat completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    /// Always 0.
    pub index: u32,
    /// The answer (full responses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<ChatMessage>,
    /// The new text (streamed chunks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<ChatDelta>,
    /// `stop` or `length` at the end, else null.
    pub finish_reason: Option<String>,
}

/// A chat completion (`chat.completion`) or one streamed chunk
/// (`chat.completion.chunk`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionResponse {
    /// Request id.
    pub id: String,
    /// `chat.completion` or `chat.completion.chunk`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// One choice (none in a stream's usage chunk).
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    /// The served model name.
    pub id: String,
    /// `model`.
    pub object: String,
    /// Unix seconds the server started.
    pub created: u64,
    /// `quantops`.
    pub owned_by: String,
    /// Context length (vLLM's extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_model_len: Option<u32>,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    /// `list`.
    pub object: String,
    /// The models served.
    pub data: Vec<ModelCard>,
}

/// The body of an error response, OpenAI's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for people.
    pub message: String,
    /// `invalid_request_error`, `rate_limit_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// A machine-readable code (`model_not_found`, `queue_full`, ...).
    pub code: Option<String>,
}

/// `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// The error.
    pub error: ErrorBody,
}

/// Why a request to an endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting, sending or reading failed.
    #[error("request to {url} failed: {source}")]
    Transport {
        /// The URL.
        url: String,
        /// The transport error.
        source: reqwest::Error,
    },
    /// The endpoint answered with an error status.
    #[error("{url} answered {status}: {message}")]
    Status {
        /// The URL.
        url: String,
        /// HTTP status code.
        status: u16,
        /// The error message (from the OpenAI error body when there is one).
        message: String,
    },
    /// The body is not what the API specifies.
    #[error("unexpected response from {url}: {reason}")]
    Protocol {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
}

impl ClientError {
    /// The HTTP status, when the endpoint answered with one.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// What the client saw of one streamed request, timed on arrival.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamRecord {
    /// The concatenated text.
    pub text: String,
    /// Arrival times of the chunks carrying generated text, measured from
    /// sending the request (the first one is the time to first token).
    pub token_times: Vec<Duration>,
    /// From sending the request to `[DONE]`.
    pub total: Duration,
    /// The last finish reason seen.
    pub finish_reason: Option<String>,
    /// The usage chunk, when the server sent one.
    pub usage: Option<Usage>,
}

/// A streamed chunk of either endpoint, read leniently: completions carry
/// `text`, chat carries `delta.content`.
#[derive(Debug, Deserialize)]
struct AnyChunk {
    #[serde(default)]
    choices: Vec<AnyChoice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<ErrorBody>,
}

#[derive(Debug, Deserialize)]
struct AnyChoice {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    delta: Option<ChatDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

/// A client of one OpenAI-compatible endpoint (ours or vLLM's).
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
}

/// The completions path.
pub const COMPLETIONS: &str = "/v1/completions";
/// The chat completions path.
pub const CHAT_COMPLETIONS: &str = "/v1/chat/completions";

impl Client {
    /// A client of `base` (e.g. `http://127.0.0.1:8000`, with or without a
    /// trailing `/` or `/v1`), each request bounded by `timeout`.
    pub fn new(base: &str, timeout: Duration) -> Result<Client, ClientError> {
        let trimmed = base.trim_end_matches('/');
        let base = trimmed.strip_suffix("/v1").unwrap_or(trimmed).to_string();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            // Load tests open many concurrent connections to one host.
            .pool_max_idle_per_host(1024)
            .build()
            .map_err(|source| ClientError::Transport {
                url: base.clone(),
                source,
            })?;
        Ok(Client { base, http })
    }

    /// The endpoint's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `POST /v1/completions` without streaming.
    pub async fn completion(
        &self,
        request: &CompletionRequest,
    ) -> Result<CompletionResponse, ClientError> {
        self.post_json(COMPLETIONS, request).await
    }

    /// `POST /v1/chat/completions` without streaming.
    pub async fn chat(
        &self,
        request: &ChatCompletionRequest,
    ) -> Result<ChatCompletionResponse, ClientError> {
        self.post_json(CHAT_COMPLETIONS, request).await
    }

    /// `GET /v1/models`.
    pub async fn models(&self) -> Result<ModelList, ClientError> {
        let url = format!("{}/v1/models", self.base);
        let response =
            self.http
                .get(&url)
                .send()
                .await
                .map_err(|source| ClientError::Transport {
                    url: url.clone(),
                    source,
                })?;
        read_json(&url, response).await
    }

    /// POSTs `body` (which should ask for `stream: true`) to `path` and reads
    /// the Server-Sent Events, timing every chunk that carries text.
    pub async fn stream<T: Serialize + ?Sized>(
        &self,
        path: &str,
        body: &T,
    ) -> Result<StreamRecord, ClientError> {
        let url = format!("{}{path}", self.base);
        let start = Instant::now();
        let response = self.send(&url, body).await?;
        let response = check_status(&url, response).await?;
        let mut record = StreamRecord::default();
        let mut buffer: Vec<u8> = Vec::new();
        let mut bytes = response.bytes_stream();
        let mut done = false;
        while let Some(piece) = bytes.next().await {
            let piece = piece.map_err(|source| ClientError::Transport {
                url: url.clone(),
                source,
            })?;
            buffer.extend_from_slice(&piece);
            while let Some(event) = take_event(&mut buffer) {
                let at = start.elapsed();
                for data in event_data(&event) {
                    if data == "[DONE]" {
                        done = true;
                        continue;
                    }
                    apply_chunk(&url, data, at, &mut record)?;
                }
            }
        }
        if !done {
            return Err(ClientError::Protocol {
                url,
                reason: "the stream ended without `data: [DONE]`".into(),
            });
        }
        record.total = start.elapsed();
        Ok(record)
    }

    async fn send<T: Serialize + ?Sized>(
        &self,
        url: &str,
        body: &T,
    ) -> Result<reqwest::Response, ClientError> {
        self.http
            .post(url)
            .json(body)
            .send()
            .await
            .map_err(|source| ClientError::Transport {
                url: url.to_string(),
                source,
            })
    }

    async fn post_json<T: Serialize + ?Sized, R: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &T,
    ) -> Result<R, ClientError> {
        let url = format!("{}{path}", self.base);
        let response = self.send(&url, body).await?;
        read_json(&url, response).await
    }
}

async fn check_status(
    url: &str,
    response: reqwest::Response,
) -> Result<reqwest::Response, ClientError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let text = response.text().await.unwrap_or_default();
    let message = serde_json::from_str::<ErrorResponse>(&text)
        .map(|e| e.error.message)
        .unwrap_or(text);
    Err(ClientError::Status {
        url: url.to_string(),
        status: status.as_u16(),
        message,
    })
}

async fn read_json<R: serde::de::DeserializeOwned>(
    url: &str,
    response: reqwest::Response,
) -> Result<R, ClientError> {
    let response = check_status(url, response).await?;
    let bytes = response
        .bytes()
        .await
        .map_err(|source| ClientError::Transport {
            url: url.to_string(),
            source,
        })?;
    serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol {
        url: url.to_string(),
        reason: e.to_string(),
    })
}

/// Removes and returns the first complete event (up to a blank line) from
/// `buffer`, accepting `\n\n` and `\r\n\r\n` separators.
fn take_event(buffer: &mut Vec<u8>) -> Option<String> {
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    let (end, sep) = match (lf, crlf) {
        (Some(a), Some(b)) => {
            if a.0 <= b.0 {
                a
            } else {
                b
            }
        }
        (Some(a), None) => a,
        (None, Some(b)) => b,
        (None, None) => return None,
    };
    let event: Vec<u8> = buffer.drain(..end + sep).take(end).collect();
    Some(String::from_utf8_lossy(&event).into_owned())
}

/// The `data:` payloads of one event.
fn event_data(event: &str) -> impl Iterator<Item = &str> {
    event
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(str::trim)
}

fn apply_chunk(
    url: &str,
    data: &str,
    at: Duration,
    record: &mut StreamRecord,
) -> Result<(), ClientError> {
    let chunk: AnyChunk = serde_json::from_str(data).map_err(|e| ClientError::Protocol {
        url: url.to_string(),
        reason: format!("bad chunk {data:?}: {e}"),
    })?;
    if let Some(error) = chunk.error {
        return Err(ClientError::Protocol {
            url: url.to_string(),
            reason: format!("error in stream: {}", error.message),
        });
    }
    if let Some(usage) = chunk.usage {
        record.usage = Some(usage);
    }
    for choice in chunk.choices {
        let text = choice.text.or(choice.delta.and_then(|d| d.content));
        if let Some(text) = text {
            record.text.push_str(&text);
            record.token_times.push(at);
        }
        if choice.finish_reason.is_some() {
            record.finish_reason = choice.finish_reason;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_on_blank_lines_of_either_kind() {
        let mut buf = b"data: {\"a\":1}\n\ndata: [DONE]\r\n\r\ndata: par".to_vec();
        assert_eq!(take_event(&mut buf).as_deref(), Some("data: {\"a\":1}"));
        assert_eq!(take_event(&mut buf).as_deref(), Some("data: [DONE]"));
        assert_eq!(take_event(&mut buf), None);
        assert_eq!(buf, b"data: par");
    }

    #[test]
    fn chunks_of_both_endpoints_are_read() {
        let mut record = StreamRecord::default();
        let at = Duration::from_millis(5);
        apply_chunk(
            "u",
            r#"{"choices":[{"index":0,"text":"Hi","finish_reason":null}]}"#,
            at,
            &mut record,
        )
        .expect("completion chunk");
        apply_chunk(
            "u",
            r#"{"choices":[{"index":0,"delta":{"content":" there"},"finish_reason":"stop"}]}"#,
            at,
            &mut record,
        )
        .expect("chat chunk");
        apply_chunk(
            "u",
            r#"{"choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}]}"#,
            at,
            &mut record,
        )
        .expect("role chunk");
        apply_chunk(
            "u",
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#,
            at,
            &mut record,
        )
        .expect("usage chunk");
        assert_eq!(record.text, "Hi there");
        assert_eq!(
            record.token_times.len(),
            2,
            "the role chunk carries no text"
        );
        assert_eq!(record.finish_reason.as_deref(), Some("stop"));
        assert_eq!(record.usage, Some(Usage::new(3, 2)));
    }

    #[test]
    fn stop_accepts_a_string_or_a_list() {
        let one: Stop = serde_json::from_str(r#""\n""#).expect("string");
        let many: Stop = serde_json::from_str(r#"["a", ""]"#).expect("list");
        assert_eq!(one.strings(), vec!["\n".to_string()]);
        assert_eq!(many.strings(), vec!["a".to_string()]);
    }
}
