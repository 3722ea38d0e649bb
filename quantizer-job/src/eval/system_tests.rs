//! System tests: chat prompts with one expectation on the answer each
//! (upper case, a JSON object with required keys, a regex, an exact or
//! contained string). Tests marked `edge_case` count only where the
//! baseline passed them, so a weak base model does not fail its variants.

use std::path::Path;

use regex::Regex;
use serde::{Deserialize, Serialize};

use super::Greedy;
use super::{EvalError, read_text};
use crate::model::LlamaModel;
use crate::tokenizer::{ChatMessage, END_TOKEN, Tokenizer, apply_chat_template};

/// Default answer length when the suite does not set one.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 48;

/// The expectation of a JSON answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonExpectation {
    /// Keys the object must have.
    #[serde(default)]
    pub required_keys: Vec<String>,
}

/// One system test as written in YAML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SystemTest {
    /// Unique name.
    pub name: String,
    /// Chat messages, rendered with the chat template.
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
    /// A raw prompt, used as is (alternative to `messages`).
    #[serde(default)]
    pub prompt: Option<String>,
    /// The answer has letters and all of them are upper case.
    #[serde(default)]
    pub uppercase: Option<bool>,
    /// The answer parses as a JSON object with the required keys.
    #[serde(default)]
    pub json: Option<JsonExpectation>,
    /// The answer matches this regex (unanchored unless written so).
    #[serde(default)]
    pub pattern: Option<String>,
    /// The answer equals this string (after trimming whitespace).
    #[serde(default)]
    pub equals: Option<String>,
    /// The answer contains this string.
    #[serde(default)]
    pub contains: Option<String>,
    /// Counts only if the baseline passed it.
    #[serde(default)]
    pub edge_case: bool,
}

/// A parsed suite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SystemTestSuite {
    /// Most tokens generated per answer.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// The tests.
    pub tests: Vec<SystemTest>,
}

fn default_max_new_tokens() -> usize {
    DEFAULT_MAX_NEW_TOKENS
}

/// The checked form of a test's single expectation. The validation stage
/// (on its own greedy answers) and the quality probe (on an endpoint's
/// answers) both judge answers through [`Expectation::check`], so a test
/// means the same thing offline and in production.
#[derive(Debug, Clone)]
pub enum Expectation {
    /// Letters present, all upper case.
    Uppercase,
    /// A JSON object with these keys.
    Json(Vec<String>),
    /// Matches the regex.
    Pattern(Regex),
    /// Equals the string after trimming.
    Equals(String),
    /// Contains the string.
    Contains(String),
}

/// The answer as the checks see it: the decoded text without surrounding
/// whitespace (what both the validation stage and the probe pass to
/// [`Expectation::check`]).
pub fn normalize_answer(decoded: &str) -> String {
    decoded.trim().to_string()
}

/// The prompt a test sends, as the API would receive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TestPrompt<'t> {
    /// Chat messages (rendered with the chat template by the model server).
    Chat(&'t [ChatMessage]),
    /// A raw completion prompt.
    Raw(&'t str),
}

impl SystemTest {
    /// The test's expectation, or why it has none or several.
    pub fn expectation(&self) -> Result<Expectation, EvalError> {
        expectation(self).map_err(|reason| EvalError::InvalidSystemTest {
            name: self.name.clone(),
            reason,
        })
    }

    /// The test's prompt, or why it has none or both forms.
    pub fn prompt(&self) -> Result<TestPrompt<'_>, EvalError> {
        match (&self.messages, &self.prompt) {
            (Some(m), None) if !m.is_empty() => Ok(TestPrompt::Chat(m)),
            (None, Some(p)) if !p.is_empty() => Ok(TestPrompt::Raw(p)),
            _ => Err(EvalError::InvalidSystemTest {
                name: self.name.clone(),
                reason: PROMPT_FORMS.to_string(),
            }),
        }
    }
}

const PROMPT_FORMS: &str = "needs exactly one non-empty `messages` or `prompt`";

impl Expectation {
    /// Whether `answer` (already [`normalize_answer`]ed) meets the expectation.
    pub fn check(&self, answer: &str) -> bool {
        match self {
            Expectation::Uppercase => {
                answer.chars().any(char::is_alphabetic)
                    && answer
                        .chars()
                        .filter(|c| c.is_alphabetic())
                        .all(char::is_uppercase)
            }
            Expectation::Json(keys) => serde_json::from_str::<serde_json::Value>(answer.trim())
                .ok()
                .and_then(|v| v.as_object().cloned())
                .is_some_and(|obj| keys.iter().all(|k| obj.contains_key(k))),
            Expectation::Pattern(re) => re.is_match(answer),
            Expectation::Equals(s) => answer.trim() == s.trim(),
            Expectation::Contains(s) => answer.contains(s.as_str()),
        }
    }
}

