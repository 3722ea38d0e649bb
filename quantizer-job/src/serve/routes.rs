//! The HTTP side: parses and validates requests (400 naming the field),
//! admits them to the engine (429 when the queue is full), and writes the
//! answers as JSON or as a stream of chunks.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::LoadedModel;
use super::engine::{Engine, Event, Finished, GenerationSpec, SubmitError};
use super::metrics::ServeMetrics;
use super::sse::{self, ChunkMeta, Endpoint};
use crate::model::SamplingParams;
use crate::openai::{
    ChatChoice, ChatCompletionResponse, CompletionChoice, CompletionResponse, ErrorBody,
    ErrorResponse, GenerationParams, ModelCard, ModelList,
};
use crate::tokenizer::{ChatMessage, apply_chat_template};

/// Default `max_tokens` of `/v1/completions` (OpenAI's).
pub const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    /// The name clients must use (or omit).
    pub model_name: String,
    /// The model and tokenizer.
    pub model: Arc<LoadedModel>,
    /// The inference engine.
    pub engine: Engine,
    /// The metrics.
    pub metrics: ServeMetrics,
    /// Unix seconds the server started.
    pub created: u64,
}

/// The routes of the OpenAI subset plus `/health` and `/metrics`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .with_state(state)
}

/// A request the server refuses, OpenAI-style.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    fn invalid(param: Option<&str>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            body: ErrorBody {
                message: message.into(),
                kind: "invalid_request_error".into(),
                param: param.map(str::to_string),
                code: None,
            },
        }
    }

    fn server(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            body: ErrorBody {
                message: message.into(),
                kind: "server_error".into(),
                param: None,
                code: None,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(ErrorResponse { error: self.body })).into_response()
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> ApiError {
        let (status, kind, code) = match e {
            SubmitError::QueueFull(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "queue_full",
            ),
            SubmitError::Stopped => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "shutting_down",
            ),
        };
        ApiError {
            status,
            body: ErrorBody {
                message: e.to_string(),
                kind: kind.into(),
                param: None,
                code: Some(code.into()),
            },
        }
    }
}

async fn models(State(state): State<Arc<AppState>>) -> axum::Json<ModelList> {
    axum::Json(ModelList {
        object: "list".into(),
        data: vec![ModelCard {
            id: state.model_name.clone(),
            object: "model".into(),
            created: state.created,
            owned_by: "quantops".into(),
            max_model_len: u32::try_from(state.model.context_len()).ok(),
        }],
    })
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match state.metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => ApiError::server(format!("cannot render metrics: {e}")).into_response(),
    }
}

#[derive(Deserialize)]
struct PromptPart {
    prompt: String,
}

#[derive(Deserialize)]
struct MessagesPart {
    messages: Vec<ChatMessage>,
}

async fn completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let result = async {
        let value = json_body(&body)?;
        let PromptPart { prompt } = typed(&value)?;
        let params: GenerationParams = typed(&value)?;
        if prompt.is_empty() {
            return Err(ApiError::invalid(
                Some("prompt"),
                "`prompt` must not be empty",
            ));
        }
        generate(&state, Endpoint::Completions, &prompt, "prompt", &params).await
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}

async fn chat_completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let result = async {
        let value = json_body(&body)?;
        let MessagesPart { messages } = typed(&value)?;
        let params: GenerationParams = typed(&value)?;
        if messages.is_empty() {
            return Err(ApiError::invalid(
                Some("messages"),
                "`messages` must hold at least one message",
            ));
        }
        let prompt = apply_chat_template(&messages, true);
        generate(&state, Endpoint::Chat, &prompt, "messages", &params).await
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}

fn json_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(None, format!("the body is not valid JSON: {e}")))
}

/// Deserialises `value` into `T`, naming the offending field on failure.
fn typed<T: DeserializeOwned>(value: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        let param = if path == "." {
            missing_field(&message)
        } else {
            Some(path)
        };
        let text = match &param {
            Some(p) => format!("invalid field `{p}`: {message}"),
            None => format!("invalid request: {message}"),
        };
        ApiError::invalid(param.as_deref(), text)
    })
}

/// The field of serde's "missing field `x`" message.
fn missing_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    rest.split('`').next().map(str::to_string)
}

