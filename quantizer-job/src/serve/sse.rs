//! Server-Sent Events in OpenAI's chunk format: one `data: {chunk}` per
//! generated token (`choices[0].text` for completions,
//! `choices[0].delta.content` for chat, which opens with a role-only chunk),
//! the finish reason on the last token's chunk, an optional usage chunk
//! (`stream_options.include_usage`), then `data: [DONE]`.

use std::convert::Infallible;

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::sync::mpsc::UnboundedReceiver;

use super::engine::{Event, Finished};
use crate::openai::{
    ChatChoice, ChatCompletionResponse, ChatDelta, CompletionChoice, CompletionResponse, ErrorBody,
    ErrorResponse, Usage,
};

/// Which endpoint's chunks to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/completions`.
    Completions,
    /// `/v1/chat/completions`.
    Chat,
}

/// What every chunk of one response repeats.
#[derive(Debug, Clone)]
pub struct ChunkMeta {
    /// Which endpoint.
    pub endpoint: Endpoint,
    /// The response id.
    pub id: String,
    /// The served model name.
    pub model: String,
    /// Unix seconds.
    pub created: u64,
    /// Send the usage chunk.
    pub include_usage: bool,
}

impl ChunkMeta {
    fn text_chunk(&self, text: Option<String>, role: bool, finish: Option<&str>) -> String {
        let finish_reason = finish.map(str::to_string);
        match self.endpoint {
            Endpoint::Completions => frame(&CompletionResponse {
                id: self.id.clone(),
                object: "text_completion".into(),
                created: self.created,
                model: self.model.clone(),
                choices: vec![CompletionChoice {
                    index: 0,
                    text: text.unwrap_or_default(),
                    finish_reason,
                }],
                usage: None,
            }),
            Endpoint::Chat => frame(&ChatCompletionResponse {
                id: self.id.clone(),
                object: "chat.completion.chunk".into(),
                created: self.created,
                model: self.model.clone(),
                choices: vec![ChatChoice {
                    index: 0,
                    message: None,
                    delta: Some(ChatDelta {
                        role: role.then(|| "assistant".to_string()),
                        content: text,
                    }),
                    finish_reason,
                }],
                usage: None,
            }),
        }
    }

    fn usage_chunk(&self, usage: Usage) -> String {
        match self.endpoint {
            Endpoint::Completions => frame(&CompletionResponse {
                id: self.id.clone(),
                object: "text_completion".into(),
                created: self.created,
                model: self.model.clone(),
                choices: vec![],
                usage: Some(usage),
            }),
            Endpoint::Chat => frame(&ChatCompletionResponse {
                id: self.id.clone(),
                object: "chat.completion.chunk".into(),
                created: self.created,
                model: self.model.clone(),
                choices: vec![],
                usage: Some(usage),
            }),
        }
    }

    /// The frames one engine event becomes, and whether the stream ends.
    fn frames(&self, event: Option<Event>, first: bool) -> (String, bool) {
        let mut out = String::new();
        if first && self.endpoint == Endpoint::Chat {
            out.push_str(&self.text_chunk(None, true, None));
        }
        match event {
            Some(Event::Token { delta, finished }) => {
                out.push_str(&self.text_chunk(
                    Some(delta),
                    false,
                    finished.map(|f| f.reason.as_str()),
                ));
                if let Some(Finished { usage, .. }) = finished {
                    if self.include_usage {
                        out.push_str(&self.usage_chunk(usage));
                    }
                    out.push_str(DONE);
                    return (out, true);
                }
                (out, false)
            }
            Some(Event::Failed(message)) => {
                out.push_str(&error_frame(message));
                out.push_str(DONE);
                (out, true)
            }
            None => {
                out.push_str(&error_frame("generation stopped unexpectedly".into()));
                out.push_str(DONE);
                (out, true)
            }
        }
    }
}

const DONE: &str = "data: [DONE]\n\n";

fn frame<T: Serialize>(chunk: &T) -> String {
    match serde_json::to_string(chunk) {
        Ok(json) => format!("data: {json}\n\n"),
        Err(e) => error_frame(format!("cannot serialise a chunk: {e}")),
    }
}

fn error_frame(message: String) -> String {
    let body = ErrorResponse {
        error: ErrorBody {
            message,
            kind: "server_error".into(),
            param: None,
            code: None,
        },
    };
    serde_json::to_string(&body)
        .map(|json| format!("data: {json}\n\n"))
        .unwrap_or_default()
}

/// The streaming response over the engine's events for one request.
pub fn response(meta: ChunkMeta, events: UnboundedReceiver<Event>) -> Response {
    let stream = futures::stream::unfold(
        (events, meta, true, false),
        |(mut events, meta, first, ended)| async move {
            if ended {
                return None;
            }
            let (frame, ended) = meta.frames(events.recv().await, first);
            Some((Ok::<_, Infallible>(frame), (events, meta, false, ended)))
        },
    );
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}
