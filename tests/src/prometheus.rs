//! A real Prometheus for the tests: started on a free loopback port with a
//! temporary storage directory, scraping the targets it is given every
//! second and evaluating the given rule files every second, queried through
//! its HTTP API, and killed (its directory removed) when dropped.
//!
//! Targets are plain `host:port` addresses with a job name, a metrics path
//! and extra labels, so one Prometheus can scrape the operator beside
//! `quantizer-job serve` and `quantizer-job probe --listen` processes:
//!
//! ```ignore
//! let prometheus = Prometheus::start(PrometheusOptions {
//!     targets: vec![
//!         ScrapeTarget::new("quantops", operator.metrics_addr),
//!         ScrapeTarget::new("vllm", serve_addr).label("namespace", "prod"),
//!     ],
//!     rule_files: vec![rules_file],
//! }).await?;
//! prometheus.wait_for_series("up{job=\"vllm\"} == 1", Duration::from_secs(30)).await?;
//! ```
//!
//! The binaries come from `$QUANTOPS_PROMETHEUS_BIN` (set by
//! `tests/tools.sh ensure_prometheus`), else the cache that function fills,
//! else `PATH`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;

use crate::{HarnessError, Result, http_get};

/// One scrape target.
#[derive(Clone, Debug)]
pub struct ScrapeTarget {
    /// The `job` label of its series.
    pub job: String,
    pub address: SocketAddr,
    pub metrics_path: String,
    /// Extra target labels (e.g. `namespace`, as a Kubernetes scrape config
    /// would add them).
    pub labels: BTreeMap<String, String>,
}

impl ScrapeTarget {
    /// `address`'s `/metrics` under job `job`.
    pub fn new(job: &str, address: SocketAddr) -> ScrapeTarget {
        ScrapeTarget {
            job: job.to_string(),
            address,
            metrics_path: "/metrics".to_string(),
            labels: BTreeMap::new(),
        }
    }

    /// Adds a target label.
    pub fn label(mut self, name: &str, value: &str) -> ScrapeTarget {
        self.labels.insert(name.to_string(), value.to_string());
        self
    }
}

/// What a Prometheus is started with.
#[derive(Clone, Debug, Default)]
pub struct PrometheusOptions {
    pub targets: Vec<ScrapeTarget>,
    /// Plain Prometheus rule files (see [`rules_from_prometheus_rule`]).
    pub rule_files: Vec<PathBuf>,
}

/// One sample of an instant vector.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// One alert as `/api/v1/alerts` lists it.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Alert {
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// `pending` or `firing`.
    pub state: String,
    #[serde(default)]
    pub value: String,
}

/// A running Prometheus; killed when dropped.
pub struct Prometheus {
    child: tokio::process::Child,
    /// Where its HTTP API listens.
    pub address: SocketAddr,
    dir: PathBuf,
}

/// The directory holding `prometheus` and `promtool`.
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("QUANTOPS_PROMETHEUS_BIN") {
        return Some(PathBuf::from(dir));
    }
    let cache = std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cache/quantops/prometheus/usr/bin"))?;
    cache.join("prometheus").is_file().then_some(cache)
}

/// A Prometheus binary (`prometheus`, `promtool`).
pub fn binary(name: &str) -> PathBuf {
    bin_dir().map_or_else(|| PathBuf::from(name), |dir| dir.join(name))
}

