//! A matmul through mlx-rs (and the BLAS it is linked with) checked against a
//! naive triple loop. Odd sizes exercise the BLAS kernels' edge handling.

use mlx_rs::Array;

/// Deterministic pseudo-random values in [-1, 1) (xorshift), so the test needs
/// no RNG crate and always sees the same numbers.
fn values(count: usize, mut state: u64) -> Vec<f32> {
    (0..count)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn naive_matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|p| f64::from(a[i * k + p]) * f64::from(b[p * n + j])).sum();
        }
    }
    out
}

fn check(m: usize, k: usize, n: usize) {
    let a = values(m * k, 0x9E37_79B9_7F4A_7C15 ^ m as u64);
    let b = values(k * n, 0xD1B5_4A32_D192_ED03 ^ n as u64);
    let product = Array::from_slice(&a, &[m as i32, k as i32])
        .matmul(Array::from_slice(&b, &[k as i32, n as i32]))
        .expect("matmul");
    product.eval().expect("eval");
    assert_eq!(product.shape(), &[m as i32, n as i32]);
    let got: &[f32] = product.as_slice();
    let want = naive_matmul(&a, &b, m, k, n);
    // float32 accumulation over k terms of magnitude <= 1.
    let tolerance = 1e-5 * k as f64;
    let mut worst = 0.0f64;
    for (g, w) in got.iter().zip(&want) {
        worst = worst.max((f64::from(*g) - w).abs());
    }
    assert!(worst <= tolerance, "{m}x{k}x{n}: max abs error {worst} > {tolerance}");
    // The product must not be trivially zero: a broken BLAS binding could
    // return a zeroed buffer that passes a loose check on tiny inputs.
    assert!(want.iter().any(|w| w.abs() > 1e-3), "{m}x{k}x{n}: degenerate reference");
}

#[test]
fn matmul_matches_naive_reference() {
    check(1, 1, 1);
    check(7, 5, 3);
    check(64, 48, 32);
    check(257, 129, 67);
}

#[test]
fn batched_matmul_matches_per_matrix_reference() {
    let (batch, m, k, n) = (3usize, 17usize, 9usize, 11usize);
    let a = values(batch * m * k, 42);
    let b = values(batch * k * n, 7);
    let product = Array::from_slice(&a, &[batch as i32, m as i32, k as i32])
        .matmul(Array::from_slice(&b, &[batch as i32, k as i32, n as i32]))
        .expect("matmul");
    product.eval().expect("eval");
    let got: &[f32] = product.as_slice();
    for i in 0..batch {
        let want = naive_matmul(&a[i * m * k..(i + 1) * m * k], &b[i * k * n..(i + 1) * k * n], m, k, n);
        for (g, w) in got[i * m * n..(i + 1) * m * n].iter().zip(&want) {
            assert!((f64::from(*g) - w).abs() < 1e-4, "batch {i}: {g} vs {w}");
        }
    }
}
