//! A float32 square-matmul benchmark through mlx-rs: the figure that tells a
//! fast BLAS (OpenBLAS, Accelerate, a GPU) from the reference one.

use std::time::{Duration, Instant};

use anyhow::Context;
use mlx_rs::Array;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MatmulBench {
    pub size: i32,
    pub iterations: u32,
    /// The fastest single matmul, which is the least disturbed by other load.
    pub best: Duration,
    pub gflops: f64,
}

/// Multiplies two `size`×`size` float32 matrices repeatedly (after one warm-up)
/// until `budget` has passed or `max_iterations` ran, and reports the best.
pub fn bench_matmul(size: i32, budget: Duration, max_iterations: u32) -> anyhow::Result<MatmulBench> {
    anyhow::ensure!(size > 0 && max_iterations > 0, "matmul benchmark needs a positive size and iteration count");
    let elements = (size as usize) * (size as usize);
    // Deterministic, well-scaled values; the content does not change the speed.
    let a_data: Vec<f32> = (0..elements).map(|i| ((i % 97) as f32 - 48.0) / 97.0).collect();
    let b_data: Vec<f32> = (0..elements).map(|i| ((i % 89) as f32 - 44.0) / 89.0).collect();
    let a = Array::from_slice(&a_data, &[size, size]);
    let b = Array::from_slice(&b_data, &[size, size]);
    mlx_rs::transforms::eval([&a, &b]).context("evaluating the benchmark inputs")?;

    let run = || -> anyhow::Result<Duration> {
        let start = Instant::now();
        let product = a.matmul(&b).context("matmul")?;
        product.eval().context("evaluating matmul")?;
        Ok(start.elapsed())
    };
    run()?; // warm-up: thread pools, page faults
    let started = Instant::now();
    let mut best = Duration::MAX;
    let mut iterations = 0;
    while iterations < max_iterations && (iterations == 0 || started.elapsed() < budget) {
        best = best.min(run()?);
        iterations += 1;
    }
    let flops = 2.0 * f64::from(size).powi(3);
    Ok(MatmulBench {
        size,
        iterations,
        best,
        gflops: flops / best.as_secs_f64() / 1e9,
    })
}
