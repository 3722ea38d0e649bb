//! The forward pass on the real model: layer-by-layer equals full, the KV
//! cache equals recomputation, weights can be swapped, and the baseline
//! answers the chat tasks it was trained on.

mod common;

use std::collections::BTreeMap;

use candle_core::{D, Tensor};
use quantizer_job::LlamaModel;
use quantizer_job::model::{LM_HEAD, LinearId, LinearKind, SamplingParams};
use rand::SeedableRng;

fn eval_tokens(n: usize) -> Vec<u32> {
    let text = std::fs::read_to_string(common::text("eval.txt")).expect("read eval.txt");
    let ids = common::tokenizer().encode(&text).expect("encode eval.txt");
    ids[..n].to_vec()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .expect("same shape")
        .abs()
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.max(D::Minus1))
        .and_then(|t| t.to_scalar::<f32>())
        .expect("max abs diff")
}

#[test]
fn layer_by_layer_equals_full_forward_and_captures_every_linear() {
    let model = common::model();
    let ids = eval_tokens(2 * 64);
    let tokens = model
        .token_tensor(&[ids[..64].to_vec(), ids[64..].to_vec()])
        .expect("token batch");
    let full = model.forward(&tokens).expect("full forward");
    assert_eq!(full.dims(), &[2, 64, 8192]);

    let mut captured: BTreeMap<LinearId, Vec<usize>> = BTreeMap::new();
    let mut hidden = model.embed(&tokens).expect("embed");
    for i in 0..model.num_layers() {
        let mut cb = |id: LinearId, x: &Tensor| {
            captured.insert(id, x.dims().to_vec());
        };
        hidden = model
            .layer_forward(i, &hidden, Some(&mut cb))
            .expect("layer");
    }
    let stepwise = model.final_logits(&hidden).expect("final logits");
    let diff = max_abs_diff(&full, &stepwise);
    assert!(diff < 1e-4, "layer-by-layer differs by {diff}");

    assert_eq!(captured.len(), 6 * 7, "every linear of every layer");
    let shape = |layer, kind| captured[&LinearId { layer, kind }].clone();
    assert_eq!(shape(0, LinearKind::QProj), vec![128, 384]);
    assert_eq!(shape(5, LinearKind::OProj), vec![128, 384]);
    assert_eq!(shape(2, LinearKind::DownProj), vec![128, 1024]);
    assert!(matches!(
        model.layer_forward(6, &hidden, None),
        Err(quantizer_job::ModelError::LayerOutOfRange {
            index: 6,
            layers: 6
        })
    ));
}

