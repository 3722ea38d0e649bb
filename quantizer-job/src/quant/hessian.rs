//! The GPTQ Hessian of a Linear's layer-wise reconstruction loss,
//! `H = 2/n · Σ xᵀx` over all calibration rows `x` (`[in]` each).
//!
//! Each batch's `XᵀX` is computed in f32 (contiguous dot products over the
//! transposed batch, eight accumulators) and added into an f64 running sum, so
//! precision does not degrade with the number of batches; the division by the
//! total row count happens once, in [`Hessian::finalize`].

use rayon::prelude::*;

use super::{Matrix, QuantError, dot};

/// Running `Σ xᵀx` of one Linear's inputs.
#[derive(Clone, Debug)]
pub struct Hessian {
    layer: String,
    dim: usize,
    /// Upper triangle valid (row-major `[dim, dim]`); mirrored on finalize.
    sum: Vec<f64>,
    samples: usize,
}

impl Hessian {
    /// An empty accumulator for a Linear with `in_features` inputs.
    pub fn new(layer: impl Into<String>, in_features: usize) -> Self {
        Self {
            layer: layer.into(),
            dim: in_features,
            sum: vec![0.0; in_features * in_features],
            samples: 0,
        }
    }

    /// The Linear this Hessian belongs to.
    pub fn layer(&self) -> &str {
        &self.layer
    }

    /// Input width.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of activation rows seen so far.
    pub fn samples(&self) -> usize {
        self.samples
    }

    /// Adds a batch of input rows `x: [n, in]`.
    pub fn add_batch(&mut self, x: &Matrix) -> Result<(), QuantError> {
        if x.cols != self.dim {
            return Err(QuantError::Shape {
                what: format!("{} calibration activations", self.layer),
                expected: format!("[n, {}]", self.dim),
                got: format!("[{}, {}]", x.rows, x.cols),
            });
        }
        if x.rows == 0 {
            return Ok(());
        }
        let xt = x.transpose();
        let dim = self.dim;
        self.sum
            .par_chunks_mut(dim)
            .enumerate()
            .for_each(|(i, row)| {
                let a = xt.row(i);
                for (j, slot) in row.iter_mut().enumerate().skip(i) {
                    *slot += f64::from(dot(a, xt.row(j)));
                }
            });
        self.samples += x.rows;
        Ok(())
    }

    /// Adds a batch's `xᵀx` computed elsewhere (the GPU backend), full
    /// `[in, in]` row-major, over `rows` activation rows.
    pub fn add_gram(&mut self, gram: &[f32], rows: usize) -> Result<(), QuantError> {
        if gram.len() != self.dim * self.dim {
            return Err(QuantError::Shape {
                what: format!("{} Gram matrix", self.layer),
                expected: format!("[{0}, {0}]", self.dim),
                got: format!("{} values", gram.len()),
            });
        }
        for (s, g) in self.sum.iter_mut().zip(gram) {
            *s += f64::from(*g);
        }
        self.samples += rows;
        Ok(())
    }

    /// `H = 2/n Σ xᵀx` as a full symmetric f64 matrix `[in, in]`.
    pub fn finalize(&self) -> Result<Vec<f64>, QuantError> {
        if self.samples == 0 {
            return Err(QuantError::NoSamples {
                layer: self.layer.clone(),
            });
        }
        let n = self.dim;
        let f = 2.0 / self.samples as f64;
        let mut h = vec![0.0; n * n];
        for i in 0..n {
            for j in i..n {
                let v = self.sum[i * n + j] * f;
                h[i * n + j] = v;
                h[j * n + i] = v;
            }
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_direct_sum_across_batches() {
        let x1 = Matrix::new(2, 3, vec![1.0, 2.0, 0.0, -1.0, 0.5, 3.0]).expect("shape");
        let x2 = Matrix::new(1, 3, vec![2.0, 0.0, 1.0]).expect("shape");
        let mut h = Hessian::new("t", 3);
        h.add_batch(&x1).expect("batch");
        h.add_batch(&x2).expect("batch");
        let got = h.finalize().expect("finalize");
        let rows = [[1.0, 2.0, 0.0], [-1.0, 0.5, 3.0], [2.0, 0.0, 1.0]];
        for i in 0..3 {
            for j in 0..3 {
                let want: f64 = rows.iter().map(|r| r[i] * r[j]).sum::<f64>() * 2.0 / 3.0;
                assert!((got[i * 3 + j] - want).abs() < 1e-9, "H[{i}][{j}]");
            }
        }
        let err = h.add_batch(&Matrix::zeros(1, 4)).unwrap_err();
        assert!(err.to_string().contains("[n, 3]"));
    }
}
