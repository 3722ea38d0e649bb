//! A dense row-major `f32` matrix: the currency of the quantization seam.
//!
//! Plain `Vec<f32>` with explicit shape keeps the algorithms free of any tensor
//! library, so a GPU backend can implement the same trait over device buffers
//! and the pipeline converts at the boundary (`Tensor::to_vec2` / `from_vec`).

use rayon::prelude::*;

use super::QuantError;

/// Dense row-major matrix `[rows, cols]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    /// Wraps `data`, checking that it holds exactly `rows * cols` values.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Result<Self, QuantError> {
        if data.len() != rows * cols {
            return Err(QuantError::Shape {
                what: "matrix data".to_string(),
                expected: format!("{} values for [{rows}, {cols}]", rows * cols),
                got: format!("{} values", data.len()),
            });
        }
        Ok(Self { rows, cols, data })
    }

    /// A matrix of zeros.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    /// Row `r` as a slice.
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    /// Element `(r, c)`.
    pub fn get(&self, r: usize, c: usize) -> f32 {
        self.data[r * self.cols + c]
    }

    /// The transpose, materialised (row-major again).
    pub fn transpose(&self) -> Matrix {
        let mut out = vec![0.0; self.data.len()];
        for r in 0..self.rows {
            for c in 0..self.cols {
                out[c * self.rows + r] = self.data[r * self.cols + c];
            }
        }
        Matrix {
            rows: self.cols,
            cols: self.rows,
            data: out,
        }
    }

    /// `self · otherᵀ` — with `self = X [n, in]` and `other = W [out, in]` this
    /// is a Linear's output `[n, out]`. Both operands are read along contiguous
    /// rows, which is why the weight is taken untransposed.
    pub fn matmul_t(&self, other: &Matrix) -> Result<Matrix, QuantError> {
        if self.cols != other.cols {
            return Err(QuantError::Shape {
                what: "matmul_t operands".to_string(),
                expected: format!("inner dimension {}", self.cols),
                got: format!("{}", other.cols),
            });
        }
        let mut out = vec![0.0f32; self.rows * other.rows];
        out.par_chunks_mut(other.rows.max(1))
            .enumerate()
            .for_each(|(r, out_row)| {
                let a = self.row(r);
                for (o, slot) in out_row.iter_mut().enumerate() {
                    *slot = dot(a, other.row(o));
                }
            });
        Matrix::new(self.rows, other.rows, out)
    }
}

/// Dot product with eight independent accumulators so the compiler vectorises it.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for i in 0..chunks {
        let (x, y) = (&a[i * 8..i * 8 + 8], &b[i * 8..i * 8 + 8]);
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// Squared Frobenius norm of `X · (A − B)ᵀ`: the output error of replacing
/// weight `A` by `B` on inputs `X`.
pub fn output_error(x: &Matrix, a: &Matrix, b: &Matrix) -> Result<f64, QuantError> {
    if a.rows != b.rows || a.cols != b.cols {
        return Err(QuantError::Shape {
            what: "output_error weights".to_string(),
            expected: format!("[{}, {}]", a.rows, a.cols),
            got: format!("[{}, {}]", b.rows, b.cols),
        });
    }
    let diff = Matrix {
        rows: a.rows,
        cols: a.cols,
        data: a.data.iter().zip(&b.data).map(|(p, q)| p - q).collect(),
    };
    let y = x.matmul_t(&diff)?;
    Ok(y.data.iter().map(|v| f64::from(*v) * f64::from(*v)).sum())
}
