//! The in-process server of the serving, load-test and probe tests: the
//! bundled model loaded once per test binary, servers on 127.0.0.1:0, and
//! a reader of the Prometheus text they expose.

use std::sync::{Arc, OnceLock};

use quantizer_job::serve::{LoadedModel, ServeOptions, Server};

/// The name the test servers serve under.
pub const MODEL_NAME: &str = "tiny-llama";

/// The bundled model, loaded once.
pub fn loaded() -> Arc<LoadedModel> {
    static MODEL: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    Arc::clone(MODEL.get_or_init(|| {
        Arc::new(LoadedModel::load(&super::model_dir()).expect("load the bundled tiny-llama"))
    }))
}

/// A yes/no question with a system prompt, the chat the tests send.
pub fn chat_messages() -> Vec<quantizer_job::tokenizer::ChatMessage> {
    use quantizer_job::tokenizer::ChatMessage;
    vec![
        ChatMessage {
            role: "system".into(),
            content: "Answer with yes or no.".into(),
        },
        ChatMessage {
            role: "user".into(),
            content: "Is 750 an even number?".into(),
        },
    ]
}

/// A server of the bundled model admitting `max_queue` requests.
pub async fn start(max_queue: usize) -> Server {
    Server::start(
        loaded(),
        &ServeOptions {
            served_model_name: MODEL_NAME.to_string(),
            listen: "127.0.0.1:0".parse().expect("loopback address"),
            max_queue,
            engine_threads: 1,
        },
    )
    .await
    .expect("start the server")
}

/// The sum of every series of `name` whose labels include all of `labels`
/// (`key="value"` pairs), in a Prometheus text exposition.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((m, r)) => (m, r),
                None => (series, ""),
            };
            (metric == name && labels.iter().all(|want| rest.contains(want)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// `GET {base}/metrics`.
pub async fn scrape(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body")
}
