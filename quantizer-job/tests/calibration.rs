//! Calibration sampling from the real calibration text.

mod common;

use quantizer_job::calibration::{self, CalibrationError};

#[test]
fn samples_are_seeded_and_valid() {
    let tok = common::tokenizer();
    let path = common::text("calibration.txt");
    let a = calibration::sample_from_file(&path, tok, 16, 256, 42).expect("samples");
    let b = calibration::sample_from_file(&path, tok, 16, 256, 42).expect("samples");
    let c = calibration::sample_from_file(&path, tok, 16, 256, 7).expect("samples");
    assert_eq!(a, b, "same seed, same samples");
    assert_ne!(a.samples, c.samples, "another seed, other samples");
    assert_eq!(a.samples.len(), 16);
    assert!(a.samples.iter().all(|s| s.len() == 256));
    let mut offsets = a.stats.offsets.clone();
    offsets.sort_unstable();
    assert!(offsets.windows(2).all(|w| w[1] - w[0] >= 256), "no overlap");
    assert!(
        a.stats.unique_token_ratio > 0.1,
        "{}",
        a.stats.unique_token_ratio
    );
    assert!(serde_json::to_string(&a.stats).is_ok());
}

#[test]
fn shortfall_states_asked_and_available() {
    let tokens: Vec<u32> = (0..1000).map(|i| i % 50).collect();
    let err = calibration::draw_samples(&tokens, "short.txt".as_ref(), 8192, 3, 400, 1)
        .expect_err("only two windows of 400");
    assert!(matches!(
        err,
        CalibrationError::Shortfall {
            samples: 3,
            sequence_length: 400,
            available_tokens: 1000,
            available_windows: 2,
            ..
        }
    ));
    let msg = err.to_string();
    assert!(
        msg.contains("3 samples of 400 tokens") && msg.contains("1000 tokens"),
        "{msg}"
    );
}

#[test]
fn out_of_vocabulary_ids_are_rejected() {
    let tokens: Vec<u32> = (600..1600).collect();
    let err = calibration::draw_samples(&tokens, "t.txt".as_ref(), 500, 2, 100, 1)
        .expect_err("ids from 600 with a vocabulary of 500");
    assert!(
        matches!(err, CalibrationError::OutOfVocabulary { vocab: 500, .. }),
        "{err}"
    );
    assert!(matches!(
        calibration::validate(&[vec![1, 2]], 3, 10),
        Err(CalibrationError::BadLength {
            expected: 3,
            found: 2,
            ..
        })
    ));
}

#[test]
fn token_files_are_used_as_given_and_checked_against_the_model_vocabulary() {
    let tok = common::tokenizer();
    let path = common::scratch("token-file").join("calibration-tokens.json");
    let file = serde_json::json!({"input_ids": [[1, 2, 3, 4, 5], [9, 8, 7, 6], [5, 5]]});
    std::fs::write(&path, file.to_string()).expect("write");
    // Rows shorter than the sequence length are skipped, longer ones cut.
    let set = calibration::load(&path, tok, 100, 2, 4, 0).expect("token file");
    assert_eq!(set.samples, vec![vec![1, 2, 3, 4], vec![9, 8, 7, 6]]);
    assert_eq!(set.stats.unique_tokens, 8);
    // Ids are checked against the model's vocabulary, not the tokenizer's.
    let err = calibration::load(&path, tok, 5, 2, 4, 0).expect_err("id 9 >= 5");
    assert!(
        matches!(
            err,
            CalibrationError::OutOfVocabulary {
                id: 9,
                vocab: 5,
                ..
            }
        ),
        "{err}"
    );
    let err = calibration::load(&path, tok, 100, 3, 4, 0).expect_err("two usable rows");
    assert!(
        matches!(
            err,
            CalibrationError::Shortfall {
                samples: 3,
                available_windows: 2,
                ..
            }
        ),
        "{err}"
    );
    std::fs::write(&path, "{\"input_ids\": \"no\"}").expect("write");
    let err = calibration::load(&path, tok, 100, 1, 4, 0).expect_err("not a token file");
    assert!(err.to_string().contains("calibration-tokens.json"), "{err}");
}

#[test]
fn text_files_are_sampled_as_before() {
    let tok = common::tokenizer();
    let path = common::text("calibration.txt");
    let a = calibration::load(&path, tok, 8192, 4, 128, 42).expect("text");
    let b = calibration::sample_from_file(&path, tok, 4, 128, 42).expect("text");
    assert_eq!(a, b);
}
