//! `serve` in process on loopback with the bundled model: the OpenAI subset,
//! greedy answers identical to `generate_greedy`, streaming identical to
//! non-streaming, admission (never refuse under `--max-queue`, 429 above),
//! 400s naming the field, and vLLM's metrics adding up.

mod common;

use common::serving::{MODEL_NAME, chat_messages, loaded, metric, scrape, start};
use quantizer_job::model::SamplingParams;
use quantizer_job::openai::{
    CHAT_COMPLETIONS, COMPLETIONS, ChatCompletionRequest, Client, CompletionRequest, ErrorResponse,
    GenerationParams, StreamOptions,
};
use quantizer_job::tokenizer::apply_chat_template;
use rand::SeedableRng;
use std::time::Duration;

const PROMPT: &str = "The Python interpreter";

fn client(base: &str) -> Client {
    Client::new(base, Duration::from_secs(120)).expect("client")
}

fn greedy(max_tokens: u32) -> GenerationParams {
    GenerationParams {
        model: Some(MODEL_NAME.into()),
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ..GenerationParams::default()
    }
}

/// What the model itself answers greedily (the reference).
fn reference_greedy(prompt: &str, max_tokens: usize) -> (String, usize) {
    let m = loaded();
    let ids = m.tokenizer.encode(prompt).expect("encode");
    let out = m
        .model
        .generate_greedy(&ids, max_tokens, m.eos)
        .expect("generate");
    (m.tokenizer.decode(&out, true).expect("decode"), out.len())
}

