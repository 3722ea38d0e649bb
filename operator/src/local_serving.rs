//! Local mode's last step, the seeds' health check: the artifact that just
//! passed its gates is served by the worker's OpenAI server on loopback and
//! the spec's system tests are sent through that endpoint by the quality
//! probe, so a local run ends with the model answering over HTTP as it will
//! under vLLM, judged by the same checks as the validation stage.

use quantops_api::ProbeResult;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the server may take to load the artifact and listen.
const START_TIMEOUT: Duration = Duration::from_secs(300);

/// Why the health check could not run or the endpoint did not answer.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error("cannot pick a loopback port: {0}")]
    Port(std::io::Error),
    #[error("cannot start `{worker} {command}`: {source}")]
    Spawn {
        worker: String,
        command: &'static str,
        source: std::io::Error,
    },
    #[error("the server of {artifact} exited with {status} before listening")]
    ServerExited { artifact: String, status: String },
    #[error("the server of {0} did not listen within {START_TIMEOUT:?}")]
    ServerTimeout(String),
    #[error("the probe exited with {0} without a result")]
    Probe(String),
    #[error("the probe's result is unreadable: {0}")]
    Result(String),
}

/// What to serve and what to ask.
#[derive(Debug, Clone)]
pub struct HealthCheck<'a> {
    pub worker: &'a Path,
    pub artifact: &'a Path,
    /// The served model name (the variant).
    pub served_name: &'a str,
    /// The system-tests suite, as the spec names it.
    pub suite: &'a str,
    /// What a relative suite path is resolved against.
    pub root: &'a Path,
    /// Directory for the probe's termination-log file.
    pub scratch: &'a Path,
}

/// The server child, stopped however the check ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl HealthCheck<'_> {
    /// Serves the artifact, probes it once and returns the probe's result.
    pub fn run(&self) -> Result<(String, ProbeResult), ServingError> {
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(ServingError::Port)?;
        let _server = self.serve(addr)?;
        let endpoint = format!("http://{addr}");
        Ok((endpoint.clone(), self.probe(&endpoint)?))
    }

    fn spawn_error(&self, command: &'static str) -> impl FnOnce(std::io::Error) -> ServingError {
        let worker = self.worker.display().to_string();
        move |source| ServingError::Spawn {
            worker,
            command,
            source,
        }
    }

    /// Starts the server and waits until it accepts connections (it loads
    /// the model before binding, so a connection means it can answer).
    fn serve(&self, addr: SocketAddr) -> Result<Server, ServingError> {
        let child = Command::new(self.worker)
            .arg("serve")
            .arg("--model")
            .arg(self.artifact)
            .args(["--served-model-name", self.served_name])
            .args(["--listen", &addr.to_string()])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(self.spawn_error("serve"))?;
        let mut server = Server(child);
        let started = Instant::now();
        while TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = server.0.try_wait() {
                return Err(ServingError::ServerExited {
                    artifact: self.artifact.display().to_string(),
                    status: status.to_string(),
                });
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(ServingError::ServerTimeout(
                    self.artifact.display().to_string(),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(server)
    }

    fn probe(&self, endpoint: &str) -> Result<ProbeResult, ServingError> {
        let log: PathBuf = self.scratch.join(format!(
            "quantops-{}-probe.termination-log",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&log);
        let status = Command::new(self.worker)
            .arg("probe")
            .args(["--endpoint", endpoint, "--model", self.served_name])
            .args(["--suite", self.suite, "--variant", self.served_name])
            .args(["--environment", "local"])
            .arg("--root")
            .arg(self.root)
            .arg(crate::local::ALLOW_LINKS_OUT_OF_ROOT)
            .arg("--termination-log")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()
            .map_err(self.spawn_error("probe"))?;
        let text =
            std::fs::read_to_string(&log).map_err(|_| ServingError::Probe(status.to_string()))?;
        let _ = std::fs::remove_file(&log);
        ProbeResult::parse(&text).map_err(|e| ServingError::Result(e.to_string()))
    }
}
