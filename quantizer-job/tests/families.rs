//! Model-family conformance against transformers, the reference forward.
//!
//! `tests/fixtures/families/` holds, per family, a tiny random-weight
//! checkpoint written by transformers 5.17 with that family's real config
//! features, and transformers' fp32 logits for fixed token ids
//! (`make_fixtures.py` made them on the GPU machine; `manifest.json` says
//! what each exercises). Every fixture is either supported — the CPU forward
//! reproduces transformers' logits — or refused when its config is read, with
//! an error naming what is not supported. Nothing runs with a feature ignored.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use quantizer_job::family::{Activation, LayerType};
use quantizer_job::gpu::llama::GpuLlama;
use quantizer_job::gpu::{DeviceChoice, Gpu};
use quantizer_job::rope::RopeScaling;
use quantizer_job::{Checkpoint, LlamaConfig, LlamaModel};
use safetensors::SafeTensors;

/// Fixtures the forward pass implements, with what they prove.
const SUPPORTED: &[&str] = &[
    "llama",         // default RoPE, untied lm_head
    "llama3",        // rope_type llama3, tied embeddings
    "llama-linear",  // rope_type linear
    "llama-yarn",    // rope_type yarn (attention factor on cos/sin)
    "mistral",       // sliding_window 16 over 40 tokens
    "qwen2",         // q/k/v bias, tied, sliding_window disabled
    "qwen3",         // per-head q/k RMSNorm before RoPE, no bias, tied
    "granite",       // embedding / residual / attention multipliers, logits scaling
    "phi3",          // fused qkv_proj and gate_up_proj
    "phi3-longrope", // longrope past the original length (long factors)
    "olmo2",         // norms after the sublayers, q/k RMSNorm over the whole projections
    "gemma2",        // 1 + w norms, GeGLU, sandwich norms, embedding scale, soft-caps, local/global
    "gemma3",        // Gemma 2's block with per-head q/k norms, local RoPE base, linear global RoPE
    "mixtral",       // 4 experts, top-2 renormalised (block_sparse_moe.experts.N.w1/w2/w3)
    "qwen2-moe",     // 4 experts, top-2 not renormalised, sigmoid-gated shared expert, q/k/v bias
    "qwen3-moe",     // 8 experts (num_local_experts), top-2 renormalised, per-head q/k norms
    "olmoe",         // 8 experts, top-2 not renormalised, q/k norms over the projections
];

/// The MoE fixtures among [`SUPPORTED`]: the GPU path refuses them up front
/// (no expert kernels yet) instead of comparing logits.
const MOE: &[&str] = &["mixtral", "qwen2-moe", "qwen3-moe", "olmoe"];

/// Fixtures refused up front, with a part of the error that names the key
/// (values read from the file are never quoted: a spec can name any file).
const REFUSED: &[(&str, &str)] = &[("llama-dynamic", "unsupported rope_type")];

/// Largest |quantops − transformers| allowed on a logit: both compute in
/// f32 from the same fp16 weights, in different orders.
const TOLERANCE: f32 = 5e-5;

/// The fixtures: beside the sources, or where `QUANTOPS_FAMILY_FIXTURES`
/// says (the GPU machine runs a test binary built elsewhere).
fn fixtures() -> PathBuf {
    std::env::var_os("QUANTOPS_FAMILY_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families"))
}

struct Reference {
    ids: Vec<u32>,
    logits: Vec<f32>,
    vocab: usize,
}

fn reference(dir: &Path) -> Reference {
    let bytes = std::fs::read(dir.join("reference.safetensors")).expect("read reference");
    let st = SafeTensors::deserialize(&bytes).expect("parse reference");
    let ids = st.tensor("input_ids").expect("input_ids");
    let ids = ids
        .data()
        .chunks_exact(8)
        .map(|c| {
            let v = i64::from_le_bytes(c.try_into().expect("8 bytes"));
            u32::try_from(v).expect("token id")
        })
        .collect();
    let logits = st.tensor("logits").expect("logits");
    let vocab = logits.shape()[1];
    let logits = logits
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    Reference { ids, logits, vocab }
}

fn cpu_logits(dir: &Path, ids: &[u32]) -> Vec<f32> {
    let checkpoint = Checkpoint::open(dir).expect("open fixture");
    let model = LlamaModel::from_checkpoint(&checkpoint).expect("load fixture");
    let tokens = model.token_tensor(&[ids.to_vec()]).expect("tokens");
    let logits: Tensor = model.forward(&tokens).expect("forward");
    logits
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("logits")
}

