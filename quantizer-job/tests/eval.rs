//! The evaluation checks on the real model and text.

mod common;

use quantizer_job::eval::{consistency, perplexity, system_tests, tasks};

#[test]
fn perplexity_on_a_few_windows_is_sane() {
    let r = perplexity::perplexity_of_file(
        common::model(),
        common::tokenizer(),
        &common::text("eval.txt"),
        512,
        4,
    )
    .expect("perplexity");
    assert_eq!(r.windows, 4);
    assert_eq!(r.predicted_tokens, 4 * 511);
    assert!(
        r.perplexity > 10.0 && r.perplexity < 60.0,
        "perplexity {}",
        r.perplexity
    );
    assert!((r.mean_nll.exp() - r.perplexity).abs() < 1e-9);
    assert!(r.text_tokens > 50_000);
}

/// The full reference figure: every 512-token window of eval.txt. Slow on
/// two cores (about two minutes), so run on demand:
/// `cargo test --release -p quantizer-job --test eval -- --ignored --nocapture`.
#[test]
#[ignore]
fn full_eval_perplexity_matches_the_reference() {
    let r = perplexity::perplexity_of_file(
        common::model(),
        common::tokenizer(),
        &common::text("eval.txt"),
        512,
        usize::MAX,
    )
    .expect("perplexity");
    println!("{}", serde_json::to_string(&r).expect("json"));
    assert!(
        (r.perplexity - 29.0).abs() < 0.05,
        "perplexity {}",
        r.perplexity
    );
}

#[test]
fn multiple_choice_tasks_are_mostly_right() {
    let r = tasks::evaluate_task_file(
        common::model(),
        common::tokenizer(),
        "chat-choice",
        &common::test_data("tasks/chat-choice.jsonl"),
        Some(12),
    )
    .expect("tasks");
    assert_eq!(r.tasks, 12);
    assert!(r.accuracy >= 0.6, "accuracy {}", r.accuracy);
    assert!(
        r.accuracy_norm >= 0.5,
        "normalised accuracy {}",
        r.accuracy_norm
    );
}

#[test]
fn consistency_of_the_baseline_with_itself_and_a_damaged_copy() {
    let model = common::model();
    let tok = common::tokenizer();
    let eos = tok.token_id("<|end|>");
    let prompts = consistency::load_prompts(&common::text("chat-tasks.jsonl"), 6).expect("prompts");
    assert_eq!(prompts.len(), 6);
    let baseline = consistency::generate(model, tok, &prompts, 16, eos).expect("baseline");
    // The baseline stage saves its generations; a later stage reloads them.
    let saved = serde_json::to_string(&baseline).expect("serialise");
    let reloaded: consistency::Generations = serde_json::from_str(&saved).expect("reload");
    let same = consistency::generate(model, tok, &prompts, 16, eos).expect("again");
    let r = consistency::compare(&reloaded, &same).expect("compare");
    assert_eq!((r.match_rate, r.token_agreement), (1.0, 1.0));

    let mut damaged = model.clone();
    let name = "model.layers.0.mlp.down_proj.weight";
    let w = (damaged.linear_weight(name).expect("weight") * 0.0).expect("zero");
    damaged.set_linear_weight(name, w).expect("set");
    let other = consistency::generate(&damaged, tok, &prompts, 16, eos).expect("damaged");
    let r = consistency::compare(&baseline, &other).expect("compare");
    assert!(r.token_agreement < 1.0, "damage changes generations");
    assert!(
        consistency::compare(
            &baseline,
            &consistency::Generations {
                max_new_tokens: 8,
                ..other
            }
        )
        .is_err()
    );
}

#[test]
fn system_tests_parse_and_the_baseline_passes_most() {
    let suite = system_tests::load_suite(&common::test_data("system-tests.yaml")).expect("suite");
    assert_eq!(suite.tests.len(), 17);
    let r =
        system_tests::run_suite(common::model(), common::tokenizer(), &suite, None).expect("run");
    assert!(
        r.pass_rate >= 0.7,
        "pass rate {} ({:?})",
        r.pass_rate,
        r.outcomes
    );
    assert!(r.counted <= 17 && r.counted >= 16);
    println!(
        "system tests: {}/{} counted tests passed",
        r.passed, r.counted
    );
    for kind in ["caps", "json", "yesno", "plus"] {
        assert!(
            r.outcomes
                .iter()
                .any(|o| o.name.starts_with(kind) && o.passed),
            "at least one {kind} test passes: {:?}",
            r.outcomes
        );
    }
    let again = system_tests::run_suite(common::model(), common::tokenizer(), &suite, Some(&r))
        .expect("rerun");
    assert_eq!(again.pass_rate, r.pass_rate, "same model, same result");
}
