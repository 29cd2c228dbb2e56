//! The dense linear algebra GPTQ needs, on matrices of at most a few thousand rows: Cholesky
//! factors in f64 (the inverse Hessian is badly conditioned enough that f32 loses columns).

use rayon::prelude::*;

/// `a` (`n x n`, row-major, symmetric positive definite) overwritten by its lower Cholesky
/// factor `L` with `a = L L^T` (the upper triangle is left as it was). On failure, the index of
/// the first pivot that was not positive.
pub fn cholesky_lower_in_place(a: &mut [f64], n: usize) -> Result<(), usize> {
    assert_eq!(a.len(), n * n);
    for i in 0..n {
        // Row i needs rows 0..i, which are final: split so that both can be borrowed.
        let (done, rest) = a.split_at_mut(i * n);
        let row_i = &mut rest[..n];
        for j in 0..=i {
            let row_j: &[f64] = if j == i {
                &row_i[..]
            } else {
                &done[j * n..j * n + n]
            };
            let dot: f64 = row_i[..j].iter().zip(&row_j[..j]).map(|(x, y)| x * y).sum();
            let value = row_i[j] - dot;
            if j == i {
                if value <= 0.0 || !value.is_finite() {
                    return Err(i);
                }
                row_i[i] = value.sqrt();
            } else {
                row_i[j] = value / done[j * n + j];
            }
        }
    }
    Ok(())
}

/// The inverse of a lower triangular `l` (`n x n`, row-major; the upper triangle is ignored),
/// lower triangular itself.
pub fn invert_lower(l: &[f64], n: usize) -> Vec<f64> {
    // Column j of the inverse solves L x = e_j by forward substitution; columns are independent.
    let columns: Vec<Vec<f64>> = (0..n)
        .into_par_iter()
        .map(|j| {
            let mut x = vec![0f64; n];
            x[j] = 1.0 / l[j * n + j];
            for i in j + 1..n {
                let row = &l[i * n..i * n + n];
                let dot: f64 = row[j..i].iter().zip(&x[j..i]).map(|(a, b)| a * b).sum();
                x[i] = -dot / row[i];
            }
            x
        })
        .collect();
    let mut inverse = vec![0f64; n * n];
    for (j, column) in columns.iter().enumerate() {
        for i in j..n {
            inverse[i * n + j] = column[i];
        }
    }
    inverse
}

/// The upper triangular `U` with `U^T U = H^-1`, for `h` symmetric positive definite: the
/// factor GPTQ's column-by-column updates read (row `i` of `U`, from the diagonal on, is how
/// the error of column `i` spreads to the columns after it).
///
/// With `J` the order-reversing permutation, `J H J = L L^T` gives `H = R R^T` with
/// `R = J L J` upper triangular, so `H^-1 = R^-T R^-1` and `U = R^-1 = J L^-1 J`: one Cholesky
/// and one triangular inverse, instead of a Cholesky, a full inverse and a second Cholesky.
pub fn inverse_upper_cholesky(h: &[f64], n: usize) -> Result<Vec<f64>, usize> {
    let reversed_index = |i: usize| n - 1 - i;
    let mut reversed = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            reversed[i * n + j] = h[reversed_index(i) * n + reversed_index(j)];
        }
    }
    cholesky_lower_in_place(&mut reversed, n).map_err(reversed_index)?;
    let inverse = invert_lower(&reversed, n);
    let mut upper = vec![0f64; n * n];
    for i in 0..n {
        for j in i..n {
            upper[i * n + j] = inverse[reversed_index(i) * n + reversed_index(j)];
        }
    }
    Ok(upper)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spd(n: usize) -> Vec<f64> {
        // A^T A + n I for a fixed pseudo-random A.
        let a: Vec<f64> = (0..n * n)
            .map(|i| ((i * 7919 % 101) as f64 - 50.0) / 50.0)
            .collect();
        let mut h = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                h[i * n + j] = (0..n).map(|k| a[k * n + i] * a[k * n + j]).sum::<f64>();
            }
            h[i * n + i] += n as f64;
        }
        h
    }

    #[test]
    fn inverse_upper_factor_times_h_is_identity() {
        let n = 17;
        let h = spd(n);
        let u = inverse_upper_cholesky(&h, n).unwrap();
        for i in 0..n {
            for j in 0..i {
                assert_eq!(u[i * n + j], 0.0, "U is upper triangular");
            }
        }
        // (U^T U) H = I
        for i in 0..n {
            for j in 0..n {
                let value: f64 = (0..n)
                    .map(|k| {
                        let hinv_ik: f64 = (0..n).map(|m| u[m * n + i] * u[m * n + k]).sum();
                        hinv_ik * h[k * n + j]
                    })
                    .sum();
                let expected = if i == j { 1.0 } else { 0.0 };
                assert!((value - expected).abs() < 1e-9, "({i},{j}) = {value}");
            }
        }
    }

    #[test]
    fn not_positive_definite_names_the_pivot() {
        let h = vec![1.0, 2.0, 2.0, 1.0];
        assert_eq!(cholesky_lower_in_place(&mut h.clone(), 2), Err(1));
    }
}