/// Runs `promtool ARGS`; its output, or an error carrying it.
pub async fn promtool(args: &[&std::ffi::OsStr]) -> Result<String> {
    let program = binary("promtool");
    let output = tokio::process::Command::new(&program)
        .args(args)
        .output()
        .await
        .map_err(|source| HarnessError::Spawn {
            script: program.clone(),
            source,
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        return Err(HarnessError::Command {
            what: format!("promtool {args:?}"),
            status: output.status,
            output: text,
        });
    }
    Ok(text)
}

/// The rule groups of a `monitoring.coreos.com/v1` PrometheusRule manifest
/// as a plain rule file (its `spec`), which Prometheus and promtool read.
pub fn rules_from_prometheus_rule(manifest: &str) -> Result<String> {
    let bad = |what: String| HarnessError::Unexpected(format!("PrometheusRule: {what}"));
    let value: serde_yaml::Value =
        serde_yaml::from_str(manifest).map_err(|e| bad(e.to_string()))?;
    if value["kind"].as_str() != Some("PrometheusRule") {
        return Err(bad(format!("kind is {:?}", value["kind"])));
    }
    let spec = value
        .get("spec")
        .filter(|spec| spec.get("groups").is_some())
        .ok_or_else(|| bad("no spec.groups".to_string()))?;
    serde_yaml::to_string(spec).map_err(|e| bad(e.to_string()))
}

/// A directory of its own under the system's temporary directory.
fn scratch_dir(prefix: &str) -> Result<PathBuf> {
    use rand::Rng;
    let suffix: u64 = rand::rng().random();
    let dir = std::env::temp_dir().join(format!("{prefix}-{suffix:016x}"));
    std::fs::create_dir_all(&dir).map_err(|source| HarnessError::Io {
        what: format!("creating {}", dir.display()),
        source,
    })?;
    Ok(dir)
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|source| HarnessError::Io {
        what: format!("writing {}", path.display()),
        source,
    })
}

/// The scrape configuration: one job per target, 1 s scrape and
/// evaluation intervals. JSON is YAML, and `serde_json` quotes every string.
fn config(options: &PrometheusOptions) -> String {
    let jobs: Vec<serde_json::Value> = options
        .targets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({
                // Job names must be unique; two targets may share a job label.
                "job_name": format!("{}-{i}", t.job),
                "metrics_path": t.metrics_path,
                "static_configs": [{
                    "targets": [t.address.to_string()],
                    "labels": t.labels.clone().into_iter()
                        .chain([("job".to_string(), t.job.clone())])
                        .collect::<BTreeMap<_, _>>(),
                }],
            })
        })
        .collect();
    serde_json::json!({
        "global": { "scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s" },
        "rule_files": options.rule_files,
        "scrape_configs": jobs,
    })
    .to_string()
}

