//! Parse errors described without the text that was parsed.
//!
//! The worker parses files a spec names (system tests, task sets, prompts,
//! calibration token files, the checkpoint's JSON), and its errors end up in
//! the QuantizedModel's status, readable by anyone who can read the object.
//! serde's messages quote the offending value (`invalid type: string
//! "eyJhbGciOi…"`), so a spec pointing at a secret would publish it. These
//! functions keep what helps a user fix the file — where (line, column),
//! what kind of value was found, what was expected, which field is missing
//! or unknown to the schema — and drop every piece of the input itself.

/// A content-free description of a JSON error: the position and what went
/// wrong, e.g. `line 1 column 1: found a string, expected struct TokenFile`.
pub fn json(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Io => "the file could not be read".to_string(),
        Category::Eof => "the JSON ends early".to_string(),
        // serde_json's syntax messages are fixed phrases ("expected value",
        // "trailing characters"), never the input.
        Category::Syntax => format!("invalid JSON ({})", strip_location(&e.to_string())),
        Category::Data => describe(&e.to_string()),
    };
    format!("line {} column {}: {what}", e.line(), e.column())
}

/// A content-free description of a YAML error, with its position when known.
pub fn yaml(e: &serde_yaml::Error) -> String {
    let what = describe(&e.to_string());
    match e.location() {
        Some(l) => format!("line {} column {}: {what}", l.line(), l.column()),
        None => what,
    }
}

/// The shapes of serde's data errors, by their fixed beginnings.
const SHAPES: [&str; 7] = [
    "invalid type: ",
    "invalid value: ",
    "invalid length ",
    "unknown field ",
    "unknown variant ",
    "missing field `",
    "duplicate field `",
];

/// The safe parts of a serde message. Data errors have fixed shapes whose
/// variable parts are either the input (dropped) or the schema (kept: the
/// expected type, a missing field's name, the accepted variants); anything
/// else is reported by kind only, since its text may quote the input.
/// serde_yaml puts the path of the value first (`tests[0].kind: …`); it is
/// dropped too (a map's keys are input), the line and column say where.
fn describe(message: &str) -> String {
    let message = strip_location(message);
    let Some(body) = SHAPES
        .iter()
        .filter_map(|shape| {
            message
                .find(shape)
                .filter(|&i| i == 0 || message[..i].ends_with(": "))
        })
        .min()
        .map(|i| &message[i..])
    else {
        return "not in the expected format (a syntax error)".to_string();
    };
    // The expected part is the schema's and comes last, after any quoted
    // input, so the last ", expected " is the schema's own.
    let expected = body
        .rsplit_once(", expected ")
        .map(|(_, e)| format!(", expected {e}"))
        .unwrap_or_default();
    if let Some(rest) = body.strip_prefix("invalid type: ") {
        format!("found {}{expected}", found_kind(rest))
    } else if let Some(rest) = body.strip_prefix("invalid value: ") {
        format!("found {} that is not allowed{expected}", found_kind(rest))
    } else if body.starts_with("invalid length ") {
        format!("wrong number of elements{expected}")
    } else if body.starts_with("unknown field ") {
        format!("a field the format does not have{expected}")
    } else if body.starts_with("unknown variant ") {
        format!("an unknown variant{expected}")
    } else {
        // `missing field` and `duplicate field`: the name is the schema's.
        body.to_string()
    }
}

/// `string "…"` → `a string`: the kind of value serde found, from a fixed
/// list, without the value.
fn found_kind(unexpected: &str) -> &'static str {
    const KINDS: [(&str, &str); 12] = [
        ("string", "a string"),
        ("integer", "an integer"),
        ("floating point", "a number"),
        ("boolean", "a boolean"),
        ("char", "a character"),
        ("byte array", "bytes"),
        ("map", "a mapping"),
        ("sequence", "a sequence"),
        ("unit", "null"),
        ("null", "null"),
        ("Option value", "an optional value"),
        ("enum", "an enum"),
    ];
    KINDS
        .iter()
        .find(|(prefix, _)| unexpected.starts_with(prefix))
        .map_or("a value", |(_, kind)| kind)
}

/// Drops serde's trailing ` at line N column M`, which callers put first.
fn strip_location(message: &str) -> &str {
    match message.rsplit_once(" at line ") {
        Some((head, tail))
            if tail
                .split(" column ")
                .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) =>
        {
            head
        }
        _ => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6InNlY3JldCJ9";

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Suite {
        tests: Vec<Test>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Test {
        name: String,
        kind: Kind,
        count: u8,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(rename_all = "lowercase")]
    #[allow(dead_code)]
    enum Kind {
        Plain,
    }

    fn yaml_error(text: &str) -> String {
        yaml(&serde_yaml::from_str::<Suite>(text).expect_err(text))
    }

    fn json_error(text: &str) -> String {
        json(&serde_json::from_str::<Suite>(text).expect_err(text))
    }

    #[test]
    fn yaml_errors_never_quote_the_input() {
        for (text, want) in [
            (
                SECRET.to_string(),
                "line 1 column 1: found a string, expected struct Suite",
            ),
            (
                format!("tests: {SECRET}"),
                "found a string, expected a sequence",
            ),
            (
                format!("tests: [{{name: a, kind: {SECRET}, count: 1}}]"),
                "an unknown variant, expected",
            ),
            (
                format!("tests: [{{name: a, kind: plain, count: 1, {SECRET}: 1}}]"),
                "a field the format does not have, expected",
            ),
            (
                "tests: [{name: a, kind: plain, count: 1000111}]".to_string(),
                "found an integer that is not allowed, expected u8",
            ),
            (
                "tests: [{name: a, kind: plain}]".to_string(),
                "missing field `count`",
            ),
            (format!("tests: [{SECRET}: {SECRET}: x]"), "line 1"),
            (format!("'{SECRET}"), "syntax error"),
        ] {
            let err = yaml_error(&text);
            assert!(err.contains(want), "{err} for {text}");
            assert!(!err.contains(SECRET) && !err.contains("eyJ"), "{err}");
        }
    }

    #[test]
    fn json_errors_never_quote_the_input() {
        for (text, want) in [
            (format!("\"{SECRET}\""), "line 1 column"),
            (
                format!("{{\"tests\": \"{SECRET}\"}}"),
                "found a string, expected a sequence",
            ),
            (
                format!("{{\"tests\": [{{\"{SECRET}\": 1}}]}}"),
                "a field the format does not have",
            ),
            (SECRET.to_string(), "invalid JSON"),
            ("{\"tests\": [".to_string(), "ends early"),
        ] {
            let err = json_error(&text);
            assert!(err.contains(want), "{err} for {text}");
            assert!(!err.contains(SECRET) && !err.contains("eyJ"), "{err}");
        }
    }

    #[test]
    fn a_secret_containing_the_separator_is_still_dropped() {
        let text = format!("\"{SECRET}, expected {SECRET}\"");
        let err = yaml_error(&text);
        assert!(!err.contains(SECRET), "{err}");
    }
}
