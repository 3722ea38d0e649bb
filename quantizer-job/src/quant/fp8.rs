//! FP8 E4M3 (the OCP `e4m3fn` variant vLLM and compressed-tensors use): 1 sign,
//! 4 exponent (bias 7), 3 mantissa bits, no infinities, NaN = `S.1111.111`,
//! largest finite ±448, smallest subnormal 2^-9. Written here rather than taken
//! from a crate so the rounding (to nearest, ties to even, saturating) is
//! explicit and tested against known bit patterns.

use rayon::prelude::*;

use super::{ActOrder, Codes, FloatDtype, Matrix, QuantError, QuantizedLinear, WeightScheme};

/// Largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;

/// Converts to E4M3, rounding to nearest-even and saturating at ±448.
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a >= E4M3_MAX {
        return sign | 0x7E;
    }
    // Below the smallest normal (2^-6) the grid is uniform with step 2^-9; a
    // result of 8 steps is the smallest normal, whose encoding is also 8.
    if a < 2f32.powi(-6) {
        let m = (a * 512.0).round_ties_even() as u8;
        return sign | m;
    }
    let e = ((a.to_bits() >> 23) as i32) - 127; // floor(log2 a), a is a normal f32 here
    let mut q = (a * 2f32.powi(3 - e)).round_ties_even() as i32; // 8..=16
    let mut e = e;
    if q == 16 {
        q = 8;
        e += 1;
    }
    sign | (((e + 7) as u8) << 3) | ((q - 8) as u8)
}

/// The value of an E4M3 bit pattern.
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((b >> 3) & 0x0F);
    let mant = f32::from(b & 0x07);
    if exp == 0x0F && b & 0x07 == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * mant * 2f32.powi(-9)
    } else {
        sign * (8.0 + mant) * 2f32.powi(exp - 10)
    }
}

/// Quantizes `w` to FP8 E4M3 with one scale per output channel (`absmax / 448`,
/// rounded to `scale_dtype` first, so that `fp8(q) · scale` is exactly what a
/// reader of the checkpoint computes).
pub fn quantize_fp8(
    layer: &str,
    w: &Matrix,
    scale_dtype: FloatDtype,
) -> Result<QuantizedLinear, QuantError> {
    if w.cols == 0 || w.rows == 0 {
        return Err(QuantError::Shape {
            what: format!("{layer} weight"),
            expected: "a non-empty [out, in] matrix".to_string(),
            got: format!("[{}, {}]", w.rows, w.cols),
        });
    }
    let rows: Vec<(f32, Vec<u8>, Vec<f32>)> = (0..w.rows)
        .into_par_iter()
        .map(|r| {
            let row = w.row(r);
            let absmax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let mut scale = scale_dtype.round(absmax / E4M3_MAX);
            if scale == 0.0 {
                scale = scale_dtype.eps();
            }
            let codes: Vec<u8> = row.iter().map(|&v| f32_to_e4m3(v / scale)).collect();
            let deq = codes.iter().map(|&b| e4m3_to_f32(b) * scale).collect();
            (scale, codes, deq)
        })
        .collect();
    let mut scales = Vec::with_capacity(w.rows);
    let mut codes = Vec::with_capacity(w.data.len());
    let mut deq = Vec::with_capacity(w.data.len());
    for (s, c, d) in rows {
        scales.push(s);
        codes.extend(c);
        deq.extend(d);
    }
    Ok(QuantizedLinear {
        shape: [w.rows, w.cols],
        scheme: WeightScheme::Fp8 { scale_dtype },
        act_order: ActOrder::None,
        codes: Codes::Fp8(codes),
        scales: Matrix::new(w.rows, 1, scales)?,
        zero_points: None,
        g_idx: None,
        dequantized: Matrix::new(w.rows, w.cols, deq)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_bit_patterns() {
        let cases: [(f32, u8); 12] = [
            (0.0, 0x00),
            (1.0, 0x38),                  // exp 7 (bias 7), mantissa 0
            (-2.0, 0xC0),                 // sign, exp 8
            (448.0, 0x7E),                // largest finite
            (1000.0, 0x7E),               // saturates
            (-1e9, 0xFE),                 // saturates negative
            (0.1, 0x1D),                  // 1.625·2^-4 = 0.1015625 is nearest
            (2f32.powi(-9), 0x01),        // smallest subnormal
            (2f32.powi(-10), 0x00),       // half the smallest subnormal: tie to even 0
            (3.0 * 2f32.powi(-10), 0x02), // 1.5 subnormal steps: tie to even 2
            (2f32.powi(-6), 0x08),        // smallest normal
            (1.0625, 0x38),               // halfway between 1.0 and 1.125: ties to even mantissa 0
        ];
        for (x, bits) in cases {
            assert_eq!(f32_to_e4m3(x), bits, "f32_to_e4m3({x})");
        }
        assert_eq!(f32_to_e4m3(1.1875), 0x3A); // halfway 1.125|1.25: even mantissa 2
        assert!(e4m3_to_f32(0x7F).is_nan());
    }

    #[test]
    fn every_finite_code_round_trips() {
        for b in 0u8..=255 {
            let v = e4m3_to_f32(b);
            if v.is_nan() {
                continue;
            }
            let back = f32_to_e4m3(v);
            // -0.0 and 0.0 both decode to zero; compare values.
            assert_eq!(e4m3_to_f32(back), v, "code {b:#04x}");
        }
    }

    #[test]
    fn per_channel_error_is_small() {
        let w =
            Matrix::new(2, 4, vec![0.5, -0.25, 0.125, 0.01, 3.0, -1.0, 0.2, 0.0]).expect("shape");
        let q = quantize_fp8("t", &w, FloatDtype::F32).expect("fp8");
        for (a, b) in w.data.iter().zip(&q.dequantized.data) {
            assert!((a - b).abs() <= a.abs() * 0.0625 + 1e-6, "{a} vs {b}");
        }
        assert_eq!(q.scales.data[1], 3.0 / 448.0);
    }
}
