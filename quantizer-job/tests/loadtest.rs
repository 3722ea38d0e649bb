//! `loadtest` against the in-process server: every profile's report agrees
//! with the server's own counters (output tokens with
//! `vllm:generation_tokens_total`, requests with `vllm:request_success_total`),
//! percentiles are ordered, and the CLI writes a JSON report that parses.

mod common;

use common::serving::{MODEL_NAME, loaded, metric, scrape, start};
use quantizer_job::loadtest::prompts::synthetic_prompts;
use quantizer_job::loadtest::report::Report;
use quantizer_job::loadtest::stats::Distribution;
use quantizer_job::loadtest::{Api, Arrival, Budget, LoadTest, Profile};
use quantizer_job::openai::Client;
use std::time::Duration;

const PROMPT_TOKENS: usize = 16;
const MAX_TOKENS: u32 = 4;

fn ordered(d: &Distribution) {
    assert!(d.p50 <= d.p90 && d.p90 <= d.p99 && d.p99 <= d.max, "{d:?}");
    assert!(d.mean > 0.0, "{d:?}");
}

async fn counters(base: &str) -> (f64, f64) {
    let text = scrape(base).await;
    let label = format!("model_name=\"{MODEL_NAME}\"");
    (
        metric(&text, "vllm:generation_tokens_total", &[&label]),
        metric(&text, "vllm:request_success_total", &[&label]),
    )
}

#[test]
fn prompts_have_the_requested_token_count() {
    let tokenizer = &loaded().tokenizer;
    for n in [1, 16, 64] {
        let prompts = synthetic_prompts(tokenizer, &[], n, 8, 3).expect("prompts");
        assert_eq!(prompts.len(), 8);
        for p in &prompts {
            assert_eq!(tokenizer.encode(&p.text).expect("encode").len(), p.tokens);
            assert_eq!(p.tokens, n, "{:?}", p.text);
        }
        assert_ne!(prompts[0].text, prompts[1].text, "prompts differ");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_profile_agrees_with_the_server_counters() {
    let server = start(64).await;
    let base = server.base_url();
    let prompts: Vec<String> = synthetic_prompts(&loaded().tokenizer, &[], PROMPT_TOKENS, 4, 1)
        .expect("prompts")
        .into_iter()
        .map(|p| p.text)
        .collect();
    let profiles = [
        (Profile::Sync, Api::Completions),
        (Profile::Concurrency(3), Api::Chat),
        (
            Profile::Rate {
                rate: 50.0,
                arrival: Arrival::Poisson,
            },
            Api::Completions,
        ),
        (
            Profile::Rate {
                rate: 50.0,
                arrival: Arrival::Fixed,
            },
            Api::Completions,
        ),
    ];
    for (profile, api) in profiles {
        let (tokens_before, requests_before) = counters(&base).await;
        let report = LoadTest {
            client: Client::new(&base, Duration::from_secs(120)).expect("client"),
            model: MODEL_NAME.into(),
            profile,
            budget: Budget::Requests(5),
            prompts: prompts.clone(),
            prompt_tokens: PROMPT_TOKENS,
            max_tokens: MAX_TOKENS,
            api,
            seed: 9,
        }
        .run()
        .await
        .expect("load test");
        let (tokens_after, requests_after) = counters(&base).await;
        assert_eq!(report.requests, 5, "{profile:?}");
        assert_eq!(report.errors, 0, "{profile:?}: {:?}", report.error_samples);
        assert_eq!(report.completed, 5);
        // ignore_eos: every answer has exactly max_tokens tokens.
        assert_eq!(report.output_tokens, 5 * u64::from(MAX_TOKENS));
        assert_eq!(report.output_tokens as f64, tokens_after - tokens_before);
        assert_eq!(report.completed as f64, requests_after - requests_before);
        if api == Api::Completions {
            assert_eq!(report.prompt_tokens_mean, PROMPT_TOKENS as f64);
        }
        ordered(&report.ttft_s);
        ordered(&report.itl_s);
        ordered(&report.e2e_s);
        assert_eq!(report.itl_s.count, 5 * (MAX_TOKENS as usize - 1));
        assert!(report.requests_per_s > 0.0 && report.output_tokens_per_s > 0.0);
        assert!(report.e2e_s.p50 >= report.ttft_s.p50);
    }
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_are_counted_as_errors() {
    let server = start(1).await;
    let base = server.base_url();
    let report = LoadTest {
        client: Client::new(&base, Duration::from_secs(120)).expect("client"),
        model: MODEL_NAME.into(),
        profile: Profile::Concurrency(6),
        budget: Budget::Requests(12),
        prompts: vec!["The Python interpreter".into()],
        prompt_tokens: 4,
        max_tokens: 16,
        api: Api::Completions,
        seed: 0,
    }
    .run()
    .await
    .expect("load test");
    assert_eq!(report.completed + report.errors, 12);
    assert!(report.errors > 0, "{report:?}");
    assert!(
        report.error_samples[0].contains("429"),
        "{:?}",
        report.error_samples
    );
    let (_, successes) = counters(&base).await;
    assert_eq!(successes, report.completed as f64);
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_writes_a_json_report() {
    let server = start(16).await;
    let base = server.base_url();
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("report.json");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_quantizer-job"))
        .args(["loadtest", "--endpoint", &base, "--model", MODEL_NAME])
        .args([
            "--profile",
            "concurrency",
            "--concurrency",
            "2",
            "--requests",
            "4",
        ])
        .args(["--prompt-tokens", "8", "--max-tokens", "3", "--tokenizer"])
        .arg(common::model_dir())
        .arg("--json")
        .arg(&json)
        .output()
        .await
        .expect("run the worker");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("TTFT") && stdout.contains("req/s"),
        "{stdout}"
    );
    let report: Report =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json written"))
            .expect("the report parses");
    assert_eq!(report.completed, 4);
    assert_eq!(report.output_tokens, 12);
    assert_eq!(report.prompt_tokens_mean, 8.0);
    assert_eq!(report.profile, "concurrency");
    server.shutdown().await.expect("shutdown");
}