async fn post_raw(base: &str, path: &str, body: &str) -> (u16, String) {
    let response = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("send");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_and_health_answer() {
    let server = start(4).await;
    let base = server.base_url();
    let models = client(&base).models().await.expect("models");
    assert_eq!(models.object, "list");
    assert_eq!(models.data.len(), 1);
    assert_eq!(models.data[0].id, MODEL_NAME);
    assert_eq!(models.data[0].max_model_len, Some(1024));
    let health = reqwest::get(format!("{base}/health"))
        .await
        .expect("health");
    assert_eq!(health.status().as_u16(), 200);
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_completion_equals_generate_greedy() {
    let server = start(4).await;
    let response = client(&server.base_url())
        .completion(&CompletionRequest {
            prompt: PROMPT.into(),
            params: greedy(12),
        })
        .await
        .expect("completion");
    let (text, n) = reference_greedy(PROMPT, 12);
    assert!(!text.is_empty());
    assert_eq!(response.choices[0].text, text);
    let usage = response.usage.expect("usage");
    assert_eq!(usage.completion_tokens as usize, n);
    let prompt_tokens = loaded().tokenizer.encode(PROMPT).expect("encode").len();
    assert_eq!(usage.prompt_tokens as usize, prompt_tokens);
    assert_eq!(
        usage.total_tokens,
        usage.prompt_tokens + usage.completion_tokens
    );
    let expected_reason = if n == 12 { "length" } else { "stop" };
    assert_eq!(
        response.choices[0].finish_reason.as_deref(),
        Some(expected_reason)
    );
    assert_eq!(response.object, "text_completion");
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completion_renders_the_chat_template() {
    let server = start(4).await;
    let response = client(&server.base_url())
        .chat(&ChatCompletionRequest {
            messages: chat_messages(),
            params: greedy(16),
        })
        .await
        .expect("chat");
    let (text, n) = reference_greedy(&apply_chat_template(&chat_messages(), true), 16);
    let message = response.choices[0].message.as_ref().expect("message");
    assert_eq!(message.role, "assistant");
    assert_eq!(message.content, text);
    assert_eq!(response.object, "chat.completion");
    // The model learned to end its turn: the answer stops at <|end|>.
    assert!(n < 16, "no end of turn in {n} tokens: {text:?}");
    assert_eq!(response.choices[0].finish_reason.as_deref(), Some("stop"));
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_yields_the_non_streaming_text() {
    let server = start(4).await;
    let c = client(&server.base_url());
    let mut params = greedy(10);
    let full = c
        .completion(&CompletionRequest {
            prompt: PROMPT.into(),
            params: params.clone(),
        })
        .await
        .expect("completion");
    params.stream = true;
    params.stream_options = Some(StreamOptions {
        include_usage: true,
    });
    let streamed = c
        .stream(
            COMPLETIONS,
            &CompletionRequest {
                prompt: PROMPT.into(),
                params: params.clone(),
            },
        )
        .await
        .expect("stream");
    assert_eq!(streamed.text, full.choices[0].text);
    assert_eq!(streamed.usage, full.usage);
    assert_eq!(
        streamed.token_times.len(),
        full.usage.expect("usage").completion_tokens as usize,
        "one chunk per generated token"
    );
    assert_eq!(streamed.finish_reason, full.choices[0].finish_reason);

    let chat_full = c
        .chat(&ChatCompletionRequest {
            messages: chat_messages(),
            params: greedy(10),
        })
        .await
        .expect("chat");
    let chat_streamed = c
        .stream(
            CHAT_COMPLETIONS,
            &ChatCompletionRequest {
                messages: chat_messages(),
                params,
            },
        )
        .await
        .expect("chat stream");
    assert_eq!(
        chat_streamed.text,
        chat_full.choices[0]
            .message
            .as_ref()
            .expect("message")
            .content
    );
    assert_eq!(chat_streamed.usage, chat_full.usage);
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_sampling_is_reproducible_and_is_generate_sampled() {
    let server = start(4).await;
    let c = client(&server.base_url());
    let request = CompletionRequest {
        prompt: PROMPT.into(),
        params: GenerationParams {
            max_tokens: Some(12),
            temperature: Some(0.9),
            top_p: Some(0.95),
            seed: Some(7),
            ..GenerationParams::default()
        },
    };
    let a = c.completion(&request).await.expect("first");
    let b = c.completion(&request).await.expect("second");
    assert_eq!(a.choices[0].text, b.choices[0].text);
    let m = loaded();
    let ids = m.tokenizer.encode(PROMPT).expect("encode");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let reference = m
        .model
        .generate_sampled(
            &ids,
            12,
            m.eos,
            SamplingParams {
                temperature: 0.9,
                top_p: 0.95,
            },
            &mut rng,
        )
        .expect("sample");
    assert_eq!(
        a.choices[0].text,
        m.tokenizer.decode(&reference, true).expect("decode")
    );
    server.shutdown().await.expect("shutdown");
}

async fn concurrent(base: &str, n: usize, max_tokens: u32) -> Vec<(u16, String)> {
    let body = serde_json::to_string(&CompletionRequest {
        prompt: PROMPT.into(),
        params: greedy(max_tokens),
    })
    .expect("json");
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let base = base.to_string();
            let body = body.clone();
            tokio::spawn(async move { post_raw(&base, COMPLETIONS, &body).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("join"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_under_the_queue_limit_all_succeed() {
    let server = start(8).await;
    let results = concurrent(&server.base_url(), 8, 6).await;
    for (status, body) in &results {
        assert_eq!(*status, 200, "{body}");
    }
    let (text, _) = reference_greedy(PROMPT, 6);
    for (_, body) in &results {
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(v["choices"][0]["text"], text.as_str());
    }
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_above_the_queue_limit_get_429() {
    let server = start(1).await;
    let results = concurrent(&server.base_url(), 12, 24).await;
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert_eq!(ok + refused.len(), results.len(), "{results:?}");
    assert!(ok >= 1, "{results:?}");
    assert!(!refused.is_empty(), "{results:?}");
    let error: ErrorResponse = serde_json::from_str(&refused[0].1).expect("OpenAI error JSON");
    assert_eq!(error.error.kind, "rate_limit_error");
    assert_eq!(error.error.code.as_deref(), Some("queue_full"));
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_400_naming_the_field() {
    let server = start(4).await;
    let base = server.base_url();
    let cases = [
        (COMPLETIONS, r#"{"max_tokens": 4}"#, Some("prompt")),
        (COMPLETIONS, r#"{"prompt": "x", "max_tokens": 4"#, None),
        (
            COMPLETIONS,
            r#"{"prompt": "x", "model": "gpt-4"}"#,
            Some("model"),
        ),
        (
            COMPLETIONS,
            r#"{"prompt": "x", "max_tokens": 5000}"#,
            Some("max_tokens"),
        ),
        (
            COMPLETIONS,
            r#"{"prompt": "x", "temperature": "hot"}"#,
            Some("temperature"),
        ),
        (COMPLETIONS, r#"{"prompt": "x", "top_p": 0}"#, Some("top_p")),
        (COMPLETIONS, r#"{"prompt": 42}"#, Some("prompt")),
        (CHAT_COMPLETIONS, r#"{"prompt": "x"}"#, Some("messages")),
        (
            CHAT_COMPLETIONS,
            r#"{"messages": [{"role": "user"}]}"#,
            Some("messages[0]"),
        ),
    ];
    for (path, body, param) in cases {
        let (status, text) = post_raw(&base, path, body).await;
        assert_eq!(status, 400, "{body}: {text}");
        let error: ErrorResponse = serde_json::from_str(&text).expect("OpenAI error JSON");
        assert_eq!(error.error.kind, "invalid_request_error", "{text}");
        match param {
            Some(p) => {
                let got = error.error.param.as_deref().unwrap_or_default();
                assert!(got.starts_with(p), "{body}: param {got:?}, want {p}");
                assert!(error.error.message.contains(p), "{body}: {text}");
            }
            None => assert!(error.error.message.contains("JSON"), "{text}"),
        }
    }
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_add_up_to_the_usage_of_the_answers() {
    let server = start(4).await;
    let base = server.base_url();
    let c = client(&base);
    let mut completion_tokens = 0;
    let mut prompt_tokens = 0;
    for max_tokens in [3, 5] {
        let r = c
            .completion(&CompletionRequest {
                prompt: PROMPT.into(),
                params: greedy(max_tokens),
            })
            .await
            .expect("completion");
        let u = r.usage.expect("usage");
        completion_tokens += u.completion_tokens;
        prompt_tokens += u.prompt_tokens;
    }
    let r = c
        .chat(&ChatCompletionRequest {
            messages: chat_messages(),
            params: greedy(16),
        })
        .await
        .expect("chat");
    let u = r.usage.expect("usage");
    completion_tokens += u.completion_tokens;
    prompt_tokens += u.prompt_tokens;

    let text = scrape(&base).await;
    let label = format!("model_name=\"{MODEL_NAME}\"");
    assert_eq!(
        metric(&text, "vllm:generation_tokens_total", &[&label]),
        f64::from(completion_tokens),
        "{text}"
    );
    assert_eq!(
        metric(&text, "vllm:prompt_tokens_total", &[&label]),
        f64::from(prompt_tokens)
    );
    assert_eq!(metric(&text, "vllm:request_success_total", &[&label]), 3.0);
    assert_eq!(
        metric(
            &text,
            "vllm:request_success_total",
            &["finished_reason=\"stop\""]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "vllm:e2e_request_latency_seconds_count", &[&label]),
        3.0
    );
    assert_eq!(
        metric(&text, "vllm:time_to_first_token_seconds_count", &[&label]),
        3.0
    );
    assert_eq!(
        metric(&text, "vllm:time_per_output_token_seconds_count", &[&label]),
        f64::from(completion_tokens - 3)
    );
    assert_eq!(metric(&text, "vllm:num_requests_running", &[&label]), 0.0);
    assert_eq!(metric(&text, "vllm:num_requests_waiting", &[&label]), 0.0);
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_end_the_text_streamed_or_not() {
    let server = start(4).await;
    let c = client(&server.base_url());
    let (text, _) = reference_greedy(PROMPT, 16);
    // A stop string in the middle of the greedy answer: the text ends just
    // before it, in both forms.
    let words: Vec<&str> = text.split_whitespace().collect();
    assert!(words.len() >= 3, "{text:?}");
    let stop = format!(" {}", words[2]);
    let cut = text.find(&stop).expect("stop string in the text");
    let mut params = greedy(16);
    params.stop = Some(quantizer_job::openai::Stop::One(stop.clone()));
    let full = c
        .completion(&CompletionRequest {
            prompt: PROMPT.into(),
            params: params.clone(),
        })
        .await
        .expect("completion");
    assert_eq!(full.choices[0].text, text[..cut]);
    assert_eq!(full.choices[0].finish_reason.as_deref(), Some("stop"));
    params.stream = true;
    let streamed = c
        .stream(
            COMPLETIONS,
            &CompletionRequest {
                prompt: PROMPT.into(),
                params,
            },
        )
        .await
        .expect("stream");
    assert_eq!(streamed.text, text[..cut]);
    server.shutdown().await.expect("shutdown");
}
