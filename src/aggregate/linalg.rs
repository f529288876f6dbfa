//! The little dense linear algebra exact averaging needs, in f64 with a
//! fixed order of operations (so every platform gets the same bits).

/// A row-major matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Matrix {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    pub fn at(&self, r: usize, c: usize) -> f64 {
        self.data[r * self.cols + c]
    }

    pub fn set(&mut self, r: usize, c: usize, v: f64) {
        self.data[r * self.cols + c] = v;
    }

    pub fn transpose(&self) -> Self {
        let mut t = Self::zeros(self.cols, self.rows);
        for r in 0..self.rows {
            for c in 0..self.cols {
                t.set(c, r, self.at(r, c));
            }
        }
        t
    }

    pub fn matmul(&self, other: &Self) -> Self {
        assert_eq!(self.cols, other.rows, "matmul of incompatible shapes");
        let mut out = Self::zeros(self.rows, other.cols);
        for r in 0..self.rows {
            for k in 0..self.cols {
                let a = self.at(r, k);
                if a == 0.0 {
                    continue;
                }
                let row = &other.data[k * other.cols..(k + 1) * other.cols];
                let target = &mut out.data[r * other.cols..(r + 1) * other.cols];
                for (t, b) in target.iter_mut().zip(row) {
                    *t += a * b;
                }
            }
        }
        out
    }

    fn column(&self, c: usize) -> Vec<f64> {
        (0..self.rows).map(|r| self.at(r, c)).collect()
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Thin QR of a (rows × k) matrix by modified Gram-Schmidt, orthogonalized
/// twice for stability, compacted to the numerical rank: Q is
/// (rows × rank) with orthonormal columns and R is (rank × k), Q·R = A.
pub fn qr(a: &Matrix) -> (Matrix, Matrix) {
    let k = a.cols;
    let mut q_cols: Vec<Vec<f64>> = Vec::with_capacity(k);
    // R by rows, one row per kept column of Q.
    let mut r_rows: Vec<Vec<f64>> = Vec::with_capacity(k);
    let scale = a.data.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(f64::MIN_POSITIVE);
    for j in 0..k {
        let mut v = a.column(j);
        for _pass in 0..2 {
            for (q, r_row) in q_cols.iter().zip(r_rows.iter_mut()) {
                let projection = dot(q, &v);
                r_row[j] += projection;
                for (x, qx) in v.iter_mut().zip(q) {
                    *x -= projection * qx;
                }
            }
        }
        let norm = dot(&v, &v).sqrt();
        // A column that is numerically dependent on earlier ones adds no
        // direction: its residual is dropped and Q·R still equals A.
        if norm > 1e-12 * scale * (a.rows as f64).sqrt() {
            let mut r_row = vec![0.0; k];
            r_row[j] = norm;
            r_rows.push(r_row);
            q_cols.push(v.iter().map(|x| x / norm).collect());
        }
    }
    let rank = q_cols.len();
    let mut q = Matrix::zeros(a.rows, rank);
    for (c, col) in q_cols.iter().enumerate() {
        for (row, value) in col.iter().enumerate() {
            q.set(row, c, *value);
        }
    }
    let r = Matrix {
        rows: rank,
        cols: k,
        data: r_rows.concat(),
    };
    (q, r)
}

/// Eigen-decomposition of a symmetric matrix by cyclic Jacobi rotations:
/// eigenvalues in descending order and the eigenvectors as columns.
pub fn symmetric_eigen(s: &Matrix) -> (Vec<f64>, Matrix) {
    let n = s.rows;
    let mut a = s.clone();
    let mut v = Matrix::zeros(n, n);
    for i in 0..n {
        v.set(i, i, 1.0);
    }
    let total: f64 = a.data.iter().map(|x| x * x).sum();
    // Jacobi converges quadratically; 60 sweeps is far more than needed and
    // bounds the loop.
    for _sweep in 0..60 {
        let off: f64 = (0..n).flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j))).map(|(i, j)| a.at(i, j).powi(2)).sum();
        if off <= 1e-30 * total.max(f64::MIN_POSITIVE) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a.at(p, q);
                if apq == 0.0 {
                    continue;
                }
                let theta = (a.at(q, q) - a.at(p, p)) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s_ = t * c;
                for k in 0..n {
                    let (akp, akq) = (a.at(k, p), a.at(k, q));
                    a.set(k, p, c * akp - s_ * akq);
                    a.set(k, q, s_ * akp + c * akq);
                }
                for k in 0..n {
                    let (apk, aqk) = (a.at(p, k), a.at(q, k));
                    a.set(p, k, c * apk - s_ * aqk);
                    a.set(q, k, s_ * apk + c * aqk);
                }
                for k in 0..n {
                    let (vkp, vkq) = (v.at(k, p), v.at(k, q));
                    v.set(k, p, c * vkp - s_ * vkq);
                    v.set(k, q, s_ * vkp + c * vkq);
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a.at(j, j).total_cmp(&a.at(i, i)).then(i.cmp(&j)));
    let values = order.iter().map(|&i| a.at(i, i)).collect();
    let mut vectors = Matrix::zeros(n, n);
    for (new, &old) in order.iter().enumerate() {
        for k in 0..n {
            vectors.set(k, new, v.at(k, old));
        }
    }
    (values, vectors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &Matrix, b: &Matrix, tol: f64) -> bool {
        a.rows == b.rows && a.cols == b.cols && a.data.iter().zip(&b.data).all(|(x, y)| (x - y).abs() < tol)
    }

    #[test]
    fn qr_reconstructs_including_dependent_columns() {
        let a = Matrix {
            rows: 4,
            cols: 3,
            // The third column is the sum of the first two.
            data: vec![1.0, 2.0, 3.0, 0.0, 1.0, 1.0, 2.0, 0.0, 2.0, 1.0, 1.0, 2.0],
        };
        let (q, r) = qr(&a);
        assert!(close(&q.matmul(&r), &a, 1e-12));
        let qtq = q.transpose().matmul(&q);
        assert!((qtq.at(0, 0) - 1.0).abs() < 1e-12 && qtq.at(0, 1).abs() < 1e-12);
        assert_eq!((q.cols, r.rows), (2, 2), "the dependent column adds no direction");
    }

    #[test]
    fn eigen_of_a_symmetric_matrix() {
        let s = Matrix {
            rows: 3,
            cols: 3,
            data: vec![4.0, 1.0, 0.5, 1.0, 3.0, 0.2, 0.5, 0.2, 1.0],
        };
        let (values, vectors) = symmetric_eigen(&s);
        assert!(values.windows(2).all(|w| w[0] >= w[1]));
        let mut diag = Matrix::zeros(3, 3);
        for (i, v) in values.iter().enumerate() {
            diag.set(i, i, *v);
        }
        let rebuilt = vectors.matmul(&diag).matmul(&vectors.transpose());
        assert!(close(&rebuilt, &s, 1e-10));
    }
}
