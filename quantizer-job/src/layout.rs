//! Where a stage reads and writes: the spec's relative paths resolved against
//! the model volume (`--root`), and the artifact directory of DESIGN.md,
//! `{output root}/{model}/{version}-{precision}-{config}/`, which also holds
//! the intermediate results that pass from one stage's Job to the next.

use quantops_api::{QuantizedModelSpec, variant};
use std::path::{Path, PathBuf};

/// File names inside the artifact directory, defined once.
pub mod files {
    /// Baseline figures and greedy generations, written by the baseline stage.
    pub const BASELINE: &str = "baseline.json";
    /// What the quantize stage measured (timings, calibration facts).
    pub const QUANTIZE: &str = "quantize.json";
    /// The full validation report, DESIGN.md's contract.
    pub const REPORT: &str = "report.json";
    /// The recipe as applied.
    pub const RECIPE: &str = "recipe.yaml";
    /// The model card.
    pub const CARD: &str = "README.md";
}

/// The resolved locations of one pipeline run.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Inputs (checkpoint, calibration and evaluation files) resolve against this.
    pub root: PathBuf,
    /// The artifact directory of this variant.
    pub artifact_dir: PathBuf,
    /// The variant name.
    pub variant: String,
}

impl Layout {
    /// Resolves the layout; `output_root` overrides `root` as the base of
    /// `spec.output.path` (local mode writes outside a read-only data tree).
    pub fn new(spec: &QuantizedModelSpec, root: &Path, output_root: Option<&Path>) -> Layout {
        let out_base = output_root.unwrap_or(root);
        Layout {
            root: root.to_path_buf(),
            artifact_dir: resolve(out_base, &spec.output.path).join(variant::artifact_dir(spec)),
            variant: variant::variant_name(spec),
        }
    }

    /// A spec path (absolute, or relative to the root).
    pub fn input(&self, path: &str) -> PathBuf {
        resolve(&self.root, path)
    }

    /// A file in the artifact directory.
    pub fn artifact_file(&self, name: &str) -> PathBuf {
        self.artifact_dir.join(name)
    }
}

fn resolve(base: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quantops_api::spec_file::parse_quantized_model;

    #[test]
    fn artifact_dir_follows_design_and_output_root_overrides() {
        let qm = parse_quantized_model(
            "kind: QuantizedModel\nmetadata: {name: x}\nspec:\n  baseModel: {name: example/tiny-llama, path: m}\n  version: v1.2\n  quantization: {method: rtn}\n  output: {path: quantized}\n",
            "t",
        )
        .expect("valid");
        let layout = Layout::new(&qm.spec, Path::new("/models"), None);
        assert_eq!(
            layout.artifact_dir,
            Path::new("/models/quantized/tiny-llama/v1.2-int4-rtn-g128")
        );
        assert_eq!(layout.input("m"), Path::new("/models/m"));
        assert_eq!(layout.input("/abs/m"), Path::new("/abs/m"));
        let local = Layout::new(&qm.spec, Path::new("/ro"), Some(Path::new("/tmp/out")));
        assert!(local.artifact_dir.starts_with("/tmp/out/quantized"));
    }
}
