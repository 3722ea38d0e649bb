//! The value rules of a `QuantizedModel` spec, each defined once: the Rust
//! check that `spec_file::validate` runs (local mode, the worker, the
//! operator's reconcile) beside the CEL expression and the bounds the CRD
//! carries, so that the API server and local mode refuse the same values
//! with the same words.
//!
//! Why these rules exist: every path in a spec is opened by the worker inside
//! the pod that mounts the model volume, and every name ends up in a path or
//! an object name. A spec must not be able to name a file outside the volume
//! (`/var/run/secrets/...`, `../../etc/passwd`), move the artifact directory
//! (`baseModel.name: evil/..`), or ask for a Job that can only fail
//! (`sequenceLength: 1000000000`).

use std::fmt;

/// Longest path a spec may name, in bytes. Also bounds the cost of the CEL
/// rules, which the API server estimates from `maxLength`.
pub const MAX_PATH_LEN: usize = 1024;

/// What a spec path must be, as the messages say it.
pub const PATH_EXPECTED: &str = "a relative path inside the model volume (no leading '/', no '..' or '.' segment, no empty segment)";

/// The CEL form of [`relative_path`]: one or more non-empty segments
/// separated by single `/`, none of them `.` or `..`.
pub const PATH_RULE: &str =
    "self.matches('^[^/]+(/[^/]+)*$') && !self.matches('(^|/)[.][.]?(/|$)')";

/// Why a string is not a path confined to the model volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("it is empty")]
    Empty,
    #[error("it is longer than {MAX_PATH_LEN} bytes")]
    TooLong,
    #[error("it is absolute (starts with '/')")]
    Absolute,
    #[error("it has a '.' or '..' segment")]
    DotSegment,
    #[error("it has an empty segment ('//' or a trailing '/')")]
    EmptySegment,
}

/// Checks that `path` is relative, normalised and so confined lexically to
/// whatever directory it is joined to: no leading `/`, no `.` or `..`
/// segment, no empty segment. Symbolic links are the worker's to check,
/// since only it sees the volume.
pub fn relative_path(path: &str) -> Result<(), PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong);
    }
    if path.starts_with('/') {
        return Err(PathError::Absolute);
    }
    for segment in path.split('/') {
        match segment {
            "" => return Err(PathError::EmptySegment),
            "." | ".." => return Err(PathError::DotSegment),
            _ => {}
        }
    }
    Ok(())
}

/// The CEL message of a field: `{field}: must be {expected}`, the words
/// `validate` returns as `expected`.
pub fn must_be(field: &str, expected: &str) -> String {
    format!("{field}: must be {expected}")
}

/// The CEL message of a path field.
pub fn path_message(field: &str) -> String {
    must_be(field, PATH_EXPECTED)
}

/// Longest `baseModel.name` (Hugging Face allows 96 characters per name).
pub const MAX_MODEL_NAME_LEN: usize = 128;
/// Longest `version` or task name: they become parts of variant names,
/// which end up in label values (63 characters).
pub const MAX_SEGMENT_LEN: usize = 63;

/// What `baseModel.name` must be.
pub const MODEL_NAME_EXPECTED: &str = "a Hugging Face repo id such as org/name: one or two segments of letters, digits, '.', '_' or '-', each starting with a letter or digit, at most 128 characters";
/// The CEL form of [`model_name`].
pub const MODEL_NAME_RULE: &str =
    "self.matches('^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$')";

/// What `version` and task names must be.
pub const SEGMENT_EXPECTED: &str = "a name of letters, digits, '.', '_' or '-' starting with a letter or digit, at most 63 characters";
/// The CEL form of [`name_segment`].
pub const SEGMENT_RULE: &str = "self.matches('^[A-Za-z0-9][A-Za-z0-9._-]*$')";

