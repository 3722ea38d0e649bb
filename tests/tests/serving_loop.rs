//! The monitoring loop end to end on one machine, with real processes and a
//! real Prometheus (no cluster needed): `quantizer-job serve` serves the
//! bundled FP16 model, `quantizer-job loadtest` drives it and its figures
//! agree with the server's own vLLM counters as Prometheus scraped them,
//! `quantizer-job probe --listen` scores the endpoint on the example
//! system tests, and when the endpoint is switched to a badly quantized
//! (2-bit RTN) variant the score drops and the PrometheusRule's
//! `QuantopsQualityRegression` fires in Prometheus's own rule evaluation.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quantops_e2e::prometheus::{
    Prometheus, PrometheusOptions, ScrapeTarget, rules_from_prometheus_rule,
};
use quantops_e2e::{init_tracing, repo_root};

const SERVED: &str = "tiny-llama";
const THRESHOLD: &str = "0.7";

fn worker() -> PathBuf {
    repo_root().join("target/release/quantizer-job")
}

fn volume() -> PathBuf {
    repo_root().join("manifests/examples/volume")
}

fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("its address")
}

/// A child process killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(what: &'static str, args: &[&str]) -> Process {
    let child = Command::new(worker())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    Process(child)
}

/// Serves `model` on `addr` and waits until it accepts connections (the
/// model is loaded before the socket is bound).
fn serve(model: &Path, addr: SocketAddr) -> Process {
    let model = model.display().to_string();
    let listen = addr.to_string();
    let mut process = spawn(
        "serve",
        &[
            "serve",
            "--model",
            &model,
            "--served-model-name",
            SERVED,
            "--listen",
            &listen,
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = process.0.try_wait() {
            panic!("serve {model} exited with {status}");
        }
        assert!(Instant::now() < deadline, "serve {model} did not listen");
        std::thread::sleep(Duration::from_millis(100));
    }
    process
}

/// The bundled model quantized to 2-bit RTN (group 128): the variant that
/// should never have left experiment.
fn two_bit_artifact(out: &Path) -> PathBuf {
    let spec = out.join("rtn-2bit.yaml");
    std::fs::write(
        &spec,
        "apiVersion: quantops.dev/v1alpha1\nkind: QuantizedModel\nmetadata: { name: tiny-2bit }\nspec:\n  baseModel: { name: example/tiny-llama, path: tiny-llama }\n  version: v1\n  quantization: { method: rtn, bits: 2, groupSize: 128, symmetric: false, ignore: [lm_head] }\n",
    )
    .expect("write the spec");
    let status = Command::new(worker())
        .args(["quantize", "--spec"])
        .arg(&spec)
        .arg("--root")
        .arg(volume())
        // The example volume links to ../shared/data, outside itself.
        .arg("--allow-links-out-of-root")
        .arg("--output-root")
        .arg(out)
        .arg("--termination-log")
        .arg(out.join("quantize.log"))
        .env("RUST_LOG", "warn")
        .status()
        .expect("run quantizer-job quantize");
    assert!(status.success(), "quantize: {status}");
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("quantize.log")).expect("quantize summary"),
    )
    .expect("summary JSON");
    PathBuf::from(summary["artifact_path"].as_str().expect("artifact_path"))
}

async fn value(prometheus: &Prometheus, promql: &str) -> f64 {
    prometheus
        .query(promql)
        .await
        .unwrap_or_else(|e| panic!("{promql}: {e}"))
        .first()
        .map_or(f64::NAN, |s| s.value)
}