/// The outcome of one test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SystemTestOutcome {
    /// The test's name.
    pub name: String,
    /// Whether the expectation held.
    pub passed: bool,
    /// Whether it counts towards the pass rate.
    pub counted: bool,
    /// Whether it is an edge case.
    pub edge_case: bool,
    /// The decoded answer.
    pub answer: String,
}

/// Pass rate of a suite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SystemTestsResult {
    /// Counted tests that passed.
    pub passed: usize,
    /// Tests that count.
    pub counted: usize,
    /// `passed / counted` (1.0 when nothing counts).
    pub pass_rate: f64,
    /// Per-test outcomes.
    pub outcomes: Vec<SystemTestOutcome>,
}

/// Reads and checks a YAML suite.
pub fn load_suite(path: &Path) -> Result<SystemTestSuite, EvalError> {
    let suite: SystemTestSuite =
        serde_yaml::from_str(&read_text(path)?).map_err(|e| EvalError::Parse {
            path: path.to_path_buf(),
            line: None,
            reason: crate::content_free::yaml(&e),
        })?;
    // Tests are named by index: until the file has proved to be a suite,
    // nothing read from it goes into a message.
    for (i, test) in suite.tests.iter().enumerate() {
        expectation(test)
            .and_then(|_| prompt_text(test))
            .map_err(|reason| EvalError::Parse {
                path: path.to_path_buf(),
                line: None,
                reason: format!("tests[{i}]: {reason}"),
            })?;
    }
    Ok(suite)
}

fn expectation(test: &SystemTest) -> Result<Expectation, String> {
    let mut found = Vec::new();
    if let Some(flag) = test.uppercase {
        if !flag {
            return Err("uppercase: false is not an expectation; omit it".into());
        }
        found.push(Expectation::Uppercase);
    }
    if let Some(j) = &test.json {
        found.push(Expectation::Json(j.required_keys.clone()));
    }
    if let Some(p) = &test.pattern {
        // regex's message repeats the pattern, which is the file's text.
        let re =
            Regex::new(p).map_err(|_| "pattern is not a valid regular expression".to_string())?;
        found.push(Expectation::Pattern(re));
    }
    if let Some(s) = &test.equals {
        found.push(Expectation::Equals(s.clone()));
    }
    if let Some(s) = &test.contains {
        found.push(Expectation::Contains(s.clone()));
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        n => Err(format!(
            "needs exactly one of uppercase, json, pattern, equals, contains; has {n}"
        )),
    }
}

fn prompt_text(test: &SystemTest) -> Result<String, String> {
    match (&test.messages, &test.prompt) {
        (Some(m), None) if !m.is_empty() => Ok(apply_chat_template(m, true)),
        (None, Some(p)) if !p.is_empty() => Ok(p.clone()),
        _ => Err(PROMPT_FORMS.into()),
    }
}

/// Runs the suite. With `baseline` (the baseline model's result), edge
/// cases count only where the baseline passed; without it (running the
/// baseline itself), an edge case counts only if it passes.
pub fn run_suite(
    model: &LlamaModel,
    tokenizer: &Tokenizer,
    suite: &SystemTestSuite,
    baseline: Option<&SystemTestsResult>,
) -> Result<SystemTestsResult, EvalError> {
    run_suite_with(
        &mut |ids, max_new_tokens, eos| Ok(model.generate_greedy(ids, max_new_tokens, eos)?),
        tokenizer,
        suite,
        baseline,
    )
}

