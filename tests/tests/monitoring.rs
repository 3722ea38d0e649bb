//! The monitoring manifests against a real Prometheus (Debian's package,
//! `tests/tools.sh ensure_prometheus`): the PrometheusRule's groups pass
//! `promtool check rules` and the unit tests in
//! `manifests/monitoring/tests/`, every dashboard query parses, and a
//! Prometheus scraping the operator (started as the other e2e tests start
//! it) sees its `quantops_*` metrics and loads the alerts.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::time::Duration;

use quantops_e2e::operator::{Operator, OperatorOptions, install_chart, sim_worker_image};
use quantops_e2e::prometheus::{
    Prometheus, PrometheusOptions, ScrapeTarget, promtool, rules_from_prometheus_rule,
};
use quantops_e2e::{TestEnv, init_tracing, repo_root};

const ALERTS: [&str; 4] = [
    "QuantopsQualityRegression",
    "QuantopsLatencySLO",
    "QuantopsPipelineFailed",
    "QuantopsPromotionStuck",
];

/// A scratch directory holding the PrometheusRule's groups as `rules.yaml`
/// and a copy of the promtool unit tests beside it (they name `rules.yaml`).
struct RulesDir(PathBuf);

impl RulesDir {
    fn new() -> RulesDir {
        let dir = std::env::temp_dir().join(format!("quantops-rules-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("rules dir");
        let manifest =
            std::fs::read_to_string(repo_root().join("manifests/monitoring/prometheusrule.yaml"))
                .expect("read the PrometheusRule");
        let rules = rules_from_prometheus_rule(&manifest).expect("its groups");
        std::fs::write(dir.join("rules.yaml"), rules).expect("write rules.yaml");
        std::fs::copy(
            repo_root().join("manifests/monitoring/tests/alerts.test.yaml"),
            dir.join("alerts.test.yaml"),
        )
        .expect("copy the unit tests");
        RulesDir(dir)
    }

    fn rules(&self) -> PathBuf {
        self.0.join("rules.yaml")
    }
}

impl Drop for RulesDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn alert_rules_pass_promtool_check_and_unit_tests() {
    let dir = RulesDir::new();
    let checked = promtool(&[
        OsStr::new("check"),
        OsStr::new("rules"),
        dir.rules().as_os_str(),
    ])
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(checked.contains("SUCCESS: 4 rules found"), "{checked}");
    let tested = promtool(&[
        OsStr::new("test"),
        OsStr::new("rules"),
        dir.0.join("alerts.test.yaml").as_os_str(),
    ])
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(tested.contains("SUCCESS"), "{tested}");
    // Every alert has a firing case and a silent case in the unit tests.
    let tests = std::fs::read_to_string(dir.0.join("alerts.test.yaml")).expect("tests");
    for alert in ALERTS {
        assert!(
            tests.matches(&format!("alertname: {alert}")).count() >= 2,
            "{alert} needs a firing and a silent case"
        );
    }
}

/// Grafana's variables, as a query would have them substituted.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__range", "1h")
        .replace("$environment", ".*")
        .replace("$namespace", ".*")
}

fn dashboard_exprs() -> Vec<String> {
    let text =
        std::fs::read_to_string(repo_root().join("manifests/monitoring/grafana-dashboard.json"))
            .expect("read the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            if let Some(expr) = target["expr"].as_str() {
                exprs.push(expr.to_string());
            }
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        if let Some(query) = variable["query"]["query"].as_str() {
            // label_values(metric, label) is Grafana's; Prometheus gets the metric.
            let metric = query
                .trim_start_matches("label_values(")
                .split(',')
                .next()
                .unwrap_or_default();
            exprs.push(metric.to_string());
        }
    }
    exprs
}

#[tokio::test]
async fn dashboard_queries_parse_in_prometheus() {
    init_tracing();
    let prometheus = Prometheus::start(PrometheusOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let exprs = dashboard_exprs();
    assert!(exprs.len() >= 20, "{exprs:?}");
    for metric in [
        "quantops_stage_duration_seconds_bucket",
        "quantops_gate_results_total",
        "quantops_promotions_total",
        "quantops_quality_score",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:generation_tokens_total",
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(metric)),
            "no panel reads {metric}"
        );
    }
    for expr in &exprs {
        prometheus
            .query(&substitute(expr))
            .await
            .unwrap_or_else(|e| panic!("dashboard query {expr}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_operator_and_loads_the_alerts() {
    init_tracing();
    let env = TestEnv::new("monitoring").await.expect("test namespace");
    install_chart(&env, &[]).await.expect("install the chart");
    let mut options = OperatorOptions::new("quantops-0", &sim_worker_image(0));
    options.leader_election = false;
    let operator = Operator::start(&env, options).await.expect("operator");
    let dir = RulesDir::new();
    let prometheus = Prometheus::start(PrometheusOptions {
        targets: vec![ScrapeTarget::new("quantops", operator.metrics_addr)],
        rule_files: vec![dir.rules()],
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    let wait = Duration::from_secs(60);
    let up = prometheus
        .wait_for_series(r#"up{job="quantops"} == 1"#, wait)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", prometheus.log()));
    assert_eq!(up.len(), 1);
    assert_eq!(
        prometheus.targets().await.expect("targets"),
        [("quantops".to_string(), "up".to_string())]
    );
    // The leader gauge, the reconcile counters and the promotion gauges
    // (set from the controller's cache) arrive under their quantops_ names.
    let leader = prometheus
        .wait_for_series(r#"quantops_leader{job="quantops"}"#, wait)
        .await
        .expect("quantops_leader");
    assert_eq!(leader[0].value, 1.0);
    let phases = prometheus
        .wait_for_series(r#"quantops_modelpromotions{job="quantops"}"#, wait)
        .await
        .expect("quantops_modelpromotions");
    let mut names: Vec<&str> = phases
        .iter()
        .filter_map(|s| s.labels.get("phase").map(String::as_str))
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "Blocked",
            "Canary",
            "Failed",
            "Pending",
            "Promoted",
            "RolledBack",
            "Syncing"
        ]
    );
    assert!(phases.iter().all(|s| s.value == 0.0), "{phases:?}");
    let models = prometheus
        .wait_for_series(
            r#"quantops_quantizedmodels{job="quantops",phase="Failed"}"#,
            wait,
        )
        .await
        .expect("quantops_quantizedmodels");
    assert_eq!(models[0].value, 0.0);

    let mut loaded = prometheus.alert_rules().await.expect("rules");
    loaded.sort_unstable();
    let mut expected = ALERTS.map(str::to_string).to_vec();
    expected.sort_unstable();
    assert_eq!(loaded, expected);
    // A healthy operator with nothing failed or stuck raises nothing.
    assert_eq!(prometheus.alerts().await.expect("alerts"), []);

    drop(prometheus);
    drop(operator);
    env.cleanup().await.expect("delete the test namespace");
}
