//! Dense f64 Cholesky factorisation and the upper Cholesky factor of an inverse,
//! written out because GPTQ needs exactly `chol(H⁻¹)ᵀ` and the matrices are at
//! most a few thousand wide. Row-oriented (Cholesky–Banachiewicz) so the inner
//! products run over contiguous memory.

use rayon::prelude::*;

use super::QuantError;

fn dot64(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 4];
    let chunks = a.len() / 4;
    for i in 0..chunks {
        for k in 0..4 {
            acc[k] += a[i * 4 + k] * b[i * 4 + k];
        }
    }
    let mut s = acc[0] + acc[1] + acc[2] + acc[3];
    for i in chunks * 4..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// Lower Cholesky factor `L` (`A = L Lᵀ`) of a symmetric positive definite
/// `n × n` row-major matrix; the upper triangle of the result is zero.
pub fn cholesky_lower(a: &[f64], n: usize, layer: &str) -> Result<Vec<f64>, QuantError> {
    let mut l = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s = a[i * n + j] - dot64(&l[i * n..i * n + j], &l[j * n..j * n + j]);
            if i == j {
                if s <= 0.0 || !s.is_finite() {
                    return Err(QuantError::NotPositiveDefinite {
                        layer: layer.to_string(),
                        column: i,
                        pivot: s,
                    });
                }
                l[i * n + i] = s.sqrt();
            } else {
                l[i * n + j] = s / l[j * n + j];
            }
        }
    }
    Ok(l)
}

/// `A⁻¹` of a symmetric positive definite matrix, via `A⁻¹ = L⁻ᵀ L⁻¹`.
pub fn spd_inverse(a: &[f64], n: usize, layer: &str) -> Result<Vec<f64>, QuantError> {
    let l = cholesky_lower(a, n, layer)?;
    // X = L⁻¹ (lower), row by row: X[i] = (e_i − Σ_{j<i} L[i][j] X[j]) / L[i][i].
    let mut x = vec![0.0; n * n];
    for i in 0..n {
        let (done, rest) = x.split_at_mut(i * n);
        let row = &mut rest[..n];
        row[i] = 1.0;
        for j in 0..i {
            let lij = l[i * n + j];
            if lij != 0.0 {
                let xj = &done[j * n..j * n + j + 1];
                for (r, v) in row[..=j].iter_mut().zip(xj) {
                    *r -= lij * v;
                }
            }
        }
        let d = l[i * n + i];
        for v in row[..=i].iter_mut() {
            *v /= d;
        }
    }
    // A⁻¹[a][b] = Σ_i X[i][a] X[i][b] = dot(Xᵀ[a], Xᵀ[b]) over i ≥ max(a, b).
    let mut xt = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            xt[j * n + i] = x[i * n + j];
        }
    }
    let mut inv = vec![0.0; n * n];
    inv.par_chunks_mut(n).enumerate().for_each(|(a, row)| {
        for (b, slot) in row.iter_mut().enumerate() {
            let from = a.max(b);
            *slot = dot64(
                &xt[a * n + from..(a + 1) * n],
                &xt[b * n + from..(b + 1) * n],
            );
        }
    });
    Ok(inv)
}

/// Upper Cholesky factor `U` of `A⁻¹` (`A⁻¹ = Uᵀ U`), the matrix GPTQ's
/// column-by-column error propagation reads its rows from.
pub fn inverse_cholesky_upper(a: &[f64], n: usize, layer: &str) -> Result<Vec<f64>, QuantError> {
    let inv = spd_inverse(a, n, layer)?;
    let l = cholesky_lower(&inv, n, layer)?;
    let mut u = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            u[j * n + i] = l[i * n + j];
        }
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_and_upper_factor_reconstruct() {
        // A = B Bᵀ + I for a fixed B: symmetric positive definite.
        let n = 5;
        let b: Vec<f64> = (0..n * n)
            .map(|k| ((k * 7 % 11) as f64 - 5.0) / 3.0)
            .collect();
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (0..n).map(|k| b[i * n + k] * b[j * n + k]).sum::<f64>()
                    + if i == j { 1.0 } else { 0.0 };
            }
        }
        let inv = spd_inverse(&a, n, "t").expect("spd");
        for i in 0..n {
            for j in 0..n {
                let p: f64 = (0..n).map(|k| a[i * n + k] * inv[k * n + j]).sum();
                assert!((p - if i == j { 1.0 } else { 0.0 }).abs() < 1e-9);
            }
        }
        let u = inverse_cholesky_upper(&a, n, "t").expect("spd");
        for i in 0..n {
            for j in 0..n {
                let p: f64 = (0..n).map(|k| u[k * n + i] * u[k * n + j]).sum();
                assert!((p - inv[i * n + j]).abs() < 1e-9);
                if j < i {
                    assert_eq!(u[i * n + j], 0.0);
                }
            }
        }
        let not_pd = vec![1.0, 2.0, 2.0, 1.0];
        assert!(matches!(
            cholesky_lower(&not_pd, 2, "layer.x"),
            Err(QuantError::NotPositiveDefinite { column: 1, .. })
        ));
    }
}