/// [`run_suite`] with any greedy decoder: how the GPU model runs the same
/// suite with the same prompts and checks.
pub fn run_suite_with<E: From<EvalError>>(
    generate: Greedy<'_, E>,
    tokenizer: &Tokenizer,
    suite: &SystemTestSuite,
    baseline: Option<&SystemTestsResult>,
) -> Result<SystemTestsResult, E> {
    let eos = tokenizer.token_id(END_TOKEN);
    let mut outcomes = Vec::with_capacity(suite.tests.len());
    for test in &suite.tests {
        let invalid = |reason| EvalError::InvalidSystemTest {
            name: test.name.clone(),
            reason,
        };
        let expect = expectation(test).map_err(invalid)?;
        let prompt = prompt_text(test).map_err(invalid)?;
        let ids = tokenizer.encode(&prompt).map_err(EvalError::from)?;
        let generated = generate(&ids, suite.max_new_tokens, eos)?;
        let answer = normalize_answer(
            &tokenizer
                .decode(&generated, true)
                .map_err(EvalError::from)?,
        );
        let passed = expect.check(&answer);
        let counted = if !test.edge_case {
            true
        } else {
            match baseline {
                Some(b) => b.outcomes.iter().any(|o| o.name == test.name && o.passed),
                None => passed,
            }
        };
        tracing::debug!(name = %test.name, passed, counted, "system test run");
        outcomes.push(SystemTestOutcome {
            name: test.name.clone(),
            passed,
            counted,
            edge_case: test.edge_case,
            answer,
        });
    }
    let counted = outcomes.iter().filter(|o| o.counted).count();
    let passed = outcomes.iter().filter(|o| o.counted && o.passed).count();
    Ok(SystemTestsResult {
        passed,
        counted,
        pass_rate: if counted == 0 {
            1.0
        } else {
            passed as f64 / counted as f64
        },
        outcomes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_with(f: impl FnOnce(&mut SystemTest)) -> SystemTest {
        let mut t = SystemTest {
            name: "t".into(),
            messages: None,
            prompt: Some("p".into()),
            uppercase: None,
            json: None,
            pattern: None,
            equals: None,
            contains: None,
            edge_case: false,
        };
        f(&mut t);
        t
    }

    #[test]
    fn expectations_check_answers() {
        let up = expectation(&test_with(|t| t.uppercase = Some(true))).expect("valid");
        assert!(up.check("HELLO WORLD 42"));
        assert!(!up.check("Hello"));
        assert!(!up.check("42"));
        let json = expectation(&test_with(|t| {
            t.json = Some(JsonExpectation {
                required_keys: vec!["package".into(), "version".into()],
            })
        }))
        .expect("valid");
        assert!(json.check(r#"{"package": "a", "version": "1"}"#));
        assert!(!json.check(r#"{"package": "a"}"#));
        assert!(!json.check("not json"));
        let pat =
            expectation(&test_with(|t| t.pattern = Some("^(yes|no)$".into()))).expect("valid");
        assert!(pat.check("yes"));
        assert!(!pat.check("maybe"));
    }

    #[test]
    fn a_test_needs_exactly_one_expectation() {
        let none = test_with(|_| {});
        assert!(expectation(&none).is_err());
        let two = test_with(|t| {
            t.equals = Some("a".into());
            t.contains = Some("a".into());
        });
        assert!(expectation(&two).is_err());
        let bad_re = test_with(|t| t.pattern = Some("(".into()));
        assert!(
            expectation(&bad_re)
                .unwrap_err()
                .contains("pattern is not a valid regular expression")
        );
    }

    /// A spec pointing `systemTests.path` at a token file must not put the
    /// token into status: the error names the file and the position only.
    #[test]
    fn a_file_that_is_not_a_suite_is_not_quoted() {
        let secret = "eyJhbGciOiJSUzI1NiIsImtpZCI6IkFCQyJ9.eyJzdWIiOiJzeXN0ZW0ifQ.c2lnbmF0dXJl";
        let dir = std::env::temp_dir().join(format!("qo-suite-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        for (name, text) in [
            ("token", secret.to_string()),
            ("mapping", format!("tests: {secret}\n")),
            (
                "pattern",
                format!("tests:\n  - {{name: {secret}, prompt: p, pattern: '({secret}'}}\n"),
            ),
            (
                "two",
                format!(
                    "tests:\n  - {{name: {secret}, prompt: p, equals: {secret}, contains: x}}\n"
                ),
            ),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, &text).expect("write");
            let err = load_suite(&path).expect_err(name).to_string();
            assert!(err.contains(&path.display().to_string()), "{err}");
            assert!(
                !err.contains("eyJ") && !err.contains("c2ln"),
                "{name}: {err}"
            );
        }
        let err = load_suite(&dir.join("token"))
            .expect_err("token")
            .to_string();
        assert!(err.contains("line 1 column 1: found a string"), "{err}");
        let err = load_suite(&dir.join("two")).expect_err("two").to_string();
        assert!(err.contains("tests[0]: needs exactly one of"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
