//! GPTQ (Frantar et al., 2022): quantize a Linear column by column, pushing each
//! column's rounding error onto the not-yet-quantized columns through the upper
//! Cholesky factor of the inverse Hessian.
//!
//! CPU layout: output rows are independent given `U = chol(H⁻¹)ᵀ`, so rows are
//! split into chunks processed in parallel. Within a chunk the columns go in
//! blocks of [`BLOCK`]: inside a block errors are applied eagerly to the block's
//! columns only; the block's accumulated errors are applied to all later columns
//! once at the block's end (GPTQ's lazy batch update). The block's rows of `U`
//! are then reused by every row of the chunk while they are in cache.
//!
//! Group parameters: with [`ActOrder::None`] and [`ActOrder::Group`] they are
//! fixed from the row's current (error-updated) values when a group starts, as
//! the original GPTQ does — exact when the group size divides or is a multiple
//! of the block (32/64/128/per channel). With [`ActOrder::Static`] they come from
//! the original weight per natural-order group, as llm-compressor's `static`.

use std::time::Instant;

use rayon::prelude::*;
use tracing::debug;

use super::grid::{self, GroupParams};
use super::linalg::inverse_cholesky_upper;
use super::{ActOrder, Hessian, IntScheme, Matrix, QuantError, QuantizedLinear, assemble_int};

/// Columns per lazy-update block.
pub const BLOCK: usize = 128;
/// Output rows per parallel work item.
const ROW_CHUNK: usize = 8;

