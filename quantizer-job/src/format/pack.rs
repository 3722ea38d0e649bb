//! compressed-tensors `pack-quantized` bit packing.
//!
//! A signed `b`-bit code `q ∈ [-2^(b-1), 2^(b-1))` is stored unsigned as
//! `q + 2^(b-1)`; `32 / b` such values fill one little-endian int32, the first
//! value in the lowest bits (value `k` of a word at bits `b·k .. b·k + b`); a
//! trailing partial word is zero-padded. Weights are packed along the input
//! dimension (`[out, ceil(in / (32/b))]`), zero points along the output dimension
//! (`[ceil(out / (32/b)), groups]`). Verified against llm-compressor's reference
//! checkpoint (see the integration tests).
//!
//! Bit widths: compressed-tensors' packer works for 1..=8 bits (3 bits: ten values
//! per word, two high bits unused), but llm-compressor only chooses
//! `pack-quantized` for 4 and 8 bits and vLLM's WNA16 kernels load only those, so
//! the writer packs 4 and 8 bits and stores 2/3 bits `naive-quantized` (one int8
//! per code), as llm-compressor does.

use rayon::prelude::*;

/// Whether codes of `bits` are stored packed (`pack-quantized`) rather than
/// one int8 each (`naive-quantized`); see the module doc for why 4 and 8.
pub fn packs(bits: u8) -> bool {
    matches!(bits, 4 | 8)
}

/// Codes per int32 word.
pub fn pack_factor(bits: u8) -> usize {
    32 / usize::from(bits)
}

fn word(values: impl Iterator<Item = i8>, bits: u8) -> i32 {
    let offset = 1i32 << (bits - 1);
    let mask = (1u32 << bits) - 1;
    let mut w = 0u32;
    for (k, q) in values.enumerate() {
        w |= ((i32::from(q) + offset) as u32 & mask) << (u32::from(bits) * k as u32);
    }
    w as i32
}

fn value(w: i32, k: usize, bits: u8) -> i8 {
    let mask = (1u32 << bits) - 1;
    let u = ((w as u32) >> (u32::from(bits) * k as u32)) & mask;
    (u as i32 - (1i32 << (bits - 1))) as i8
}

/// Packs row-major codes `[rows, cols]` along the columns: `[rows, ceil(cols / pf)]`.
/// Rows are packed in parallel: a large model has billions of codes.
pub fn pack_rows(codes: &[i8], rows: usize, cols: usize, bits: u8) -> Vec<i32> {
    let pf = pack_factor(bits);
    let words = cols.div_ceil(pf);
    let mut out = vec![0i32; rows * words];
    if words == 0 {
        return out;
    }
    out.par_chunks_mut(words)
        .zip(codes[..rows * cols].par_chunks(cols))
        .for_each(|(packed, row)| {
            for (w, chunk) in packed.iter_mut().zip(row.chunks(pf)) {
                *w = word(chunk.iter().copied(), bits);
            }
        });
    out
}

/// Unpacks words stored as little-endian bytes (what the artifact and the
/// GPU's pack kernel hold) like [`unpack_rows`].
pub fn unpack_row_bytes(bytes: &[u8], rows: usize, cols: usize, bits: u8) -> Vec<i8> {
    let words: Vec<i32> = bytes
        .chunks_exact(4)
        .map(|w| i32::from_le_bytes([w[0], w[1], w[2], w[3]]))
        .collect();
    unpack_rows(&words, rows, cols, bits)
}

/// Inverse of [`pack_rows`].
pub fn unpack_rows(packed: &[i32], rows: usize, cols: usize, bits: u8) -> Vec<i8> {
    let pf = pack_factor(bits);
    let words = cols.div_ceil(pf);
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            out.push(value(packed[r * words + c / pf], c % pf, bits));
        }
    }
    out
}

/// Packs row-major codes `[rows, cols]` along the rows: `[ceil(rows / pf), cols]`.
pub fn pack_cols(codes: &[i8], rows: usize, cols: usize, bits: u8) -> Vec<i32> {
    let pf = pack_factor(bits);
    let words = rows.div_ceil(pf);
    let mut out = Vec::with_capacity(words * cols);
    for w in 0..words {
        for c in 0..cols {
            let col = (w * pf..((w + 1) * pf).min(rows)).map(|r| codes[r * cols + c]);
            out.push(word(col, bits));
        }
    }
    out
}

/// Inverse of [`pack_cols`].
pub fn unpack_cols(packed: &[i32], rows: usize, cols: usize, bits: u8) -> Vec<i8> {
    let pf = pack_factor(bits);
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            out.push(value(packed[(r / pf) * cols + c], r % pf, bits));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int4_words_match_hand_computation() {
        // One row of 8 codes: -8 -7 -1 0 1 2 6 7.
        // Stored nibbles (q + 8):  0  1  7 8 9 10 14 15 = 0x0 0x1 0x7 0x8 0x9 0xA 0xE 0xF,
        // first value in the lowest nibble, so the word reads (high → low)
        // 0xFEA98710 = 4272523024 as u32, i.e. 4272523024 - 2^32 = -22444272 as i32.
        // Second row: 0 0 0 0 0 0 0 1 → nibbles 8 8 8 8 8 8 8 9 → 0x98888888 = -1735882616.
        let codes: [i8; 16] = [-8, -7, -1, 0, 1, 2, 6, 7, 0, 0, 0, 0, 0, 0, 0, 1];
        let packed = pack_rows(&codes, 2, 8, 4);
        assert_eq!(packed, vec![0xFEA9_8710_u32 as i32, 0x9888_8888_u32 as i32]);
        assert_eq!(packed, vec![-22_444_272, -1_735_882_616]);
        assert_eq!(unpack_rows(&packed, 2, 8, 4), codes.to_vec());
        // Along the rows (zero-point layout), 9 rows x 1 column: codes 0..=8 - 4
        // → nibbles 4..=12; the first word holds rows 0..8 (0xBA987654), the
        // second holds row 8 alone (0x0000000C), zero-padded.
        let col: Vec<i8> = (0..9).map(|v| v - 4).collect();
        let packed = pack_cols(&col, 9, 1, 4);
        assert_eq!(packed, vec![0xBA98_7654_u32 as i32, 0xC]);
        assert_eq!(unpack_cols(&packed, 9, 1, 4), col);
    }

    #[test]
    fn round_trips_all_widths() {
        for bits in [2u8, 3, 4, 8] {
            let half = 1i32 << (bits - 1);
            let (rows, cols) = (7, 37); // not multiples of any pack factor
            let codes: Vec<i8> = (0..rows * cols)
                .map(|k| ((k as i32 * 5 + 3) % (2 * half) - half) as i8)
                .collect();
            let p = pack_rows(&codes, rows, cols, bits);
            assert_eq!(p.len(), rows * cols.div_ceil(pack_factor(bits)));
            assert_eq!(
                unpack_rows(&p, rows, cols, bits),
                codes,
                "rows, {bits} bits"
            );
            let le: Vec<u8> = p.iter().flat_map(|w| w.to_le_bytes()).collect();
            assert_eq!(unpack_row_bytes(&le, rows, cols, bits), codes);
            let p = pack_cols(&codes, rows, cols, bits);
            assert_eq!(p.len(), rows.div_ceil(pack_factor(bits)) * cols);
            assert_eq!(
                unpack_cols(&p, rows, cols, bits),
                codes,
                "cols, {bits} bits"
            );
        }
    }
}