impl Prometheus {
    /// Starts Prometheus and waits until `/-/ready` answers.
    pub async fn start(options: PrometheusOptions) -> Result<Prometheus> {
        let dir = scratch_dir("quantops-prometheus")?;
        let config_file = dir.join("prometheus.yml");
        write(&config_file, &config(&options))?;
        let address = SocketAddr::from(([127, 0, 0, 1], crate::operator::free_port()?));
        let program = binary("prometheus");
        let log = std::fs::File::create(dir.join("prometheus.log")).map_err(|source| {
            HarnessError::Io {
                what: "creating the Prometheus log".into(),
                source,
            }
        })?;
        let child = tokio::process::Command::new(&program)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .arg("--web.enable-lifecycle")
            .arg("--storage.tsdb.retention.time=1h")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| HarnessError::Spawn {
                script: program.clone(),
                source,
            })?;
        let mut prometheus = Prometheus {
            child,
            address,
            dir,
        };
        let timeout = Duration::from_secs(30);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ready = reqwest::Url::parse(&format!("{}/-/ready", prometheus.url()))
                .map_err(|e| HarnessError::Unexpected(e.to_string()))?;
            if let Ok((200, _)) = http_get(ready).await {
                return Ok(prometheus);
            }
            if let Ok(Some(status)) = prometheus.child.try_wait() {
                return Err(HarnessError::Unexpected(format!(
                    "prometheus exited ({status}):\n{}",
                    prometheus.log()
                )));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(HarnessError::Timeout {
                    what: format!("Prometheus to be ready:\n{}", prometheus.log()),
                    timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// The HTTP API's base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// `GET /api/v1/...` with query parameters: the `data` of a successful
    /// answer, else the API's error.
    async fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<serde_json::Value> {
        let url = reqwest::Url::parse_with_params(&format!("{}{path}", self.url()), params)
            .map_err(|e| HarnessError::Unexpected(format!("{path}: {e}")))?;
        let (code, body) = http_get(url).await?;
        let value: serde_json::Value = serde_json::from_str(&body).map_err(|e| {
            HarnessError::Unexpected(format!("{path}: HTTP {code}, not JSON ({e}): {body}"))
        })?;
        if value["status"] != "success" {
            return Err(HarnessError::Unexpected(format!(
                "{path}: {}: {}",
                value["errorType"], value["error"]
            )));
        }
        Ok(value["data"].clone())
    }

    /// Evaluates `promql` now: every sample of the instant vector (a scalar
    /// comes back as one sample without labels). A query Prometheus cannot
    /// parse is an error naming why.
    pub async fn query(&self, promql: &str) -> Result<Vec<Sample>> {
        let data = self.api("/api/v1/query", &[("query", promql)]).await?;
        let value_of = |v: &serde_json::Value| -> f64 {
            v[1].as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or(f64::NAN)
        };
        match data["resultType"].as_str() {
            Some("vector") => Ok(data["result"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|r| Sample {
                    labels: serde_json::from_value(r["metric"].clone()).unwrap_or_default(),
                    value: value_of(&r["value"]),
                })
                .collect()),
            Some("scalar") => Ok(vec![Sample {
                labels: BTreeMap::new(),
                value: value_of(&data["result"]),
            }]),
            other => Err(HarnessError::Unexpected(format!(
                "{promql}: result type {other:?} is not a vector or scalar"
            ))),
        }
    }

    /// Polls `promql` until it returns at least one sample; those samples.
    pub async fn wait_for_series(&self, promql: &str, timeout: Duration) -> Result<Vec<Sample>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let samples = self.query(promql).await?;
            if !samples.is_empty() {
                return Ok(samples);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(HarnessError::Timeout {
                    what: format!("a sample of {promql}"),
                    timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The alerts pending or firing now.
    pub async fn alerts(&self) -> Result<Vec<Alert>> {
        let data = self.api("/api/v1/alerts", &[]).await?;
        serde_json::from_value(data["alerts"].clone())
            .map_err(|e| HarnessError::Unexpected(format!("/api/v1/alerts: {e}")))
    }

    /// The names of the alerting rules loaded.
    pub async fn alert_rules(&self) -> Result<Vec<String>> {
        let data = self.api("/api/v1/rules", &[("type", "alert")]).await?;
        Ok(data["groups"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .filter_map(|r| r["name"].as_str().map(str::to_string))
            .collect())
    }

    /// Each target's job label and health (`up`, `down`, `unknown`).
    pub async fn targets(&self) -> Result<Vec<(String, String)>> {
        let data = self.api("/api/v1/targets", &[("state", "active")]).await?;
        Ok(data["activeTargets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|t| {
                (
                    t["labels"]["job"].as_str().unwrap_or_default().to_string(),
                    t["health"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // kill_on_drop stops the process; its data goes with the directory.
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_job_per_target_with_labels() {
        let options = PrometheusOptions {
            targets: vec![
                ScrapeTarget::new("quantops", SocketAddr::from(([127, 0, 0, 1], 8080)))
                    .label("namespace", "prod"),
            ],
            rule_files: vec![PathBuf::from("/r.yaml")],
        };
        let config: serde_json::Value = serde_json::from_str(&config(&options)).unwrap_or_default();
        assert_eq!(config["global"]["scrape_interval"], "1s");
        assert_eq!(config["rule_files"][0], "/r.yaml");
        let job = &config["scrape_configs"][0]["static_configs"][0];
        assert_eq!(job["targets"][0], "127.0.0.1:8080");
        assert_eq!(job["labels"]["job"], "quantops");
        assert_eq!(job["labels"]["namespace"], "prod");
    }

    #[test]
    fn plain_rules_from_a_prometheus_rule() {
        let manifest = "apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata: {name: x}\nspec:\n  groups:\n    - name: g\n      rules: [{alert: A, expr: up == 0}]\n";
        let rules = rules_from_prometheus_rule(manifest).unwrap_or_default();
        assert!(rules.starts_with("groups:"), "{rules}");
        assert!(rules_from_prometheus_rule("kind: ConfigMap").is_err());
    }
}
