//! Where a stage reads and writes: the spec's relative paths resolved against
//! the model volume (`--root`), and the artifact directory of DESIGN.md,
//! `{output root}/{model}/{version}-{precision}-{config}/`, which also holds
//! the intermediate results that pass from one stage's Job to the next.
//!
//! Every path is confined to its root before anything is opened, in two
//! steps: lexically (relative, no `.` or `..` segment: the rule the CRD and
//! `spec_file::validate` apply, checked again here so that no caller can
//! skip it), then on the file system: the real location, with every
//! symbolic link followed, must stay under the root's real location, unless
//! the volume's owner allowed links out ([`Links::AllowOutOfRoot`], which
//! local mode uses for a data tree of its own that links elsewhere).

use quantops_api::rules::{self, PathError};
use quantops_api::{QuantizedModelSpec, variant};
use std::path::{Component, Path, PathBuf};

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

/// Whether a symbolic link under the root may lead out of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Links {
    /// The real location must stay under the root: what a Job runs with,
    /// since nothing outside `/models` in its pod is the spec's to read.
    Confined,
    /// Links are followed wherever they lead; spec paths are still checked
    /// lexically. For a local data tree whose owner linked it to data kept
    /// elsewhere (the bundled example volume does).
    AllowOutOfRoot,
}

/// Why a spec path was refused; each names its field.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// Not a relative, normalised path.
    #[error("{field}: {path:?} must be {expected}: {reason}", expected = rules::PATH_EXPECTED)]
    NotRelative {
        field: String,
        path: String,
        reason: PathError,
    },
    /// A symbolic link on the way leads out of the root.
    #[error(
        "{field}: {path:?} leads out of {root} through a symbolic link; links out of the model volume are refused (local mode: --allow-links-out-of-root)"
    )]
    LeavesRoot {
        field: String,
        path: String,
        root: PathBuf,
    },
    /// A symbolic link on the way points at nothing, so where it leads
    /// cannot be checked.
    #[error("{field}: {path:?} passes through a dangling symbolic link under {root}")]
    DanglingLink {
        field: String,
        path: String,
        root: PathBuf,
    },
    /// The root or the path could not be examined.
    #[error("{field}: cannot resolve {path:?} under {root}: {source}")]
    Io {
        field: String,
        path: String,
        root: PathBuf,
        source: std::io::Error,
    },
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
    links: Links,
}

impl Layout {
    /// Resolves the layout; `output_root` overrides `root` as the base of
    /// `spec.output.path` (local mode writes outside a read-only data tree).
    pub fn new(
        spec: &QuantizedModelSpec,
        root: &Path,
        output_root: Option<&Path>,
        links: Links,
    ) -> Result<Layout, LayoutError> {
        let out_base = output_root.unwrap_or(root);
        let output = confine(out_base, "spec.output.path", &spec.output.path, links)?;
        let artifact = variant::artifact_dir(spec);
        let artifact_dir = confine(
            &output,
            "spec.baseModel.name and spec.version (the artifact directory)",
            &artifact,
            links,
        )?;
        Ok(Layout {
            root: root.to_path_buf(),
            artifact_dir,
            variant: variant::variant_name(spec),
            links,
        })
    }

    /// A spec path, confined to the root; `field` names it in errors.
    pub fn input(&self, field: &str, path: &str) -> Result<PathBuf, LayoutError> {
        confine(&self.root, field, path, self.links)
    }

    /// A file in the artifact directory.
    pub fn artifact_file(&self, name: &str) -> PathBuf {
        self.artifact_dir.join(name)
    }
}