#[test]
fn linear_names_and_weight_swaps() {
    let mut model: LlamaModel = common::model().clone();
    let names = model.linear_names();
    assert_eq!(names.len(), 6 * 7 + 1);
    assert_eq!(names[0], "model.layers.0.self_attn.q_proj.weight");
    assert_eq!(names.last().map(String::as_str), Some(LM_HEAD));
    for name in &names {
        let w = model.linear_weight(name).expect("known linear");
        assert_eq!(w.rank(), 2, "{name}");
    }
    let name = "model.layers.1.mlp.down_proj.weight";
    assert_eq!(
        model.linear_weight(name).expect("down").dims(),
        &[384, 1024]
    );
    let zeros = Tensor::zeros(
        (384, 1024),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .expect("zeros");
    model
        .set_linear_weight(name, zeros)
        .expect("same shape is accepted");
    let sum = model
        .linear_weight(name)
        .and_then(|w| Ok(w.abs()?.sum_all()?.to_scalar::<f32>()?))
        .expect("sum");
    assert_eq!(sum, 0.0);
    let wrong = Tensor::zeros(
        (384, 384),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .expect("zeros");
    assert!(
        model.set_linear_weight(name, wrong).is_err(),
        "shape change refused"
    );
    assert!(
        model
            .linear_weight("model.layers.9.mlp.up_proj.weight")
            .is_err()
    );

    let norm = model.input_layernorm(2).expect("norm").clone();
    let doubled = (&norm * 2.0).expect("scale");
    model.set_input_layernorm(2, doubled).expect("set norm");
    let after = model.input_layernorm(2).expect("norm");
    assert!(max_abs_diff(&(&norm * 2.0).expect("scale"), after) == 0.0);
    assert!(model.post_attention_layernorm(5).is_ok());
}

#[test]
fn kv_cache_generation_equals_recomputation() {
    let model = common::model();
    let tok = common::tokenizer();
    let prompt = tok
        .encode("<|user|>\nWhat is 12 plus 30?<|end|>\n<|assistant|>\n")
        .expect("encode");
    let cached = model.generate_greedy(&prompt, 12, None).expect("cached");
    let uncached = model
        .generate_greedy_uncached(&prompt, 12, None)
        .expect("uncached");
    assert_eq!(cached.len(), 12);
    assert_eq!(cached, uncached);

    let params = SamplingParams {
        temperature: 0.8,
        top_p: 0.9,
    };
    let sample = |seed| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        model
            .generate_sampled(&prompt, 8, None, params, &mut rng)
            .expect("sample")
    };
    assert_eq!(sample(3), sample(3), "seeded sampling is reproducible");
    assert!(sample(3).iter().all(|&id| id < 8192));
}

#[derive(serde::Deserialize)]
struct ChatTask {
    prompt: String,
    answer: String,
}

/// Exact-match rate of greedy answers on the first `n` chat tasks.
fn chat_task_exact_match(n: usize) -> (f64, usize) {
    let model = common::model();
    let tok = common::tokenizer();
    let eos = tok.require_token_id("<|end|>").expect("eos");
    assert_eq!(eos, 4);
    let text = std::fs::read_to_string(common::text("chat-tasks.jsonl")).expect("read tasks");
    let tasks: Vec<ChatTask> = text
        .lines()
        .take(n)
        .map(|l| serde_json::from_str(l).expect("task line"))
        .collect();
    let mut correct = 0;
    for t in &tasks {
        let ids = tok.encode(&t.prompt).expect("encode");
        let out = model
            .generate_greedy(&ids, 32, Some(eos))
            .expect("generate");
        let answer = tok.decode(&out, true).expect("decode");
        correct += usize::from(answer.trim() == t.answer);
    }
    (correct as f64 / tasks.len() as f64, tasks.len())
}

#[test]
fn baseline_answers_most_chat_tasks() {
    let (rate, n) = chat_task_exact_match(30);
    assert_eq!(n, 30);
    assert!(rate >= 0.5, "exact match {rate} on {n} tasks");
}

/// All 200 chat tasks (the README's reference: 0.65 exact match). Run on
/// demand with `--ignored --nocapture`.
#[test]
#[ignore]
fn baseline_chat_task_exact_match_on_all_tasks() {
    let (rate, n) = chat_task_exact_match(usize::MAX);
    println!("chat-task exact match {rate:.3} over {n} tasks");
    assert_eq!(n, 200);
    assert!(rate >= 0.55, "exact match {rate}");
}

#[test]
fn weights_can_come_from_a_tensor_map() {
    let ckpt = quantizer_job::Checkpoint::open(&common::model_dir()).expect("open");
    let mut tensors = ckpt.load_all_f32().expect("load all");
    assert_eq!(tensors.len(), 6 * 9 + 3);
    // A dequantized linear supplied under the checkpoint name is used as is.
    let name = "model.layers.4.self_attn.v_proj.weight";
    let replaced = (&tensors[name] * 0.5).expect("scale");
    tensors.insert(name.to_string(), replaced.clone());
    let model = LlamaModel::from_tensors(ckpt.config().clone(), tensors.clone()).expect("build");
    assert_eq!(
        max_abs_diff(model.linear_weight(name).expect("weight"), &replaced),
        0.0
    );

    tensors.remove("model.layers.2.mlp.up_proj.weight");
    let err = LlamaModel::from_tensors(ckpt.config().clone(), tensors).expect_err("missing");
    assert!(
        matches!(&err, quantizer_job::ModelError::MissingTensor { name } if name == "model.layers.2.mlp.up_proj.weight"),
        "{err}"
    );
}

#[test]
fn sequences_past_the_rope_tables_are_refused() {
    let model = common::model();
    let long = vec![5u32; model.config().max_position_embeddings + 1];
    let err = model
        .forward(&model.token_tensor(&[long]).expect("tokens"))
        .expect_err("too long");
    assert!(
        matches!(
            err,
            quantizer_job::ModelError::SequenceTooLong {
                len: 1025,
                max: 1024
            }
        ),
        "{err}"
    );
}