/// Waits until `promql` has a sample satisfying `ok`, returning its value.
async fn wait_until(
    prometheus: &Prometheus,
    promql: &str,
    ok: impl Fn(f64) -> bool,
    timeout: Duration,
) -> f64 {
    let deadline = Instant::now() + timeout;
    loop {
        let v = value(prometheus, promql).await;
        if ok(v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{promql} is still {v} after {timeout:?}\n{}",
            prometheus.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_and_alert_follow_a_switch_to_a_two_bit_variant() {
    init_tracing();
    let scratch =
        std::env::temp_dir().join(format!("quantops-serving-loop-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let two_bit = two_bit_artifact(&scratch);
    let fp16 = volume().join("tiny-llama");

    let rules = scratch.join("rules.yaml");
    let manifest =
        std::fs::read_to_string(repo_root().join("manifests/monitoring/prometheusrule.yaml"))
            .expect("read the PrometheusRule");
    std::fs::write(
        &rules,
        rules_from_prometheus_rule(&manifest).expect("its groups"),
    )
    .expect("write rules.yaml");

    let serve_addr = free_port();
    let probe_addr = free_port();
    let mut server = serve(&fp16, serve_addr);
    let prometheus = Prometheus::start(PrometheusOptions {
        targets: vec![
            ScrapeTarget::new("vllm", serve_addr),
            ScrapeTarget::new("quality-probe", probe_addr),
        ],
        rule_files: vec![rules],
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let minute = Duration::from_secs(60);

    // 1. The load test's own figures against the server's counters, as
    //    Prometheus scraped them before and after (no other traffic yet).
    let tokens = r#"sum(vllm:generation_tokens_total{job="vllm"})"#;
    let successes = r#"sum(vllm:request_success_total{job="vllm"})"#;
    let tokens_before = wait_until(&prometheus, tokens, f64::is_finite, minute).await;
    // Labelled by finish reason, so absent (NaN here) until the first answer.
    let successes_before = value(&prometheus, successes).await.max(0.0);
    let report_file = scratch.join("loadtest.json");
    let endpoint = format!("http://{serve_addr}");
    let status = Command::new(worker())
        .args([
            "loadtest",
            "--endpoint",
            &endpoint,
            "--model",
            SERVED,
            "--profile",
            "concurrency",
            "--concurrency",
            "2",
            "--requests",
            "6",
            "--prompt-tokens",
            "16",
            "--max-tokens",
            "8",
        ])
        .arg("--tokenizer")
        .arg(&fp16)
        .arg("--json")
        .arg(&report_file)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .status()
        .expect("run loadtest");
    assert!(status.success(), "loadtest: {status}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report_file).expect("report"))
            .expect("JSON");
    assert_eq!(report["completed"], 6, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    let output_tokens = report["output_tokens"].as_f64().expect("output_tokens");
    assert_eq!(
        output_tokens, 48.0,
        "6 requests × 8 tokens, end of sequence ignored"
    );
    let tokens_after = wait_until(
        &prometheus,
        tokens,
        |v| v >= tokens_before + output_tokens,
        minute,
    )
    .await;
    assert_eq!(tokens_after - tokens_before, output_tokens);
    assert_eq!(value(&prometheus, successes).await - successes_before, 6.0);
    let e2e_count = value(
        &prometheus,
        r#"sum(vllm:e2e_request_latency_seconds_count{job="vllm"})"#,
    )
    .await;
    assert!(e2e_count >= 6.0, "{e2e_count}");

    // 2. The probe daemon scores the FP16 endpoint above the threshold.
    let suite = volume().join("system-tests.yaml").display().to_string();
    let listen = probe_addr.to_string();
    let _probe = spawn(
        "probe",
        &[
            "probe",
            "--endpoint",
            &endpoint,
            "--model",
            SERVED,
            "--suite",
            &suite,
            "--variant",
            "v1-int2",
            "--environment",
            "prod",
            "--threshold",
            THRESHOLD,
            "--window",
            "2",
            "--interval",
            "1",
            "--listen",
            &listen,
        ],
    );
    let score = r#"min(quantops_quality_score{job="quality-probe",environment="prod"})"#;
    let good = wait_until(&prometheus, score, |v| v >= 0.7, 2 * minute).await;
    assert!(good <= 1.0);
    assert_eq!(prometheus.alerts().await.expect("alerts"), []);

    // 3. The endpoint switches to the 2-bit variant: same address, same name.
    drop(server);
    server = serve(&two_bit, serve_addr);
    let bad = wait_until(&prometheus, score, |v| v < 0.7, 2 * minute).await;
    assert!(bad < good, "{bad} < {good}");
    eprintln!("quality score: FP16 {good:.3}, 2-bit {bad:.3} (threshold {THRESHOLD})");
    let regressions = r#"sum(quantops_quality_regression_alerts_total{job="quality-probe"})"#;
    assert_eq!(
        wait_until(&prometheus, regressions, |v| v >= 1.0, minute).await,
        1.0
    );
    // The rule holds for 1m before it fires.
    let deadline = Instant::now() + 3 * minute;
    let fired = loop {
        let alerts = prometheus.alerts().await.expect("alerts");
        if let Some(a) = alerts.iter().find(|a| {
            a.labels.get("alertname").map(String::as_str) == Some("QuantopsQualityRegression")
                && a.state == "firing"
        }) {
            break a.clone();
        }
        assert!(Instant::now() < deadline, "no firing alert: {alerts:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert_eq!(
        fired.labels.get("environment").map(String::as_str),
        Some("prod")
    );
    assert_eq!(
        fired.labels.get("variant").map(String::as_str),
        Some("v1-int2")
    );
    drop(server);
    drop(prometheus);
    let _ = std::fs::remove_dir_all(&scratch);
}
