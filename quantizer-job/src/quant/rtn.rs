//! Round-to-nearest: each group's min-max grid, every weight rounded onto it.
//! The floor every calibrated method must beat; INT8 weight-only is RTN with
//! 8-bit symmetric per-channel grids.

use rayon::prelude::*;

use super::grid::{self, GroupParams};
use super::{ActOrder, IntScheme, Matrix, QuantError, QuantizedLinear, assemble_int};

/// Quantizes `w` (`[out, in]`) with round-to-nearest.
pub fn rtn(layer: &str, w: &Matrix, scheme: IntScheme) -> Result<QuantizedLinear, QuantError> {
    let group_size = grid::validate(&scheme, layer, w.cols)?;
    let groups = w.cols / group_size;
    let rows: Vec<(Vec<i32>, Vec<GroupParams>)> = (0..w.rows)
        .into_par_iter()
        .map(|r| {
            let row = w.row(r);
            let mut codes = Vec::with_capacity(row.len());
            let mut params = Vec::with_capacity(groups);
            for chunk in row.chunks(group_size) {
                let p = grid::params_of(chunk, &scheme);
                codes.extend(chunk.iter().map(|&x| grid::quantize(x, p, scheme.bits)));
                params.push(p);
            }
            (codes, params)
        })
        .collect();
    let (codes, params): (Vec<_>, Vec<_>) = rows.into_iter().unzip();
    assemble_int(
        [w.rows, w.cols],
        scheme,
        ActOrder::None,
        codes.concat(),
        &params.concat(),
        groups,
        None,
    )
}