#[test]
fn every_fixture_is_classified() {
    let mut names: Vec<String> = std::fs::read_dir(fixtures())
        .expect("fixtures dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("config.json").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut known: Vec<String> = SUPPORTED
        .iter()
        .map(|s| s.to_string())
        .chain(REFUSED.iter().map(|(s, _)| s.to_string()))
        .collect();
    known.sort();
    assert_eq!(names, known, "each fixture is either SUPPORTED or REFUSED");
}

#[test]
fn supported_families_match_transformers_logits() {
    let mut report = Vec::new();
    for name in SUPPORTED {
        let dir = fixtures().join(name);
        let r = reference(&dir);
        let ours = cpu_logits(&dir, &r.ids);
        assert_eq!(ours.len(), r.logits.len(), "{name}: logits shape");
        let max_diff = ours
            .iter()
            .zip(&r.logits)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        let argmax_agree = ours
            .chunks(r.vocab)
            .zip(r.logits.chunks(r.vocab))
            .filter(|(a, b)| argmax(a) == argmax(b))
            .count();
        report.push(format!(
            "{name}: max |diff| {max_diff:.2e}, argmax agrees at {argmax_agree}/{} positions",
            r.ids.len()
        ));
        assert!(
            max_diff < TOLERANCE,
            "{name}: logits differ from transformers' by up to {max_diff}"
        );
    }
    println!("{}", report.join("\n"));
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

#[test]
fn unsupported_families_are_refused_naming_the_feature() {
    for (name, expected) in REFUSED {
        let dir = fixtures().join(name);
        let err = match Checkpoint::open(&dir) {
            Ok(_) => panic!("{name}: opened, but the forward does not implement it"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(expected) && err.contains("config.json"),
            "{name}: error {err:?} should name {expected:?} and the file"
        );
    }
}

/// The CPU logits of a fixture with its config changed by `tweak`.
fn logits_with(dir: &Path, ids: &[u32], tweak: impl FnOnce(&mut LlamaConfig)) -> Vec<f32> {
    let checkpoint = Checkpoint::open(dir).expect("open");
    let mut config = checkpoint.config().clone();
    tweak(&mut config);
    let tensors = checkpoint.load_all_f32().expect("tensors");
    let model = LlamaModel::from_tensors(config, tensors).expect("model");
    let tokens = model.token_tensor(&[ids.to_vec()]).expect("tokens");
    model
        .forward(&tokens)
        .expect("forward")
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("logits")
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

#[test]
fn each_fixture_really_exercises_its_feature() {
    // Guards the conformance test itself: computed with the feature ignored,
    // each fixture's logits are far from transformers'.
    for name in ["llama3", "llama-linear", "llama-yarn"] {
        let dir = fixtures().join(name);
        let r = reference(&dir);
        let ours = logits_with(&dir, &r.ids, |c| c.rope_scaling = RopeScaling::Default);
        let d = max_diff(&ours, &r.logits);
        assert!(d > 1e-2, "{name}: default RoPE is within {d} of its own");
    }
    // Qwen3 without its q/k norms (the tensors are there, but ignored).
    let dir = fixtures().join("qwen3");
    let r = reference(&dir);
    let ours = logits_with(&dir, &r.ids, |c| {
        assert!(c.block.qk_norm);
        c.block.qk_norm = false;
    });
    let d = max_diff(&ours, &r.logits);
    assert!(d > 1e-2, "qwen3: no q/k norms is within {d} of its own");
    // Granite with each of its four multipliers neutral (1, or the default
    // 1/sqrt(head_dim) score scale) in turn.
    let dir = fixtures().join("granite");
    let r = reference(&dir);
    type Tweak = fn(&mut quantizer_job::family::Scalars);
    let tweaks: [(&str, Tweak); 4] = [
        ("embedding_multiplier", |s| s.embedding_multiplier = 1.0),
        ("residual_multiplier", |s| s.residual_multiplier = 1.0),
        ("attention_multiplier", |s| s.attention_multiplier = None),
        ("logits_scaling", |s| s.logits_scaling = 1.0),
    ];
    for (key, tweak) in tweaks {
        let ours = logits_with(&dir, &r.ids, |c| tweak(&mut c.block.scalars));
        let d = max_diff(&ours, &r.logits);
        assert!(d > 1e-2, "granite without {key} is within {d} of its own");
    }
    // Phi-3.5's longrope over 40 tokens (original length 32) rotates with
    // its long factors: with the short ones instead it is far off.
    let dir = fixtures().join("phi3-longrope");
    let r = reference(&dir);
    let ours = logits_with(&dir, &r.ids, |c| match &mut c.rope_scaling {
        RopeScaling::LongRope {
            short_factor,
            long_factor,
            ..
        } => *long_factor = short_factor.clone(),
        other => panic!("phi3-longrope reads as {other:?}"),
    });
    let d = max_diff(&ours, &r.logits);
    assert!(
        d > 1e-2,
        "phi3-longrope with short factors is within {d} of its own"
    );
    // OLMo 2 without its q/k norms over the whole projections (the tensors
    // are there, but ignored).
    let dir = fixtures().join("olmo2");
    let r = reference(&dir);
    let ours = logits_with(&dir, &r.ids, |c| {
        assert!(c.block.qk_norm);
        c.block.qk_norm = false;
    });
    let d = max_diff(&ours, &r.logits);
    assert!(d > 1e-2, "olmo2: no q/k norms is within {d} of its own");
    // Gemma without each of its features in turn (the tensors and keys are
    // there, but ignored). The fixture's attention scores are small next to
    // the cap of 50, so ignoring that cap moves the logits by about 5e-3
    // only: still a hundred times the tolerance.
    type ConfigTweak = fn(&mut LlamaConfig);
    let gemma: [(&str, &str, ConfigTweak); 9] = [
        ("gemma2", "1 + weight norms", |c| {
            c.block.norm_unit_offset = false
        }),
        ("gemma2", "GeGLU", |c| c.block.activation = Activation::Silu),
        ("gemma2", "embedding scale", |c| {
            c.block.scalars.embedding_multiplier = 1.0
        }),
        ("gemma2", "query_pre_attn_scalar", |c| {
            c.block.scalars.attention_multiplier = None
        }),
        ("gemma2", "attention soft-cap", |c| {
            c.block.softcap.attention = None
        }),
        ("gemma2", "final soft-cap", |c| {
            c.block.softcap.final_logits = None
        }),
        ("gemma2", "local layers", |c| {
            c.layer_types.fill(LayerType::Full)
        }),
        ("gemma3", "local RoPE", |c| c.local_rope = None),
        ("gemma3", "q/k norms", |c| c.block.qk_norm = false),
    ];
    for (name, feature, tweak) in gemma {
        let dir = fixtures().join(name);
        let r = reference(&dir);
        let ours = logits_with(&dir, &r.ids, tweak);
        let d = max_diff(&ours, &r.logits);
        let far = match feature {
            "attention soft-cap" => 1e-3,
            _ => 1e-2,
        };
        assert!(
            d > far,
            "{name} without its {feature} is within {d} of its own"
        );
    }
    // Mistral's window (16) is shorter than its 40 tokens: inside the window
    // full attention agrees, past it it does not.
    let dir = fixtures().join("mistral");
    let r = reference(&dir);
    let full = logits_with(&dir, &r.ids, |c| {
        assert_eq!(c.sliding_window, Some(16));
        c.sliding_window = None;
    });
    let v = r.vocab;
    let early = max_diff(&full[..16 * v], &r.logits[..16 * v]);
    let late = max_diff(&full[16 * v..], &r.logits[16 * v..]);
    assert!(early < TOLERANCE, "inside the window both agree ({early})");
    assert!(
        late > 1e-2,
        "past the window full attention differs ({late})"
    );
}

#[test]
fn cached_generation_equals_the_full_recompute() {
    // Decoding one token at a time with the KV cache must mask the keys that
    // left Mistral's window, and cache Qwen3's keys normed and rotated, as
    // the full recompute does.
    // Gemma's caches hold local and global layers side by side.
    for name in ["mistral", "qwen3", "olmo2", "gemma2", "gemma3"] {
        let dir = fixtures().join(name);
        let r = reference(&dir);
        let checkpoint = Checkpoint::open(&dir).expect("open");
        let model = LlamaModel::from_checkpoint(&checkpoint).expect("load");
        let prompt = &r.ids[..10];
        let cached = model.generate_greedy(prompt, 30, None).expect("cached");
        let uncached = model
            .generate_greedy_uncached(prompt, 30, None)
            .expect("uncached");
        assert_eq!(cached.len(), 30, "{name}");
        assert_eq!(cached, uncached, "{name}");
    }
}

/// The GPU forward against the same fixtures: runs where a GPU is usable
/// (the device machine, `QUANTOPS_REQUIRE_GPU=1` makes its absence a
/// failure), skips elsewhere.
#[test]
fn gpu_forward_matches_transformers_logits() {
    let required = std::env::var_os("QUANTOPS_REQUIRE_GPU").is_some();
    let gpu = match Gpu::for_choice(DeviceChoice::Auto) {
        Ok(Some(gpu)) => gpu,
        Ok(None) if !required => {
            eprintln!("skipped: no usable GPU (set QUANTOPS_REQUIRE_GPU to make this a failure)");
            return;
        }
        Ok(None) => panic!("QUANTOPS_REQUIRE_GPU is set but no GPU is usable"),
        Err(e) => panic!("opening the GPU: {e}"),
    };
    let mut report = Vec::new();
    for name in SUPPORTED {
        let dir = fixtures().join(name);
        let r = reference(&dir);
        let checkpoint = Checkpoint::open(&dir).expect("open fixture");
        if MOE.contains(name) {
            let err = GpuLlama::from_source(&gpu, &checkpoint)
                .err()
                .map(|e| e.to_string());
            let err = err.unwrap_or_else(|| panic!("{name}: the GPU path ran a MoE model"));
            assert!(err.contains("mixture-of-experts"), "{name}: {err}");
            report.push(format!("{name}: refused on the GPU path ({err})"));
            continue;
        }
        let model = GpuLlama::from_source(&gpu, &checkpoint).expect("upload");
        let ours = model.logits(&r.ids).expect("GPU logits");
        let d = max_diff(&ours, &r.logits);
        let cpu = LlamaModel::from_checkpoint(&checkpoint).expect("load");
        let prompt = &r.ids[..10];
        let greedy_cpu = cpu.generate_greedy(prompt, 30, None).expect("CPU greedy");
        let greedy_gpu = model.generate_greedy(prompt, 30, None).expect("GPU greedy");
        report.push(format!(
            "{name}: GPU max |diff| {d:.2e}, greedy equal to the CPU's: {}",
            greedy_cpu == greedy_gpu
        ));
        assert!(d < TOLERANCE, "{name}: GPU logits differ by up to {d}");
        assert_eq!(greedy_gpu, greedy_cpu, "{name}: GPU greedy decoding");
    }
    println!("{}", report.join("\n"));
}

/// Without a GPU: every MoE fixture is refused by the GPU path's up-front
/// check (what `GpuLlama::from_source` and the GPU quantization pipeline
/// call first), naming the feature; every dense fixture passes it.
#[test]
fn gpu_path_refuses_moe_fixtures_up_front() {
    for name in SUPPORTED {
        let checkpoint = Checkpoint::open(&fixtures().join(name)).expect("open fixture");
        let verdict = quantizer_job::gpu::moe::refuse_moe(checkpoint.config());
        match (MOE.contains(name), verdict) {
            (true, Err(e)) => {
                let text = e.to_string();
                assert!(
                    text.contains("mixture-of-experts") && text.contains("--device cpu"),
                    "{name}: {text}"
                );
            }
            (false, Ok(())) => {}
            (moe, verdict) => panic!("{name}: moe {moe}, GPU verdict {verdict:?}"),
        }
    }
}

/// Guards the MoE conformance: each fixture's routing matters. Flipping
/// the renormalisation of the top-k weights (Mixtral's and Qwen3-MoE's on,
/// Qwen2-MoE's and OLMoE's off), or routing to one expert fewer, moves the
/// logits far from transformers'; so does gating the experts by GeGLU
/// instead of the family's SiLU (the experts follow `Block::activation`).
#[test]
fn moe_fixtures_really_exercise_their_routing() {
    for name in MOE {
        let dir = fixtures().join(name);
        let r = reference(&dir);
        let flipped = logits_with(&dir, &r.ids, |c| {
            let moe = c.block.moe.as_mut().expect("a MoE config");
            moe.renormalize = !moe.renormalize;
        });
        let d = max_diff(&flipped, &r.logits);
        assert!(d > 1e-2, "{name}: flipped renormalisation is within {d}");
        let fewer = logits_with(&dir, &r.ids, |c| {
            let moe = c.block.moe.as_mut().expect("a MoE config");
            moe.top_k -= 1;
        });
        let d = max_diff(&fewer, &r.logits);
        assert!(d > 1e-2, "{name}: top-(k-1) routing is within {d}");
        // The experts gate by the family's activation, as the dense MLP
        // does: GeGLU in place of SwiGLU must move the logits too.
        let gelu = logits_with(&dir, &r.ids, |c| c.block.activation = Activation::GeluTanh);
        let d = max_diff(&gelu, &r.logits);
        assert!(
            d > 1e-2,
            "{name}: GeGLU experts are within {d} of SwiGLU ones"
        );
    }
}
