//! `probe` against the in-process server and against a closed port: the
//! score, the exit code, and the termination message's contract keys; the
//! daemon's metrics over a few runs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::serving::{MODEL_NAME, chat_messages, loaded, metric, scrape, start};
use quantizer_job::eval::system_tests::{SystemTest, SystemTestSuite, normalize_answer};
use quantizer_job::layout::Links;
use quantizer_job::openai::Client;
use quantizer_job::probe::daemon::{self, DaemonOptions};
use quantizer_job::probe::{Probe, load_probe_suite};
use quantizer_job::tokenizer::apply_chat_template;

const MAX_TOKENS: usize = 16;

fn test(name: &str) -> SystemTest {
    SystemTest {
        name: name.into(),
        messages: None,
        prompt: None,
        uppercase: None,
        json: None,
        pattern: None,
        equals: None,
        contains: None,
        edge_case: false,
    }
}

/// A suite of two tests: a chat prompt whose expected answer is the model's
/// own greedy answer (passes), and a raw prompt expecting a string the model
/// never writes (fails).
fn write_suite(dir: &Path) -> PathBuf {
    let messages = chat_messages();
    let m = loaded();
    let ids = m
        .tokenizer
        .encode(&apply_chat_template(&messages, true))
        .expect("encode");
    let out = m
        .model
        .generate_greedy(&ids, MAX_TOKENS, m.eos)
        .expect("generate");
    let answer = normalize_answer(&m.tokenizer.decode(&out, true).expect("decode"));
    assert!(!answer.is_empty());
    let mut known = test("known-greedy-answer");
    known.messages = Some(messages);
    known.equals = Some(answer);
    let mut unreachable = test("unreachable");
    unreachable.prompt = Some("The Python interpreter".into());
    unreachable.contains = Some("zq-never-written-qz".into());
    unreachable.edge_case = true;
    let suite = SystemTestSuite {
        max_new_tokens: MAX_TOKENS,
        tests: vec![known, unreachable],
    };
    let path = dir.join("suite.yaml");
    std::fs::write(&path, serde_yaml::to_string(&suite).expect("yaml")).expect("write suite");
    path
}

async fn run_cli(endpoint: &str, suite: &Path, termination: &Path) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_quantizer-job"))
        .args(["probe", "--endpoint", endpoint, "--model", MODEL_NAME])
        .args(["--variant", "v1-int4", "--environment", "test", "--suite"])
        .arg(suite)
        .arg("--termination-log")
        .arg(termination)
        .output()
        .await
        .expect("run the worker")
}

/// The termination message, checked for size and for exactly the contract keys.
fn contract(termination: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(termination).expect("termination message written");
    assert!(text.len() < 4096, "{} bytes", text.len());
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let mut keys: Vec<&str> = v
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "environment",
            "failures",
            "finished_at",
            "kind",
            "latency_seconds",
            "model",
            "passed",
            "score",
            "total",
            "variant"
        ]
    );
    let mut lat: Vec<&str> = v["latency_seconds"]
        .as_object()
        .expect("latency object")
        .keys()
        .map(String::as_str)
        .collect();
    lat.sort_unstable();
    assert_eq!(lat, ["max", "mean", "p50", "p90"]);
    assert_eq!(v["kind"], "probe");
    assert_eq!(v["model"], MODEL_NAME);
    assert_eq!(v["variant"], "v1-int4");
    assert_eq!(v["environment"], "test");
    chrono::DateTime::parse_from_rfc3339(v["finished_at"].as_str().expect("string"))
        .expect("RFC 3339");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_scores_the_served_model() {
    let server = start(8).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let suite = write_suite(dir.path());
    let termination = dir.path().join("termination-log");
    let out = run_cli(&server.base_url(), &suite, &termination).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = contract(&termination);
    assert_eq!(v["score"], 0.5);
    assert_eq!(
        (v["passed"].as_u64(), v["total"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(v["failures"], 0);
    let latency = &v["latency_seconds"];
    let f = |k: &str| latency[k].as_f64().expect("number");
    assert!(f("mean") > 0.0 && f("p50") <= f("p90") && f("p90") <= f("max"));
    let full: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    assert_eq!(full["score"], 0.5);
    assert_eq!(full["tests"][0]["passed"], true);
    assert_eq!(full["tests"][1]["passed"], false);
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_port_is_a_result_not_a_crash() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let suite = write_suite(dir.path());
    let termination = dir.path().join("termination-log");
    let out = run_cli(&format!("http://127.0.0.1:{port}"), &suite, &termination).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = contract(&termination);
    assert_eq!(v["score"], 0.0);
    assert_eq!(v["total"], 2);
    assert_eq!(v["failures"], 2);
    assert_eq!(v["passed"], 0);
}

#[test]
fn a_bad_suite_is_a_crash() {
    let dir = tempfile::tempdir().expect("temp dir");
    let suite = dir.path().join("suite.yaml");
    std::fs::write(&suite, "tests:\n  - name: no-expectation\n    prompt: hi\n").expect("write");
    let termination = dir.path().join("termination-log");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_quantizer-job"))
        .args([
            "probe",
            "--endpoint",
            "http://127.0.0.1:9",
            "--model",
            "m",
            "--suite",
        ])
        .arg(&suite)
        .arg("--termination-log")
        .arg(&termination)
        .output()
        .expect("run the worker");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        // The test is named by index: nothing read from the file is quoted.
        stderr.contains("tests[0]") && stderr.contains("--suite"),
        "{stderr}"
    );
    let empty = dir.path().join("empty.yaml");
    std::fs::write(&empty, "tests: []\n").expect("write");
    assert!(load_probe_suite(Path::new("empty.yaml"), Some(dir.path()), Links::Confined).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_exports_the_window_and_one_alert() {
    let server = start(8).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let suite = load_probe_suite(&write_suite(dir.path()), None, Links::Confined).expect("suite");
    let probe = Probe {
        client: Client::new(&server.base_url(), Duration::from_secs(120)).expect("client"),
        model: MODEL_NAME.into(),
        suite,
        variant: Some("v1-int4".into()),
        environment: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(daemon::run(
        probe,
        DaemonOptions {
            interval: Duration::from_millis(100),
            window: 3,
            threshold: 0.8,
        },
        listener,
        async {
            let _ = stopped.await;
        },
    ));
    let labels = [
        format!("model=\"{MODEL_NAME}\""),
        "variant=\"v1-int4\"".to_string(),
        "environment=\"\"".to_string(),
    ];
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    // Wait (bounded) for three runs; no assertion on how long they take.
    let mut text = String::new();
    for _ in 0..600 {
        text = scrape(&base).await;
        if metric(&text, "quantops_quality_probe_runs_total", &labels) >= 3.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        metric(&text, "quantops_quality_probe_runs_total", &labels) >= 3.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "quantops_quality_score", &labels),
        0.5,
        "{text}"
    );
    assert_eq!(metric(&text, "quantops_quality_last_score", &labels), 0.5);
    assert_eq!(metric(&text, "quantops_quality_threshold", &labels), 0.8);
    // Below the threshold from the first run on: one crossing, one alert.
    assert_eq!(
        metric(&text, "quantops_quality_regression_alerts_total", &labels),
        1.0
    );
    assert_eq!(
        metric(&text, "quantops_quality_probe_failures_total", &labels),
        0.0
    );
    assert!(
        metric(
            &text,
            "quantops_quality_probe_latency_seconds_count",
            &labels
        ) >= 6.0
    );
    stop.send(()).expect("daemon running");
    task.await.expect("join").expect("daemon ends cleanly");
    server.shutdown().await.expect("shutdown");
}
