//! llm-compressor's GPTQ W4A16_ASYM g128 checkpoint reads back close to the FP16
//! base weights, and our packing conventions explain its tensors.

mod common;

use common::{load_linear, reference_dir, rel_err};
use quantizer_job::format::read_checkpoint;
use quantizer_job::quant::{FloatDtype, IntScheme, rtn};

#[test]
fn reference_dequantizes_close_to_base_weights() {
    let ckpt = read_checkpoint(&reference_dir()).expect("read reference checkpoint");
    assert_eq!(
        ckpt.quantized_modules.len(),
        6 * 7,
        "every Linear but lm_head"
    );
    assert!(!ckpt.quantized_modules.contains("lm_head"));
    let cfg = ckpt
        .quantization_config
        .as_ref()
        .expect("quantization_config");
    assert_eq!(cfg["format"], "pack-quantized");
    let scheme = IntScheme {
        bits: 4,
        symmetric: false,
        group_size: Some(128),
        scale_dtype: FloatDtype::F16,
    };
    let mut worst: (f64, String) = (0.0, String::new());
    let mut sum_ratio = 0.0;
    for m in &ckpt.quantized_modules {
        let base = load_linear(m);
        let t = &ckpt.tensors[&format!("{m}.weight")];
        assert_eq!(t.shape, vec![base.rows, base.cols], "{m} shape");
        let err = rel_err(&base.data, &t.data);
        let rtn_err = rel_err(
            &base.data,
            &rtn(m, &base, scheme).expect("rtn").dequantized.data,
        );
        // GPTQ trades weight error for output error, so its weight error exceeds
        // RTN's, but it must stay in the same range: a wrong nibble order, zero
        // point sign or offset gives errors of 0.6 to 1.5 instead.
        assert!(err < 0.25, "{m}: relative error {err:.4}");
        assert!(err < 2.0 * rtn_err, "{m}: {err:.4} vs RTN {rtn_err:.4}");
        println!("{m}: GPTQ reference {err:.4}, our RTN {rtn_err:.4}");
        sum_ratio += err / rtn_err;
        if err > worst.0 {
            worst = (err, m.clone());
        }
    }
    println!(
        "reference: worst relative weight error {:.4} ({}), mean GPTQ/RTN ratio {:.3}",
        worst.0,
        worst.1,
        sum_ratio / ckpt.quantized_modules.len() as f64
    );
    // Unquantized tensors come back as they were stored.
    let lm = &ckpt.tensors["lm_head.weight"];
    assert_eq!(lm.shape, vec![8192, 384]);
    assert_eq!(lm.data, load_linear("lm_head").data);
}

/// With `actorder: static`, llm-compressor fixes every group's scale and zero
/// point from the original weight's min-max before GPTQ runs, so they must
/// equal our RTN grid of the base weight: a direct check of the grid convention
/// (scale = f16(f16(max − min) / 15), signed zero point, range containing 0):
/// bit-identical on every group checked.
#[test]
fn reference_grid_matches_our_min_max_grid() {
    use safetensors::SafeTensors;
    let bytes = std::fs::read(reference_dir().join("model.safetensors")).expect("read reference");
    let st = SafeTensors::deserialize(&bytes).expect("parse reference");
    let scheme = IntScheme {
        bits: 4,
        symmetric: false,
        group_size: Some(128),
        scale_dtype: FloatDtype::F16,
    };
    let (mut same_scale, mut same_zero, mut total) = (0usize, 0usize, 0usize);
    for m in [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.gate_proj",
        "model.layers.3.mlp.down_proj",
    ] {
        let ours = rtn(m, &load_linear(m), scheme).expect("rtn");
        let scales: Vec<f32> = st
            .tensor(&format!("{m}.weight_scale"))
            .expect("scale")
            .data()
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        let zp_words: Vec<i32> = st
            .tensor(&format!("{m}.weight_zero_point"))
            .expect("zero point")
            .data()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let groups = ours.scales.cols;
        let zps = quantizer_job::format::pack::unpack_cols(&zp_words, ours.shape[0], groups, 4);
        let our_zps = ours.zero_points.as_ref().expect("asymmetric");
        for k in 0..scales.len() {
            total += 1;
            same_scale += usize::from(scales[k] == ours.scales.data[k]);
            same_zero += usize::from(zps[k] == our_zps[k]);
        }
    }
    let (fs, fz) = (
        same_scale as f64 / total as f64,
        same_zero as f64 / total as f64,
    );
    println!(
        "reference grid: {fs:.4} of scales and {fz:.4} of zero points identical ({total} groups)"
    );
    assert!(
        fs == 1.0 && fz == 1.0,
        "scales {fs:.4}, zero points {fz:.4}"
    );
}
