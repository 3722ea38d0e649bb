//! GPTQ and AWQ against RTN on real layers of the bundled model, with real-ish
//! inputs (normalised embeddings of text tokens); INT8 and FP8 error bounds.

mod common;

use common::{load_linear, norm_inputs, rel_err};
use quantizer_job::quant::{
    ActOrder, AwqConfig, CpuBackend, FloatDtype, Hessian, IntScheme, Matrix, QuantBackend,
    output_error,
};

fn scheme(bits: u8, symmetric: bool, group_size: Option<usize>) -> IntScheme {
    IntScheme {
        bits,
        symmetric,
        group_size,
        scale_dtype: FloatDtype::F16,
    }
}

fn hessian_of(layer: &str, x: &Matrix) -> Hessian {
    let mut h = Hessian::new(layer, x.cols);
    // Two batches, as the pipeline feeds them.
    let half = x.rows / 2;
    let (a, b) = x.data.split_at(half * x.cols);
    for (rows, data) in [(half, a), (x.rows - half, b)] {
        let batch = Matrix::new(rows, x.cols, data.to_vec()).expect("batch");
        CpuBackend
            .accumulate_hessian(&mut h, &batch)
            .expect("accumulate");
    }
    h
}

#[test]
fn gptq_beats_rtn_on_real_layers() {
    let backend = CpuBackend;
    let cases = [
        (
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.input_layernorm",
        ),
        (
            "model.layers.0.mlp.gate_proj",
            "model.layers.0.post_attention_layernorm",
        ),
    ];
    for (layer, norm) in cases {
        let w = load_linear(layer);
        let x = norm_inputs(norm, 1024);
        let h = hessian_of(layer, &x);
        // Evaluate on held-out rows so GPTQ is not just fitting its calibration set.
        let eval = norm_inputs(norm, 2048);
        let eval = Matrix::new(1024, eval.cols, eval.data[1024 * eval.cols..].to_vec())
            .expect("held-out rows");
        for (s, order) in [
            (scheme(4, false, Some(128)), ActOrder::None),
            (scheme(4, false, Some(128)), ActOrder::Static),
            (scheme(4, false, Some(128)), ActOrder::Group),
            (scheme(4, true, None), ActOrder::None),
            (scheme(3, false, Some(64)), ActOrder::Static),
        ] {
            let r = backend.quantize_rtn(layer, &w, s).expect("rtn");
            let g = backend
                .quantize_gptq(layer, &w, &h, s, order, 0.01)
                .expect("gptq");
            assert_eq!(g.g_idx.is_some(), order == ActOrder::Group);
            let e_rtn = output_error(&eval, &w, &r.dequantized).expect("rtn error");
            let e_gptq = output_error(&eval, &w, &g.dequantized).expect("gptq error");
            let ratio = e_gptq / e_rtn;
            println!(
                "{layer} {}b sym={} g={:?} {order:?}: output error GPTQ/RTN = {ratio:.3}",
                s.bits, s.symmetric, s.group_size
            );
            assert!(ratio < 0.9, "{layer} {s:?} {order:?}: ratio {ratio:.3}");
        }
    }
}

#[test]
fn gptq_handles_dead_columns_and_checks_shapes() {
    let layer = "model.layers.0.self_attn.k_proj";
    let w = load_linear(layer);
    let mut x = norm_inputs("model.layers.0.input_layernorm", 256);
    for row in x.data.chunks_mut(x.cols) {
        row[5] = 0.0; // input channel 5 never active
    }
    let h = hessian_of(layer, &x);
    let q = CpuBackend
        .quantize_gptq(
            layer,
            &w,
            &h,
            scheme(4, true, Some(128)),
            ActOrder::None,
            0.01,
        )
        .expect("gptq with a dead column");
    for r in 0..q.shape[0] {
        assert_eq!(q.dequantized.get(r, 5), 0.0, "dead column is zeroed");
    }
    let wrong = Hessian::new(layer, 100);
    let err = CpuBackend
        .quantize_gptq(
            layer,
            &w,
            &wrong,
            scheme(4, true, None),
            ActOrder::None,
            0.01,
        )
        .unwrap_err();
    assert!(err.to_string().contains("k_proj"), "{err}");
}

/// AWQ's output error `‖X Wᵀ − (X/s) Q(W·s)ᵀ‖²` summed over a set of Linears
/// sharing one input, and RTN's `‖X Wᵀ − X Q(W)ᵀ‖²` on the same set.
fn awq_vs_rtn(names: &[&str], norm: &str, s: IntScheme) -> (f64, f64, Option<f32>) {
    let weights: Vec<Matrix> = names.iter().map(|n| load_linear(n)).collect();
    let x = norm_inputs(norm, 512);
    let layers: Vec<(&str, &Matrix)> = names.iter().copied().zip(weights.iter()).collect();
    let res = CpuBackend
        .quantize_awq(&layers, &x, s, &AwqConfig::default())
        .expect("awq");
    assert_eq!(res.scales.len(), x.cols);
    assert_eq!(res.layers.len(), names.len());
    let (mut e_awq, mut e_rtn) = (0.0, 0.0);
    for ((name, w), q) in layers.iter().zip(&res.layers) {
        let mut unscaled = q.dequantized.clone();
        for row in unscaled.data.chunks_mut(w.cols) {
            for (v, f) in row.iter_mut().zip(&res.scales) {
                *v /= f;
            }
        }
        e_awq += output_error(&x, w, &unscaled).expect("awq error");
        let r = CpuBackend.quantize_rtn(name, w, s).expect("rtn");
        e_rtn += output_error(&x, w, &r.dequantized).expect("rtn error");
    }
    (e_awq, e_rtn, res.alpha)
}