/// Checks the parameters against the model and the prompt.
fn spec(
    state: &AppState,
    endpoint: Endpoint,
    prompt_ids: Vec<u32>,
    prompt_param: &str,
    params: &GenerationParams,
) -> Result<GenerationSpec, ApiError> {
    if let Some(model) = &params.model
        && model != &state.model_name
    {
        let mut e = ApiError::invalid(
            Some("model"),
            format!(
                "the model `{model}` does not exist; this server serves `{}`",
                state.model_name
            ),
        );
        e.body.code = Some("model_not_found".into());
        return Err(e);
    }
    let context = state.model.context_len();
    if prompt_ids.is_empty() {
        return Err(ApiError::invalid(
            Some(prompt_param),
            format!("`{prompt_param}` encodes to no tokens"),
        ));
    }
    if prompt_ids.len() >= context {
        return Err(ApiError::invalid(
            Some(prompt_param),
            format!(
                "`{prompt_param}` has {} tokens; the context is {context}",
                prompt_ids.len()
            ),
        ));
    }
    let room = context - prompt_ids.len();
    let max_tokens = match params.max_tokens {
        Some(0) => {
            return Err(ApiError::invalid(
                Some("max_tokens"),
                "`max_tokens` must be at least 1",
            ));
        }
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        None => match endpoint {
            Endpoint::Completions => DEFAULT_COMPLETION_MAX_TOKENS.min(room),
            Endpoint::Chat => room,
        },
    };
    if max_tokens > room {
        return Err(ApiError::invalid(
            Some("max_tokens"),
            format!(
                "`max_tokens` is {max_tokens}, but the prompt has {} tokens and the context is {context}: at most {room}",
                prompt_ids.len()
            ),
        ));
    }
    let temperature = params.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(ApiError::invalid(
            Some("temperature"),
            "`temperature` must be a number ≥ 0",
        ));
    }
    let top_p = params.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            Some("top_p"),
            "`top_p` must be in (0, 1]",
        ));
    }
    Ok(GenerationSpec {
        prompt_ids,
        max_tokens,
        sampling: SamplingParams { temperature, top_p },
        seed: params.seed,
        stop: params
            .stop
            .as_ref()
            .map(|s| s.strings())
            .unwrap_or_default(),
        ignore_eos: params.ignore_eos,
    })
}

async fn generate(
    state: &AppState,
    endpoint: Endpoint,
    prompt: &str,
    prompt_param: &str,
    params: &GenerationParams,
) -> Result<Response, ApiError> {
    let ids = state
        .model
        .tokenizer
        .encode(prompt)
        .map_err(|e| ApiError::invalid(Some(prompt_param), e.to_string()))?;
    let spec = spec(state, endpoint, ids, prompt_param, params)?;
    let events = state.engine.submit(spec)?;
    let meta = ChunkMeta {
        endpoint,
        id: format!(
            "{}-{:016x}",
            match endpoint {
                Endpoint::Completions => "cmpl",
                Endpoint::Chat => "chatcmpl",
            },
            rand::random::<u64>()
        ),
        model: state.model_name.clone(),
        created: unix_now(),
        include_usage: params.stream_options.is_some_and(|o| o.include_usage),
    };
    if params.stream {
        return Ok(sse::response(meta, events));
    }
    let (text, finished) = collect(events).await?;
    Ok(full_response(&meta, text, finished))
}

/// Reads the engine's events to the end.
async fn collect(
    mut events: tokio::sync::mpsc::UnboundedReceiver<Event>,
) -> Result<(String, Finished), ApiError> {
    let mut text = String::new();
    loop {
        match events.recv().await {
            Some(Event::Token { delta, finished }) => {
                text.push_str(&delta);
                if let Some(f) = finished {
                    return Ok((text, f));
                }
            }
            Some(Event::Failed(message)) => return Err(ApiError::server(message)),
            None => return Err(ApiError::server("generation stopped unexpectedly")),
        }
    }
}

fn full_response(meta: &ChunkMeta, text: String, finished: Finished) -> Response {
    let finish_reason = Some(finished.reason.as_str().to_string());
    match meta.endpoint {
        Endpoint::Completions => axum::Json(CompletionResponse {
            id: meta.id.clone(),
            object: "text_completion".into(),
            created: meta.created,
            model: meta.model.clone(),
            choices: vec![CompletionChoice {
                index: 0,
                text,
                finish_reason,
            }],
            usage: Some(finished.usage),
        })
        .into_response(),
        Endpoint::Chat => axum::Json(ChatCompletionResponse {
            id: meta.id.clone(),
            object: "chat.completion".into(),
            created: meta.created,
            model: meta.model.clone(),
            choices: vec![ChatChoice {
                index: 0,
                message: Some(ChatMessage {
                    role: "assistant".into(),
                    content: text,
                }),
                delta: None,
                finish_reason,
            }],
            usage: Some(finished.usage),
        })
        .into_response(),
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_field_is_read_from_serdes_message() {
        assert_eq!(
            missing_field("missing field `prompt`").as_deref(),
            Some("prompt")
        );
        assert_eq!(missing_field("invalid type: string"), None);
    }
}