/// One segment of a name that becomes a directory: starts with a letter or
/// digit (so never `.` or `..`), then letters, digits, `.`, `_`, `-`.
pub fn name_segment(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= MAX_SEGMENT_LEN
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// A Hugging Face-like repo id, `name` or `org/name`; its last segment is
/// the artifact directory, so `evil/..` is refused.
pub fn model_name(s: &str) -> bool {
    let segment = |p: &str| {
        let mut chars = p.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    };
    s.len() <= MAX_MODEL_NAME_LEN
        && match s.split_once('/') {
            Some((org, name)) => segment(org) && segment(name),
            None => segment(s),
        }
}

/// Most files a digest list may name.
pub const MAX_DIGESTS: usize = 1024;
/// What the keys of `baseModel.sha256` must be.
pub const DIGEST_KEY_EXPECTED: &str = "a map whose keys are relative file paths inside the checkpoint directory (no leading '/', no '..' or '.' segment, no empty segment)";
/// The CEL form of the key rule.
pub const DIGEST_KEY_RULE: &str = "self.all(k, k.size() <= 1024 && k.matches('^[^/]+(/[^/]+)*$') && !k.matches('(^|/)[.][.]?(/|$)'))";
/// What the values of `baseModel.sha256` must be.
pub const DIGEST_EXPECTED: &str = "a map whose values are sha256 digests (64 lowercase hex digits)";
/// Length of a hex sha256 digest.
pub const DIGEST_LEN: usize = 64;
/// The CEL form of [`sha256_digest`], on each value of the map.
pub const DIGEST_RULE: &str = "self.matches('^[0-9a-f]{64}$')";

/// A hex sha256 digest as `sha256sum` prints it.
pub fn sha256_digest(s: &str) -> bool {
    s.len() == DIGEST_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Most entries of `quantization.ignore`.
pub const MAX_IGNORE: usize = 256;
/// Longest `quantization.ignore` entry (a layer-name suffix).
pub const MAX_IGNORE_LEN: usize = 256;
/// Most task sets in `validation.tasks`.
pub const MAX_TASK_SETS: usize = 64;

/// Most GPUs one pipeline Job may ask for: a pod runs on one node, and no
/// node has more.
pub const MAX_GPUS: u32 = 16;
/// Longest resource quantity string.
pub const MAX_QUANTITY_LEN: usize = 64;
/// What `resources.memory` and `resources.cpu` must be.
pub const QUANTITY_EXPECTED: &str =
    "a positive Kubernetes quantity (such as 16Gi for memory, 4 or 500m for cpu)";
/// The CEL form of [`positive_quantity`] (Kubernetes' quantity library).
pub const QUANTITY_RULE: &str = "isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))";

/// Whether `s` parses as a Kubernetes resource quantity (the grammar of
/// `resource.ParseQuantity`) greater than zero.
pub fn positive_quantity(s: &str) -> bool {
    if s.len() > MAX_QUANTITY_LEN {
        return false;
    }
    let (negative, rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let number_end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(number_end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits_ok = !(whole.is_empty() && fraction.is_empty())
        && whole.bytes().all(|b| b.is_ascii_digit())
        && fraction.bytes().all(|b| b.is_ascii_digit());
    let suffix_ok = match suffix {
        "" | "n" | "u" | "m" | "k" | "M" | "G" | "T" | "P" | "E" => true,
        "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => true,
        _ => suffix
            .strip_prefix(['e', 'E'])
            .map(|exp| exp.strip_prefix(['+', '-']).unwrap_or(exp))
            .is_some_and(|exp| !exp.is_empty() && exp.bytes().all(|b| b.is_ascii_digit())),
    };
    let nonzero = whole.bytes().chain(fraction.bytes()).any(|b| b != b'0');
    digits_ok && suffix_ok && nonzero && !negative
}

/// An inclusive bound on an integer field, with the message that names it.
/// The CRD carries `min`/`max` as schema bounds; `spec_file::validate`
/// checks the same numbers, so local mode refuses what the API server would.
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    /// The field, as the API server names it.
    pub field: &'static str,
    pub min: u64,
    pub max: u64,
    /// `between {min} and {max}`, spelled out (checked by a test) so that
    /// `validate` can return it as a static string.
    pub expected: &'static str,
}

impl Bound {
    /// `Err((field, expected))` when `value` is outside the bound.
    pub fn check(&self, value: u64) -> Result<(), (&'static str, &'static str)> {
        if (self.min..=self.max).contains(&value) {
            Ok(())
        } else {
            Err((self.field, self.expected))
        }
    }
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.expected)
    }
}

/// Calibration samples: GPTQ's usual 128 to 1024, with room to spare.
pub const CALIBRATION_SAMPLES: Bound = Bound {
    field: "spec.calibration.samples",
    min: 1,
    max: 65_536,
    expected: "between 1 and 65536",
};
/// Tokens per calibration sample: at least 16, at most the longest context
/// of current Llama-family models (128k).
pub const CALIBRATION_SEQUENCE_LENGTH: Bound = Bound {
    field: "spec.calibration.sequenceLength",
    min: 16,
    max: 131_072,
    expected: "between 16 and 131072",
};
/// Tokens per perplexity window: a window needs two tokens to predict one.
pub const EVAL_WINDOW_TOKENS: Bound = Bound {
    field: "spec.validation.evalText.windowTokens",
    min: 2,
    max: 131_072,
    expected: "between 2 and 131072",
};
/// Perplexity windows.
pub const EVAL_MAX_WINDOWS: Bound = Bound {
    field: "spec.validation.evalText.maxWindows",
    min: 1,
    max: 100_000,
    expected: "between 1 and 100000",
};
/// Consistency prompts; 0 would compare nothing and fail the gate.
pub const CONSISTENCY_MAX_PROMPTS: Bound = Bound {
    field: "spec.validation.consistency.maxPrompts",
    min: 1,
    max: 10_000,
    expected: "between 1 and 10000",
};
/// Tokens generated per consistency prompt.
pub const CONSISTENCY_MAX_NEW_TOKENS: Bound = Bound {
    field: "spec.validation.consistency.maxNewTokens",
    min: 1,
    max: 4_096,
    expected: "between 1 and 4096",
};
/// GPUs per Job; 0 runs the CPU twin.
pub const GPUS: Bound = Bound {
    field: "spec.resources.gpus",
    min: 0,
    max: MAX_GPUS as u64,
    expected: "between 0 and 16",
};

/// Load-test requests per model.
pub const LOADTEST_REQUESTS: Bound = Bound {
    field: "spec.validation.loadtest.requests",
    min: 1,
    max: 100_000,
    expected: "between 1 and 100000",
};
/// Load-test requests in flight.
pub const LOADTEST_CONCURRENCY: Bound = Bound {
    field: "spec.validation.loadtest.concurrency",
    min: 1,
    max: 1_024,
    expected: "between 1 and 1024",
};
/// Tokens of each synthetic load-test prompt.
pub const LOADTEST_PROMPT_TOKENS: Bound = Bound {
    field: "spec.validation.loadtest.promptTokens",
    min: 1,
    max: 131_072,
    expected: "between 1 and 131072",
};
/// Output tokens of each load-test request.
pub const LOADTEST_MAX_TOKENS: Bound = Bound {
    field: "spec.validation.loadtest.maxTokens",
    min: 1,
    max: 131_072,
    expected: "between 1 and 131072",
};

/// Every bound, for the test that their messages say their numbers.
pub const BOUNDS: [Bound; 11] = [
    CALIBRATION_SAMPLES,
    CALIBRATION_SEQUENCE_LENGTH,
    EVAL_WINDOW_TOKENS,
    EVAL_MAX_WINDOWS,
    CONSISTENCY_MAX_PROMPTS,
    CONSISTENCY_MAX_NEW_TOKENS,
    GPUS,
    LOADTEST_REQUESTS,
    LOADTEST_CONCURRENCY,
    LOADTEST_PROMPT_TOKENS,
    LOADTEST_MAX_TOKENS,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_confined_lexically() {
        for good in [
            "m",
            "tiny-llama",
            "text/eval.txt",
            "a/b/c.d",
            "..a/b",
            "a./.b",
            "x..y",
        ] {
            assert_eq!(relative_path(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("", PathError::Empty),
            ("/etc", PathError::Absolute),
            (
                "/var/run/secrets/kubernetes.io/serviceaccount/token",
                PathError::Absolute,
            ),
            ("/proc/self/environ", PathError::Absolute),
            ("..", PathError::DotSegment),
            ("../tmp/x", PathError::DotSegment),
            ("../../../etc/passwd", PathError::DotSegment),
            ("text/../../etc", PathError::DotSegment),
            ("a/..", PathError::DotSegment),
            ("./a", PathError::DotSegment),
            ("a/./b", PathError::DotSegment),
            ("a//b", PathError::EmptySegment),
            ("a/", PathError::EmptySegment),
        ] {
            assert_eq!(relative_path(bad), Err(why), "{bad:?}");
        }
        assert_eq!(
            relative_path(&"a".repeat(MAX_PATH_LEN + 1)),
            Err(PathError::TooLong)
        );
        assert_eq!(relative_path(&"a".repeat(MAX_PATH_LEN)), Ok(()));
    }

    #[test]
    fn model_names_are_repo_ids() {
        for good in [
            "gpt2",
            "example/tiny-llama",
            "meta-llama/Llama-3.2-1B",
            "a_b/c.d",
        ] {
            assert!(model_name(good), "{good}");
        }
        for bad in [
            "",
            "evil/..",
            "..",
            "a/.",
            "/abs",
            "a/b/c",
            "a/",
            "-a/b",
            "a/b c",
            "a".repeat(MAX_MODEL_NAME_LEN + 1).as_str(),
        ] {
            assert!(!model_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn segments_cannot_climb() {
        for good in ["v1", "v1.2", "2024_01", "rc-1"] {
            assert!(name_segment(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            ".hidden",
            "-x",
            "v 1",
            "v".repeat(64).as_str(),
        ] {
            assert!(!name_segment(bad), "{bad:?}");
        }
    }

    #[test]
    fn digests_are_lowercase_hex_of_64() {
        assert!(sha256_digest(&"0a".repeat(32)));
        for bad in [
            "not-a-digest",
            "0A".repeat(32).as_str(),
            "0".repeat(63).as_str(),
            "0".repeat(65).as_str(),
        ] {
            assert!(!sha256_digest(bad), "{bad}");
        }
    }

    #[test]
    fn quantities_follow_kubernetes() {
        for good in [
            "16Gi", "1", "500m", "0.5", "1.5Gi", "+2", "1e3", "1E-3", ".5", "5.", "4k", "100M",
        ] {
            assert!(positive_quantity(good), "{good}");
        }
        for bad in [
            "lots",
            "-3",
            "0",
            "0.0",
            "",
            "Gi",
            "1GB",
            "1 Gi",
            "1e",
            "1.2.3",
            "--1",
            "9".repeat(65).as_str(),
        ] {
            assert!(!positive_quantity(bad), "{bad:?}");
        }
    }

    #[test]
    fn bounds_say_their_numbers_and_check_them() {
        for b in BOUNDS {
            assert_eq!(
                b.expected,
                format!("between {} and {}", b.min, b.max),
                "{}",
                b.field
            );
            assert!(
                b.check(b.min).is_ok() && b.check(b.max).is_ok(),
                "{}",
                b.field
            );
            assert_eq!(b.check(b.max + 1), Err((b.field, b.expected)));
            if b.min > 0 {
                assert_eq!(b.check(b.min - 1), Err((b.field, b.expected)));
            }
        }
    }

    #[test]
    fn path_messages_name_the_field() {
        assert_eq!(
            path_message("spec.calibration.path"),
            format!("spec.calibration.path: must be {PATH_EXPECTED}")
        );
    }
}