/// Quantizes `w` (`[out, in]`) with GPTQ using the layer's accumulated Hessian.
/// Columns with `H_ii = 0` (inputs never active) are zeroed, as GPTQ does;
/// `damp_percent · mean(diag H)` is added to the diagonal before factorising.
pub fn gptq(
    layer: &str,
    w: &Matrix,
    hessian: &Hessian,
    scheme: IntScheme,
    act_order: ActOrder,
    damp_percent: f64,
) -> Result<QuantizedLinear, QuantError> {
    let start = Instant::now();
    let n = w.cols;
    let group_size = grid::validate(&scheme, layer, n)?;
    let groups = n / group_size;
    if hessian.dim() != n {
        return Err(QuantError::Shape {
            what: format!("{layer} Hessian"),
            expected: format!("[{n}, {n}]"),
            got: format!("[{0}, {0}]", hessian.dim()),
        });
    }
    if !(damp_percent.is_finite() && damp_percent >= 0.0) {
        return Err(QuantError::Unsupported {
            layer: layer.to_string(),
            field: "damp_percent",
            value: damp_percent.to_string(),
            expected: "a finite fraction >= 0",
        });
    }
    let mut h = hessian.finalize()?;
    let mut w = w.clone();
    let mut dead = 0usize;
    for i in 0..n {
        if h[i * n + i] == 0.0 {
            h[i * n + i] = 1.0;
            dead += 1;
            for r in 0..w.rows {
                w.data[r * n + i] = 0.0;
            }
        }
    }

    // Processing order: position k handles original column perm[k].
    let mut perm: Vec<usize> = (0..n).collect();
    if act_order != ActOrder::None {
        perm.sort_by(|&a, &b| h[b * n + b].total_cmp(&h[a * n + a]));
    }
    let mut hp = vec![0.0f64; n * n];
    for (a, &pa) in perm.iter().enumerate() {
        for (b, &pb) in perm.iter().enumerate() {
            hp[a * n + b] = h[pa * n + pb];
        }
    }
    let mean_diag = (0..n).map(|i| hp[i * n + i]).sum::<f64>() / n as f64;
    let damp = damp_percent * mean_diag;
    for i in 0..n {
        hp[i * n + i] += damp;
    }
    let u64 = inverse_cholesky_upper(&hp, n, layer)?;
    let u: Vec<f32> = u64.iter().map(|&v| v as f32).collect();

    // Static order: parameters from the original weight, natural-order groups.
    let static_params: Option<Vec<GroupParams>> = (act_order == ActOrder::Static).then(|| {
        (0..w.rows)
            .flat_map(|r| {
                w.row(r)
                    .chunks(group_size)
                    .map(|g| grid::params_of(g, &scheme))
                    .collect::<Vec<_>>()
            })
            .collect()
    });
    // Group of processing position k (natural columns for None/Static).
    let group_of = |k: usize| -> usize {
        match act_order {
            ActOrder::None | ActOrder::Group => k / group_size,
            ActOrder::Static => perm[k] / group_size,
        }
    };

    let mut codes = vec![0i32; w.rows * n];
    let mut params = vec![
        GroupParams {
            scale: 1.0,
            zero: 0
        };
        w.rows * groups
    ];
    w.data
        .par_chunks(ROW_CHUNK * n)
        .zip(codes.par_chunks_mut(ROW_CHUNK * n))
        .zip(params.par_chunks_mut(ROW_CHUNK * groups))
        .enumerate()
        .for_each(|(chunk, ((wrows, crows), prows))| {
            let rows = wrows.len() / n;
            // Rows in processing order.
            let mut wp: Vec<f32> = Vec::with_capacity(wrows.len());
            for r in 0..rows {
                wp.extend(perm.iter().map(|&c| wrows[r * n + c]));
            }
            let mut qp = vec![0i32; rows * n];
            let mut err = vec![0.0f32; rows * BLOCK];
            for i1 in (0..n).step_by(BLOCK) {
                let i2 = (i1 + BLOCK).min(n);
                for r in 0..rows {
                    let row = &mut wp[r * n..(r + 1) * n];
                    let prow = &mut prows[r * groups..(r + 1) * groups];
                    for i in i1..i2 {
                        let g = group_of(i);
                        if let Some(sp) = &static_params {
                            prow[g] = sp[(chunk * ROW_CHUNK + r) * groups + g];
                        } else if i.is_multiple_of(group_size) {
                            prow[g] = grid::params_of(&row[i..i + group_size], &scheme);
                        }
                        let p = prow[g];
                        let q = grid::quantize(row[i], p, scheme.bits);
                        qp[r * n + i] = q;
                        let e = (row[i] - grid::dequantize(q, p)) / u[i * n + i];
                        err[r * BLOCK + (i - i1)] = e;
                        let urow = &u[i * n..(i + 1) * n];
                        for (wj, uj) in row[i + 1..i2].iter_mut().zip(&urow[i + 1..i2]) {
                            *wj -= e * uj;
                        }
                    }
                }
                if i2 < n {
                    for r in 0..rows {
                        let row = &mut wp[r * n + i2..(r + 1) * n];
                        for k in 0..(i2 - i1) {
                            let e = err[r * BLOCK + k];
                            let urow = &u[(i1 + k) * n + i2..(i1 + k + 1) * n];
                            for (wj, uj) in row.iter_mut().zip(urow) {
                                *wj -= e * uj;
                            }
                        }
                    }
                }
            }
            for r in 0..rows {
                for (k, &c) in perm.iter().enumerate() {
                    crows[r * n + c] = qp[r * n + k];
                }
            }
        });

    // Per channel there is one group whatever the order: no g_idx to store.
    let g_idx = (act_order == ActOrder::Group && scheme.group_size.is_some()).then(|| {
        let mut idx = vec![0i32; n];
        for (k, &c) in perm.iter().enumerate() {
            idx[c] = (k / group_size) as i32;
        }
        idx
    });
    let out = assemble_int(
        [w.rows, n],
        scheme,
        act_order,
        codes,
        &params,
        groups,
        g_idx,
    );
    debug!(
        layer,
        dead_columns = dead,
        elapsed_ms = start.elapsed().as_millis() as u64,
        "gptq quantized"
    );
    out
}