/// `root` joined with the spec path `path`, refused when `path` is not a
/// relative normalised path or (with [`Links::Confined`]) when its real
/// location leaves the root's. A path that does not exist yet is checked up
/// to its deepest existing ancestor, which is where it would be created.
pub fn confine(root: &Path, field: &str, path: &str, links: Links) -> Result<PathBuf, LayoutError> {
    rules::relative_path(path).map_err(|reason| LayoutError::NotRelative {
        field: field.to_string(),
        path: path.to_string(),
        reason,
    })?;
    let joined = root.join(path);
    if links == Links::AllowOutOfRoot {
        return Ok(joined);
    }
    let io = |source| LayoutError::Io {
        field: field.to_string(),
        path: path.to_string(),
        root: root.to_path_buf(),
        source,
    };
    let real_root = real_location(root).map_err(io)?;
    let real = real_location(&joined).map_err(io)?;
    match real {
        Real::Dangling => Err(LayoutError::DanglingLink {
            field: field.to_string(),
            path: path.to_string(),
            root: root.to_path_buf(),
        }),
        Real::At(real) if matches!(&real_root, Real::At(r) if real.starts_with(r)) => Ok(joined),
        Real::At(_) => Err(LayoutError::LeavesRoot {
            field: field.to_string(),
            path: path.to_string(),
            root: root.to_path_buf(),
        }),
    }
}

/// Where a path really is.
enum Real {
    At(PathBuf),
    Dangling,
}

