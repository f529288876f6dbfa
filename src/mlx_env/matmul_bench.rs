//! A square-matmul benchmark through mlx-rs: the figure that tells a fast
//! BLAS (OpenBLAS, Accelerate, a GPU) from the reference one, and the
//! compute limit `bench train` measures its steps against.

use std::time::{Duration, Instant};

use anyhow::Context;
use mlx_rs::{Array, Dtype};

use super::Backend;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MatmulBench {
    pub size: i32,
    pub iterations: u32,
    /// The fastest single matmul, which is the least disturbed by other load.
    pub best: Duration,
    pub gflops: f64,
}

/// The matmul side `matmul_limit` uses on `backend`: 1024 keeps a CPU
/// busy for a while; a GPU needs 8192 before launch costs vanish.
fn matmul_size(backend: Backend) -> i32 {
    if backend == Backend::Cpu { 1024 } else { 8192 }
}

/// The device's matmul rate at `dtype`, for the backend MLX computes on:
/// best of up to 20 products within 2 s.
pub fn matmul_limit(dtype: Dtype) -> anyhow::Result<MatmulBench> {
    bench_matmul(matmul_size(super::backend()), dtype, Duration::from_secs(2), 20)
}

/// Multiplies two `size`×`size` matrices of `dtype` repeatedly (after one
/// warm-up) until `budget` has passed or `max_iterations` ran, and reports
/// the best.
fn bench_matmul(size: i32, dtype: Dtype, budget: Duration, max_iterations: u32) -> anyhow::Result<MatmulBench> {
    anyhow::ensure!(size > 0 && max_iterations > 0, "matmul benchmark needs a positive size and iteration count");
    // Well-scaled values made where the product runs; the content does not
    // change the speed.
    let operand = |seed: u64| -> anyhow::Result<Array> {
        let key = mlx_rs::random::key(seed)?;
        Ok(mlx_rs::random::uniform::<_, f32>(-1.0, 1.0, &[size, size], &key)?.as_dtype(dtype)?)
    };
    let (a, b) = (operand(1).context("benchmark input")?, operand(2).context("benchmark input")?);
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
