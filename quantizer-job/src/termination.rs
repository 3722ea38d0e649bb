//! The worker's compact summary for the operator, written to the pod's
//! termination message file, which the kubelet copies into the pod status
//! (`state.terminated.message`). The operator reads that, not the volume.

use quantops_api::StageSummary;
use std::path::PathBuf;

/// Where Kubernetes expects the termination message by default.
pub const DEFAULT_PATH: &str = "/dev/termination-log";

/// The termination-message file, if this process has one.
#[derive(Clone, Debug)]
pub struct TerminationLog {
    path: Option<PathBuf>,
}

impl TerminationLog {
    /// Uses `explicit` when given; otherwise the default path, but only when
    /// the file already exists (the kubelet creates it), so that a local run
    /// never creates files under /dev.
    pub fn new(explicit: Option<PathBuf>) -> TerminationLog {
        let path = explicit.or_else(|| {
            let default = PathBuf::from(DEFAULT_PATH);
            default.is_file().then_some(default)
        });
        TerminationLog { path }
    }

    /// Writes the summary; a failure to write is logged, not fatal: the
    /// full result is in `report.json` either way.
    pub fn write(&self, summary: &StageSummary) {
        self.write_text(&summary.to_termination_message());
    }

    /// Writes an already rendered compact message (the probe's summary);
    /// failures are logged, not fatal, as for [`Self::write`].
    pub fn write_text(&self, message: &str) {
        if let Some(path) = &self.path
            && let Err(error) = std::fs::write(path, message)
        {
            tracing::warn!(path = %path.display(), %error, "cannot write the termination message");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_compact_json_to_explicit_path() {
        let path = std::env::temp_dir().join(format!("qo-term-{}", std::process::id()));
        let log = TerminationLog::new(Some(path.clone()));
        log.write(&StageSummary {
            stage: "quantize".into(),
            variant: "v".into(),
            ..Default::default()
        });
        let text = std::fs::read_to_string(&path).expect("written");
        let back: StageSummary = serde_json::from_str(&text).expect("json");
        assert_eq!(back.stage, "quantize");
        std::fs::remove_file(path).ok();
    }
}