/// The canonical location of `path`: its deepest existing ancestor with
/// every link resolved, then the components that do not exist yet (plain
/// names, since the path was checked lexically).
fn real_location(path: &Path) -> std::io::Result<Real> {
    let absolute = std::path::absolute(path)?;
    let mut missing = Vec::new();
    let mut existing = absolute.as_path();
    loop {
        match existing.canonicalize() {
            Ok(real) => {
                let mut real = real;
                real.extend(missing.iter().rev());
                return Ok(Real::At(real));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // An entry that exists but cannot be resolved is a link to nothing.
                if existing.symlink_metadata().is_ok() {
                    return Ok(Real::Dangling);
                }
                match (existing.parent(), existing.components().next_back()) {
                    (Some(parent), Some(Component::Normal(name))) => {
                        missing.push(name.to_os_string());
                        existing = parent;
                    }
                    _ => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quantops_api::QuantizedModel;
    use quantops_api::spec_file::parse_quantized_model;

    fn spec(output: &str) -> QuantizedModel {
        parse_quantized_model(
            &format!("kind: QuantizedModel\nmetadata: {{name: x}}\nspec:\n  baseModel: {{name: example/tiny-llama, path: m}}\n  version: v1.2\n  quantization: {{method: rtn}}\n  output: {{path: {output}}}\n"),
            "t",
        )
        .expect("valid")
    }

    /// A scratch directory removed at the end.
    struct Scratch(PathBuf);
    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("quantops-layout-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("scratch dir");
            Scratch(dir)
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn artifact_dir_follows_design_and_output_root_overrides() {
        let qm = spec("quantized");
        let layout = Layout::new(&qm.spec, Path::new("/models"), None, Links::AllowOutOfRoot)
            .expect("layout");
        assert_eq!(
            layout.artifact_dir,
            Path::new("/models/quantized/tiny-llama/v1.2-int4-rtn-g128")
        );
        assert_eq!(
            layout.input("f", "m").expect("relative"),
            Path::new("/models/m")
        );
        let local = Layout::new(
            &qm.spec,
            Path::new("/ro"),
            Some(Path::new("/tmp/out")),
            Links::AllowOutOfRoot,
        )
        .expect("layout");
        assert!(local.artifact_dir.starts_with("/tmp/out/quantized"));
    }

    #[test]
    fn absolute_and_climbing_paths_are_refused_naming_the_field() {
        let scratch = Scratch::new("lexical");
        let mut qm = spec("quantized");
        for links in [Links::Confined, Links::AllowOutOfRoot] {
            let layout = Layout::new(&qm.spec, &scratch.0, None, links).expect("layout");
            for bad in [
                "/etc/passwd",
                "/var/run/secrets/kubernetes.io/serviceaccount/token",
                "/proc/self/environ",
                "..",
                "../../../etc/passwd",
                "text/../../x",
                "",
            ] {
                let err = layout
                    .input("spec.calibration.path", bad)
                    .expect_err(bad)
                    .to_string();
                assert!(err.starts_with("spec.calibration.path: "), "{err}");
                assert!(
                    err.contains("relative path inside the model volume"),
                    "{err}"
                );
            }
            // The spec parser refuses these already; the layout refuses them
            // again for any caller that builds a spec by hand.
            for bad in ["../tmp/x", "/tmp/x"] {
                qm.spec.output.path = bad.to_string();
                let err = Layout::new(&qm.spec, &scratch.0, None, links).expect_err(bad);
                assert!(err.to_string().starts_with("spec.output.path: "), "{err}");
            }
            qm.spec.output.path = "quantized".to_string();
            qm.spec.base_model.name = "evil/..".to_string();
            let err = Layout::new(&qm.spec, &scratch.0, None, links).expect_err("evil/..");
            assert!(err.to_string().starts_with("spec.baseModel.name"), "{err}");
            qm.spec.base_model.name = "example/tiny-llama".to_string();
        }
    }

    #[test]
    fn a_link_out_of_the_root_is_refused_unless_allowed() {
        let scratch = Scratch::new("links");
        let root = scratch.0.join("volume");
        let outside = scratch.0.join("outside");
        std::fs::create_dir_all(root.join("data")).expect("volume");
        std::fs::create_dir_all(&outside).expect("outside");
        std::fs::write(outside.join("secret"), "eyJhbGciOi-secret").expect("secret");
        std::fs::write(root.join("data/eval.txt"), "text").expect("eval");
        std::os::unix::fs::symlink(&outside, root.join("out")).expect("link out");
        std::os::unix::fs::symlink("data", root.join("inside")).expect("link in");
        std::os::unix::fs::symlink(root.join("nowhere"), root.join("dangling")).expect("dangling");
        let qm = spec("quantized");
        let confined = Layout::new(&qm.spec, &root, None, Links::Confined).expect("layout");
        // Inside, through a link that stays inside, and not yet existing: fine.
        for good in ["data/eval.txt", "inside/eval.txt", "data/new/file"] {
            assert_eq!(confined.input("f", good).expect(good), root.join(good));
        }
        for bad in ["out/secret", "out", "out/not-there"] {
            let err = confined
                .input("spec.validation.evalText.path", bad)
                .expect_err(bad);
            assert!(matches!(err, LayoutError::LeavesRoot { .. }), "{err}");
            assert!(
                err.to_string()
                    .starts_with("spec.validation.evalText.path: "),
                "{err}"
            );
        }
        let err = confined.input("f", "dangling/x").expect_err("dangling");
        assert!(matches!(err, LayoutError::DanglingLink { .. }), "{err}");
        // An output directory that is a link out is refused too.
        let mut linked = qm.clone();
        linked.spec.output.path = "out".to_string();
        let err = Layout::new(&linked.spec, &root, None, Links::Confined).expect_err("output out");
        assert!(err.to_string().starts_with("spec.output.path: "), "{err}");
        // The owner's explicit choice: links are followed.
        let allowed = Layout::new(&qm.spec, &root, None, Links::AllowOutOfRoot).expect("layout");
        assert_eq!(
            allowed.input("f", "out/secret").expect("allowed"),
            root.join("out/secret")
        );
    }

    #[test]
    fn a_root_that_is_itself_a_link_or_missing_still_confines() {
        let scratch = Scratch::new("rootlink");
        std::fs::create_dir_all(scratch.0.join("real/m")).expect("real");
        std::os::unix::fs::symlink(scratch.0.join("real"), scratch.0.join("models"))
            .expect("root link");
        let qm = spec("quantized");
        let root = scratch.0.join("models");
        let layout = Layout::new(&qm.spec, &root, None, Links::Confined).expect("layout");
        assert_eq!(layout.input("f", "m").expect("inside"), root.join("m"));
        // Local mode's output root may not exist yet.
        let out = scratch.0.join("target/local");
        let layout =
            Layout::new(&qm.spec, &root, Some(&out), Links::Confined).expect("missing output root");
        assert!(layout.artifact_dir.starts_with(&out));
    }
}