#[test]
fn awq_beats_rtn_on_real_layer_sets() {
    let cases: [(&[&str], &str, IntScheme, f64); 3] = [
        (
            &[
                "model.layers.0.self_attn.q_proj",
                "model.layers.0.self_attn.k_proj",
                "model.layers.0.self_attn.v_proj",
            ],
            "model.layers.0.input_layernorm",
            scheme(4, false, Some(128)),
            1.0,
        ),
        (
            &["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
            "model.layers.0.post_attention_layernorm",
            scheme(4, false, Some(128)),
            0.95,
        ),
        (
            &["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
            "model.layers.0.post_attention_layernorm",
            scheme(3, true, None),
            0.95,
        ),
    ];
    for (names, norm, s, bound) in cases {
        let (e_awq, e_rtn, alpha) = awq_vs_rtn(names, norm, s);
        let ratio = e_awq / e_rtn;
        println!(
            "AWQ {names:?} {}b sym={} g={:?}: alpha {alpha:?}, output error AWQ/RTN = {ratio:.3}",
            s.bits, s.symmetric, s.group_size
        );
        assert!(ratio < bound, "{names:?}: ratio {ratio:.3}");
    }
}

#[test]
fn int8_and_fp8_errors_are_small() {
    let layer = "model.layers.2.mlp.down_proj";
    let w = load_linear(layer);
    let int8 = CpuBackend
        .quantize_rtn(layer, &w, scheme(8, true, None))
        .expect("int8");
    let fp8 = CpuBackend
        .quantize_fp8(layer, &w, FloatDtype::F16)
        .expect("fp8");
    let e8 = rel_err(&w.data, &int8.dequantized.data);
    let ef = rel_err(&w.data, &fp8.dequantized.data);
    println!("{layer}: relative weight error int8 {e8:.5}, fp8 {ef:.5}");
    assert!(e8 < 0.01, "int8 {e8}");
    assert!(ef < 0.04, "fp8 {ef}");
}

/// Wall times on the widest Linear of the bundled model (not an assertion; run
/// with `--ignored --nocapture` to print them).
#[test]
#[ignore = "timing report, not a correctness check"]
fn timings_on_down_proj() {
    use std::time::Instant;
    let layer = "model.layers.0.mlp.down_proj";
    let w = load_linear(layer);
    let x = norm_inputs("model.layers.0.input_layernorm", 4096);
    let wide: Vec<f32> = x
        .data
        .chunks(x.cols)
        .flat_map(|row| (0..w.cols).map(move |c| row[c % x.cols] * (1.0 + (c / x.cols) as f32)))
        .collect();
    let x = Matrix::new(x.rows, w.cols, wide).expect("inputs");
    let t = Instant::now();
    let mut h = Hessian::new(layer, w.cols);
    CpuBackend.accumulate_hessian(&mut h, &x).expect("hessian");
    let t_h = t.elapsed();
    let s = scheme(4, false, Some(128));
    let t = Instant::now();
    CpuBackend
        .quantize_gptq(layer, &w, &h, s, ActOrder::Static, 0.01)
        .expect("gptq");
    let t_g = t.elapsed();
    let t = Instant::now();
    CpuBackend.quantize_rtn(layer, &w, s).expect("rtn");
    let t_r = t.elapsed();
    println!(
        "{layer} [384, 1024], {} threads: Hessian of 4096 rows {:.3} s, GPTQ {:.3} s, RTN {:.4} s",
        rayon::current_num_threads(),
        t_h.as_secs_f64(),
        t_g.as_secs_f64(),
        t_r.as_secs_f64()
    );
}

/// Folding `1/s` into the previous op and using `Q(W·s)` keeps the layer's
/// function: `norm(x; gamma/s) · (W·s)ᵀ = norm(x; gamma) · Wᵀ` before rounding.
#[test]
fn awq_mapping_and_folding_preserve_the_function() {
    use quantizer_job::quant::{ScaleSink, fold_into_linear, fold_into_norm, llama_awq_mappings};
    let maps = llama_awq_mappings("model.layers.0", 128, 384);
    assert_eq!(maps.len(), 3, "o_proj left out under GQA");
    assert_eq!(
        maps[0].sink,
        ScaleSink::Norm("model.layers.0.input_layernorm".to_string())
    );
    assert_eq!(
        maps[2].sink,
        ScaleSink::Linear("model.layers.0.mlp.up_proj".to_string())
    );
    assert_eq!(llama_awq_mappings("model.layers.0", 384, 384).len(), 4);

    let s = [2.0f32, 0.5, 4.0];
    let mut gamma = vec![1.0f32, 1.0, 1.0];
    fold_into_norm(&mut gamma, &s).expect("fold");
    assert_eq!(gamma, vec![0.5, 2.0, 0.25]);
    let mut up = Matrix::new(3, 2, vec![2.0, 4.0, 1.0, 1.0, 8.0, 8.0]).expect("w");
    fold_into_linear(&mut up, &s).expect("fold");
    assert_eq!(up.data, vec![1.0, 2.0, 2.0, 2.0, 2.0, 2.0]);
    assert!(fold_into_norm(&mut [1.0; 2], &s).is_err());
}
