//! Which QuantizedModel may write an artifact directory. The model volume
//! is one claim per namespace, so two models of a namespace with the same
//! `spec.output.path` and variant would write into one directory at once
//! (one's `report.json` carrying the other's gates). A model that already
//! ran a stage keeps the directory, then the older model (by creation time,
//! then by name); the other waits, with a condition naming it, until it is
//! deleted or moved. This decides from the cache; [`crate::output_claim`]
//! makes it exact where the cache lags.

use kube::ResourceExt;
use quantops_api::{QuantizedModel, QuantizedModelSpec};

/// The artifact directory on the model volume: `spec.output.path` (with
/// `.` and empty segments dropped and `..` applied) joined with the
/// variant's `{model}/{version}-{precision}-{config}`.
pub fn artifact_dir(spec: &QuantizedModelSpec) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let joined = format!(
        "{}/{}",
        spec.output.path,
        quantops_api::variant::artifact_dir(spec)
    );
    for segment in joined.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            other => segments.push(other),
        }
    }
    segments.join("/")
}

/// The model that keeps `dir` when `model` asks for it too: another one of
/// the same namespace, not being deleted, writing the same directory, that
/// has run a stage while `model` has not, or else was created earlier (or
/// at the same second with a smaller name). A model that started keeps its
/// directory, so that a newcomer can never stop it half-way.
pub fn taken_by<'a>(
    model: &QuantizedModel,
    others: impl IntoIterator<Item = &'a QuantizedModel>,
) -> Option<&'a QuantizedModel> {
    let dir = artifact_dir(&model.spec);
    let precedence = |qm: &QuantizedModel| {
        let started = qm.status.as_ref().is_some_and(|s| !s.stages.is_empty());
        // A model without a creation time (not stored yet) comes last.
        let created = qm.metadata.creation_timestamp.as_ref().map(|t| t.0);
        (!started, created.is_none(), created, qm.name_any())
    };
    let mine = precedence(model);
    others
        .into_iter()
        .filter(|other| other.namespace() == model.namespace())
        .filter(|other| other.name_any() != model.name_any())
        .filter(|other| other.metadata.deletion_timestamp.is_none())
        .filter(|other| artifact_dir(&other.spec) == dir)
        .filter(|other| precedence(other) < mine)
        .min_by_key(|other| precedence(other))
}

/// The `Ready=False, reason OutputConflict` message, naming the model
/// (`namespace`/`owner`) that writes the directory.
pub fn conflict_message(model: &QuantizedModel, namespace: &str, owner: &str) -> String {
    format!(
        "spec.output: artifact directory {} is already used by QuantizedModel {namespace}/{owner}",
        artifact_dir(&model.spec)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn model(namespace: &str, name: &str, created: i64, output: &str) -> QuantizedModel {
        let yaml = format!(
            "apiVersion: quantops.dev/v1alpha1\nkind: QuantizedModel\nmetadata: {{name: {name}, namespace: {namespace}, uid: uid-{name}}}\nspec:\n  baseModel: {{name: example/tiny-llama, path: m}}\n  version: v1.2\n  quantization: {{method: gptq, bits: 4, groupSize: 128, symmetric: false}}\n  calibration: {{path: c.txt}}\n  output: {{path: {output}}}\n"
        );
        let mut qm: QuantizedModel = serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("{e}"));
        qm.metadata.creation_timestamp = Timestamp::from_second(created).ok().map(Time);
        qm
    }

    #[test]
    fn the_directory_joins_output_and_variant() {
        let qm = model("experiment", "a", 1, "./quantized/");
        assert_eq!(
            artifact_dir(&qm.spec),
            "quantized/tiny-llama/v1.2-int4-gptq-g128-asym"
        );
    }

    #[test]
    fn the_older_model_keeps_the_directory() {
        let older = model("experiment", "other", 10, "quantized");
        let newer = model("experiment", "mine", 20, "quantized/.");
        let all = [older.clone(), newer.clone()];
        let owner = taken_by(&newer, &all).map(|o| o.name_any());
        assert_eq!(owner.as_deref(), Some("other"));
        assert_eq!(
            conflict_message(&newer, "experiment", &older.name_any()),
            "spec.output: artifact directory quantized/tiny-llama/v1.2-int4-gptq-g128-asym is already used by QuantizedModel experiment/other"
        );
        assert!(taken_by(&older, &all).is_none(), "the older one runs");

        // Same second: the smaller name keeps it.
        let a = model("experiment", "a", 10, "quantized");
        let b = model("experiment", "b", 10, "quantized");
        let both = [a.clone(), b.clone()];
        assert_eq!(
            taken_by(&b, &both).map(|o| o.name_any()).as_deref(),
            Some("a")
        );
        assert!(taken_by(&a, &both).is_none());
    }

    #[test]
    fn a_model_that_started_keeps_the_directory_from_an_older_one() {
        let older = model("experiment", "a", 10, "quantized");
        let mut started = model("experiment", "b", 20, "quantized");
        let mut status = quantops_api::QuantizedModelStatus::default();
        status.stages.insert(
            "baseline".to_string(),
            quantops_api::quantized_model::StageRecord {
                hash: "h".to_string(),
                job: "j".to_string(),
                job_uid: None,
                state: quantops_api::quantized_model::StageState::Running,
            },
        );
        started.status = Some(status);
        let all = [older.clone(), started.clone()];
        assert!(
            taken_by(&started, &all).is_none(),
            "the started one runs on"
        );
        assert_eq!(
            taken_by(&older, &all).map(|o| o.name_any()).as_deref(),
            Some("b")
        );
    }

    #[test]
    fn other_directories_namespaces_and_deleted_models_do_not_conflict() {
        let mine = model("experiment", "mine", 20, "quantized");
        let elsewhere = model("experiment", "x", 10, "other-root");
        let other_namespace = model("test", "y", 10, "quantized");
        let mut going = model("experiment", "z", 10, "quantized");
        going.metadata.deletion_timestamp = Timestamp::from_second(30).ok().map(Time);
        let all = [elsewhere, other_namespace, going, mine.clone()];
        assert!(taken_by(&mine, &all).is_none());
    }
}
